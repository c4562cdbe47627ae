"""calm_fast.models."""
