"""Log-likelihood multiple choice (MMLU, ARC, HellaSwag, PIQA), scored as lm-evaluation-harness does.

For each example the model scores `context + delimiter + choice` for every choice; `acc` takes the
argmax of the summed continuation log-probabilities, `acc_norm` the argmax after dividing each by the
character length of the choice text (lm-eval's definition). Tokenisation follows lm-eval's
`_encode_pair` (trailing context spaces move into the continuation; continuation tokens are the tail
of the whole string's encoding; no BOS), so the same model gets the same numbers.

Speed (`HFLoglikScorer.batch_choice_logprobs`, used by `evaluate_mc` on batches of examples; the engine
is `prefix_batch`):
- contexts that share a token prefix (an MMLU subject's header + 5 dev questions, ~80% of its tokens) are
  grouped and the prefix runs once; its KV cache is broadcast (stride-0 views, no copy) to the rows of the
  group's suffixes, which run batched by similar length; the shared prefix is the common prefix of the token ids themselves, so it
  is a token-level prefix of every full encoding by construction;
- the LM head only at scored positions (the context's last token; the continuation tokens), none over
  the ~700 context positions; single-token answers (MMLU letters) need no pass beyond the context;
- multi-token continuations (ARC, HellaSwag, PIQA) of all choices of a batch run together over their
  context's cache rows (masking the suffix padding);
- inference_mode, eval mode; through `from_sampling_client` every group runs as one job on the engine
  thread with the client's adapter active, so LoRA adapters score exactly like the base path.
Log-probs equal a plain one-forward-per-choice loop to float noise (~1e-5; the tests check 1e-4).
Trade-off: the batch must hold a subject's examples together to share its prefix; `evaluate_mc` extends
a batch rather than cut a run of contexts with a long common prefix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evals.benchmarks import Example
from evals.benchmarks_real.prefix_batch import GroupScorer, Request, plan_groups
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
        self._client: Any = None
        self.max_cache_bytes = 512 << 20  # bound on the expanded KV cache of one batched pass
        self.stats = {"tokens": 0, "calls": 0, "prefix_tokens": 0}  # forward tokens / calls, tokens saved
        self._last_ctx: tuple[str | None, list[int]] = (None, [])  # encode_pair's memo of the last context

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
        scorer._client = client  # keeps an owned snapshot adapter alive (it is deleted with its client)
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
        memo = self._last_ctx  # read once: safe if two threads share the scorer
        if memo[0] != context:  # the choices of an example share it: encode it once, not per choice
            memo = self._last_ctx = (context, self._encode(context))
        ctx = list(memo[1])
        return ctx, whole[len(ctx):]

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id):
            if t is not None:
                return int(t)
        raise ValueError("tokenizer has neither a BOS nor an EOS token to stand in for an empty context")

    def choice_logprobs(self, context: str, continuations: Sequence[str]) -> list[float]:
        return self.batch_choice_logprobs([(context, continuations)])[0]

    def _requests(self, context: str, continuations: Sequence[str]) -> list[Request]:
        """One request sharing the context; one per choice where trailing spaces make the contexts differ
        (lm-eval's tokens are kept either way)."""
        pairs = [self.encode_pair(context, c) for c in continuations]
        if any(not p[1] for p in pairs):
            raise ValueError(f"an empty continuation in {list(continuations)!r}")
        groups = [pairs] if all(p[0] == pairs[0][0] for p in pairs) else [[p] for p in pairs]
        out = []
        for g in groups:
            ctx = g[0][0] or [self._prefix_token()]  # lm-eval scores an empty context after end-of-text
            budget = self.max_length - max(len(c) for _, c in g) + 1
            if len(ctx) > budget:  # lm-eval keeps the last max_length tokens: cut the context from the left
                ctx = ctx[len(ctx) - budget:]
            out.append(Request(tuple(ctx), tuple(tuple(c) for _, c in g)))
        return out

    def batch_choice_logprobs(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """`choice_logprobs` for many (context, continuations) at once: contexts sharing a token prefix
        (a few-shot block) run it once, suffixes and continuations batched (see prefix_batch)."""
        reqs: list[Request] = []
        owner: list[int] = []  # item index of each request
        for k, (ctx, conts) in enumerate(items):
            rs = self._requests(ctx, conts)
            reqs += rs
            owner += [k] * len(rs)
        # what one more forward call costs, in tokens: launches dominate on an accelerator, FLOPs on a CPU
        device = self._run(lambda: next(self._model().parameters()).device.type)
        call_tokens = 8 if device == "cpu" else 512
        per_req: list[list[float]] = [[] for _ in reqs]
        for g in plan_groups(reqs, call_tokens):
            sub = [reqs[i] for i in g.members]
            got = self._run(lambda sub=sub, g=g: self._score_group(sub, g.prefix_len, call_tokens))
            for i, lps in zip(g.members, got, strict=True):
                per_req[i] = lps
        out: list[list[float]] = [[] for _ in items]
        for k, lps in zip(owner, per_req, strict=True):
            out[k] += lps  # requests of one item are in choice order
        return out

    def _score_group(self, reqs: list[Request], prefix_len: int, call_tokens: int) -> list[list[float]]:
        import torch

        model = self._model()
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                gs = GroupScorer(model, call_tokens=call_tokens, max_cache_bytes=self.max_cache_bytes)
                scores = gs.score(reqs, prefix_len)
                self.stats["tokens"] += gs.tokens_run
                self.stats["calls"] += gs.calls
                self.stats["prefix_tokens"] += prefix_len * (len(reqs) - 1)  # tokens the prefix cache saved
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


def _batch_end(pending: list[Example], start: int, step: int) -> int:
    """`start + step`, moved on (by up to `step`) while the next context continues the same few-shot block
    (a long common prefix with the previous one), so a batch does not split a group that shares a prefix."""
    end = min(len(pending), start + step)
    while end < min(len(pending), start + 2 * step) and len(os.path.commonprefix(
            [pending[end - 1].messages[0]["content"], pending[end].messages[0]["content"]])) >= 256:
        end += 1
    return end


def evaluate_mc(scorer: LoglikScorer, bench: LoglikMCBenchmark, store: ResultStore | None = None, *,
                checkpoint: str | None = None, progress: Callable[[str, int, int], None] | None = None,
                flush_every: int = 32, batch_size: int = 64) -> BenchmarkResult:
    """Score every example (resuming from `store`), returning a BenchmarkResult the paired compare accepts.

    A scorer with `batch_choice_logprobs` gets `batch_size` examples per call (stored after each call);
    others are called per example and stored every `flush_every`."""
    ckpt = checkpoint or scorer.name
    proto = bench.protocol_for(EvalProtocol())
    phash = proto.hash()
    meta = ResultMeta(bench.name, ckpt, bench.kind, proto, phash, bench.dataset_hash(), len(bench))
    done: dict[str, ExampleRecord] = {}
    if store is not None:
        store.begin(meta)
        done = store.load_records(ckpt, bench.name, phash)
    pending = [ex for ex in bench.examples if ex.id not in done]
    batched = getattr(scorer, "batch_choice_logprobs", None)
    step = max(1, batch_size if batched is not None else flush_every)
    start = 0
    while start < len(pending):
        end = _batch_end(pending, start, step) if batched is not None else min(len(pending), start + step)
        part = pending[start:end]
        items = [(ex.messages[0]["content"], [ex.meta.get("delimiter", " ") + str(c) for c in ex.meta["choices"]])
                 for ex in part]
        # a batch lets examples of one subject share their few-shot prefix (they are adjacent in the benchmark)
        all_lps = batched(items) if batched is not None else [scorer.choice_logprobs(c, x) for c, x in items]
        buf: list[ExampleRecord] = []
        for ex, lps in zip(part, all_lps, strict=True):
            if len(lps) != len(ex.meta["choices"]) or not all(math.isfinite(x) for x in lps):
                raise ValueError(f"scorer {scorer.name!r}: bad log-probabilities {lps} for an example of {bench.name!r}")
            buf.append(mc_record(bench, ex, lps, ckpt, phash))
        if store is not None:
            store.append(buf)
        done.update({r.example_id: r for r in buf})
        if progress is not None:
            progress(bench.name, len(bench) - len(pending) + end, len(bench))
        start = end
    ordered = {ex.id: done[ex.id] for ex in bench.examples}
    return BenchmarkResult(bench.name, bench.kind, ckpt, proto, phash, meta.dataset_hash, len(bench), ordered)


def secondary_mean(result: BenchmarkResult, metric: str) -> float:
    """The mean of the non-primary metric (acc or acc_norm) stored in each record's extra."""
    vals = [float(r.extra[metric]) for r in result.records.values() if metric in r.extra]
    return sum(vals) / len(vals) if vals else math.nan
