"""T5 token/word alignment between a source and a target prompt (Prompt-to-Prompt's replace and refine, for T5).

PixArt encodes a prompt with a T5 tokenizer into exactly `max_length` ids (120 for PixArt-alpha, 300 for Sigma): the text pieces, `</s>`, then
`<pad>` -- no BOS token, unlike CLIP, so Prompt-to-Prompt's word-index code (which skips a BOS) is off by one here.
A word starts with a piece that begins with the marker `▁` and may go on for several pieces (`▁ele`, `ph`, `ant`);
this is the failure the DiT4Edit paper names, and every function below works on whole words made of pieces.

Conventions shared by all functions:
- Words are the prompt split on whitespace. Two words are the same word when they are equal after stripping
  surrounding punctuation and case-folding (`word_key`); token positions are always the tokenizer's own.
- Pass the text exactly as the text encoder sees it: `preprocess_prompt` prepares it as diffusers' PixArt pipelines
  do (lowercased and stripped, or cleaned with `clean_caption=True`); align that string, or positions of upper-case
  words differ.
- `mapper` acts on attention probabilities along the key axis: `P_target ≈ P_source @ mapper`, `(L, L)`, rows =
  source tokens, columns = target tokens. `from_source[j]` is 1 where target column `j` comes from the source and 0
  where the target keeps its own (Prompt-to-Prompt refine: `A = (P_src @ M) * f + P_tgt * (1 - f)`; replace has
  `f = 1` on every real token, so one formula serves both modes).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .checks import word_key
from .defaults import PIXART_ALPHA_TOKENS
from .errors import DiT4EditError
from .methods import EDIT_MODES

logger = logging.getLogger(__name__)

WORD_START = "\u2581"  # sentencepiece's marker at the start of a word's first piece
# `PIXART_ALPHA_TOKENS` (120) is the default length of the functions here; a pipeline passes its model's own
# (`DiT4EditPipeline.max_sequence_length`).


def preprocess_prompt(text: str, clean_caption: bool = False) -> str:
    """The prompt as diffusers' PixArt pipelines hand it to the tokenizer (`PixArtAlphaPipeline._text_preprocessing`).

    clean_caption False: lowercased, then stripped of surrounding whitespace.
    clean_caption True: diffusers' `_clean_caption` applied twice (URLs, HTML, odd punctuation removed; lowercased)
        when both of its optional packages, beautifulsoup4 and ftfy, are installed; without them diffusers logs a
        warning and does as for False, and so does this.
    Align, tokenize and check the words of this string: it is the one the text encoder sees.
    """
    if not isinstance(text, str):
        raise DiT4EditError(f"prompt must be text, got {type(text).__name__}")
    if clean_caption and not all(importlib.util.find_spec(name) for name in ("bs4", "ftfy")):
        logger.warning("clean_caption needs beautifulsoup4 and ftfy; prompts are only lowercased and stripped")
        clean_caption = False
    if not clean_caption:
        return text.lower().strip()
    # Deferred: the diffusers pipeline module is heavy, and only this optional path needs its cleaning rules.
    from diffusers import PixArtAlphaPipeline

    rules = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)  # `_clean_caption` reads only class attributes
    return rules._clean_caption(rules._clean_caption(text))


@dataclass(frozen=True)
class Tokens:
    """A prompt as PixArt's T5 encoder sees it, with each token's word.

    All per-token tuples have length `max_length`: text pieces first, then `</s>`, then padding.
    """

    ids: tuple[int, ...]  # (L,) token ids, exactly as `tokenizer(prompt, padding="max_length", truncation=True)`
    pieces: tuple[str, ...]  # (L,) sentencepiece pieces ("▁ele", "ph", "ant", "</s>", "<pad>", ...)
    words: tuple[str, ...]  # whitespace-split words that own at least one piece, in order
    word_of_token: tuple[int | None, ...]  # (L,) index into `words`; None for `</s>` and padding

    @property
    def num_text(self) -> int:
        """Number of text pieces; also the position of `</s>`."""
        return sum(w is not None for w in self.word_of_token)

    @property
    def keys(self) -> tuple[str, ...]:
        """`word_key` of each word: the form used to compare words."""
        return tuple(word_key(w) for w in self.words)

    def word_tokens(self, index: int) -> list[int]:
        """Token positions of word `index` (all its pieces, in order)."""
        return [i for i, w in enumerate(self.word_of_token) if w == index]


@dataclass(frozen=True, eq=False)
class TokenAlignment:
    """How the target prompt's tokens take their cross-attention columns from the source prompt's."""

    mode: str  # "replace" (same word count, word swap) or "refine" (words added/removed; global word alignment)
    mapper: torch.Tensor  # (L, L) float32; target probabilities over keys = source probabilities @ mapper
    from_source: torch.Tensor  # (L,) float32; 1 where the target column comes from the source, 0 where it keeps its own
    changed_words: tuple[str, ...]  # target words that differ from the source (replaced or inserted)
    changed_source_words: tuple[str, ...]  # source words that differ from the target (replaced or removed)
    source: Tokens
    target: Tokens
    changed_columns: tuple[int, ...] = ()  # the target token columns of `changed_words`


def tokenize(tokenizer, prompt: str, max_length: int = PIXART_ALPHA_TOKENS) -> Tokens:
    """Tokenize `prompt` as PixArt does (`max_length` ids: pieces, `</s>`, padding) and find each piece's word.

    Raises DiT4EditError for an empty prompt or one longer than `max_length` tokens (PixArt would cut it silently).
    """
    _check_prompt(prompt, "prompt")
    if max_length < 2:
        raise DiT4EditError(f"max_length must be at least 2 (text and </s>), got {max_length}")
    ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
    if len(ids) > max_length:
        raise DiT4EditError(
            f"prompt has {len(ids)} T5 tokens (with </s>), more than the {max_length} PixArt encodes; "
            f"shorten it: {_shorten(prompt)!r}"
        )
    num_text = len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids += [pad_id] * (max_length - len(ids))
    pieces = tuple(tokenizer.convert_ids_to_tokens(ids))
    words, word_of_text = _assign_words(tokenizer, prompt, ids[:num_text], pieces[:num_text])
    if not words:
        raise DiT4EditError(f"prompt {_shorten(prompt)!r} gives no T5 tokens")
    word_of_token = tuple(word_of_text) + (None,) * (max_length - num_text)
    return Tokens(ids=tuple(ids), pieces=pieces, words=tuple(words), word_of_token=word_of_token)


def _assign_words(tokenizer, prompt: str, text_ids: list[int], text_pieces: tuple[str, ...]):
    """Each text piece's word index: a new word starts at every piece that begins with `▁`."""
    words = prompt.split()
    starts = [i for i, piece in enumerate(text_pieces) if i == 0 or piece.startswith(WORD_START)]
    if len(starts) == len(words):
        word_of_text = [0] * len(text_pieces)
        for w, (begin, end) in enumerate(zip(starts, starts[1:] + [len(text_pieces)])):
            word_of_text[begin:end] = [w] * (end - begin)
        return words, word_of_text
    # The normaliser merged, split or dropped a word (rare: control characters, NFKC oddities). T5 pieces never
    # cross whitespace, so tokenizing word by word gives the same pieces; use that, and keep words that have pieces.
    per_word = [list(tokenizer(word, add_special_tokens=False, verbose=False)["input_ids"]) for word in words]
    counts = [len(ids) for ids in per_word]
    if [i for ids in per_word for i in ids] != list(text_ids):
        raise DiT4EditError(
            f"cannot tell which T5 pieces belong to which word in {_shorten(prompt)!r} "
            f"({len(words)} words, {len(starts)} word-start pieces)"
        )
    kept = [w for w, c in zip(words, counts) if c > 0]
    word_of_text = [k for k, c in enumerate(c for c in counts if c > 0) for _ in range(c)]
    return kept, word_of_text


def align(
    tokenizer,
    source: str,
    target: str,
    mode: str = "auto",
    max_length: int = PIXART_ALPHA_TOKENS,
    conserve_mass: bool = False,
) -> TokenAlignment:
    """Prompt-to-Prompt token alignment for T5 pieces (Hertz et al. 2022, §3.2: word swap and prompt refinement).

    mode: "replace" needs the same number of words; word i of the target takes word i of the source's columns.
          "refine" aligns the two word sequences globally (Needleman-Wunsch); target words with no counterpart keep
          their own attention (`from_source` 0). "auto": replace when the word counts are equal, else refine.
    A word pair whose piece counts are equal maps piece to piece. Otherwise every target piece of the word gets the
    mean of the source word's piece columns (`conserve_mass=True`: Prompt-to-Prompt's original rule, the sum divided
    by the target's piece count, so rows of `P @ mapper` keep summing to one). The same word written differently
    ("cat" / "Cat,") first matches its common leading and trailing pieces one to one.
    `</s>` maps to `</s>` and the k-th padding token to the k-th padding token.
    """
    if mode not in EDIT_MODES:
        raise DiT4EditError(f"edit mode must be one of {', '.join(EDIT_MODES)}, got {mode!r}")
    _check_prompt(source, "source prompt")
    _check_prompt(target, "target prompt")
    src = tokenize(tokenizer, source, max_length)
    tgt = tokenize(tokenizer, target, max_length)
    if mode == "auto":
        mode = "replace" if len(src.words) == len(tgt.words) else "refine"
    if mode == "replace":
        if len(src.words) != len(tgt.words):
            raise DiT4EditError(
                f"replace needs the same number of words in both prompts: source has {len(src.words)} "
                f"({' '.join(src.words)}), target has {len(tgt.words)} ({' '.join(tgt.words)}); use refine"
            )
        pairs = list(enumerate(range(len(tgt.words))))
    else:
        pairs = _align_words(src.keys, tgt.keys)

    mapper = torch.zeros(max_length, max_length)  # (L_source, L_target)
    for s, t in pairs:
        same = src.keys[s] == tgt.keys[t]
        _map_word(mapper, src, tgt, s, t, same, conserve_mass)
    # </s> to </s>, then padding in order: positions shift by the difference in text length.
    shift = tgt.num_text - src.num_text
    for i in range(src.num_text, max_length):
        if 0 <= i + shift < max_length:
            mapper[i, i + shift] = 1.0
    from_source = (mapper.sum(dim=0) > 0).float()  # (L_target,)

    paired_src = {s for s, t in pairs if src.keys[s] == tgt.keys[t]}
    paired_tgt = {t for s, t in pairs if src.keys[s] == tgt.keys[t]}
    return TokenAlignment(
        mode=mode,
        mapper=mapper,
        from_source=from_source,
        changed_words=tuple(w for t, w in enumerate(tgt.words) if t not in paired_tgt),
        changed_source_words=tuple(w for s, w in enumerate(src.words) if s not in paired_src),
        source=src,
        target=tgt,
        changed_columns=tuple(c for t in range(len(tgt.words)) if t not in paired_tgt for c in tgt.word_tokens(t)),
    )


def _map_word(mapper, src: Tokens, tgt: Tokens, s: int, t: int, same: bool, conserve_mass: bool) -> None:
    """Write the columns of target word `t` from source word `s` into `mapper` (rows source, columns target)."""
    rows, cols = src.word_tokens(s), tgt.word_tokens(t)
    if len(rows) == len(cols):
        mapper[rows, cols] = 1.0  # piece to piece
        return
    if same:  # the same word with other pieces ("cat" / "cat,"): match common leading and trailing pieces first
        head = _common_run(src, tgt, rows, cols)
        tail = _common_run(src, tgt, rows[head:][::-1], cols[head:][::-1])
        mapper[rows[:head], cols[:head]] = 1.0
        if tail:
            mapper[rows[len(rows) - tail :], cols[len(cols) - tail :]] = 1.0
        rest_rows, rest_cols = rows[head : len(rows) - tail], cols[head : len(cols) - tail]
        if not rest_cols:
            return
        rows = rest_rows or rows  # extra target pieces with no source piece left: use the whole source word
        cols = rest_cols
    weight = 1.0 / (len(cols) if conserve_mass else len(rows))
    for c in cols:
        mapper[rows, c] = weight


def _common_run(src: Tokens, tgt: Tokens, rows: list[int], cols: list[int]) -> int:
    """How many leading positions of `rows` and `cols` hold the same piece (case-folded)."""
    n = 0
    while n < min(len(rows), len(cols)) and src.pieces[rows[n]].casefold() == tgt.pieces[cols[n]].casefold():
        n += 1
    return n


def _align_words(source: tuple[str, ...], target: tuple[str, ...]) -> list[tuple[int, int]]:
    """Needleman-Wunsch global alignment of two word sequences; returns the matched (source, target) word pairs.

    Scores as in Prompt-to-Prompt's `seq_aligner` (match 1, mismatch -1, gap 0): a mismatch never beats two gaps, so
    only identical words pair up (a longest common subsequence). Ties: reading both sequences from the end, two equal
    last words always pair; otherwise the source's last word is dropped unless that loses a pair that dropping the
    target's keeps. So a repeated source word pairs by its first copy and a repeated target word by its last.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]  # (n + 1, m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diagonal, score[i - 1][j], score[i][j - 1])
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if source[i - 1] == target[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i - 1][j] >= score[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def word_token_indices(tokenizer, prompt: str, words: str | Iterable[str], max_length: int = PIXART_ALPHA_TOKENS) -> list[int]:
    """Sorted token positions of every piece of the named words, at every place they occur in `prompt`.

    `words` is a string or strings; each is split on whitespace and compared with `word_key` ("Cat," finds "cat").
    Raises DiT4EditError naming a word that is not in the prompt.
    """
    tokens = tokenize(tokenizer, prompt, max_length)
    return sorted(i for word in _split_words(words) for i in _positions(tokens, word, prompt))


def reweight_vector(
    tokenizer, prompt: str, weights: Mapping[str, float], max_length: int = PIXART_ALPHA_TOKENS
) -> torch.Tensor:
    """(L,) float32 scale per key token: ones, except every piece of each named word, which gets its weight.

    Prompt-to-Prompt's attention re-weighting multiplies the target's cross-attention columns by this vector.
    A key may name several words ("red car"): all their pieces get the weight. Later keys win on overlap.
    """
    tokens = tokenize(tokenizer, prompt, max_length)
    vector = torch.ones(max_length)
    for key, value in weights.items():
        value = float(value)
        if not math.isfinite(value):
            raise DiT4EditError(f"reweight value for {key!r} must be a finite number, got {value}")
        for word in _split_words(key):
            vector[_positions(tokens, word, prompt)] = value
    return vector


def _positions(tokens: Tokens, word: str, prompt: str) -> list[int]:
    key, keys = word_key(word), tokens.keys
    found = [i for i, w in enumerate(tokens.word_of_token) if w is not None and keys[w] == key]
    if not found:
        raise DiT4EditError(
            f"word {word!r} is not in the prompt {_shorten(prompt)!r} (its words: {', '.join(tokens.words)})"
        )
    return found


def _split_words(words: str | Iterable[str]) -> list[str]:
    items = [words] if isinstance(words, str) else list(words)
    split = [w for item in items for w in str(item).split()]
    if not split:
        raise DiT4EditError("no word given to look up in the prompt")
    return split


def _check_prompt(prompt, what: str) -> None:
    if not isinstance(prompt, str):
        raise DiT4EditError(f"{what} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DiT4EditError(f"{what} is empty")


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
