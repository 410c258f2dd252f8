"""Checks of user-supplied values and words that need no model and import nothing heavy (no torch, no diffusers).

Each raises `DiT4EditError` with one line naming the value, so the CLI and the API report bad input before any
model loads or any inversion runs.
"""

from __future__ import annotations

import json
import math
import os
import stat
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


# --- text from users ----------------------------------------------------------------------------------------------

#: Characters that draw nothing although their Unicode category says "letter" or "symbol" (Hangul fillers, the
#: blank Braille pattern).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: Categories that draw nothing on their own: separators (spaces, line and paragraph separators), controls, format
#: characters (zero-width spaces and joiners, bidi marks), surrogates, unassigned code points, and combining marks
#: with nothing to combine with (variation selectors are among them).
_BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Cn", "Mn", "Me"})


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: every character is whitespace of any kind, zero-width, a format or control
    character, or a lone combining mark ("\\u200b\\u2060\\ufeff" is blank, like "" and " \\t")."""
    return all(char.isspace() or char in _BLANK_LETTERS or unicodedata.category(char) in _BLANK_CATEGORIES
               for char in text)


def prompt(value, what: str = "prompt") -> str:
    """`value` as a prompt: text that shows at least one character (see `is_blank`); one-line error otherwise."""
    if not isinstance(value, str):
        raise DiT4EditError(f"the {what} must be text, got {type(value).__name__}")
    if is_blank(value):
        raise DiT4EditError(f"the {what} is empty" + (" (it holds only invisible characters)" if value else ""))
    return value


def printable(text) -> str:
    """`text` safe to print on a terminal or in a log line: control characters (ESC, NUL, newlines, DEL, C1),
    format characters (bidi overrides and isolates, zero-width characters), line/paragraph separators, surrogates and
    unassigned code points are written as Python escapes (`\\x1b`, `\\u202e`); everything else, accents, CJK and
    emoji included, is kept. Backslashes are doubled so an escape in the output always means the character."""
    out = []
    for char in str(text):
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Cn", "Co"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


# --- JSON ---------------------------------------------------------------------------------------------------------

#: Deepest nesting of arrays and objects accepted in a JSON file or line (settings, specs and mappings need < 10).
MAX_JSON_DEPTH = 64


def load_json(text: str | bytes, what: str):
    """Parse JSON text from a user's file or line; any problem is a one-line `DiT4EditError` naming `what`.

    A leading UTF-8 byte-order mark is dropped (bytes are decoded as `utf-8-sig`), and arrays or objects nested more
    than `MAX_JSON_DEPTH` deep are refused, including ones so deep that the parser itself would give up."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DiT4EditError(f"{what} is not UTF-8 text (byte {error.start})") from None
    elif not isinstance(text, str):
        raise DiT4EditError(f"{what} must be JSON text, got {type(text).__name__}")
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except RecursionError:
        raise DiT4EditError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:  # JSONDecodeError, and int conversion limits
        raise DiT4EditError(f"{what} is not valid JSON ({str(error).splitlines()[0] if str(error) else 'empty'})"
                            ) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise DiT4EditError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def read_json(path, what: str | None = None):
    """`load_json` of a file's contents; `what` defaults to the path. A path that is not a regular file (a folder,
    a FIFO, a device) or cannot be read is a one-line `DiT4EditError` too; nothing is read from a non-file."""
    path = Path(path)
    what = what or str(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise DiT4EditError(f"{what} is not a regular file: {path}")
        data = path.read_bytes()
    except OSError as error:
        raise DiT4EditError(f"cannot read {what}: {error.strerror or error}") from None
    return load_json(data, what)


def json_depth(value) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar is 0, `[]` is 1, `[{}]` is 2); iterative,
    so any depth the parser produced is measured without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# --- tensors --------------------------------------------------------------------------------------------------------


def finite(tensor, what: str, limit: float | None = None):
    """`tensor` (torch or numpy) unchanged when every value is finite (and `abs(value) <= limit` when given);
    otherwise a one-line `DiT4EditError` saying how many values are not, e.g. "the decoded image holds 12 NaN or
    infinite values". Use it on every result before it becomes an image or a file."""
    if hasattr(tensor, "isfinite"):  # a torch tensor: count on its own device, copy nothing
        bad = int((~tensor.isfinite()).sum())
        peak = (lambda: float(tensor.abs().max())) if tensor.numel() else (lambda: 0.0)
    else:
        import numpy as np

        values = np.asarray(tensor, dtype=np.float64)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        peak = (lambda: float(np.abs(values).max())) if values.size else (lambda: 0.0)
    if bad:
        raise DiT4EditError(f"{what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")
    if limit is not None and peak() > limit:
        raise DiT4EditError(f"{what} holds values up to {peak():.3g}, beyond the +-{limit:g} that real ones stay "
                            "within")
    return tensor
