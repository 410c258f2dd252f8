"""Model families behind one seam (`Backbone`): PixArt-alpha/Sigma, Stable Diffusion 3 / 3.5, FLUX.1.

`family_of(index)` names the family of a parsed `model_index.json`; `backbone_for(pipe)` wraps a loaded diffusers
pipeline of any family. Each family's module is the only place that knows its network.
"""

from __future__ import annotations

from ..errors import DiT4EditError
from .base import (ROLES, AttentionLayer, Backbone, FolderSpec, PromptTokens, TextInputs, TextSegment, TokenGrid,
                   read_index)
from .flux import FluxBackbone
from .pixart import PixArtBackbone
from .sd3 import SD3Backbone

#: Every backbone, by family name.
BACKBONES: dict[str, type[Backbone]] = {b.family: b for b in (PixArtBackbone, SD3Backbone, FluxBackbone)}


def family_of(index: dict) -> str:
    """The family of a pipeline from its `model_index.json` `_class_name`; a one-line error for any other."""
    pipeline = index.get("_class_name")
    for family, backbone in BACKBONES.items():
        if pipeline in backbone.folder.pipelines:
            return family
    known = ", ".join(p for b in BACKBONES.values() for p in b.folder.pipelines)
    raise DiT4EditError(f"a {pipeline} cannot be edited: dit4edit runs {known}")


def backbone_for(pipe, max_sequence_length: int | None = None) -> Backbone:
    """The backbone of a loaded pipeline (its class name, or the `_class_name` it was saved as)."""
    name = type(pipe).__name__
    if not any(name in b.folder.pipelines for b in BACKBONES.values()):
        name = dict(getattr(pipe, "config", {})).get("_class_name", name)
    return BACKBONES[family_of({"_class_name": name})](pipe, max_sequence_length)


__all__ = ["BACKBONES", "ROLES", "AttentionLayer", "Backbone", "FolderSpec", "PromptTokens", "TextInputs",
           "TextSegment", "TokenGrid", "backbone_for", "family_of", "read_index"]
