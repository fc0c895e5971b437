"""The LLaVA model library: vision tower wrapper, projectors, the Llama-based model, loading.

Importing this package registers `drip_llava_llama` with AutoConfig / AutoModelForCausalLM.
"""
from drip_llava.model.builder import LoadedModel, detect_checkpoint_kind, load_pretrained_model
from drip_llava.model.llava_llama import DripLlavaConfig, DripLlavaForCausalLM
from drip_llava.model.projector import (
                                        PROJECTOR_FILE,
                                        build_projector,
                                        list_projectors,
                                        load_projector_weights,
                                        register_projector,
                                        save_projector,
)
from drip_llava.model.vision_tower import DripVisionTower, build_vision_tower

__all__ = [
    "DripLlavaConfig", "DripLlavaForCausalLM", "DripVisionTower", "LoadedModel", "PROJECTOR_FILE",
    "build_projector", "build_vision_tower", "detect_checkpoint_kind", "list_projectors",
    "load_pretrained_model", "load_projector_weights",
    "register_projector", "save_projector",
]
