"""WSOL models: backbones (ResNet50, VGG16, InceptionV3 WSOL variants, small CPU nets) and the CALM/CAM heads."""

from calm_fast.models.backbones import BACKBONES, Backbone, build_backbone, load_pretrained
from calm_fast.models.wsol import WSOLModel, build_model

__all__ = ["BACKBONES", "Backbone", "WSOLModel", "build_backbone", "build_model", "load_pretrained"]
