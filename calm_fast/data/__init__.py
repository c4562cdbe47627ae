"""calm_fast.data."""
