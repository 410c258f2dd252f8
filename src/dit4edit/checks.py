"""Checks of user-supplied values and words that need no model and import nothing heavy (no torch, no diffusers).

Each raises `DiT4EditError` with one line naming the value, so the CLI and the API report bad input before any
model loads or any inversion runs.
"""

from __future__ import annotations

import json
import math
import os
import string
import unicodedata
from pathlib import Path

from .errors import DiT4EditError
from .methods import INVERSION_METHODS

#: Denoising steps accepted (the training schedule has 1000 timesteps).
MAX_STEPS = 1000
#: Seeds torch's generators accept.
MAX_SEED = 2**64 - 1


def integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in `[low, high]` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DiT4EditError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise DiT4EditError(f"{name} must be {bounds}, got {value}")
    return value


def number(value, name: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False) -> float:
    """`value` as a finite float in `[low, high]` (`(low, high]` with `low_open`); NaN and infinities refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiT4EditError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DiT4EditError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        raise DiT4EditError(f"{name} must be {' and '.join(b for b in (lower, upper) if b)}, got {value:g}")
    return value


def steps(value, name: str = "steps") -> int:
    return integer(value, name, 1, MAX_STEPS)


def guidance(value, name: str = "guidance scale") -> float:
    return number(value, name, 0.0, 1000.0)


def tolerance(value, name: str = "tol") -> float:
    return number(value, name, 0.0, 1.0, low_open=True)


def seed(value, name: str = "seed") -> int:
    return integer(value, name, 0, MAX_SEED)


def inversion_method(value, name: str = "inversion method") -> str:
    if value not in INVERSION_METHODS:
        raise DiT4EditError(f"unknown {name} {value!r} (choose from {', '.join(INVERSION_METHODS)})")
    return value


def existing_file(path, what: str) -> Path:
    """A path that exists and is a non-empty regular file, or a one-line error saying "<what> not found"."""
    path = Path(path)
    if not path.exists():
        raise DiT4EditError(f"{what} not found: {path}")
    if not path.is_file():
        raise DiT4EditError(f"{what} is not a file: {path}")
    return path


def writable_file(path, what: str = "output") -> Path:
    """A path a file can be written to: not a folder, and its nearest existing parent is a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise DiT4EditError(f"{what} path is a directory: {path}")
    writable_folder(path.parent, what)
    return path


def writable_folder(folder, what: str = "output") -> Path:
    """A folder that exists and is writable, or can be created (its nearest existing ancestor is a writable folder)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DiT4EditError(f"cannot write the {what} under {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DiT4EditError(f"cannot write the {what} under {folder}: {existing} is not writable")
    return folder


# --- words -----------------------------------------------------------------------------------------------------


def word_key(word: str) -> str:
    """The form in which words are compared: surrounding punctuation stripped, case-folded ("Cat," -> "cat").

    A word made only of punctuation keeps its characters ("," stays ",") so it can still be named and aligned.
    """
    start, end = 0, len(word)
    while start < end and _is_punctuation(word[start]):
        start += 1
    while end > start and _is_punctuation(word[end - 1]):
        end -= 1
    return (word[start:end] or word).casefold()


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def prompt_keys(prompt: str) -> set[str]:
    """The compared forms of a prompt's whitespace-separated words."""
    return {word_key(word) for word in prompt.split()}


def words_in_prompts(words, prompts: list[str], what: str) -> None:
    """Every word of `words` occurs in at least one of `prompts` (compared by `word_key`)."""
    keys = set().union(*(prompt_keys(p) for p in prompts if p))
    missing = [w for w in words if word_key(w) not in keys]
    if missing:
        shown = " / ".join(repr(p) for p in prompts if p)
        raise DiT4EditError(f"{what} {', '.join(missing)} not in the prompt {shown}")


# --- text from users ---------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """`text` safe to print on one line: control and format characters (ESC, NUL, newlines, bidi overrides) shown
    escaped."""
    return "".join(c if c.isprintable() and unicodedata.category(c) != "Cf" else repr(c)[1:-1] for c in str(text))


def prompt(value, what: str = "prompt") -> str:
    """A prompt: text with at least one visible character (whitespace, zero-width and other format characters do
    not count)."""
    if value is None:
        raise DiT4EditError(f"a {what} is needed")
    if not isinstance(value, str):
        raise DiT4EditError(f"the {what} must be text, got {type(value).__name__}")
    if not any(not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc", "Zs") for c in value):
        raise DiT4EditError(f"the {what} is empty")
    return value


def finite(tensor, what: str):
    """`tensor` when every value is finite; a one-line error naming `what` otherwise (a result that is not finite
    is an error, never a black image)."""
    if not bool(tensor.isfinite().all()):
        raise DiT4EditError(f"{what} are not finite (NaN or infinity): the model or its settings overflowed")
    return tensor


#: The deepest nesting of arrays and objects read from a JSON file (specs, mappings, configs are shallow).
MAX_JSON_DEPTH = 64


def load_json(text: str, what: str):
    """Parse JSON text (a leading byte-order mark allowed) with nesting at most `MAX_JSON_DEPTH` deep; any problem
    is a one-line error naming `what`."""
    text = text.removeprefix("\ufeff")
    depth = deepest = 0
    in_string = escaped = False
    for char in text:  # a cheap depth scan first: the parser itself would recurse and overflow
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                raise DiT4EditError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        message = error.msg if isinstance(error, json.JSONDecodeError) else "too deeply nested"
        raise DiT4EditError(f"{what} is not JSON ({message})") from None
