"""Log-likelihood multiple choice (MMLU, ARC, HellaSwag, PIQA), scored as lm-evaluation-harness does.

For each example the model scores `context + delimiter + choice` for every choice; `acc` takes the
argmax of the summed continuation log-probabilities, `acc_norm` the argmax after dividing each by the
character length of the choice text (lm-eval's definition). Tokenisation follows lm-eval's
`_encode_pair` (trailing context spaces move into the continuation; continuation tokens are the tail
of the whole string's encoding; no BOS), so the same model gets the same numbers.

All choices of an example go through one batched forward pass that shares the context: the context is
run once and its KV cache is repeated across the choices, so an MMLU 5-shot example costs one context
pass (single-token answers need nothing more) instead of one per choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evals.benchmarks import Example
from evals.protocols import EvalProtocol
from evals.runner import BenchmarkResult
from evals.store import ExampleRecord, ResultMeta, ResultStore

MC_SCORER_VERSION = "1"


class LoglikScorer(Protocol):
    """What log-likelihood benchmarks need from a model."""

    name: str

    def choice_logprobs(self, context: str, continuations: Sequence[str]) -> list[float]:
        """Summed log P(continuation | context) for each continuation (continuations include the delimiter)."""
        ...


class HFLoglikScorer:
    """A LoglikScorer over a Hugging Face causal LM (optionally with a peft adapter) and its tokenizer.

    `run` executes a zero-argument function and returns its value; training_core clients pass one that
    runs it on the engine's worker thread with the right adapter active.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_length: int | None = None,
                 run: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 0) or 2048)
        self._run = run or (lambda fn: fn())
        self._model_fn: Callable[[], Any] | None = None  # set when the model must be looked up per call

    @classmethod
    def from_sampling_client(cls, client: Any, name: str) -> HFLoglikScorer:
        """Score through a training_core SamplingClient: its model, tokenizer and adapter, on its engine thread."""
        from training_core.sampler import unwrap_model

        engine, adapter = client._engine, client._adapter  # no public accessor yet; read-only use

        def run(fn: Callable[[], Any]) -> Any:
            def job() -> Any:
                with engine.activate(adapter):
                    return fn()
            return engine.submit(job).result()

        scorer = cls(None, engine.base.tokenizer, name, max_length=engine.base.max_length, run=run)
        scorer._model_fn = lambda: unwrap_model(engine.model)  # the engine may re-wrap the model (peft)
        return scorer

    @classmethod
    def from_generator(cls, generator: Any) -> HFLoglikScorer:
        """From the `SamplingGenerator` the CLI's generator factory returns (it holds a SamplingClient)."""
        client = getattr(generator, "client", None)
        if client is None or not hasattr(client, "_engine"):
            raise TypeError(f"generator {getattr(generator, 'name', generator)!r} exposes no training_core "
                            f"SamplingClient; build an HFLoglikScorer from a model and tokenizer instead")
        return cls.from_sampling_client(client, generator.name)

    def _model(self) -> Any:
        return self._model_fn() if self._model_fn is not None else self.model

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's HFLM._encode_pair."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id):
            if t is not None:
                return int(t)
        raise ValueError("tokenizer has neither a BOS nor an EOS token to stand in for an empty context")

    def choice_logprobs(self, context: str, continuations: Sequence[str]) -> list[float]:
        pairs = [self.encode_pair(context, c) for c in continuations]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):  # only when trailing spaces differ per choice; keep lm-eval's tokens
            return [self._score_one(c, t) for c, t in pairs]
        conts = [p[1] for p in pairs]
        if any(not c for c in conts):
            raise ValueError(f"an empty continuation in {list(continuations)!r}")
        if not ctx:
            ctx = [self._prefix_token()]  # lm-eval scores an empty context after the end-of-text token
        budget = self.max_length - max(len(c) for c in conts) + 1
        if len(ctx) > budget:  # lm-eval keeps the last max_length tokens: cut the context from the left
            ctx = ctx[len(ctx) - budget:]
        return self._run(lambda: self._shared_prefix_pass(ctx, conts))

    def _score_one(self, ctx: list[int], cont: list[int]) -> float:
        if not ctx:
            ctx = [self._prefix_token()]
        return self._run(lambda: self._shared_prefix_pass(ctx, [cont]))[0]

    def _shared_prefix_pass(self, ctx: list[int], conts: list[list[int]]) -> list[float]:
        import torch

        model = self._model()
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([ctx]), use_cache=True)
                first = out.logits[0, -1].float().log_softmax(-1)
                scores = [float(first[c[0]]) for c in conts]
                longest = max(len(c) for c in conts)
                if longest > 1:
                    # the rest of every continuation in one batch of n rows over the shared, repeated KV cache;
                    # right padding: a real token never attends to a pad, so no mask is needed
                    n, pad = len(conts), conts[0][0]
                    rows = [c[:-1] + [pad] * (longest - len(c)) for c in conts]
                    cache = out.past_key_values
                    cache.batch_repeat_interleave(n)
                    logp = model(input_ids=torch.tensor(rows), past_key_values=cache,
                                 use_cache=False).logits.float().log_softmax(-1)
                    for i, c in enumerate(conts):
                        if len(c) > 1:
                            idx = torch.tensor(c[1:])
                            scores[i] += float(logp[i, : len(c) - 1].gather(1, idx[:, None]).sum())
        finally:
            model.train(was_training)
        return scores


# ---------------------------------------------------------------- benchmark + evaluation


def mc_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, Any]:
    """lm-eval's acc and acc_norm for one example (ties go to the first choice, as np.argmax does)."""
    pred = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    normed = [lp / max(1, len(ch)) for lp, ch in zip(logprobs, choices, strict=True)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


@dataclass
class LoglikMCBenchmark:
    """Multiple choice by log-likelihood. Each Example: messages = [user: context], target = gold index,
    meta = {"choices": [...], "delimiter": " ", ...}. `primary` is the per-example score ("acc" or "acc_norm");
    both are stored per example."""

    name: str
    examples: list[Example]
    primary: str = "acc_norm"
    protocol_extra: dict[str, str] = field(default_factory=dict)
    description: str = ""
    kind: str = "loglik_mc"

    def __post_init__(self) -> None:
        if self.primary not in ("acc", "acc_norm"):
            raise ValueError(f"primary must be acc or acc_norm, got {self.primary!r}")
        if not self.examples:
            raise ValueError(f"benchmark {self.name!r} has no examples")
        if len({e.id for e in self.examples}) != len(self.examples):
            raise ValueError(f"benchmark {self.name!r}: duplicate examples")

    def protocol_for(self, base: EvalProtocol) -> EvalProtocol:
        # Log-likelihood does not sample: only the scoring method, template and few-shot setup can change a score.
        extra = {"scoring": f"loglik-mc/{self.primary}", **self.protocol_extra}
        return EvalProtocol(renderer="raw-text", max_tokens=1, grader=f"loglik_mc({self.primary})",
                            grader_version=MC_SCORER_VERSION, extra=extra)

    def dataset_hash(self) -> str:
        import hashlib

        return hashlib.sha256(",".join(sorted(e.id for e in self.examples)).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.examples)


def mc_record(bench: LoglikMCBenchmark, ex: Example, logprobs: list[float], ckpt: str, phash: str) -> ExampleRecord:
    choices = list(ex.meta["choices"])
    m = mc_metrics(logprobs, choices, int(ex.target))
    pred = m["pred_norm"] if bench.primary == "acc_norm" else m["pred"]
    return ExampleRecord(
        example_id=ex.id, benchmark=bench.name, checkpoint=ckpt, protocol_hash=phash, prompt=ex.messages[0]["content"],
        output=str(choices[pred]), extracted=str(pred), score=m[bench.primary],
        extra={"target": int(ex.target), "acc": m["acc"], "acc_norm": m["acc_norm"], "logprobs": logprobs})


def evaluate_mc(scorer: LoglikScorer, bench: LoglikMCBenchmark, store: ResultStore | None = None, *,
                checkpoint: str | None = None, progress: Callable[[str, int, int], None] | None = None,
                flush_every: int = 32) -> BenchmarkResult:
    """Score every example (resuming from `store`), returning a BenchmarkResult the paired compare accepts."""
    ckpt = checkpoint or scorer.name
    proto = bench.protocol_for(EvalProtocol())
    phash = proto.hash()
    meta = ResultMeta(bench.name, ckpt, bench.kind, proto, phash, bench.dataset_hash(), len(bench))
    done: dict[str, ExampleRecord] = {}
    if store is not None:
        store.begin(meta)
        done = store.load_records(ckpt, bench.name, phash)
    pending = [ex for ex in bench.examples if ex.id not in done]
    buf: list[ExampleRecord] = []
    for k, ex in enumerate(pending, start=1):
        delim = ex.meta.get("delimiter", " ")
        lps = scorer.choice_logprobs(ex.messages[0]["content"], [delim + str(c) for c in ex.meta["choices"]])
        if len(lps) != len(ex.meta["choices"]) or not all(math.isfinite(x) for x in lps):
            raise ValueError(f"scorer {scorer.name!r}: bad log-probabilities {lps} for an example of {bench.name!r}")
        buf.append(mc_record(bench, ex, lps, ckpt, phash))
        if len(buf) >= flush_every or k == len(pending):
            if store is not None:
                store.append(buf)
            done.update({r.example_id: r for r in buf})
            buf = []
            if progress is not None:
                progress(bench.name, len(bench) - len(pending) + k, len(bench))
    ordered = {ex.id: done[ex.id] for ex in bench.examples}
    return BenchmarkResult(bench.name, bench.kind, ckpt, proto, phash, meta.dataset_hash, len(bench), ordered)


def secondary_mean(result: BenchmarkResult, metric: str) -> float:
    """The mean of the non-primary metric (acc or acc_norm) stored in each record's extra."""
    vals = [float(r.extra[metric]) for r in result.records.values() if metric in r.extra]
    return sum(vals) / len(vals) if vals else math.nan
