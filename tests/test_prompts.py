"""T5 token/word alignment (dit4edit.prompts) on a small trained T5 tokenizer whose words split into many pieces."""

import random

import pytest
import torch

from dit4edit.errors import DiT4EditError
from dit4edit.prompts import WORD_START, align, reweight_vector, tokenize, word_key, word_token_indices
from dit4edit.prompts import PIXART_ALPHA_TOKENS, _align_words, preprocess_prompt
from dit4edit.tokenizer import train_t5_tokenizer

L = PIXART_ALPHA_TOKENS
SENTENCES = [
    "a cat sitting on the grass",
    "a cat on the grass",
    "a photo of a cat",
    "a dog on the grass",
    "the cat and the dog on the grass",
    "a big cat on a red car",
    "a painting of a cat, watercolor style",
    "a hippopotamus in the river",
    "an elephant near the house",
]
WORDS = ["a", "cat", "dog", "elephant", "hippopotamus", "car", "red", "big", "grass", "on", "the", "river"]


@pytest.fixture(scope="module")
def tok():
    tokenizer = train_t5_tokenizer(SENTENCES * 5, vocab_size=60)
    # The cases below rely on these splits: one word of one piece, others of several.
    assert pieces_of(tokenizer, "cat") == ["▁cat"]
    assert len(pieces_of(tokenizer, "elephant")) >= 3
    assert len(pieces_of(tokenizer, "dog")) >= 3
    assert len(pieces_of(tokenizer, "car")) == 2
    assert pieces_of(tokenizer, "cat,") == ["▁cat", ","]
    return tokenizer


def pieces_of(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def positions(tokens, word_index):
    return tokens.word_tokens(word_index)


# --- preparing a prompt -------------------------------------------------------------------------------------------

VARIED_PROMPTS = [
    "A Red Circle on a White Background",
    "  a cat sitting on the GRASS  ",
    "\tA Photo Of A Cat,\nWatercolor Style.\r\n",
    "an ELEPHANT -- near the \"House\"!",
    "Straße, ÉCOLE, İstanbul, ΣΟΦΙΑ",
    "a cat &amp; a dog at https://example.com/cat.png #123",
    "already lowercase",
]


@pytest.mark.parametrize("clean_caption", [False, True])
def test_preprocess_prompt_is_what_diffusers_pixart_pipeline_does(clean_caption):
    from diffusers import PixArtAlphaPipeline

    pipeline = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)  # no components: the text rules only
    expected = pipeline._text_preprocessing(VARIED_PROMPTS, clean_caption=clean_caption)
    assert [preprocess_prompt(p, clean_caption=clean_caption) for p in VARIED_PROMPTS] == expected
    assert preprocess_prompt(VARIED_PROMPTS[0]) == "a red circle on a white background"


def test_preprocess_prompt_refuses_what_is_not_text():
    with pytest.raises(DiT4EditError, match="must be text"):
        preprocess_prompt(["a cat"])


def test_prompt_length_default_agrees_with_the_model_folder():
    from dit4edit.model_folder import DEFAULT_PROMPT_LENGTH, PROMPT_LENGTHS

    assert PIXART_ALPHA_TOKENS == DEFAULT_PROMPT_LENGTH == PROMPT_LENGTHS["PixArtAlphaPipeline"] == 120


# --- tokenize ------------------------------------------------------------------------------------------------------


def test_tokenize_matches_pixart_encoding_and_groups_pieces_into_words(tok):
    prompt = "a photo of an elephant, standing"
    tokens = tokenize(tok, prompt)
    expected = tok(prompt, max_length=L, padding="max_length", truncation=True)["input_ids"]
    assert list(tokens.ids) == list(expected)
    assert len(tokens.ids) == len(tokens.pieces) == len(tokens.word_of_token) == L
    n = tokens.num_text
    assert tokens.pieces[0].startswith(WORD_START)  # no BOS
    assert tokens.ids[n] == tok.eos_token_id and tokens.pieces[n] == "</s>"
    assert set(tokens.ids[n + 1 :]) == {tok.pad_token_id}
    assert tokens.word_of_token[n:] == (None,) * (L - n)
    assert tokens.words == ("a", "photo", "of", "an", "elephant,", "standing")
    elephant = positions(tokens, 4)
    assert [tokens.pieces[i] for i in elephant] == pieces_of(tok, "elephant,")  # "▁", "e", "le", ..., ","
    assert len(elephant) >= 4 and tokens.pieces[elephant[-1]] == ","  # glued comma belongs to its word
    # every piece that starts a word carries the marker, and only those
    for i in range(n):
        starts_word = i == 0 or tokens.word_of_token[i] != tokens.word_of_token[i - 1]
        assert tokens.pieces[i].startswith(WORD_START) == starts_word


class DroppingTokenizer:
    """A tokenizer whose normaliser deletes a character, so a whitespace word can vanish (as control characters may)."""

    def __init__(self, tokenizer, dropped):
        self.tokenizer, self.dropped = tokenizer, dropped

    def __call__(self, text, **kwargs):
        return self.tokenizer(text.replace(self.dropped, ""), **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_words_without_pieces_are_dropped(tok):
    dropping = DroppingTokenizer(tok, "\x07")
    tokens = tokenize(dropping, "a \x07 cat on the grass")
    assert tokens.words == ("a", "cat", "on", "the", "grass")
    assert tokens.ids == tokenize(tok, "a cat on the grass").ids
    assert align(dropping, "a \x07 cat on the grass", "a dog on the grass").mode == "replace"
    with pytest.raises(DiT4EditError, match="gives no T5 tokens"):
        tokenize(dropping, "\x07")


def test_word_key_strips_punctuation_and_case():
    assert word_key("Cat,") == "cat"
    assert word_key('"Dog!"') == "dog"
    assert word_key(",") == ","
    assert word_key("don't") == "don't"


# --- replace -------------------------------------------------------------------------------------------------------


def test_replace_identity_for_equal_prompts(tok):
    for prompt in ["a cat on the grass", "a hippopotamus, on the red car."]:
        alignment = align(tok, prompt, prompt)
        assert alignment.mode == "replace"
        assert alignment.mapper.dtype == torch.float32 and torch.equal(alignment.mapper, torch.eye(L))
        assert torch.equal(alignment.from_source, torch.ones(L))
        assert alignment.changed_words == () and alignment.changed_source_words == ()
        assert alignment.changed_columns == ()


def test_replace_one_piece_word_to_many_pieces(tok):
    a = align(tok, "a cat on the grass", "a elephant on the grass")
    src, tgt = a.source, a.target
    assert a.mode == "replace"
    assert a.changed_words == ("elephant",) and a.changed_source_words == ("cat",)
    (cat,) = positions(src, 1)
    elephant = positions(tgt, 1)
    assert len(elephant) >= 3
    assert a.changed_columns == tuple(elephant)
    for j in elephant:  # every target piece's column is the source word's column
        expected = torch.zeros(L)
        expected[cat] = 1.0
        assert torch.equal(a.mapper[:, j], expected)
    # identical words map piece to piece, shifted by the longer word
    for w in (0, 2, 3, 4):
        for i, j in zip(positions(src, w), positions(tgt, w)):
            assert a.mapper[i, j] == 1.0 and a.mapper[:, j].sum() == 1.0
    # </s> to </s>, padding to padding
    assert a.mapper[src.num_text, tgt.num_text] == 1.0 and a.mapper[:, tgt.num_text].sum() == 1.0
    assert tgt.pieces[tgt.num_text] == "</s>"
    assert torch.all(a.from_source[: tgt.num_text + 1] == 1.0)


def test_replace_many_pieces_word_to_one_piece_takes_the_mean(tok):
    a = align(tok, "a elephant on the grass", "a cat on the grass")
    elephant = positions(a.source, 1)
    (cat,) = positions(a.target, 1)
    column = a.mapper[:, cat]
    assert torch.allclose(column[elephant], torch.full((len(elephant),), 1.0 / len(elephant)))
    assert column.sum().item() == pytest.approx(1.0)
    assert column.count_nonzero() == len(elephant)
    # conserve_mass (Prompt-to-Prompt's rule, sum / target pieces): here the sum of the source columns
    summed = align(tok, "a elephant", "a cat", conserve_mass=True).mapper[:, 1]
    assert torch.equal(summed[elephant], torch.ones(len(elephant)))
    # and in the other direction the source word's mass is shared by the target pieces
    b = align(tok, "a cat", "a elephant", conserve_mass=True)
    pieces = positions(b.target, 1)
    assert b.mapper[1, pieces].sum().item() == pytest.approx(1.0)


def test_replace_same_word_in_other_case_and_with_glued_punctuation(tok):
    a = align(tok, "a cat on the grass", "A Cat, on the grass.")
    assert a.mode == "replace"
    assert a.changed_words == ()
    # every target text token still takes a source column
    assert torch.all(a.from_source[: a.target.num_text + 1] == 1.0)
    # "cat" -> "Cat,": the pieces differ, all of them take the source word's column
    (cat,) = positions(a.source, 1)
    for j in positions(a.target, 1):
        assert a.mapper[cat, j] == 1.0
    # "cat," -> "cat": the comma piece is dropped, "▁cat" maps to "▁cat"
    b = align(tok, "a cat, on the grass", "a cat on the grass")
    cat_src, comma = positions(b.source, 1)
    (cat_tgt,) = positions(b.target, 1)
    assert b.mapper[cat_src, cat_tgt] == 1.0 and b.mapper[:, cat_tgt].sum() == 1.0
    assert b.mapper[comma].sum() == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_replace_property_random_attention(tok, seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    source = [rng.choice(WORDS) for _ in range(n)]
    target = [w if rng.random() < 0.5 else rng.choice(WORDS) for w in source]
    a = align(tok, " ".join(source), " ".join(target), mode="replace")
    src, tgt = a.source, a.target
    gen = torch.Generator().manual_seed(seed)
    probs = torch.zeros(7, L)  # (queries, keys): rows sum to 1 over the source's text tokens and </s>
    probs[:, : src.num_text + 1] = torch.rand(7, src.num_text + 1, generator=gen)
    probs /= probs.sum(dim=1, keepdim=True)
    mapped = probs @ a.mapper  # (queries, target keys)
    assert torch.all(mapped[:, : tgt.num_text + 1] >= 0)
    for w in range(n):
        s_cols, t_cols = positions(src, w), positions(tgt, w)
        if len(s_cols) == len(t_cols):
            assert torch.allclose(mapped[:, t_cols], probs[:, s_cols])
        else:
            mean = probs[:, s_cols].mean(dim=1, keepdim=True).expand(-1, len(t_cols))
            assert torch.allclose(mapped[:, t_cols], mean)
    assert torch.allclose(mapped[:, tgt.num_text], probs[:, src.num_text])  # </s>
    assert a.changed_words == tuple(t for s, t in zip(source, target) if s != t)


# --- refine --------------------------------------------------------------------------------------------------------


def test_refine_insertion(tok):
    a = align(tok, "a cat on the grass", "a big cat on the red grass")
    src, tgt = a.source, a.target
    assert a.mode == "refine"
    assert a.changed_words == ("big", "red") and a.changed_source_words == ()
    inserted = positions(tgt, 1) + positions(tgt, 5)
    assert a.changed_columns == tuple(inserted)
    own = [j for j in range(tgt.num_text) if a.from_source[j] == 0]
    assert own == inserted
    assert torch.all(a.mapper[:, inserted] == 0)
    # kept words map one to one at their shifted positions
    for s, t in [(0, 0), (1, 2), (2, 3), (3, 4), (4, 6)]:
        for i, j in zip(positions(src, s), positions(tgt, t), strict=True):
            assert a.mapper[i, j] == 1.0 and a.mapper[:, j].sum() == 1.0
    assert a.mapper[src.num_text, tgt.num_text] == 1.0  # </s> -> </s>
    assert a.from_source[tgt.num_text] == 1.0
    # every source padding token lands on a target padding token
    assert torch.all(a.mapper[src.num_text + 1 :].sum(dim=1)[: L - tgt.num_text - 1] == 1.0)


def test_refine_deletion(tok):
    a = align(tok, "a big cat on the red grass", "a cat on the grass")
    src, tgt = a.source, a.target
    assert a.changed_words == () and a.changed_source_words == ("big", "red")
    for removed in positions(src, 1) + positions(src, 5):
        assert a.mapper[removed].sum() == 0.0
    assert a.mapper[src.num_text, tgt.num_text] == 1.0 and tgt.pieces[tgt.num_text] == "</s>"
    shift = src.num_text - tgt.num_text
    # all target tokens come from the source except the last padding slots, which have no source padding left
    assert torch.all(a.from_source[: L - shift] == 1.0)
    assert torch.all(a.from_source[L - shift :] == 0.0)


def test_refine_separate_punctuation_is_its_own_word(tok):
    a = align(tok, "a cat on the grass", "a cat , on the grass")
    assert a.mode == "refine" and a.changed_words == (",",)
    own = [j for j in range(a.target.num_text) if a.from_source[j] == 0]
    assert own == positions(a.target, 2)
    assert [a.target.pieces[j] for j in own] == ["▁", ","]


def test_refine_forced_with_equal_word_counts(tok):
    a = align(tok, "a cat on the grass", "a dog on the grass", mode="refine")
    assert a.mode == "refine" and a.changed_words == ("dog",)
    dog = positions(a.target, 1)
    assert [j for j in range(L) if a.from_source[j] == 0] == dog


def test_refine_repeated_words_align_to_the_nearest_match(tok):
    # "a photo of a cat" -> "a cat": the target's "a" pairs with the "a" next to "cat", not the first one
    a = align(tok, "a photo of a cat", "a cat")
    src, tgt = a.source, a.target
    assert a.changed_words == () and a.changed_source_words == ("a", "photo", "of")
    (first_a,), (second_a,), (target_a,) = positions(src, 0), positions(src, 3), positions(tgt, 0)
    assert a.mapper[second_a, target_a] == 1.0 and a.mapper[first_a].sum() == 0.0
    assert torch.all(a.from_source[: tgt.num_text + 1] == 1.0)


def test_refine_ties_pair_early_source_words_with_late_target_words(tok):
    # Two alignments keep two words each: "a big" with the target's second "a big", or "a cat" with its first
    # "a cat". The backtrace from the end prefers dropping a source word to dropping a target word, so the match
    # sits late in the target: "cat" is the changed source word and the target's first "a cat" is new.
    a = align(tok, "a big cat", "a cat and a big dog")
    assert a.changed_source_words == ("cat",)
    assert a.changed_words == ("a", "cat", "and", "dog")
    (source_a,), target_a = positions(a.source, 0), positions(a.target, 3)
    assert a.mapper[source_a, target_a].tolist() == [1.0]
    assert a.mapper[source_a, positions(a.target, 0)].tolist() == [0.0]


@pytest.mark.parametrize("source, target, pairs", [
    ("ccc", "cb", [(0, 0)]),  # a repeated source word: its first copy
    ("cc", "caaa", [(0, 0)]),
    ("ba", "bb", [(0, 1)]),  # a repeated target word: its last copy
    ("ab", "baca", [(0, 3)]),  # "a" late in the target rather than "b" early
    ("caab", "cc", [(0, 1)]),
    ("abc", "abc", [(0, 0), (1, 1), (2, 2)]),
])
def test_word_alignment_tie_break(source, target, pairs):
    assert _align_words(tuple(source), tuple(target)) == pairs


def test_word_alignment_is_a_longest_common_subsequence_with_the_stated_tie_break():
    rng = random.Random(0)
    for _ in range(300):
        source = tuple(rng.choice("abc") for _ in range(rng.randint(1, 6)))
        target = tuple(rng.choice("abc") for _ in range(rng.randint(1, 6)))
        pairs = _align_words(source, target)
        assert all(source[s] == target[t] for s, t in pairs)
        assert all(s1 < s2 and t1 < t2 for (s1, t1), (s2, t2) in zip(pairs, pairs[1:]))
        assert len(pairs) == _lcs_length(source, target)
        assert pairs == _preferred_alignment(source, target)


def _lcs_length(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _preferred_alignment(a, b):
    """The tie-break, by brute force over every way to walk both sequences from their ends: each step pairs the two
    last words (only if equal), drops the source's last word, or drops the target's. Of the walks with the most
    pairs, the one whose steps, read from the end, prefer pairing, then dropping the source word."""
    walks = []

    def walk(i, j, steps, pairs):
        if i == 0 or j == 0:
            walks.append((-len(pairs), steps, pairs[::-1]))
            return
        if a[i - 1] == b[j - 1]:
            walk(i - 1, j - 1, steps + "0", pairs + [(i - 1, j - 1)])
        walk(i - 1, j, steps + "1", pairs)  # drop the source word
        walk(i, j - 1, steps + "2", pairs)  # drop the target word

    walk(len(a), len(b), "", [])
    return min(walks)[2]


def test_auto_mode_choice(tok):
    assert align(tok, "a cat on the grass", "a dog on the grass").mode == "replace"
    assert align(tok, "a cat on the grass", "a cat").mode == "refine"
    assert align(tok, "a cat", "a big red cat").mode == "refine"


# --- word positions and reweighting ---------------------------------------------------------------------------------


def test_word_token_indices(tok):
    prompt = "a Cat near a big elephant, on the grass"
    tokens = tokenize(tok, prompt)
    elephant = positions(tokens, 5)
    assert word_token_indices(tok, prompt, "elephant") == elephant
    assert word_token_indices(tok, prompt, ["cat", "elephant"]) == positions(tokens, 1) + elephant
    assert word_token_indices(tok, prompt, "a") == positions(tokens, 0) + positions(tokens, 3)
    assert word_token_indices(tok, prompt, "big elephant") == positions(tokens, 4) + elephant


def test_reweight_vector_positions(tok):
    prompt = "a big elephant on the grass"
    tokens = tokenize(tok, prompt)
    vector = reweight_vector(tok, prompt, {"Elephant": 2.5, "grass": 0.0})
    assert vector.shape == (L,)
    expected = torch.ones(L)
    expected[positions(tokens, 2)] = 2.5
    expected[positions(tokens, 5)] = 0.0
    assert torch.equal(vector, expected)
    assert (vector == 2.5).sum() == len(positions(tokens, 2)) >= 3


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \t\n"])
def test_empty_prompts(tok, prompt):
    with pytest.raises(DiT4EditError, match="source prompt is empty"):
        align(tok, prompt, "a cat")
    with pytest.raises(DiT4EditError, match="target prompt is empty"):
        align(tok, "a cat", prompt)
    with pytest.raises(DiT4EditError, match="prompt is empty"):
        tokenize(tok, prompt)


def test_too_long_prompt_names_its_token_count(tok):
    prompt = " ".join(["grass"] * 30)  # 6 pieces a word: 181 tokens with </s>
    count = len(tok(prompt)["input_ids"])
    assert count > L
    with pytest.raises(DiT4EditError, match=rf"prompt has {count} T5 tokens .* more than the {L}"):
        align(tok, "a cat", prompt)
    # just fits with a longer max_length
    assert tokenize(tok, prompt, max_length=count).num_text == count - 1


def test_replace_with_different_word_counts_names_both(tok):
    with pytest.raises(DiT4EditError) as info:
        align(tok, "a cat on the grass", "a big dog on the grass", mode="replace")
    message = str(info.value)
    assert "source has 5 (a cat on the grass)" in message
    assert "target has 6 (a big dog on the grass)" in message
    with pytest.raises(DiT4EditError, match=r"source has 2 \(a cat\), target has 3 \(a big dog\)"):
        align(tok, "a cat", "a big dog", mode="replace")
    assert "\n" not in message


def test_unknown_words_are_named(tok):
    words = r"\(its words: a, cat, on, the, grass\)"
    with pytest.raises(DiT4EditError, match=rf"word 'zebra' is not in the prompt 'a cat on the grass' {words}"):
        reweight_vector(tok, "a cat on the grass", {"cat": 2.0, "zebra": 2.0})
    with pytest.raises(DiT4EditError, match=r"word 'dog' is not in the prompt"):
        word_token_indices(tok, "a cat on the grass", ["cat", "dog"])
    with pytest.raises(DiT4EditError, match=r"reweight value for 'cat'"):
        reweight_vector(tok, "a cat", {"cat": float("nan")})
    with pytest.raises(DiT4EditError, match=r"edit mode must be one of auto, replace, refine, got 'swap'"):
        align(tok, "a cat", "a dog", mode="swap")
