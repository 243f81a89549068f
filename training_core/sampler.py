"""Sampler: batched KV-cache generation and prompt logprobs, with Tinker's sampling semantics.

``sample_batch`` runs every prompt x ``num_samples`` in one left-padded batch (attention mask and per-row
position ids), prefilling each prompt once and fanning its KV cache out to its samples, then decoding one token
per step over a preallocated KV cache (see ``sampling_decoders``). Finished rows are dropped from the batch as
they stop. All arithmetic runs under ``torch.inference_mode`` in the model's dtype, with the model temporarily
in eval mode (dropout, including LoRA dropout, off).

What the returned numbers mean
------------------------------
``SampledSequence.logprobs[i]`` is ``log_softmax(logits)[tokens[i]]`` of the model's RAW next-token logits:
temperature 1, no top-k / top-p truncation, whatever temperature / top_k / top_p the tokens were sampled
with. It is therefore exactly the log-probability that a trainer's ``forward`` over
``prompt + tokens`` assigns to the same tokens (within fp32 rounding, about 1e-6), which is what importance
ratios in RL need. With bf16 weights both sides round differently (the decoder runs bf16 projections with
fp32 attention, the trainer its own bf16 kernels): they agree to about 1e-2 (measured on the tiny preset:
mean 0.005, max 0.02 per token); use fp32 where importance ratios must be exact. It is NOT the
log-probability under the distribution actually sampled from when
``temperature != 1`` or top-k / top-p are active: that one is ``log_softmax(truncate(logits / temperature))``
and is returned as ``SampledSequenceWithSamplingLogprobs.sampling_logprobs`` when ``sampling_logprobs=True``
(0.0 for every token under greedy decoding, temperature 0).

Semantics (Tinker ``SamplingParams``)
-------------------------------------
- ``temperature`` 0 is greedy; ``top_k`` -1 (or 0) is off; ``top_p`` 1 is off. Order: temperature, top-k, top-p.
- ``stop``: None stops at ``eos_token_ids``; ``[]`` disables every stop, EOS included; a list of ints replaces
  the defaults; a str or list of str are stop strings matched on the decoded generated text (needs
  ``tokenizer``), in addition to EOS. Returned tokens include the stop token / the token completing the stop
  string. ``stop_reason`` is "stop" for a stop hit and "length" when ``max_tokens`` ran out.
- ``max_tokens`` None means "up to the model's context" (``max_position_embeddings`` minus the longest
  prompt); a prompt + max_tokens beyond the context raises ValueError before any compute.
- ``seed``: each sequence draws from its own ``torch.Generator``, seeded from (seed, sample index, prompt), so
  the same seed and inputs give the same tokens, and a sequence does not depend on the other prompts in the
  batch (up to float rounding of differently padded batches). ``seed=None`` is nondeterministic. The global
  torch RNG is never used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training_core.sampling_decoders import make_decoder
from training_core.sampling_ops import TokenSelector, UniformStreams, random_base_seed, row_seed
from training_core.types import SampledSequence, SamplingParams

__all__ = [
    "SampledSequenceWithSamplingLogprobs",
    "prompt_logprobs",
    "sample_batch",
    "unwrap_model",
]


@dataclass
class SampledSequenceWithSamplingLogprobs(SampledSequence):
    """A SampledSequence plus the logprobs under the (tempered, truncated) distribution actually sampled."""

    sampling_logprobs: list[float] | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF causal LM under a peft wrapper (LoRA layers stay injected in it), or the model itself."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        cfg = getattr(model, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            raise NotImplementedError(
                "sampler: peft prompt-learning adapters are not supported (LoRA-style only)"
            )
        return model.get_base_model()
    return model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def _vocab_size(base: nn.Module) -> int:
    emb = base.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    return int(n) if n is not None else int(base.config.vocab_size)


def _context_length(base: nn.Module) -> int | None:
    n = getattr(base.config, "max_position_embeddings", None)
    return int(n) if n else None


def _check_tokens(seqs: list[list[int]], vocab: int, what: str) -> None:
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"{what}[{i}] is empty: sampling needs at least one prompt token")
        arr = np.asarray(seq)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what}[{i}] must hold ints, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= vocab))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"{what}[{i}][{j}] = {int(arr[j])} is not a token id (vocab size {vocab})")


def _parse_stop(
    stop: str | list[str] | list[int] | None, eos_token_ids: list[int], tokenizer: object | None
) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) following Tinker: None -> EOS; [] -> nothing; ints replace EOS."""
    if stop is None:
        return list(eos_token_ids), []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple):
        raise ValueError(
            f"SamplingParams.stop must be None, a str, a list of str or a list of int, got {stop!r}"
        )
    if len(stop) == 0:
        return [], []
    if all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        return [int(s) for s in stop], []
    if all(isinstance(s, str) for s in stop):
        if any(s == "" for s in stop):
            raise ValueError("SamplingParams.stop: empty stop string")
        if tokenizer is None:
            raise ValueError(
                "SamplingParams.stop holds strings: pass tokenizer= to match them on decoded text"
            )
        return list(eos_token_ids), [str(s) for s in stop]
    raise ValueError(f"SamplingParams.stop mixes types or holds non-str/int items: {stop!r}")


def _check_params(params: SamplingParams, num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    t = float(params.temperature)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {params.temperature!r}")
    if not isinstance(params.top_k, int) or params.top_k < -1:
        raise ValueError(f"SamplingParams.top_k must be -1 (off) or a positive int, got {params.top_k!r}")
    if not 0.0 < float(params.top_p) <= 1.0:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p!r}")
    if params.max_tokens is not None and (not isinstance(params.max_tokens, int) or params.max_tokens < 0):
        raise ValueError(f"SamplingParams.max_tokens must be None or an int >= 0, got {params.max_tokens!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise ValueError(f"SamplingParams.seed must be None or an int, got {params.seed!r}")


def _resolve_max_tokens(params: SamplingParams, prompts: list[list[int]], context: int | None) -> int:
    longest = max(len(p) for p in prompts)
    if params.max_tokens is None:
        if context is None:
            raise ValueError(
                "SamplingParams.max_tokens is None and the model config has no max_position_embeddings"
            )
        if longest >= context:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room in the context of {context} tokens"
            )
        return context - longest
    if context is not None:
        for i, p in enumerate(prompts):
            if len(p) + params.max_tokens > context:
                raise ValueError(
                    f"prompts[{i}]: {len(p)} prompt tokens + max_tokens {params.max_tokens} = "
                    f"{len(p) + params.max_tokens} exceeds the model context (max_position_embeddings={context})"
                )
    return int(params.max_tokens)


class _StopStrings:
    """Matches stop strings on the decoded tail of each sequence's generated tokens."""

    def __init__(self, strings: list[str], tokenizer: object, n_rows: int) -> None:
        self.strings = strings
        self.tokenizer = tokenizer
        # A stop string completed by the newest token lies within its last `window` tokens (>= 1 byte each).
        self.window = max(len(s.encode("utf-8")) for s in strings) + 8
        self.generated: list[list[int]] = [[] for _ in range(n_rows)]

    def hits(self, row_ids: list[int], toks: list[int], active: list[bool]) -> list[bool]:
        out = [False] * len(row_ids)
        for r, (rid, tok, alive) in enumerate(zip(row_ids, toks, active, strict=True)):
            if not alive:
                continue
            gen = self.generated[rid]
            gen.append(tok)
            text = self.tokenizer.decode(gen[-self.window :], skip_special_tokens=False)  # type: ignore[attr-defined]
            out[r] = any(s in text for s in self.strings)
        return out


def sample_batch(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    num_samples: int = 1,
    *,
    eos_token_ids: list[int],
    tokenizer: object | None = None,
    sampling_logprobs: bool = False,
    cache_key: tuple[Hashable, Hashable] | None = None,
) -> list[list[SampledSequence]]:
    """Sample ``num_samples`` continuations of every prompt; returns one list of sequences per prompt.

    ``sampling_logprobs=True`` returns ``SampledSequenceWithSamplingLogprobs`` (see the module docstring).
    ``cache_key``: (adapter, weights version) of the model's current weights, to reuse the fused decoder's
    weights across calls (``sampling_decoders.make_decoder``); None reads them afresh.
    """
    _check_params(params, num_samples)
    if len(prompts) == 0:
        return []
    prompts = [list(p) for p in prompts]
    base = unwrap_model(model)
    vocab = _vocab_size(base)
    _check_tokens(prompts, vocab, "prompts")
    stop_ids, stop_strings = _parse_stop(params.stop, list(eos_token_ids), tokenizer)
    n_new = _resolve_max_tokens(params, prompts, _context_length(base))

    n_rows = len(prompts) * num_samples
    if n_new == 0:
        return _assemble(
            prompts,
            num_samples,
            torch.empty(0, n_rows, dtype=torch.long),
            torch.empty(0, n_rows),
            None,
            torch.zeros(n_rows, dtype=torch.long),
            torch.zeros(n_rows, dtype=torch.bool),
        )
    with _eval_mode(model), torch.inference_mode():
        return _generate(
            base, prompts, params, num_samples, n_new, stop_ids, stop_strings, tokenizer, sampling_logprobs,
            cache_key,
        )


def _generate(
    base: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    num_samples: int,
    n_new: int,
    stop_ids: list[int],
    stop_strings: list[str],
    tokenizer: object | None,
    want_sampling_lp: bool,
    cache_key: tuple[Hashable, Hashable] | None = None,
) -> list[list[SampledSequence]]:
    n_prompts = len(prompts)
    n_rows = n_prompts * num_samples
    plen_P = torch.tensor([len(p) for p in prompts])
    P = int(plen_P.max())
    ids_PP = torch.zeros(n_prompts, P, dtype=torch.long)
    valid_PP = torch.zeros(n_prompts, P, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at slot P - 1
        ids_PP[i, P - len(p) :] = torch.tensor(p)
        valid_PP[i, P - len(p) :] = True

    decoder = make_decoder(base, max_positions=P + n_new, capacity=P + n_new, rows_hint=n_rows, cache_key=cache_key)
    logits_RV = decoder.prefill(ids_PP, valid_PP)
    if num_samples > 1:  # prefill each prompt once, then fan its cache out to its samples
        decoder.repeat_rows(num_samples)
        logits_RV = logits_RV.repeat_interleave(num_samples, dim=0)
    pos_R = plen_P.repeat_interleave(num_samples)

    uniforms = None
    temperature = float(params.temperature)
    if temperature > 0:
        base_seed = random_base_seed() if params.seed is None else int(params.seed)
        seeds = [row_seed(base_seed, j, p) for p in prompts for j in range(num_samples)]
        uniforms = UniformStreams(seeds, n_new)
    top_k = params.top_k if params.top_k > 0 else -1
    select = TokenSelector(temperature, top_k, float(params.top_p), uniforms, want_sampling_lp)

    out_tok_NR = torch.zeros(n_new, n_rows, dtype=torch.long)
    out_lp_NR = torch.zeros(n_new, n_rows)
    out_slp_NR = torch.zeros(n_new, n_rows) if want_sampling_lp else None
    lengths_R = torch.full((n_rows,), n_new, dtype=torch.long)
    stopped_R = torch.zeros(n_rows, dtype=torch.bool)
    stop_ids_S = torch.tensor(stop_ids, dtype=torch.long) if stop_ids else None
    stopper = _StopStrings(stop_strings, tokenizer, n_rows) if stop_strings else None

    row_ids = torch.arange(n_rows)  # original row of each current batch row
    done = torch.zeros(n_rows, dtype=torch.bool)  # per current batch row
    n_done = 0
    compacted = False
    for t in range(n_new):
        tok_R, lp_R, slp_R = select(logits_RV, t)
        if compacted:
            out_tok_NR[t].index_copy_(0, row_ids, tok_R)
            out_lp_NR[t].index_copy_(0, row_ids, lp_R.float())
            if out_slp_NR is not None and slp_R is not None:
                out_slp_NR[t].index_copy_(0, row_ids, slp_R.float())
        else:
            out_tok_NR[t] = tok_R
            out_lp_NR[t] = lp_R
            if out_slp_NR is not None and slp_R is not None:
                out_slp_NR[t] = slp_R
        hit = torch.isin(tok_R, stop_ids_S) if stop_ids_S is not None else None
        if stopper is not None:
            s_hit = torch.tensor(stopper.hits(row_ids.tolist(), tok_R.tolist(), (~done).tolist()))
            hit = s_hit if hit is None else hit | s_hit
        if hit is not None:
            new = hit & ~done
            k = int(new.sum())
            if k:
                done |= new
                finished = row_ids[new]
                lengths_R[finished] = t + 1
                stopped_R[finished] = True
                n_done += k
                if n_done == len(row_ids):
                    break
        if t == n_new - 1:
            break
        if n_done and 4 * n_done >= len(row_ids):  # drop finished rows once they are a quarter of the batch
            keep = (~done).nonzero().squeeze(1)
            decoder.select_rows(keep)
            if uniforms is not None:
                uniforms.select_rows(keep)
            row_ids, pos_R, tok_R = row_ids[keep], pos_R[keep], tok_R[keep]
            done = torch.zeros(len(keep), dtype=torch.bool)
            n_done = 0
            compacted = True
        logits_RV = decoder.step(tok_R, pos_R + t)
    return _assemble(prompts, num_samples, out_tok_NR, out_lp_NR, out_slp_NR, lengths_R, stopped_R)


def _assemble(
    prompts: list[list[int]],
    num_samples: int,
    tok_NR: torch.Tensor,
    lp_NR: torch.Tensor,
    slp_NR: torch.Tensor | None,
    lengths_R: torch.Tensor,
    stopped_R: torch.Tensor,
) -> list[list[SampledSequence]]:
    toks = tok_NR.t().tolist()
    lps = lp_NR.t().tolist()
    slps = slp_NR.t().tolist() if slp_NR is not None else None
    lengths = lengths_R.tolist()
    stopped = stopped_R.tolist()
    out: list[list[SampledSequence]] = []
    for i in range(len(prompts)):
        group: list[SampledSequence] = []
        for j in range(num_samples):
            r = i * num_samples + j
            n = lengths[r]
            reason = "stop" if stopped[r] else "length"
            if slps is not None:
                group.append(
                    SampledSequenceWithSamplingLogprobs(reason, toks[r][:n], lps[r][:n], slps[r][:n])
                )
            else:
                group.append(SampledSequence(reason, toks[r][:n], lps[r][:n]))
        out.append(group)
    return out


def prompt_logprobs(
    model: nn.Module, tokens: list[int], topk: int = 0
) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """Logprob of each prompt token given the tokens before it (None at position 0), from one forward pass.

    With ``topk > 0`` also returns, per position, the ``topk`` most likely (token_id, logprob) pairs of the
    model's next-token distribution there (None at position 0). Logprobs are untempered
    ``log_softmax`` of the raw logits, as in ``sample_batch``.
    """
    tokens = list(tokens)
    base = unwrap_model(model)
    _check_tokens([tokens], _vocab_size(base), "tokens")
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be an int >= 0, got {topk!r}")
    context = _context_length(base)
    if context is not None and len(tokens) > context:
        raise ValueError(f"{len(tokens)} tokens exceed the model context (max_position_embeddings={context})")
    with _eval_mode(model), torch.inference_mode():
        logits_TV = base(input_ids=torch.tensor([tokens])).logits[0].float()
        logp_TV = logits_TV[:-1].log_softmax(dim=-1)  # row i predicts token i + 1
        target = torch.tensor(tokens[1:], dtype=torch.long)
        lps: list[float | None] = [None, *logp_TV.gather(1, target[:, None]).squeeze(1).tolist()]
        if topk == 0:
            return lps, None
        k = min(topk, logp_TV.shape[-1])
        vals, idx = logp_TV.topk(k, dim=-1)
        top: list[list[tuple[int, float]] | None] = [None]
        for ids_row, vals_row in zip(idx.tolist(), vals.tolist(), strict=True):
            top.append(list(zip(ids_row, vals_row, strict=True)))
        return lps, top
