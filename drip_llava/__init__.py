"""drip-llava: a LLaVA-style assistant whose vision tower is DRIP (dynamic token pooling ViT)."""

__all__ = ["load_pretrained_model"]


def __getattr__(name):  # lazy: `import drip_llava.vision` should not pull in the LLM stack
    if name == "load_pretrained_model":
        from .model.builder import load_pretrained_model

        return load_pretrained_model
    raise AttributeError(f"module 'drip_llava' has no attribute {name!r}")
