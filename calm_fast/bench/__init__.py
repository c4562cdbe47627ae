"""calm-fast bench: throughput of each part against a baseline measured in the same run."""
