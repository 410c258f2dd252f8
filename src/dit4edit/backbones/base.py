"""The backbone seam: what the editor needs from one model family, behind one small class per family.

Like k-diffusion's model wrappers, a `Backbone` turns its family's network into the solver's data prediction
`denoised = D(x, i)` at point `i` of a `dit4edit.solvers.Schedule`, so samplers and inverters never learn which
network they run. Beyond that it answers what editing asks of a model:

- the folder: which components it must have and their classes (`FolderSpec`, read from `model_index.json`);
- prompts -> the model's text inputs (`TextInputs`, diffusers' names) with a token -> word map (`PromptTokens`)
  giving, for every position of the model's text sequence, the word of the prompt it holds;
- the schedule the family samples on, with model timesteps as the network expects them;
- the token grid (`TokenGrid`): how latent pixels become image tokens;
- the attention layers by role (`AttentionLayer`): self, cross, joint, single-stream, named by processor.

Latents are always the VAE's `(B, C, h, w)` (scaled, shifted as the family's pipeline does): a backbone that packs
tokens (FLUX) packs and unpacks inside `predict`, so masks, blends and images work alike for every family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from ..errors import DiT4EditError
from ..layout import BatchLayout
from ..solvers import Denoiser, Schedule

#: Attention roles. "self": image queries, image keys. "cross": image queries, text keys. "joint": one softmax over
#: image and text tokens, with separate projections per stream (MM-DiT double-stream). "single": the same over one
#: stream holding text and image tokens with shared projections (FLUX's single-stream blocks).
ROLES = ("self", "cross", "joint", "single")
IMAGE, TEXT = "image", "text"


@dataclass(frozen=True)
class FolderSpec:
    """What a model folder of one family holds: pipeline class names in `model_index.json` and, per required
    component, the class names accepted for it."""

    pipelines: tuple[str, ...]
    components: dict[str, tuple[str, ...]] = field(hash=False)

    def check(self, index: dict, name: str = "the model") -> None:
        """One-line `DiT4EditError` unless `index` (a parsed `model_index.json`) is this family's pipeline with
        every required component of an accepted class."""
        pipeline = index.get("_class_name")
        if pipeline not in self.pipelines:
            raise DiT4EditError(f"{name} is a {pipeline}, not one of {', '.join(self.pipelines)}")
        problems = []
        for component, classes in self.components.items():
            entry = index.get(component)
            found = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
            if found is None:
                problems.append(f"no {component}")
            elif found not in classes:
                problems.append(f"{component} is a {found}, not {' or '.join(classes)}")
        if problems:
            raise DiT4EditError(f"{name} ({pipeline}): {'; '.join(problems)}")


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DiT4EditError(f"cannot read {path}: {error}") from None


@dataclass(frozen=True)
class TextSegment:
    """A stretch `[start, stop)` of the model's text sequence encoded by one text encoder ("clip" or "t5")."""

    encoder: str
    start: int
    stop: int


@dataclass(frozen=True)
class PromptTokens:
    """Which word of a prompt each position of the model's text sequence holds.

    `prompt` is the text as the encoders saw it (a family may lower-case it); `words` its whitespace-split words;
    `word_of_token` has one entry per position of the text sequence (all segments, in sequence order), None for
    BOS / EOS / padding and for positions no word reaches."""

    prompt: str
    words: tuple[str, ...]
    word_of_token: tuple[int | None, ...]  # (L,)
    segments: tuple[TextSegment, ...]

    def word_tokens(self, index: int, encoder: str | None = None) -> list[int]:
        """Sequence positions of word `index` (in every segment, or only in `encoder`'s)."""
        spans = [s for s in self.segments if encoder is None or s.encoder == encoder]
        return [p for s in spans for p in range(s.start, s.stop) if self.word_of_token[p] == index]


def word_map(tokenizer, prompt: str, max_length: int, encoder: str, start: int = 0):
    """`(words, word_of_token, segment)` of `prompt` tokenized as its encoder does (`max_length` ids, padded and
    cut), placed at `start` of the text sequence. A token belongs to the whitespace word its characters lie in
    (tokenizer offsets; a bare `▁` covering only a space to the word after it), so T5's `▁` pieces, CLIP's `</w>`
    pieces and punctuation split off a word all land on the word they come from."""
    encoding = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                         return_offsets_mapping=True)
    word_at: list[int | None] = [None] * len(prompt)  # character -> word
    words = prompt.split()
    position = 0
    for w, word in enumerate(words):
        position = prompt.index(word, position)
        word_at[position : position + len(word)] = [w] * len(word)
        position += len(word)
    ids = encoding["input_ids"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # an unknown character is still text
    owners = []
    for token, (begin, end) in zip(ids, encoding["offset_mapping"]):
        owner = None
        if end > begin and token not in special:
            inside = [w for w in word_at[begin:end] if w is not None]
            # A bare word-start marker (T5's "▁" covering only the space) belongs to the word that follows it.
            owner = inside[-1] if inside else (word_at[end] if end < len(prompt) else None)
        owners.append(owner)
    return tuple(words), tuple(owners), TextSegment(encoder, start, start + len(ids))


@dataclass(frozen=True)
class TextInputs:
    """A batch of prompts as the transformer takes them (diffusers' names), one row per prompt or per batch row.

    prompt_embeds: (B, L, D) the text sequence.
    pooled_prompt_embeds: (B, P) the pooled CLIP vector (SD3, FLUX), else None.
    prompt_attention_mask: (B, L) 0/1 padding mask where the transformer takes one, else None.
    tokens: each prompt's token -> word map (empty after `rows`, whose rows mix prompts).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None
    tokens: tuple[PromptTokens, ...] = ()

    def rows(self, layout: BatchLayout, uncond: TextInputs) -> TextInputs:
        """The batch rows of `layout`: these prompts' rows in the conditional half, `uncond`'s (one row, broadcast)
        in the unconditional half."""

        def join(u, c):
            return None if c is None else layout.join_guidance(u if u is not None else c, c)

        return TextInputs(join(uncond.prompt_embeds, self.prompt_embeds),
                          join(uncond.pooled_prompt_embeds, self.pooled_prompt_embeds),
                          join(uncond.prompt_attention_mask, self.prompt_attention_mask))


@dataclass(frozen=True)
class TokenGrid:
    """Image tokens of a latent: `height x width` tokens in row-major order, each `patch x patch` latent pixels."""

    height: int
    width: int
    patch: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: its processor's name, role (`ROLES`), block index within its stack, and the token
    order of its query and key sequences (e.g. SD3 joint: ("image", "text") for both; FLUX: ("text", "image"))."""

    name: str  # e.g. "transformer_blocks.3.attn.processor"
    role: str
    block: int
    queries: tuple[str, ...]
    keys: tuple[str, ...]


class Backbone:
    """One model family around a loaded diffusers pipeline `pipe` (its components are read, never changed).

    Subclasses set the class attributes and implement `encode_prompts`, `prompt_tokens`, `schedule`, `sampler`,
    `predict`, `grid`, `attention_layers`; `denoiser`, `layout`, `layers` and the latent helpers are shared."""

    family: ClassVar[str]
    folder: ClassVar[FolderSpec]
    #: What the network predicts: "epsilon" (VP diffusion) or "flow" (rectified-flow velocity).
    prediction: ClassVar[str] = "flow"
    #: Whether guidance runs as classifier-free guidance over unconditional rows (else a model input, or none).
    cfg: ClassVar[bool] = True

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.max_sequence_length = max_sequence_length or self.default_prompt_length()

    def default_prompt_length(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # --- what every family implements ------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> TextInputs:
        """The prompts as the family's pipeline encodes them (no negative prompt; `denoiser` adds "")."""
        raise NotImplementedError

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        """Which word of `prompt` each position of the model's text sequence holds."""
        raise NotImplementedError

    def schedule(self, num_steps: int, latent_hw: tuple[int, int], sigma_max: float = 1.0) -> Schedule:
        """The points of the family's own `num_steps`-step schedule for a latent of `latent_hw`. `sigma_max` below 1
        starts a flow schedule just short of pure noise, which DPM-Solver++ and the inverters of
        `dit4edit.solvers` need (`flow.INVERTIBLE_SIGMA_MAX`); a VP schedule never reaches it and ignores it."""
        raise NotImplementedError

    def sampler(self):
        """The family's own sampler, `(denoise, x, schedule, callback, disable) -> trajectory`: Euler on s for the
        flows, DPM-Solver++(2M) for the eps models."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, i: int, text: TextInputs, schedule: Schedule, guidance_scale: float,
                layout: BatchLayout, attention_kwargs: dict | None = None) -> torch.Tensor:
        """Data prediction `denoised (branches, C, h, w)` at point `i` for latents `x (branches, C, h, w)`, with
        `text` the batch rows of `layout` (`TextInputs.rows`) and guidance applied; in the dtype of `x`.
        `attention_kwargs` reach the attention processors (diffusers' `joint_attention_kwargs` /
        `cross_attention_kwargs`)."""
        raise NotImplementedError

    def grid(self, latent_hw: tuple[int, int]) -> TokenGrid:
        """The token grid of latents `(h, w)`: the transformer's square patches (a family that packs its tokens
        some other way says so itself)."""
        p = self.transformer.config.patch_size
        return TokenGrid(latent_hw[0] // p, latent_hw[1] // p, p)

    def attention_layers(self) -> tuple[AttentionLayer, ...]:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------------------

    def layout(self, num_targets: int, guidance_scale: float, rows: int = 4) -> BatchLayout:
        """The batch layout of `num_targets` targets next to a source: unconditional rows only where the family
        guides by classifier-free guidance and the scale is above 1."""
        if not self.cfg:
            return BatchLayout(num_targets, guidance=False)
        return BatchLayout.for_scale(num_targets, guidance_scale, rows)

    def denoiser(self, prompts: Sequence[str], schedule: Schedule, guidance_scale: float,
                 layout: BatchLayout | None = None, step_kwargs: bool = False) -> Denoiser:
        """`denoise(x, i) -> D` for latents with one row per prompt (the source first); the negative prompt is
        "" as in diffusers. With `step_kwargs` the processors receive `step_index=i`."""
        layout = layout or self.layout(len(prompts) - 1, guidance_scale)
        if layout.branches != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a layout of {layout.branches} branches")
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""]) if layout.guidance else cond
        text = cond.rows(layout, uncond)

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            kwargs = {"step_index": i} if step_kwargs else None
            return self.predict(x, i, text, schedule, guidance_scale, layout, kwargs)

        return denoise

    def layers(self, role: str) -> tuple[AttentionLayer, ...]:
        """The attention layers of one role, in model order."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return tuple(layer for layer in self.attention_layers() if layer.role == role)

    # --- latents ---------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    def to_latent(self, mean: torch.Tensor) -> torch.Tensor:
        """The VAE posterior mean -> the latent the transformer sees: `(z - shift) * scale`."""
        config = self.pipe.vae.config
        return (mean - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_latent`, what `vae.decode` takes."""
        config = self.pipe.vae.config
        return latent / config.scaling_factor + (config.get("shift_factor") or 0.0)

    def noise(self, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Initial noise `(batch, C, h, w)` drawn as the family's pipeline draws it from `generator`."""
        from diffusers.utils.torch_utils import randn_tensor  # deferred: diffusers' helper, as the pipelines use

        return randn_tensor((batch, self.latent_channels, *latent_hw), generator=generator, device=self.device,
                            dtype=dtype)
