"""Evaluation of WSOL maps: map sources (`maps`, `baselines`), scoring and the cross-rank sum
(`scoring`), the per-rank job (`job`), the numbers-only headline (`headline`), the report files
(`reports`), `calm-fast eval` (`cli`) and the attribution benchmarks (`attribution`)."""
