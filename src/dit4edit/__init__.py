"""dit4edit: training-free, text-guided image editing with diffusion transformers (DiT4Edit on PixArt-alpha)."""

__version__ = "0.1.0"

__all__ = ["DiT4EditPipeline", "Inversion", "DiT4EditError"]


def __getattr__(name: str):
    # Import lazily so `import dit4edit.errors` or `dit4edit --help` does not pay for diffusers.
    if name in ("DiT4EditPipeline", "Inversion"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "DiT4EditError":
        from .errors import DiT4EditError

        return DiT4EditError
    raise AttributeError(f"module 'dit4edit' has no attribute {name!r}")
