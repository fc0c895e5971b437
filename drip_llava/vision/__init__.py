"""The vision encoders: DRIP (and the plain ViT) plus the other token-reduction tower families, one definition
each, used by CLIP, classification, LLaVA, FLOPs and visualisation."""
from .config import DripVisionConfig, create_config, get_preset_config, list_presets
from .families import TowerOutput, create_model, from_pretrained, get_family, list_families, register_family
from .model import DripVisionModel, DripVisionOutput

__all__ = ["DripVisionConfig", "DripVisionModel", "DripVisionOutput", "TowerOutput", "create_config",
           "create_model", "from_pretrained", "get_family", "get_preset_config", "list_families", "list_presets",
           "register_family"]
