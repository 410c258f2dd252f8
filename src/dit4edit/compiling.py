"""Regional `torch.compile` of a PixArt transformer: each transformer block is compiled, its attention layers stay eager.

All blocks run the same code, so dynamo compiles one set of graphs and reuses it for every block (compile time
does not grow with depth). The attention layers (`attn1`, `attn2`) are excluded from the graphs: their processors
decide per step and per block what to do (attention control, token merging, recording), and inside a graph every
new step index or processor would recompile. What gets fused is the rest of the block: adaLN-single modulation,
layer norms, gates and residuals, and the feed-forward.

Limits: dynamo does not guard on forward hooks of modules it inlines, so hooks added to a block's submodules after
compilation are ignored (the pipeline refuses merged feed-forward layers on compiled blocks for that reason).
Each new batch size or image size compiles once more; later calls reuse the graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

#: Where a compiled transformer keeps what `uncompile_blocks` restores.
_SAVED = "_dit4edit_eager_attention"


def blocks_compiled(transformer: torch.nn.Module) -> bool:
    return hasattr(transformer, _SAVED)


def compile_blocks(transformer: torch.nn.Module, **options) -> None:
    """Compile every `transformer_blocks[i]` with `torch.compile(**options)`, keeping `attn1` / `attn2` eager.
    Idempotent; `uncompile_blocks` undoes it."""
    if blocks_compiled(transformer):
        return
    saved = []
    for block in transformer.transformer_blocks:
        for attn in (getattr(block, "attn1", None), getattr(block, "attn2", None)):
            if attn is not None:
                saved.append((attn, attn.__dict__.get("forward")))  # an offload hook's forward, or None
                attn.forward = torch.compiler.disable(attn.forward)  # recursive: the processor runs eagerly
        block.compile(**options)
    setattr(transformer, _SAVED, saved)


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Run the blocks eagerly again (the compiled graphs stay in dynamo's cache). Idempotent."""
    if not blocks_compiled(transformer):
        return
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None  # what `nn.Module.compile` set
    for attn, forward in getattr(transformer, _SAVED):
        if forward is None:
            del attn.forward
        else:
            attn.forward = forward
    delattr(transformer, _SAVED)


@contextmanager
def compiled_blocks(transformer: torch.nn.Module, **options) -> Iterator[torch.nn.Module]:
    """`compile_blocks` for the duration of a `with` block; eager again afterwards, also after an exception
    (blocks that were compiled before stay compiled)."""
    already = blocks_compiled(transformer)
    compile_blocks(transformer, **options)
    try:
        yield transformer
    finally:
        if not already:
            uncompile_blocks(transformer)
