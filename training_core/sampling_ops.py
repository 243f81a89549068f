"""Token selection for the sampler: temperature, top-k, top-p and seeded per-sequence randomness.

A token is drawn by inverting the CDF of ``softmax(scores)`` at one uniform number per row and step, which
costs one cumsum per step and needs only ``max_tokens`` random numbers per sequence (the Gumbel-max trick
would need a whole vocabulary of them per step). Each sequence's uniforms come from its own
``torch.Generator``, seeded from ``(seed, sample index, hash of its prompt)``, so a sequence's random numbers
do not depend on which other prompts share the batch, and the global torch RNG is never touched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch


def random_base_seed() -> int:
    """A fresh seed from the OS: ``seed=None`` means nondeterministic, without touching torch's global RNG."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def row_seed(base_seed: int, sample_index: int, prompt: Sequence[int]) -> int:
    """Seed of one sequence, a function of (base seed, sample index, prompt tokens) only."""
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8).digest()
    prompt_hash = int.from_bytes(digest, "little")
    entropy = [base_seed & 0xFFFFFFFFFFFFFFFF, sample_index, prompt_hash]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) | (int(state[1]) << 32)) & 0x7FFFFFFFFFFFFFFF


class UniformStreams:
    """One uniform draw per row and step, from that row's own generator, drawn for all steps up front.

    A row's numbers depend only on its own seed, never on the batch, so the same prompt, sample index and
    seed give the same tokens whatever else is batched with it.
    """

    def __init__(self, seeds: list[int], max_steps: int) -> None:
        rows = []
        for s in seeds:
            g = torch.Generator()
            g.manual_seed(s)
            rows.append(torch.rand(max_steps, generator=g, dtype=torch.float64))
        self.u_RN = torch.stack(rows) if rows else torch.empty(0, max_steps, dtype=torch.float64)

    def select_rows(self, keep_R: torch.Tensor) -> None:
        """Keep only these current rows (batch compaction)."""
        self.u_RN = self.u_RN[keep_R]

    def at(self, step: int) -> torch.Tensor:
        return self.u_RN[:, step]


def sample_inverse_cdf(scores_BV: torch.Tensor, u_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(scores) by inverting its CDF at u; also return log Z per row.

    The CDF is accumulated in float64 (exact to ~1e-15). ``searchsorted(..., right=True)`` returns the first
    index whose CDF exceeds ``u * total``; that entry has nonzero probability, so masked (-inf) tokens are
    never drawn. ``log Z = max + log(total)`` is the softmax normaliser, so ``scores[tok] - log Z`` is the
    token's log-probability without a second pass over the vocabulary.
    """
    max_B1 = scores_BV.amax(dim=-1, keepdim=True)
    cdf_BV = (scores_BV - max_B1).exp_().cumsum(dim=-1, dtype=torch.float64)
    total_B = cdf_BV[:, -1]
    tok_B = torch.searchsorted(cdf_BV, (u_B * total_B)[:, None], right=True).squeeze(1)
    tok_B = tok_B.clamp_max_(scores_BV.shape[-1] - 1)
    return tok_B, max_B1.squeeze(1) + total_B.log().to(scores_BV.dtype)


def filter_top_k_(scores_BV: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask (in place, with -inf) everything below the k-th largest score of each row; ties are kept."""
    if 0 < top_k < scores_BV.shape[-1]:
        kth_B1 = scores_BV.topk(top_k, dim=-1).values[:, -1:]
        scores_BV.masked_fill_(scores_BV < kth_B1, float("-inf"))
    return scores_BV


def filter_top_p_(scores_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (in place): keep the smallest prefix of the sorted distribution whose mass reaches top_p."""
    if top_p >= 1.0:
        return scores_BV
    sorted_BV, order_BV = scores_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= top_p
    drop_sorted_BV[:, 0] = False  # always keep the most likely token
    drop_BV = torch.empty_like(drop_sorted_BV).scatter_(1, order_BV, drop_sorted_BV)
    return scores_BV.masked_fill_(drop_BV, float("-inf"))


class TokenSelector:
    """Chooses the next token of every row and returns the logprobs the sampler reports.

    ``logprob`` is always ``log_softmax(raw logits)[token]`` (untempered, untruncated). With
    ``want_sampling_logprob`` it also returns the log-probability under the distribution actually sampled
    from (temperature and top-k/top-p applied; 0 under greedy decoding).
    """

    def __init__(
        self,
        temperature: float,
        top_k: int,
        top_p: float,
        uniforms: UniformStreams | None,
        want_sampling_logprob: bool,
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.uniforms = uniforms
        self.want_sampling_logprob = want_sampling_logprob
        self.plain = temperature == 1.0 and top_k <= 0 and top_p >= 1.0

    def __call__(
        self, logits_BV: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits_BV = logits_BV.float()
        sampling_lp_B: torch.Tensor | None = None
        if self.temperature == 0.0 or self.uniforms is None:
            tok_B = logits_BV.argmax(dim=-1)
            lp_B = _gather(logits_BV, tok_B) - logits_BV.logsumexp(dim=-1)
            if self.want_sampling_logprob:
                sampling_lp_B = torch.zeros(tok_B.shape[0])
        elif self.plain:  # the sampled distribution is the model's own: one pass gives token and logprob
            tok_B, log_z_B = sample_inverse_cdf(logits_BV, self.uniforms.at(step))
            lp_B = _gather(logits_BV, tok_B) - log_z_B
            if self.want_sampling_logprob:
                sampling_lp_B = lp_B.clone()
        else:
            scores_BV = logits_BV / self.temperature if self.temperature != 1.0 else logits_BV.clone()
            filter_top_k_(scores_BV, self.top_k)
            filter_top_p_(scores_BV, self.top_p)
            tok_B, log_z_B = sample_inverse_cdf(scores_BV, self.uniforms.at(step))
            lp_B = _gather(logits_BV, tok_B) - logits_BV.logsumexp(dim=-1)
            if self.want_sampling_logprob:
                sampling_lp_B = _gather(scores_BV, tok_B) - log_z_B
        return tok_B, lp_B, sampling_lp_B


def _gather(x_BV: torch.Tensor, idx_B: torch.Tensor) -> torch.Tensor:
    return x_BV.gather(1, idx_B[:, None]).squeeze(1)
