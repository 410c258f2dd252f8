"""Cross-attention localisation loss: teach each caption word to attend where its thing is in the picture.

Real text-to-image models attend locally (a word's cross-attention map covers its object), which is what Prompt-to-
Prompt's word swap and local blend rely on. A small model trained on the diffusion loss alone need not: the
embedded model's background colour word attends to the objects. The synthetic world knows where every word's thing
is, so training can ask for it (the layout losses of Chen et al. 2023 and BoxDiff, used here as a training term):

    loss = mean over supervised tokens, heads and blocks of  -log( sum_n p_j(n) m_j(n) )

where p_j is token j's cross-attention map over the image tokens (its column of the attention probabilities,
normalised to sum to 1 over the image) and m_j the share of each image token covered by the word's region: an
object's words (size, colour, pattern, shape) -> that object, the background's colour word and "background" -> the
background; "a", "and", "on", `</s>` and padding are not supervised.
"""

from __future__ import annotations

import numpy as np
import torch

from dit4edit.prompts import tokenize as tokenize_prompt

BACKGROUND = 0  # region index of the background; objects are 1..K in caption order
UNSUPERVISED = -1
FUNCTION_WORDS = ("a", "and", "on")


def word_regions(caption: str) -> list[int]:
    """Region index of each whitespace-split word of a caption in the world's grammar (`a {size} {colour} {pattern}
    {shape} [and a ...] on a {background} background`): objects 1..K in caption order, the background 0, function
    words -1."""
    regions, obj, in_background = [], 1, False
    for word in caption.split():
        if word == "on":
            in_background = True
        if word in FUNCTION_WORDS:
            regions.append(UNSUPERVISED)
            if word == "and" and not in_background:
                obj += 1
        else:
            regions.append(BACKGROUND if in_background else obj)
    return regions


def token_regions(tokenizer, caption: str, length: int) -> np.ndarray:
    """(length,) int64: the region of each T5 token of `caption` (its word's region; -1 for function words, `</s>`
    and padding)."""
    tokens = tokenize_prompt(tokenizer, caption, max_length=length)
    regions = word_regions(" ".join(tokens.words))
    return np.array([UNSUPERVISED if w is None else regions[w] for w in tokens.word_of_token], dtype=np.int64)


def region_maps(alphas: np.ndarray, height: int, width: int, cell: int, max_objects: int) -> np.ndarray:
    """(1 + max_objects, height / cell, width / cell) float32: the share of each token cell (`cell` px square) that
    the background (index 0) and each object (1..K, zero beyond the scene's objects) cover."""
    h, w = height // cell, width // cell
    out = np.zeros((1 + max_objects, h, w), dtype=np.float32)
    if len(alphas):
        cover = alphas.reshape(len(alphas), h, cell, w, cell).mean(axis=(2, 4))
        out[1 : 1 + len(alphas)] = cover
        out[BACKGROUND] = (1.0 - alphas.max(axis=0)).reshape(h, cell, w, cell).mean(axis=(1, 3))
    else:
        out[BACKGROUND] = 1.0
    return out


def localisation_loss(probs: list[torch.Tensor], regions: torch.Tensor, maps: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """The loss above, averaged over the recorded blocks.

    probs: per block `(B, heads, N, L)` cross-attention probabilities (image tokens N attend over text tokens L).
    regions: `(B, L)` int64 region of each text token (-1 = not supervised; a dropped caption is all -1).
    maps: `(B, R, N)` coverage of each region on the image tokens.
    """
    if not probs:
        return torch.zeros(())
    valid = regions >= 0  # (B, L)
    if not valid.any():  # every caption dropped: zero, still on the graph
        return probs[0].sum() * 0.0
    index = regions.clamp(min=0)[:, :, None].expand(-1, -1, maps.shape[-1])  # (B, L, N)
    target = torch.gather(maps, 1, index)  # (B, L, N): each token's region
    total = 0.0
    for p in probs:
        column = p.float().permute(0, 1, 3, 2)  # (B, heads, L, N)
        column = column / (column.sum(-1, keepdim=True) + eps)
        inside = (column * target[:, None]).sum(-1)  # (B, heads, L)
        nll = -torch.log(inside + eps) * valid[:, None]
        total = total + nll.sum() / (valid.sum() * p.shape[1])
    return total / len(probs)


class RecordingCrossAttention:
    """diffusers' attention for PixArt's cross-attention (`attn2`), with explicit probabilities kept in `store` (with
    their graph) so the loss above can train through them. Same result as the default processor."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        d = key.shape[-1] // heads
        query, key, value = (x.view(batch, -1, heads, d).transpose(1, 2) for x in (query, key, value))
        scores = query @ key.transpose(-1, -2) * attn.scale  # (B, heads, N, L)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1])
        probs = scores.softmax(-1)
        self.store.append(probs)
        out = (probs @ value).transpose(1, 2).reshape(batch, n, heads * d).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def install_recording(transformer) -> list:
    """Put `RecordingCrossAttention` on every block's cross-attention; returns the list it fills (clear it per
    step)."""
    store: list = []
    for block in transformer.transformer_blocks:
        block.attn2.set_processor(RecordingCrossAttention(store))
    return store


def attention_targets(scenes, tokenizer, cell: int, length: int) -> dict:
    """{(width, height): (maps (n, R, N) float32, regions (n, length) int64)} for training scenes grouped by size in
    their order (as `train_dit.encode_latents` groups them). N = image tokens of a `cell`-px token grid."""
    max_objects = max((len(s.alphas) for s in scenes), default=0)
    by_size: dict = {}
    for s in scenes:
        maps = region_maps(s.alphas, s.height, s.width, cell, max_objects).reshape(1 + max_objects, -1)
        entry = by_size.setdefault((s.width, s.height), ([], []))
        entry[0].append(torch.from_numpy(maps))
        entry[1].append(torch.from_numpy(token_regions(tokenizer, s.caption, length)))
    return {size: (torch.stack(m), torch.stack(r)) for size, (m, r) in by_size.items()}
