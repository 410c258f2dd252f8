"""What an edit returns (its own module: the pipeline, the request path and the editing methods all build one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EditResult:
    images: list  # PIL images, one per target prompt, at the input's original size
    reconstruction: Any  # the source branch decoded, a PIL image: what the edit keeps
    latents: Any  # (1 + targets, C, h, w) final latents, source first (a torch tensor)
    controller: Any = None  # the AttentionController holding the recorded attention maps, when any
