"""WSOL data: metadata, the synthetic dataset, splits from the config, image decoding, sampling, the torch
and FFCV loaders, FFCV conversion, and `loaders`, the one place that picks FFCV or torch for a split."""
