"""An lm-evaluation-harness model: `lm_eval --model recurrent-pretrain --model_args model=DIR ...`.

    from pretrain.harness import RecurrentLM
    lm = RecurrentLM(model="runs/smoke/export")            # an export (either format), run or checkpoint dir
    lm_eval.simple_evaluate(model=lm, tasks=[...])

lm_eval is optional (`pip install lm_eval`; it pulls datasets, pandas, scipy, scikit-learn, ... so it
is not in the test extra): with it installed RecurrentLM subclasses lm_eval.api.model.LM and
registers itself as "recurrent-pretrain"; without it the class works on its own on any objects
with an `args` tuple, as lm_eval's Instance has.

Conventions (those of launch.eval): text is encoded by the model's sentencepiece tokenizer with no
BOS; every context starts after one EOS (the token a document start is predicted from in
training). The three request types:

  * loglikelihood (context, continuation) -> (log p(continuation | context), whether greedy
    decoding would produce it): the context is prefilled once (requests sharing a context share
    it; lm_eval sends each choice of a multiple-choice question with the same context) and the
    continuation is scored by one recurrent step per token from that state. As lm_eval's HF model
    does, trailing spaces of the context move to the continuation and the continuation's tokens are
    those of encode(context + continuation) after encode(context).
  * loglikelihood_rolling (text,) -> log p(text), every token scored once (EOS first) in windows of
    max_length tokens, as launch.eval scores a stream.
  * generate_until (context, {"until": [...], "max_gen_toks": N, "do_sample": bool, "temperature": T})
    -> the continuation, cut before the first stop string: prefill, then one step per token (the
    recurrent cache); greedy unless do_sample; it stops at EOS too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.model import sample_next_token

try:
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model
except ImportError:  # lm_eval is optional
    _HarnessLM = object

    def register_model(*names):
        return lambda cls: cls


@register_model("recurrent-pretrain")
class RecurrentLM(_HarnessLM):
    def __init__(self, model, tokenizer=None, device: str | None = None, batch_size: int | str = 8,
                 max_length: int = 2048, seed: int = 0, **unused):
        """model: a path (export of either format, run dir, checkpoint dir) or a LanguageModel with
        `tokenizer` (data.tokenizer.Tokenizer) given. batch_size is used by loglikelihood_rolling."""
        if _HarnessLM is not object:
            super().__init__()
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, (str, Path)):
            from pretrain.evaluate import load_model

            model, tokenizer, _ = load_model(model, self._device)
        elif tokenizer is None:
            raise ValueError("RecurrentLM(model=<LanguageModel>) needs tokenizer=<data.tokenizer.Tokenizer>")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)
        self.eos_id = tokenizer.eos_id
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # -------------------------------------------------------------------------- helpers

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return [self.eos_id] + context_ids, whole[len(context_ids):]

    def _prefill(self, ids: list[int]):
        """(logits of the last token [vocab], cache) after ids (the last max_length of them); a
        document starts after every EOS, as in training."""
        ids = torch.tensor([ids[-self.max_length:]], device=self._device)
        logits, cache = self.model.prefill(ids, self._doc_start(ids))
        return logits[0, -1], cache

    def _doc_start(self, ids):
        doc_start = torch.zeros_like(ids, dtype=torch.bool)
        doc_start[:, 0] = True
        doc_start[:, 1:] = ids[:, :-1] == self.eos_id
        return doc_start

    def _step(self, token: int, previous: int, cache):
        ids = torch.tensor([token], device=self._device)
        logits, cache = self.model.step(ids, cache, torch.tensor([previous == self.eos_id], device=self._device))
        return logits[0], cache

    # -------------------------------------------------------------------------- lm_eval's three methods

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        for context, indices in by_context.items():
            first_logits, first_cache = self._prefill(list(context))
            for i in indices:
                logits, cache = first_logits, first_cache  # steps return new states: the prefill is reused
                total, greedy = 0.0, True
                continuation = pairs[i][1]
                for j, token in enumerate(continuation):
                    logprobs = torch.log_softmax(logits.double(), dim=-1)
                    total += float(logprobs[token])
                    greedy &= int(logprobs.argmax()) == token
                    if j + 1 < len(continuation):
                        logits, cache = self._step(token, continuation[j - 1] if j else context[-1], cache)
                results[i] = (total, bool(greedy))
            self._cache_hook(requests, indices, pairs, results)
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from pretrain.evaluate import score

        out = []
        for req in requests:
            (text,) = req.args[:1]
            tokens = self.tokenizer.encode(text)
            if not tokens:
                out.append(0.0)
                continue
            stream = np.asarray([self.eos_id] + tokens, dtype=np.int64)
            nll, _ = score(self.model, stream, self.eos_id, self.max_length, self.batch_size, self._device)
            out.append(-nll)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            context_ids = [self.eos_id] + self.tokenizer.encode(context)
            logits, cache = self._prefill(context_ids)
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                token = int(sample_next_token(logits[None], temperature, 0, self.generator,
                                              self.tokenizer.vocab_size)[0])
                if token == self.eos_id:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated)
                if any(stop in text for stop in until):
                    break
                logits, cache = self._step(token, (context_ids + generated)[-2], cache)
            cut = min([text.index(s) for s in until if s in text], default=len(text))
            out.append(text[:cut])
        return out

    def _cache_hook(self, requests, indices, pairs, results):
        """lm_eval's response cache (when it is installed and the requests are its Instances)."""
        hook = getattr(getattr(self, "cache_hook", None), "add_partial", None)
        if hook is None:
            return
        for i in indices:
            args = getattr(requests[i], "args", None)
            if args is not None:
                hook("loglikelihood", args, results[i])

    # lm_eval queries these on its models (its LM base class has them too)
    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.model_path)
