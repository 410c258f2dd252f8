"""Unified attention control (DiT4Edit, arXiv 2411.03286, Sec. 3.2) for PixArt-alpha transformers.

- `AttentionControl`: what to control and when (frozen dataclass, validated once).
- `AttentionController`: one edit's runtime state: which edit applies at (step, block), recorded cross-attention
  maps (`word_maps`), local blend (`blend_mask`, `local_blend`).
- `install(transformer, controller)`: context manager putting one `ControlledAttnProcessor` on every attention
  layer and restoring the previous ones in `finally`.
- `edits`: the attention edits as pure SDPA functions, each with the identity it relies on.
"""

from .blend import apply_local_blend, attention_blend_mask
from .config import AttentionControl, steps_before
from .controller import AttentionController, TokenEdit
from .install import install
from .processors import ControlledAttnProcessor

__all__ = [
    "AttentionControl",
    "AttentionController",
    "ControlledAttnProcessor",
    "TokenEdit",
    "apply_local_blend",
    "attention_blend_mask",
    "install",
    "steps_before",
]
