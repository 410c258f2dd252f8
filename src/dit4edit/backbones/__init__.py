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
    """The backbone of a loaded pipeline: by its class (a family's diffusers pipeline), else by its transformer's
    class (any other pipeline around a family's components)."""
    name = type(pipe).__name__
    for backbone in BACKBONES.values():
        if name in backbone.folder.pipelines:
            return backbone(pipe, max_sequence_length)
    transformer = type(getattr(pipe, "transformer", None)).__name__
    for backbone in BACKBONES.values():
        if transformer in backbone.folder.components["transformer"]:
            return backbone(pipe, max_sequence_length)
    raise DiT4EditError(f"a {name} with a {transformer} cannot be edited: dit4edit runs "
                        f"{', '.join(p for b in BACKBONES.values() for p in b.folder.pipelines)}")


__all__ = ["BACKBONES", "ROLES", "AttentionLayer", "Backbone", "FolderSpec", "PromptTokens", "TextInputs",
           "TextSegment", "TokenGrid", "backbone_for", "family_of", "read_index"]
