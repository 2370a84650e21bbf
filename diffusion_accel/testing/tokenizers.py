"""Tokenizers built locally (no hub): a byte-level CLIP tokenizer and a word-level T5 tokenizer.

Used by the tiny test pipelines and the built-in demo pipeline. Real pipelines ship their own.
"""

from __future__ import annotations

import json
import string
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_clip_tokenizer_files(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write ``vocab.json``/``merges.txt`` for a CLIP BPE tokenizer whose merges build ``words``.

    Every byte is a token (so any text tokenizes); each word in ``words`` also becomes one token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for char in _byte_level_chars():
        vocab.setdefault(char, len(vocab))
    for char in _byte_level_chars():
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        _add_word_merges(word, vocab, merges)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("".join(line + "\n" for line in ["#version: 0.2", *merges]),
                                      encoding="utf-8")
    return folder


def _add_word_merges(word: str, vocab: dict[str, int], merges: list[str]) -> None:
    """Append left-to-right merges that turn ``word`` (with its ``</w>`` end mark) into one token."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    current = pieces[0]
    for piece in pieces[1:]:
        merged = current + piece
        rule = f"{current} {piece}"
        if merged not in vocab:
            vocab[merged] = len(vocab)
            merges.append(rule)
        current = merged


@lru_cache(maxsize=None)
def clip_tokenizer(max_length: int = 77, words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """A CLIP tokenizer built in a temporary folder (byte-level, plus one token per word)."""
    folder = Path(tempfile.mkdtemp(prefix="da_clip_tok_"))
    write_clip_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, pad_token=EOS)


@lru_cache(maxsize=None)
def t5_tokenizer(words: tuple[str, ...] = ("a", "photo", "of", "red", "bicycle", "cat"),
                 max_length: int = 64) -> T5Tokenizer:
    """A Unigram T5 tokenizer: one piece per word in ``words``, letters/digits as fallback."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    word_pieces = [("\u2581" + word, -1.0) for word in words]
    char_pieces = [(char, -5.0) for char in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=specials + word_pieces + char_pieces, extra_ids=0,
                       model_max_length=max_length)
