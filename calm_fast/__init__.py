"""calm-fast: CALM (class activation latent mapping) with exact WSOL evaluation."""

__version__ = "0.1.0"
