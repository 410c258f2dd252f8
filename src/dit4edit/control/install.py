"""Install attention control on a PixArt transformer for the duration of a `with` block, then restore."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from ..errors import DiT4EditError
from .controller import AttentionController
from .processors import ControlledAttnProcessor

_LAYER = re.compile(r"transformer_blocks\.(\d+)\.attn([12])\.processor")


@contextmanager
def install(transformer, controller: AttentionController) -> Iterator[AttentionController]:
    """Give every `transformer_blocks.{i}.attn1/attn2` its own `ControlledAttnProcessor` (attn1 = self-attention,
    attn2 = cross-attention), named by block; other layers keep their processors. The previous processors come
    back in `finally`, also after an exception. Yields the controller.
    """
    num_blocks = len(transformer.transformer_blocks)
    if controller.num_blocks != num_blocks:
        raise DiT4EditError(
            f"the attention controller was built for {controller.num_blocks} transformer blocks, "
            f"the model has {num_blocks}"
        )
    previous = dict(transformer.attn_processors)
    processors = {}
    for name, processor in previous.items():
        match = _LAYER.fullmatch(name)
        processors[name] = (
            ControlledAttnProcessor(controller, int(match[1]), cross=match[2] == "2") if match else processor
        )
    transformer.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it gets
    try:
        yield controller
    finally:
        transformer.set_attn_processor(dict(previous))
