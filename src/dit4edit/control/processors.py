"""One attention processor per PixArt attention layer, named at install time by its block and kind (self / cross).

The processor is diffusers' `AttnProcessor2_0` written out step by step (spatial/group norm, 4-D input, mask
preparation, q/k norms, output projection, residual, rescale), with the core attention swapped for an edit from
`edits.py` when the controller says one applies at this (step, block). With no edit it computes exactly what the
default processor computes. The step arrives as `step_index` through `cross_attention_kwargs`; nothing counts calls.
"""

from __future__ import annotations

import torch

from .controller import AttentionController
from .edits import SELF_EDITS, cross_attention_edit, cross_attention_probs, sdpa


class ControlledAttnProcessor:
    """Attention of `transformer_blocks.{block}.attn1` (`cross=False`) or `.attn2` (`cross=True`) under control.

    Self-attention: the controller's edit (source / p2p / mutual / union) on all target rows; under token merging
    (`dit4edit.merging.token_merging`) it receives the merged tokens, grouped alike in every row. Cross-attention:
    the Prompt-to-Prompt edit on the conditional target rows, and recording of the chosen words' maps.
    """

    def __init__(self, controller: AttentionController, block: int, cross: bool):
        self.controller = controller
        self.block = block
        self.cross = cross

    def __repr__(self):
        return f"{type(self).__name__}(block={self.block}, {'cross' if self.cross else 'self'})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        step_index: int | None = None,
    ) -> torch.Tensor:
        controller = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B * heads, 1 or N, L) -> (B, heads, 1 or N, L), as SDPA wants it
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self.cross:
            edit = controller.cross_edit(step_index, hidden_states.device)
            record_rows = controller.record_rows(self.block, step_index)
        else:
            edit = controller.self_edit(self.block, step_index)
            record_rows = None
        if (edit is not None or record_rows is not None) and batch_size != controller.layout.rows:
            raise ValueError(
                f"attention control expects the {controller.layout.rows}-row batch of {controller.layout}, "
                f"got {batch_size} rows"
            )

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N or L, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if record_rows is not None:
            # The maps of each branch's own prompt, before any edit (Prompt-to-Prompt's AttentionStore).
            rows = record_rows.to(query.device)
            probs = cross_attention_probs(query, key, attention_mask, rows, controller.record_columns)  # (R, N, C)
            controller.record(step_index, probs)

        layout = controller.layout
        if edit is None:
            hidden_states = sdpa(query, key, value, attention_mask)
        elif self.cross:
            hidden_states = cross_attention_edit(query, key, value, layout, attention_mask, *edit)
        else:
            hidden_states = SELF_EDITS[edit](query, key, value, layout, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, N, C)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
