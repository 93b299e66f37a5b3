"""The language model: embedding -> blocks -> norm -> head.

A block is  x + mixer(norm(x))  then  x + mlp(norm(x)),  where the mixer of each layer is one of
paragru | paralstm | deltaproduct | attention (pretrain/mixers.py). This file is single-device
code; parallel/ applies tensor and sequence parallelism to it from the outside.

Decoding (generate) is a prefill and steps:

    logits, cache = model.prefill(prompt_ids)        # the parallel forward, plus each layer's state
    logits, cache = model.step(next_ids, cache)      # one token per row: O(1) per recurrent layer

The cache is a list with one state per layer (ParaGRU h, ParaLSTM (c, h), DeltaProduct S and conv
windows, attention's KV cache: pretrain/mixers.py). Logits of prefill then steps equal forward's
over the whole sequence (tests/test_decoding.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.flops import model_flops_per_token
from pretrain.mixers import RMSNorm, fp32_at_least
from pretrain.registry import build_mixer


def next_token_loss(logits, labels):
    """Mean cross-entropy of logits [B, T, V] against labels [B, T], computed in fp32."""
    return F.cross_entropy(fp32_at_least(logits).flatten(0, 1), labels.flatten())


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str, layer_idx: int):
        super().__init__()
        self.mixer_name = mixer
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg, mixer, layer_idx)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        hidden = cfg.mlp_multiple * math.ceil(cfg.mlp_ratio * cfg.d_model / cfg.mlp_multiple)
        self.mlp = SwiGLU(cfg.d_model, hidden)

    def forward(self, x, doc_start=None):
        x = x + self.mixer(self.norm1(x), doc_start)
        x = x + self.mlp(self.norm2(x))
        return x

    def prefill(self, x, doc_start=None):
        y, state = self.mixer.prefill(self.norm1(x), doc_start)
        x = x + y
        return x + self.mlp(self.norm2(x)), state

    def step(self, x, state, doc_start=None):
        y, state = self.mixer.step(self.norm1(x), state, doc_start)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, m, i) for i, m in enumerate(cfg.layer_mixers()))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if hasattr(module, "reset_mixer_parameters"):
            module.reset_mixer_parameters()

    def forward(self, input_ids, labels=None, doc_start=None):
        """Logits [B, T, vocab]; with labels, the mean cross-entropy over all positions instead.

        doc_start[b, t] = True where a document begins at t: recurrent state, conv windows and
        (optionally) attention restart there, so packed documents never see each other.
        """
        if not self.cfg.reset_at_doc_start:
            doc_start = None
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, doc_start)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        return self.loss_fn(logits, labels)

    # A tensor-parallel plan swaps in the vocab-parallel cross-entropy (logits sharded over vocab).
    loss_fn = staticmethod(next_token_loss)

    def solver_residual_tensor(self) -> tuple[list[str], torch.Tensor | None]:
        """(names, residuals [L] fp32): the last Newton residual of each ParaRNN layer, stacked on
        the device, with no host sync (the trainer accumulates these between log steps)."""
        names, values = [], []
        for i, block in enumerate(self.blocks):
            residual = getattr(block.mixer, "last_residual", None)
            if residual is not None:
                names.append(f"layer{i}.{block.mixer_name}")
                values.append(residual.detach().float())
        return names, torch.stack(values) if values else None

    def solver_residuals(self) -> dict[str, float]:
        """The last Newton residual of each ParaRNN layer, read in one host sync for all layers."""
        names, values = self.solver_residual_tensor()
        return {} if values is None else dict(zip(names, values.tolist()))

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) counted from each layer's math, including
        the Newton iterations, the scans and the chunkwise DeltaProduct (pretrain/flops.py)."""
        return model_flops_per_token(self.cfg, seq_len)["total"]

    # ------------------------------------------------------------------------- decoding

    def prefill(self, input_ids, doc_start=None):
        """forward over a prompt [B, T] -> (logits [B, T, vocab], cache): the parallel path
        (Newton, chunkwise, attention) and each layer's state after the last token, from which
        step() continues the last document. T = 0 gives the empty cache."""
        if input_ids.shape[1] == 0:
            return self.head.weight.new_zeros(input_ids.shape[0], 0, self.cfg.vocab_size), \
                self.empty_cache(input_ids.shape[0])
        if not self.cfg.reset_at_doc_start:
            doc_start = None
        x = self.embed(input_ids)
        cache = []
        for block in self.blocks:
            x, state = block.prefill(x, doc_start)
            cache.append(state)
        return self.head(self.norm(x)), cache

    def step(self, input_ids, cache, doc_start=None):
        """One token per row, input_ids [B] -> (logits [B, vocab], the cache after it).
        doc_start [B] bool: rows where this token starts a new document (state restarts)."""
        if not self.cfg.reset_at_doc_start:
            doc_start = None
        x = self.embed(input_ids)
        new_cache = []
        for block, state in zip(self.blocks, cache):
            x, state = block.step(x, state, doc_start)
            new_cache.append(state)
        return self.head(self.norm(x)), new_cache

    def empty_cache(self, batch_size: int) -> list:
        """Each layer's state before any token (what step() starts from without a prompt)."""
        return [block.mixer.empty_state(batch_size) for block in self.blocks]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                 generator: torch.Generator | None = None, eos_id: int | None = None,
                 use_cache: bool = True, vocab_limit: int | None = None):
        """Continue input_ids [B, T >= 1] by up to max_new_tokens tokens (stopping early once every
        row has sampled eos_id); temperature 0 is greedy; only ids below vocab_limit are drawn (a
        tokenizer smaller than the model's vocabulary). With the cache: one prefill over the
        prompt, then one step per token. use_cache=False re-runs the whole sequence for every
        token (the same tokens, O(T) per token; for comparison)."""
        if input_ids.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if use_cache:
            logits, cache = self.prefill(input_ids)
            logits = logits[:, -1]
        for i in range(max_new_tokens):
            if not use_cache:
                logits = self(input_ids)[:, -1]
            nxt = sample_next_token(logits, temperature, top_k, generator, vocab_limit)
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            if use_cache and i + 1 < max_new_tokens:
                logits, cache = self.step(nxt, cache)
        return input_ids


def sample_next_token(logits, temperature: float = 0.8, top_k: int = 40,
                      generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Next token [B] from logits [B, vocab]: argmax at temperature 0, else a sample from
    softmax(logits / temperature) restricted to the top_k logits (0: all); ids >= vocab_limit never."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    logits = fp32_at_least(logits)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
