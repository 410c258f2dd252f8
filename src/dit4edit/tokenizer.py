"""A T5 tokenizer trained from sentences, for models built without a hub (tests, the embedded model)."""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm
from transformers import T5Tokenizer

from .prompts import PIXART_ALPHA_TOKENS


def train_t5_tokenizer(sentences: Iterable[str], vocab_size: int = 256,
                       max_length: int = PIXART_ALPHA_TOKENS) -> T5Tokenizer:
    """Train a unigram sentencepiece model on `sentences` and wrap it as a `T5Tokenizer`.

    Ids follow T5: 0 = `<pad>`, 1 = `</s>`, 2 = `<unk>`, no BOS, words start with the piece marker `▁`.
    `vocab_size` is an upper bound (sentencepiece shrinks it when the text has fewer pieces).
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
