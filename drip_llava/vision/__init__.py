"""The DRIP vision encoder: one definition used by CLIP, classification, LLaVA, FLOPs and visualisation."""
from .config import DripVisionConfig, get_preset_config, list_presets
from .model import DripVisionModel, DripVisionOutput

__all__ = ["DripVisionConfig", "DripVisionModel", "DripVisionOutput", "get_preset_config", "list_presets"]
