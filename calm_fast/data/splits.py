"""A split of the configured dataset, read from the `[data]` section of a config: the metadata root,
the image root configured for the split of that name (else DATA.md's default), the mask root and the
number of classes. Training, validation and `calm-fast eval` read their splits through it.
"""

from __future__ import annotations

from pathlib import Path

from calm_fast.config import Config, ConfigError
from calm_fast.data.metadata import (
    WSOLSplit,
    declared_num_classes,
    default_image_root,
    default_metadata_root,
    read_split,
)


def read_configured_split(cfg: Config, split_name: str, num_classes: int | None = None) -> WSOLSplit:
    """Read `split_name` of the configured dataset as a WSOLSplit, its labels bounded by `num_classes`,
    default data.num_classes, else the count the dataset declares (synthetic sets); never the largest label
    + 1, which would turn a typo in class_labels.txt into a bigger model. The image root is the one
    configured for the split of that name (data.train_split / val_split / test_split), else DATA.md's default."""
    data = cfg.data
    metadata_root = data.metadata_root or default_metadata_root(data.root)
    num_classes = num_classes or data.num_classes or declared_num_classes(metadata_root, data.dataset)
    if num_classes is None and (Path(metadata_root) / data.dataset / split_name).is_dir():  # else: not found
        raise ConfigError(f"data.num_classes is not set and {data.dataset!r} declares no class count: set "
                          "data.num_classes to the dataset's number of classes (CUB 200, ILSVRC 1000, "
                          "OpenImages 100)")
    image_root = {data.test_split: data.test_image_root, data.val_split: data.val_image_root,
                  data.train_split: data.train_image_root}.get(split_name)
    image_root = image_root or default_image_root(data.root, data.dataset, split_name)
    return read_split(metadata_root, data.dataset, split_name, image_root, mask_root=data.mask_root,
                      num_classes=num_classes)
