"""A sentencepiece tokenizer: load one, or train one from documents held in memory."""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

UNK_ID = 0
EOS_ID = 1
# Training sentences are document lines; a longer line is cut into pieces of this many
# characters so that sentencepiece (which skips sentences over max_sentence_length bytes) sees it.
MAX_SENTENCE_CHARS = 4096


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model. EOS separates documents in the token stream."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.model_path} does not exist")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer model {self.model_path} is not a sentencepiece model "
                             f"({str(e).strip().splitlines()[-1] if str(e).strip() else e})") from None
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer model {self.model_path} has no EOS piece; one is needed "
                             f"to separate documents (train it with eos_id set)")
        self.checksum = file_sha256(self.model_path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _sentences(documents: Iterable[str]) -> Iterable[str]:
    for doc in documents:
        for line in doc.splitlines(keepends=True):
            if not line.strip():
                continue
            for i in range(0, len(line), MAX_SENTENCE_CHARS):
                yield line[i:i + MAX_SENTENCE_CHARS]


def sample_sentences(documents: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """A uniform sample of at most `max_sentences` lines (reservoir sampling: one pass, bounded
    memory, the same sample for the same input)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, sentence in enumerate(_sentences(documents)):
        if n < max_sentences:
            sample.append(sentence)
        else:
            j = rng.randrange(n + 1)
            if j < max_sentences:
                sample[j] = sentence
    return sample


def train_tokenizer(documents: Iterable[str], out_prefix: str | os.PathLike, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 300_000,
                    byte_fallback: bool = True, num_threads: int = 2) -> Tokenizer:
    """Train a sentencepiece model on a sample of the documents' lines; writes
    `{out_prefix}.model` and returns it loaded.

    The normalisation is the identity and whitespace is kept as is, so decode(encode(text))
    gives the text back (source code keeps its indentation); with byte_fallback no character
    is ever unknown. Ids: 0 = <unk>, 1 = </s> (EOS); no BOS or PAD piece."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type {model_type!r} is not supported; choose bpe or unigram")
    if vocab_size < 16:
        raise ValueError(f"vocab_size {vocab_size} is too small; use at least a few hundred")
    sentences = sample_sentences(documents, max_sentences)
    if not sentences:
        raise ValueError("no text to train the tokenizer on: every document is empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            # Written through a stream: a model_prefix would be recorded in the model and make
            # its bytes (and checksum) depend on where it was trained.
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9999 if byte_fallback else 1.0,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, pad_id=-1,
            # A small corpus may not support the requested size; take what it supports.
            hard_vocab_limit=False,
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes; a char is at most 4
            num_threads=max(1, num_threads),
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ValueError(f"sentencepiece could not train a {model_type} tokenizer with "
                         f"vocab_size {vocab_size}: {msg}") from None
    model_path = Path(f"{out_prefix}.model")
    model_path.write_bytes(model.getvalue())
    return Tokenizer(model_path)
