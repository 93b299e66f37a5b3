"""Held-out evaluation of a trained model: loss, perplexity, bits per token and bits per byte.

The model comes from an export (`python -m launch.export`, either --format) or from a checkpoint (a checkpoint
dir, or a run dir's newest intact one; consolidated exactly as an export would be). The text is
either a prepared split (`data/` manifest and shards, read with their sha256 checked; the split's
tokenizer must be the model's) or raw text files tokenised here with the model's tokenizer (one
document per file for .txt, one per line for .jsonl, as prepare_data reads them; EOS after each).

Scoring. The token stream (documents, each followed by EOS) is preceded by one EOS, so its first
token is predicted as a document start like every other, and cut into consecutive windows of
seq_len + 1 tokens overlapping by one; each window predicts its last seq_len tokens from zero
state, with the state (and attention) reset after every EOS exactly as in training. Every token
of the text, EOS included, is scored once. Bits per byte divide the summed loss (in bits) by the
UTF-8 bytes of the text: each document's tokens decoded on their own, plus one byte per EOS (the
document separator). For raw text that round-trips through the tokenizer (prepare_data's
tokenizers do: identity normalisation, byte fallback) these are the files' own bytes plus one per
document.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.corpus import iter_documents
from data.shards import empty_split_reason, load_manifest, load_shard
from data.sources import open_source
from data.tokenizer import Tokenizer
from pretrain.config import ConfigError
from pretrain.export import export, is_export, load_exported
from pretrain.hf_export import is_hf_export, load_hf_exported


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model in eval mode, its tokenizer, export metadata) from an export or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass an export dir, a run dir or a checkpoint dir")
    if is_export(path):
        model, meta = load_exported(path, device)
        return model, Tokenizer(path / "tokenizer.model"), meta
    if is_hf_export(path):
        model, meta = load_hf_exported(path, device)
        return model, Tokenizer(path / "tokenizer.model"), meta
    with tempfile.TemporaryDirectory(prefix="eval-export-") as tmp:
        out = export(path, Path(tmp) / "export")  # sha256-checked, consolidated like an export
        model, meta = load_exported(out, device)
        return model, Tokenizer(out / "tokenizer.model"), meta


def split_tokens(data_dir, split: str, tokenizer: Tokenizer) -> np.ndarray:
    """The whole token stream of a prepared split (a directory, URL or pipe: source), after checking
    it was made by this tokenizer."""
    manifest, _ = load_manifest(data_dir)
    if manifest.get("tokenizer_sha256") != tokenizer.checksum:
        raise ConfigError(f"{data_dir} was tokenised by another tokenizer than the model's; evaluate on "
                          f"data prepared with the model's tokenizer.model (prepare_data --tokenizer) or on text files")
    if split not in ("train", "val"):
        raise ConfigError(f"--split must be train or val, got {split!r}")
    shards = manifest[split]["shards"]
    if not shards:
        why = f" ({empty_split_reason(manifest)})" if split == "val" else ""
        raise ConfigError(f"split {split!r} of {data_dir} is empty{why}; evaluate --split train, pass --text "
                          f"files, or prepare the data with a larger --val-fraction")
    dtype = np.dtype(manifest["dtype"])
    source = open_source(data_dir)
    return np.concatenate([load_shard(source, s, dtype) for s in shards]).astype(np.int64)


def text_tokens(files, tokenizer: Tokenizer, text_field: str = "text") -> np.ndarray:
    ids: list[int] = []
    try:
        documents = iter_documents(files, text_field)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    if not ids:
        raise ConfigError(f"{', '.join(map(str, files))} hold no text to evaluate on")
    return np.asarray(ids, dtype=np.int64)


def scored_bytes(stream: np.ndarray, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the text the stream decodes to (see the module docstring)."""
    eos = tokenizer.eos_id
    total, start = 0, 0
    for end in list(np.flatnonzero(stream == eos)) + [len(stream)]:
        if end > start:
            total += len(tokenizer.decode(stream[start:end].tolist()).encode("utf-8"))
        total += int(end < len(stream))  # the EOS
        start = int(end) + 1
    return int(total)


@torch.no_grad()
def score(model, stream: np.ndarray, eos_id: int, seq_len: int, batch_size: int, device) -> tuple[float, int]:
    """(summed next-token loss in nats, tokens scored) over the stream (module docstring)."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"--seq-len and --batch-size must be >= 1, got {seq_len} and {batch_size}")
    windows = [stream[s:s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]
    full = [w for w in windows if len(w) == seq_len + 1]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if len(w) != seq_len + 1]  # the stream's shorter last window
    nll, count = 0.0, 0
    for batch in batches:
        ids = torch.from_numpy(np.stack(batch)).to(device)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        doc_start = torch.zeros_like(inputs, dtype=torch.bool)
        doc_start[:, 0] = True
        doc_start[:, 1:] = inputs[:, :-1] == eos_id
        logits = model(inputs, doc_start=doc_start)
        nll += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += labels.numel()
    return nll, count


def evaluate(model_path, *, data: str | None = None, split: str = "val", text=None, seq_len: int = 256,
             batch_size: int = 8, max_tokens: int | None = None, device=None) -> dict:
    """Loss (nats/token), perplexity, bits per token and bits per byte; see the module docstring."""
    if (data is None) == (not text):
        raise ConfigError("pass exactly one of --data (a prepared directory) and --text (files)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = load_model(model_path, device)
    stream = split_tokens(data, split, tokenizer) if data is not None else text_tokens(text, tokenizer)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
        stream = stream[:max_tokens]
    if len(stream) < 1:
        raise ConfigError("the evaluation text holds no tokens")
    if int(stream.max()) >= model.cfg.vocab_size:
        raise ConfigError(f"token id {int(stream.max())} is beyond the model's vocab_size {model.cfg.vocab_size}")
    with_start = np.concatenate([[tokenizer.eos_id], stream])  # the first token is a document start
    nll, tokens = score(model, with_start, tokenizer.eos_id, seq_len, batch_size, device)
    n_bytes = scored_bytes(stream, tokenizer)
    loss = nll / tokens
    return {"model": str(model_path), "source": data if data is not None else [str(t) for t in text],
            "split": split if data is not None else None, "step": meta.get("step"),
            "tokens": int(tokens), "bytes": int(n_bytes), "loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_token": loss / math.log(2), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "seq_len": seq_len}


def summary_line(result: dict) -> str:
    return (f"eval: {result['tokens']:,} tokens ({result['bytes']:,} bytes): loss {result['loss']:.4f}, "
            f"perplexity {result['perplexity']:.2f}, {result['bits_per_token']:.3f} bits/token, "
            f"{result['bits_per_byte']:.4f} bits/byte")


def to_json(result: dict) -> str:
    return json.dumps(result)
