"""Loss functions of the Tinker API, on flat per-token tensors.

All losses are sums over the tokens of all datums (not means), as the Tinker reference defines them.
Notation: `lp` = target-token logprobs under the current weights, `q` = the sampler's logprobs
(`logprobs` input), `A` = `advantages`. Every loss reports `loss:sum`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),  # `weights` optional: missing means all ones
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
LOSS_CONFIG_KEYS: dict[str, set[str]] = {
    "cross_entropy": set(),
    "importance_sampling": set(),
    "ppo": {"clip_low_threshold", "clip_high_threshold"},
    "cispo": {"clip_low_threshold", "clip_high_threshold"},
    "dro": {"beta"},
}
DEFAULT_CLIP_LOW, DEFAULT_CLIP_HIGH, DEFAULT_DRO_BETA = 0.8, 1.2, 0.05

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float]], torch.Tensor]


def _cross_entropy(lp_N: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    w_N = inp.get("weights")
    if w_N is None:
        w_N = torch.ones_like(lp_N)
    return -(lp_N * w_N).sum()


def _ratio(lp_N: torch.Tensor, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(lp_N - inp["logprobs"])


def _importance_sampling(lp_N: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    return -(_ratio(lp_N, inp) * inp["advantages"]).sum()


def _clip_bounds(cfg: dict[str, float]) -> tuple[float, float]:
    lo = float(cfg.get("clip_low_threshold", DEFAULT_CLIP_LOW))
    hi = float(cfg.get("clip_high_threshold", DEFAULT_CLIP_HIGH))
    if not lo <= 1.0 <= hi:
        raise ValueError(f"clip thresholds must satisfy low <= 1 <= high (absolute ratio bounds), got {lo}, {hi}")
    return lo, hi


def _ppo(lp_N: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    lo, hi = _clip_bounds(cfg)
    r_N, a_N = _ratio(lp_N, inp), inp["advantages"]
    return -torch.minimum(r_N * a_N, torch.clamp(r_N, lo, hi) * a_N).sum()


def _cispo(lp_N: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    lo, hi = _clip_bounds(cfg)
    r_N = torch.clamp(_ratio(lp_N, inp), lo, hi).detach()  # stop-gradient on the clipped ratio
    return -(r_N * lp_N * inp["advantages"]).sum()


def _dro(lp_N: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    beta = float(cfg.get("beta", DEFAULT_DRO_BETA))
    # The quadratic term does not vanish at A=0: callers mask prompt positions by sending q == lp there
    # is impossible, so we honour an optional `weights` mask (1 = counted), defaulting to all tokens.
    m_N = inp.get("weights")
    per_tok = lp_N * inp["advantages"] - 0.5 * beta * (lp_N - inp["logprobs"]) ** 2
    return -(per_tok * m_N).sum() if m_N is not None else -per_tok.sum()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
}


def check_loss_fn(loss_fn: str, loss_fn_config: dict[str, float] | None) -> None:
    if loss_fn not in LOSSES:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; expected one of {sorted(LOSSES)}")
    extra = set(loss_fn_config or {}) - LOSS_CONFIG_KEYS[loss_fn]
    if extra:
        raise ValueError(f"loss_fn_config keys {sorted(extra)} are not used by {loss_fn!r}")


def compute_loss(
    loss_fn: str, lp_N: torch.Tensor, inputs: dict[str, torch.Tensor], loss_fn_config: dict[str, float] | None
) -> torch.Tensor:
    """Loss (to minimise) over flat per-token tensors of all datums concatenated."""
    check_loss_fn(loss_fn, loss_fn_config)
    return LOSSES[loss_fn](lp_N, inputs, dict(loss_fn_config or {}))
