"""vcmamba_jax: VCMamba in JAX/Flax (linen)."""

from vcmamba_jax.models import create_model, list_models

__version__ = "0.1.0"


def __getattr__(name):
    # The converters pull in optional readers (torch, safetensors): import them lazily.
    if name in ("load_pytorch_weights", "to_pytorch_state_dict", "load_pretrained",
                "save_pretrained"):
        from vcmamba_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'vcmamba_jax' has no attribute {name!r}")


__all__ = ["create_model", "list_models", "load_pytorch_weights", "to_pytorch_state_dict",
           "load_pretrained", "save_pretrained", "__version__"]
