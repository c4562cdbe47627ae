"""calm_fast.metrics."""
