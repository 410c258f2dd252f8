"""MergeConfig takes only values of its fields' types: a bool is not a ratio, 2.0 is not a stride."""

from __future__ import annotations

import numpy as np
import pytest

from dit4edit.errors import DiT4EditError
from dit4edit.merging import MergeConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=False), "merge ratio"),
    (dict(ratio="0.5"), "merge ratio"),
    (dict(ratio=float("nan")), "merge ratio"),
    (dict(stride=(2.0, 2)), "merge stride"),
    (dict(stride=(True, 3)), "merge stride"),
    (dict(stride="33"), "merge stride"),
    (dict(stride=(3, 10**6)), "merge stride"),
    (dict(seed=1.5), "merge seed"),
    (dict(seed=-1), "merge seed"),
    (dict(merge_ff="no"), "merge_ff must be true or false"),
    (dict(merge_ff=1), "merge_ff must be true or false"),
    (dict(min_tokens=2.7), "min_tokens must be an integer"),
    (dict(min_tokens=None), "min_tokens must be an integer"),
    (dict(blocks=(0, 2.5)), "merge blocks"),
    (dict(blocks=(False, 2)), "merge blocks"),
    (dict(skip_steps=2.7), "skip_steps must be an integer"),
    (dict(skip_steps=True), "skip_steps must be an integer"),
])
def test_merge_config_types_are_strict(kwargs, message):
    with pytest.raises(DiT4EditError, match=message) as info:
        MergeConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_numpy_numbers_and_lists_are_accepted_and_normalised():
    config = MergeConfig(ratio=np.float32(0.5), stride=[np.int64(2), 2], seed=np.int64(3), blocks=[1, 4],
                         skip_steps=np.int32(1))
    assert config.stride == (2, 2) and config.blocks == (1, 4) and type(config.ratio) is float
    assert config == MergeConfig(ratio=0.5, stride=(2, 2), seed=3, blocks=(1, 4), skip_steps=1)
