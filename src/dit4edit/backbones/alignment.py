"""Prompt-to-Prompt token alignment over a model's whole text sequence (every segment: SD3's CLIP and T5 parts,
the T5-only families'), from two prompts' token -> word maps (`PromptTokens`).

Same rules as `dit4edit.prompts.align` for T5 alone: replace pairs word i with word i (same word count), refine
pairs the identical words of a global word alignment; a word pair with equal piece counts maps piece to piece,
otherwise every target piece takes the mean of the source word's pieces. Positions that hold no word (BOS, EOS,
padding) map in order within their segment, so `</s>` meets `</s>` and CLIP's BOS meets BOS. The mapper acts on
probabilities along the key axis: `P_target ~ P_source @ mapper`, rows source positions, columns target positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import word_key
from ..errors import DiT4EditError
from ..prompts import _align_words
from .base import PromptTokens


@dataclass(frozen=True, eq=False)
class SequenceAlignment:
    mode: str  # "replace" or "refine"
    mapper: torch.Tensor  # (L, L) float32
    from_source: torch.Tensor  # (L,) 1 where the target position takes the source's column


def align_tokens(source: PromptTokens, target: PromptTokens, mode: str = "auto") -> SequenceAlignment:
    """The alignment of `target`'s text positions to `source`'s (`mode`: "replace", "refine" or "auto": replace
    when the word counts are equal)."""
    if [(s.encoder, s.start, s.stop) for s in source.segments] != [(s.encoder, s.start, s.stop)
                                                                    for s in target.segments]:
        raise DiT4EditError("the two prompts' token maps come from different text sequences")
    src_keys, tgt_keys = tuple(map(word_key, source.words)), tuple(map(word_key, target.words))
    if mode == "auto":
        mode = "replace" if len(src_keys) == len(tgt_keys) else "refine"
    if mode == "replace":
        if len(src_keys) != len(tgt_keys):
            raise DiT4EditError(f"replace needs the same number of words in both prompts: source has "
                                f"{len(src_keys)}, target has {len(tgt_keys)}; use refine")
        pairs = [(i, i) for i in range(len(tgt_keys))]
    elif mode == "refine":
        pairs = _align_words(src_keys, tgt_keys)
    else:
        raise DiT4EditError(f"alignment mode must be replace, refine or auto, got {mode!r}")
    length = len(source.word_of_token)
    mapper = torch.zeros(length, length)  # (L_source, L_target)
    for segment in source.segments:
        span = range(segment.start, segment.stop)
        for s, t in pairs:
            rows = [p for p in span if source.word_of_token[p] == s]
            cols = [p for p in span if target.word_of_token[p] == t]
            if not rows or not cols:
                continue
            if len(rows) == len(cols):
                mapper[rows, cols] = 1.0
            else:
                for c in cols:
                    mapper[rows, c] = 1.0 / len(rows)
        free_rows = [p for p in span if source.word_of_token[p] is None]
        free_cols = [p for p in span if target.word_of_token[p] is None]
        for r, c in zip(free_rows, free_cols):  # BOS, EOS and padding, in order
            mapper[r, c] = 1.0
    return SequenceAlignment(mode, mapper, (mapper.sum(dim=0) > 0).float())
