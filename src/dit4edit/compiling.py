"""Regional `torch.compile` of a PixArt transformer: each transformer block is compiled, its attention layers stay eager.

All blocks run the same code, so dynamo compiles one set of graphs and reuses it for every block (compile time
does not grow with depth). The attention layers (`attn1`, `attn2`) are excluded from the graphs: their processors
decide per step and per block what to do (attention control, token merging, recording), and inside a graph every
new step index, processor or merge plan would recompile (the layers' forward hooks, through which token
merging works, run eagerly with them). What gets fused is the rest of the block: adaLN-single modulation,
layer norms, gates and residuals, and the feed-forward.

Limit: the feed-forward is compiled, so forward hooks added to it later are not run eagerly (the pipeline refuses
merged feed-forward layers on compiled blocks).
Each new batch size or image size compiles once more; later calls reuse the graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

#: Marks a transformer whose blocks `compile_blocks` compiled.
_SAVED = "_dit4edit_compiled_blocks"


def blocks_compiled(transformer: torch.nn.Module) -> bool:
    return hasattr(transformer, _SAVED)


def compile_blocks(transformer: torch.nn.Module, **options) -> None:
    """Compile every `transformer_blocks[i]` with `torch.compile(**options)`, keeping `attn1` / `attn2` eager.
    Idempotent; `uncompile_blocks` undoes it."""
    if blocks_compiled(transformer):
        return
    for block in transformer.transformer_blocks:
        for attn in _attention_layers(block):
            _keep_eager(attn)
        block.compile(**options)
    setattr(transformer, _SAVED, True)


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Run the blocks eagerly again (the compiled graphs stay in dynamo's cache). Idempotent."""
    if not blocks_compiled(transformer):
        return
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None  # what `nn.Module.compile` set
        for attn in _attention_layers(block):
            attn._compiled_call_impl = None
            del attn._call_impl
    delattr(transformer, _SAVED)


def _keep_eager(layer: torch.nn.Module) -> None:
    """Run `layer` outside the graph of the module that calls it, hooks included: dynamo traces a module call into
    its `forward` with the hooks present at compile time and does not guard on them, so hooks added later (token
    merging) would be ignored. `nn.Module.__call__` runs `_compiled_call_impl` when it is set (as `nn.Module.compile`
    does); here it is the layer's own `_call_impl` with dynamo disabled (recursively: the processor runs eagerly),
    and the instance-level `_call_impl` stops dynamo from short-cutting the call to `forward`."""
    eager = torch.compiler.disable(layer._call_impl)
    layer._compiled_call_impl = eager
    layer._call_impl = eager


def _attention_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer for layer in (getattr(block, "attn1", None), getattr(block, "attn2", None)) if layer is not None]


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
