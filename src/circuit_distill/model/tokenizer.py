"""Word-level tokenizer for the models this project trains itself.

Saved as a real ``PreTrainedTokenizerFast`` so ``load_model`` treats it like any checkpoint's.
Words are split on whitespace and on punctuation; every vocabulary entry is one token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_level_tokenizer(words: Iterable[str], *, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is the special tokens then ``words``.

    Token ids follow the order of ``words`` (duplicates dropped), so the same word list always
    gives the same ids. Unknown words map to ``<unk>``.
    """
    vocab: dict[str, int] = {}
    for w in list(SPECIAL_TOKENS) + list(words):
        w = w.lower() if lowercase and w not in SPECIAL_TOKENS else w
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"vocabulary entries must be non-empty and contain no whitespace: {w!r}")
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        clean_up_tokenization_spaces=False,
    )


def numbered_vocabulary(vocab_size: int) -> list[str]:
    """Words ``w0 .. wK`` filling a vocabulary of ``vocab_size`` tokens including specials."""
    return [f"w{i}" for i in range(max(0, vocab_size - len(SPECIAL_TOKENS)))]
