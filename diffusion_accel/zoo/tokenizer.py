"""Tokenizers built locally (no hub): a byte-level BPE CLIP tokenizer and a word-level T5 tokenizer."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from tokenizers import normalizers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5Tokenizer

from .captions import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 32


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every adjacent occurrence of ``pair`` in ``seq`` by the joined symbol."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (most frequent pair first) until every word is a single symbol."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        seqs = [_merge_pair(s, best) for s in seqs]
    return merges


def write_clip_vocab(folder: Path, words: tuple[str, ...] | None = None) -> Path:
    """Write vocab.json/merges.txt: 256 bytes (+ ``</w>`` forms), one token per word, BOS/EOS."""
    folder.mkdir(parents=True, exist_ok=True)
    words = vocabulary() if words is None else words
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in _byte_chars():
            vocab.setdefault(char + suffix, len(vocab))
    merges = learn_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer whose caption words are single tokens; any other text falls back to bytes."""
    with tempfile.TemporaryDirectory(prefix="da_zoo_clip_tok_") as temporary:  # one was left behind per call
        folder = write_clip_vocab(Path(temporary))
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, pad_token=EOS)


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A Unigram T5 tokenizer: one piece per caption word, letters/digits/punctuation as fallback, lowercasing
    first as the CLIP tokenizers do (its pieces are lowercase: "A Sneaker" lost both words to <unk> and letters,
    and fashion-flux drew bags for it). A ``PreTrainedTokenizerFast`` around T5's tokenizer: transformers'
    ``T5Tokenizer`` rebuilds its normalizer from a sentencepiece charsmap when loaded, dropping the lowercasing."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = [("\u2581" + w, -1.0) for w in vocabulary() if w.isalpha()]
    words += [(w, -1.5) for w in vocabulary() if w.isalpha() and len(w) > 1]
    chars = [(c, -5.0) for c in string.ascii_lowercase + string.digits + "-.,'"]
    t5 = T5Tokenizer(vocab=specials + words + chars, extra_ids=0, model_max_length=max_length)
    t5.backend_tokenizer.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=t5.backend_tokenizer, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)
