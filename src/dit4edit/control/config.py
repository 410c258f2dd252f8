"""What attention control does and when: one frozen dataclass, validated once.

The *what* (source / Prompt-to-Prompt / mutual self-attention, replace / refine / reweight on cross-attention,
local blend) is separate from the *when* (step fractions, block ranges, per-word windows), as in Prompt-to-Prompt
and MasaCtrl. Step fractions are turned into step counts by `steps_before`; block ranges are resolved against the
model by `block_range`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..errors import DiT4EditError
from ..methods import EDIT_MODES

SELF_MODES_EARLY = ("source", "p2p", "target")
MUTUAL_MODES = ("source", "union", "none")
BLEND_NORMALISATIONS = ("max", "minmax")
#: Largest reweight factor. Prompt-to-Prompt uses factors of about 0.1 to 10; a factor multiplies attention
#: probabilities that then multiply values, and beyond this the product leaves float16's range (65504) and, for
#: factors near 1e38, float32's, where it would overflow after the inversion has run.
MAX_REWEIGHT = 1000.0
#: Largest block index, or negative index, a block range may name (the largest models have under 100 blocks).
MAX_BLOCK_INDEX = 1024
#: Largest local-blend dilation radius, in tokens.
MAX_DILATE = 64


def steps_before(fraction: float, num_steps: int) -> int:
    """How many of `num_steps` denoising steps (step 0 = noisiest) fall before `fraction` of the schedule.

    Step `i` is "before" the fraction when `i < steps_before(fraction, num_steps)`; the tiny epsilon keeps
    `0.3 * 10` at 3 despite floating point.
    """
    return min(num_steps, math.floor(fraction * num_steps + 1e-6))


def block_range(layers: tuple[int, int] | None, num_blocks: int, what: str, default: str = "deeper half") -> range:
    """Resolve a `[start, end)` block range against a model with `num_blocks` transformer blocks.

    `None` means the default: `"deeper half"` -> `[num_blocks // 2, num_blocks)`, `"all"` -> `[0, num_blocks)`.
    Negative indices count from the end, like Python slices (`(-4, 28)` = the last four blocks of 28).
    """
    if layers is None:
        return range(num_blocks // 2 if default == "deeper half" else 0, num_blocks)
    start, end = (i + num_blocks if i < 0 else i for i in layers)
    if not 0 <= start < end <= num_blocks:
        raise DiT4EditError(
            f"{what} {layers[0]}:{layers[1]} is outside the model, which has {num_blocks} transformer blocks "
            f"(valid: 0 <= start < end <= {num_blocks})"
        )
    return range(start, end)


def _is_number(value) -> bool:
    """A real number that is not a bool (True is not a fraction, "0.5" is not a number)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, str)) and math.isfinite(float(value))


def _is_integer(value) -> bool:
    """A whole number that is not a bool (2.0 and 2.7 are not counts, True is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fraction(name: str, value: float) -> None:
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise DiT4EditError(f"{name} must be a fraction of the schedule in [0, 1], got {value!r}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):  # "no" and 0 are not flags: a string would be truthy
        raise DiT4EditError(f"{name} must be true or false, got {value!r}")


def _mapping(name: str, value) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k.strip() for k in value):
        raise DiT4EditError(f"{name} must map words to numbers, got {value!r}")
    return dict(value)


def _words(name: str, words) -> tuple[str, ...]:
    if isinstance(words, str):
        words = tuple(words.replace(",", " ").split())
    if not isinstance(words, (list, tuple)):
        raise DiT4EditError(f"{name} must be words (text or a list of text), got {words!r}")
    words = tuple(words)
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise DiT4EditError(f"{name} must be non-empty words, got {words!r}")
    return words


def _layers(name: str, layers) -> tuple[int, int] | None:
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)) or len(layers) != 2 or not all(
            _is_integer(i) and -MAX_BLOCK_INDEX <= i <= MAX_BLOCK_INDEX for i in layers):
        raise DiT4EditError(f"{name} must be a (start, end) pair of block indices, got {layers!r}")
    return int(layers[0]), int(layers[1])


@dataclass(frozen=True)
class AttentionControl:
    """Unified attention control of DiT4Edit (arXiv 2411.03286, Sec. 3.2): Prompt-to-Prompt on cross-attention plus
    source / mutual self-attention on the deeper blocks.

    Arguments that matter:
        self_replace_steps: the switch S, as a fraction of the denoising schedule. In the steps before S the target
            branch takes the source branch's self-attention output (paper Eq. 11, `Attention(Q_src, K_src, V_src)`);
            from S on it runs mutual self-attention `Attention(Q_tgt, K_src, V_src)` (MasaCtrl).
        self_layers: `[start, end)` transformer blocks whose self-attention is controlled. `None` = the deeper half
            of the model (`[num_blocks // 2, num_blocks)`, i.e. 14:28 on PixArt-XL-2), after the paper's observation
            that deep-block queries carry the layout and shallow ones do not. Provisional: to be re-measured on the
            trained model. Negative indices count from the end.
        cross_replace_steps: Prompt-to-Prompt cross-attention edit in the steps before this fraction of the
            schedule; afterwards the target attends with its own map.
        edit_mode: `"replace"` (same word count, each differing word's pieces mapped onto the source word's pieces),
            `"refine"` (aligned target pieces take the source's attention, inserted pieces keep their own) or
            `"auto"` (replace when the prompts have the same word count, else refine). Resolved by `prompts.py`.
        reweight: `{word: factor}` scaling the target prompt's attention to a word (no renormalisation, as
            Prompt-to-Prompt), applied within the cross-attention window.
        local_blend_words: words (looked up in the source and in the target prompt) whose cross-attention defines
            the editable region; outside it the target latent is reset to the source latent. Empty = no local blend
            (a user mask, given to the controller, still applies).

    Arguments to tinker with:
        self_mode_early: before S, `"source"` = Eq. 11 (target gets the source output), `"p2p"` = Prompt-to-Prompt
            self-attention (source map, target values: `SDPA(Q_src, K_src, V_tgt)`), `"target"` = no control before S
            (MasaCtrl's start step).
        mutual: from S on, `"source"` = `SDPA(Q_tgt, K_src, V_src)`; `"union"` = the target attends to
            `[K_src; K_tgt]` with values `[V_src; V_tgt]`; `"none"` = no self-attention control from S on
            (Prompt-to-Prompt's self-attention window: with `self_mode_early="p2p"`, S is its `self_replace_steps`).
        cross_replace_words: `{word: fraction}` per-word cross-attention windows overriding `cross_replace_steps`
            for that target word's pieces (Prompt-to-Prompt's `cross_replace_steps={"default_": .8, "word": .4}`).
        cross_replace_changed: the cross-attention window of the words that differ between the source prompt and
            each target prompt (a per-word window a model's settings can set without naming words); `None` = the
            same as every other word. 0 lets a changed word attend with its own map from the first step: on a
            model whose word maps are not local (a background's colour word attending to the object), taking the
            source word's map puts the new word where the old one attended, not where it belongs.
        local_blend_changed: also blend on the words that differ between the source prompt and each target prompt
            (e.g. "red" and "blue" for "a red circle" -> "a blue circle"): a local blend that needs no word named,
            so a model's settings can turn it on for every edit.
        local_blend_threshold: a latent position is editable where the normalised blend-word map exceeds this.
        local_blend_normalize: how a blend-word map is normalised before the threshold: `"max"` divides by its peak
            (Prompt-to-Prompt); `"minmax"` maps its minimum to 0 and its peak to 1, for models whose word maps sit
            on a high floor (a small T5 without a start token spreads a word's attention over the whole picture, and
            the max-normalised map then exceeds any threshold everywhere).
        local_blend_start: fraction of the schedule before which no blending happens (maps are still recorded).
        local_blend_layers: `[start, end)` blocks whose cross-attention maps are averaged for the mask; `None` = all.
        local_blend_dilate: radius of the max-pool that dilates the map on the token grid before thresholding
            (0 = none).
        enabled: `False` turns every control off (the processors then compute exactly the default attention).
    """

    self_replace_steps: float = 0.4
    self_layers: tuple[int, int] | None = None
    cross_replace_steps: float = 0.8
    edit_mode: str = "auto"
    reweight: Mapping[str, float] = field(default_factory=dict)
    local_blend_words: tuple[str, ...] = ()
    self_mode_early: str = "source"
    mutual: str = "source"
    cross_replace_words: Mapping[str, float] = field(default_factory=dict)
    cross_replace_changed: float | None = None
    local_blend_changed: bool = False
    local_blend_threshold: float = 0.3
    local_blend_normalize: str = "max"
    local_blend_start: float = 0.2
    local_blend_layers: tuple[int, int] | None = None
    local_blend_dilate: int = 1
    enabled: bool = True

    def __post_init__(self):
        _fraction("self_replace_steps", self.self_replace_steps)
        _fraction("cross_replace_steps", self.cross_replace_steps)
        _fraction("local_blend_start", self.local_blend_start)
        if self.cross_replace_changed is not None:
            _fraction("cross_replace_changed", self.cross_replace_changed)
        for word, fraction in _mapping("cross_replace_words", self.cross_replace_words).items():
            _fraction(f"cross_replace_words[{word!r}]", fraction)
        for name, value, allowed in (
            ("self_mode_early", self.self_mode_early, SELF_MODES_EARLY),
            ("mutual", self.mutual, MUTUAL_MODES),
            ("edit_mode", self.edit_mode, EDIT_MODES),
            ("local_blend_normalize", self.local_blend_normalize, BLEND_NORMALISATIONS),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise DiT4EditError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for word, factor in _mapping("reweight", self.reweight).items():
            if not _is_number(factor):
                raise DiT4EditError(f"reweight factor for {word!r} must be a finite number, got {factor!r}")
            if not 0 < factor <= MAX_REWEIGHT:
                raise DiT4EditError(f"reweight factor for {word!r} must be > 0 and <= {MAX_REWEIGHT:g}, got "
                                    f"{factor:g}")
        if not (_is_number(self.local_blend_threshold) and 0.0 < self.local_blend_threshold <= 1.0):
            raise DiT4EditError(f"local_blend_threshold must be in (0, 1], got {self.local_blend_threshold!r}")
        _flag("local_blend_changed", self.local_blend_changed)
        _flag("enabled", self.enabled)
        if not (_is_integer(self.local_blend_dilate) and 0 <= self.local_blend_dilate <= MAX_DILATE):
            raise DiT4EditError(f"local_blend_dilate must be an integer from 0 to {MAX_DILATE}, got "
                                f"{self.local_blend_dilate!r}")
        # Freeze the mappings too, and normalise sequences coming from a CLI or JSON.
        object.__setattr__(self, "reweight", MappingProxyType({k: float(v) for k, v in self.reweight.items()}))
        object.__setattr__(self, "cross_replace_words", MappingProxyType(dict(self.cross_replace_words)))
        object.__setattr__(self, "local_blend_words", _words("local_blend_words", self.local_blend_words))
        object.__setattr__(self, "self_layers", _layers("self_layers", self.self_layers))
        object.__setattr__(self, "local_blend_layers", _layers("local_blend_layers", self.local_blend_layers))

    def self_blocks(self, num_blocks: int) -> range:
        """The controlled self-attention blocks on a model with `num_blocks` blocks (raises if out of range)."""
        return block_range(self.self_layers, num_blocks, "self_layers")

    def blend_blocks(self, num_blocks: int) -> range:
        """The blocks whose cross-attention maps feed the local-blend mask."""
        return block_range(self.local_blend_layers, num_blocks, "local_blend_layers", default="all")
