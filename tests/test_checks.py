"""Checks of user text, JSON and tensors shared by every surface."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dit4edit import checks
from dit4edit.errors import DiT4EditError


# --- prompts that show nothing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "\u2060\u2060",  # word joiners
    "\ufeff",  # a byte-order mark
    "\u00a0\u3000\u2003",  # no-break, ideographic and em spaces
    "\u200e\u202e\u2066",  # bidi marks, overrides and isolates
    "\u3164 \u115f",  # Hangul fillers
    "\u2028\u2029\x0b",  # line and paragraph separators, a vertical tab
    "\ufe0f\u034f",  # a variation selector and a combining grapheme joiner, with nothing to join
    "\u00ad\x00",  # a soft hyphen and a NUL
])
def test_prompt_of_only_invisible_characters_is_empty(text):
    assert checks.is_blank(text)
    with pytest.raises(DiT4EditError, match="is empty") as info:
        checks.prompt(text, "target prompt")
    assert "target prompt" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["a", "\u732b", "\U0001f408", "e\u0301", "\u200ba\u200b", "\u0627", "."])
def test_prompt_with_one_visible_character_is_kept(text):
    assert not checks.is_blank(text) and checks.prompt(text) == text


@pytest.mark.parametrize("value", [None, b"a cat", ["a cat"], 3])
def test_prompt_that_is_not_text_is_refused(value):
    with pytest.raises(DiT4EditError, match="must be text"):
        checks.prompt(value)


# --- text printed to a terminal -------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x1b", "\x00", "\x07", "\x9b", "\x7f", "\r", "\n", "\u202e", "\u2067", "\u200b",
                                  "\u2028", "\ud800"])
def test_printable_escapes_what_a_terminal_would_act_on(char):
    text = f"blue{char}[31mcircle"
    shown = checks.printable(text)
    assert char not in shown and shown.isprintable()
    assert shown.startswith("blue\\") and shown.endswith("[31mcircle")


def test_printable_keeps_ordinary_text_and_stays_unambiguous():
    text = "caf\u00e9 \u732b \U0001f408 \u0627\u0644 tab-free"
    assert checks.printable(text) == text
    assert checks.printable("a\\x1b") != checks.printable("a\x1b")  # a typed backslash never reads as an escape


# --- JSON -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{\"a\": " * 200_000 + "1" + "}" * 200_000, "[" * 65 + "]" * 65,
                                  "[{\"x\": " * 40 + "0" + "}]" * 40])
def test_deeply_nested_json_is_one_line_error(text):
    with pytest.raises(DiT4EditError, match="nested more than 64 levels") as info:
        checks.load_json(text, "spec line 3")
    assert str(info.value).startswith("spec line 3") and "\n" not in str(info.value)


def test_json_at_the_depth_limit_is_read():
    text = "[" * checks.MAX_JSON_DEPTH + "]" * checks.MAX_JSON_DEPTH
    assert checks.json_depth(checks.load_json(text, "x")) == checks.MAX_JSON_DEPTH


def test_byte_order_mark_is_ignored_in_text_bytes_and_files(tmp_path):
    value = {"prompt": "a red circle", "steps": [1, 2]}
    text = "\ufeff" + json.dumps(value)
    assert checks.load_json(text, "line 1") == value
    assert checks.load_json(text.encode("utf-8"), "line 1") == value
    path = tmp_path / "mapping.json"
    path.write_bytes(text.encode("utf-8"))
    assert checks.read_json(path) == value


@pytest.mark.parametrize("data, message", [(b"{\"a\": }", "not valid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                                           (b"", "not valid JSON")])
def test_bad_json_is_one_line_error_naming_it(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(DiT4EditError, match=message) as info:
        checks.read_json(path, "the mapping")
    assert "the mapping" in str(info.value) and "\n" not in str(info.value)


def test_json_path_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "settings.json"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(DiT4EditError, match="not a regular file"):
        checks.read_json(fifo)
    os.symlink(tmp_path / "gone.json", tmp_path / "dangling.json")
    with pytest.raises(DiT4EditError, match="cannot read"):
        checks.read_json(tmp_path / "dangling.json")


# --- finite results -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_is_refused(bad):
    tensor = torch.zeros(2, 3, 8, 8, dtype=torch.float16)
    tensor[1, 2, 7, 0] = bad
    with pytest.raises(DiT4EditError, match="the decoded image holds 1 NaN or infinite value$"):
        checks.finite(tensor, "the decoded image")
    array = np.zeros((4, 4))
    array[0, :2] = bad
    with pytest.raises(DiT4EditError, match="holds 2 NaN"):
        checks.finite(array, "the result")


def test_finite_tensor_passes_and_limit_bounds_magnitude():
    tensor = torch.linspace(-3, 3, 50)
    assert checks.finite(tensor, "x") is tensor
    assert checks.finite(tensor, "x", limit=3.0) is tensor
    with pytest.raises(DiT4EditError, match="values up to 3"):
        checks.finite(tensor, "the latent", limit=2.5)
    assert checks.finite(torch.zeros(0), "empty", limit=1.0).numel() == 0
