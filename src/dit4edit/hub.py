"""Loading a model folder or hub id with diffusers: the prompt length its index names, the dtype keyword this
diffusers prefers, and loaders kept quiet so a failure is one line."""

from __future__ import annotations

import contextlib
import logging

from diffusers import DiffusionPipeline

from .model_folder import DEFAULT_PROMPT_LENGTH, prompt_length


def hub_prompt_length(name: str, kwargs: dict) -> int:
    """The prompt length of a hub model, from its model_index.json (`model_folder.prompt_length`); where and how
    to look (`local_files_only`, `revision`, `cache_dir`, `token`) as `kwargs` tell `from_pretrained`."""
    where = {k: kwargs[k] for k in ("local_files_only", "revision", "cache_dir", "token") if k in kwargs}
    try:
        index = DiffusionPipeline.load_config(name, **where)
    except (OSError, ValueError):  # unreachable, not found or not a pipeline: from_pretrained reports it
        return DEFAULT_PROMPT_LENGTH
    return prompt_length(dict(index))


def dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); use the one this install prefers."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


@contextlib.contextmanager
def quiet_loaders():
    """While loading: only errors from diffusers, transformers and huggingface_hub (their warnings and retries
    would print lines before our one-line error); the previous levels come back afterwards."""
    import warnings

    names = ("diffusers", "transformers", "huggingface_hub")
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
