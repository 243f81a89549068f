"""Reading a HF model's weights for the fused sampling decoder (see ``sampling_decoders``).

Each projection is read as the affine map it computes: a plain ``nn.Linear`` gives its parameters directly; a
wrapped one (peft LoRA / DoRA, ``modules_to_save``) is probed with the identity, so an adapter's effect is
folded into one weight per call and costs nothing per decoding step. Weights are then prepacked for oneDNN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # what the fused sampling/training paths read


class Unsupported(Exception):
    """A fused path cannot represent this model exactly; use the generic Hugging Face path."""


class Linear:
    """``x @ w.T + b`` with the weight prepacked for oneDNN (mkldnn) when that is available.

    A decode step multiplies a few rows by every weight matrix; plain sgemm re-packs the whole weight on each
    call, which dominates at this size. Prepacking once per ``sample_batch`` call makes the projections
    about 1.5x faster on CPU in fp32 (rounding differs from sgemm by ~1e-6 relative) and in bf16 (where the
    CPU has bf16 dot products), and a bf16 projection takes ~0.6x the time of an fp32 one at 16 rows.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, rows_hint: int) -> None:
        self.w: torch.Tensor | None = w
        self.b = b
        self.packed: torch.Tensor | None = None
        if _mkldnn_ok(w):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
                probe = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0), dtype=w.dtype)
                got = _LINEAR(probe, packed, b, "none", [], "")
                want = F.linear(probe, w, b)
                tol = 1e-4 if w.dtype == torch.float32 else 2e-2  # bf16: accumulation order only
                if torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())):
                    self.packed = packed
                    self.w = None  # only the packed copy is used from now on: do not keep (or cache) two
            except (RuntimeError, AttributeError):  # no usable oneDNN kernel: plain F.linear
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _LINEAR(x, self.packed, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one fused op."""
        if self.packed is not None:
            return _LINEAR_ADD(x, residual, self.packed, self.b, "add")
        if self.b is None:
            return torch.addmm(residual, x, self.w.t())
        return residual + F.linear(x, self.w, self.b)


def _mkldnn_ok(w: torch.Tensor) -> bool:
    if not (
        w.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and _LINEAR is not None
    ):
        return False
    if w.dtype == torch.bfloat16:  # only where the CPU has bf16 dot products (else oneDNN emulates: slower)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return w.dtype == torch.float32


def _mkldnn_ops() -> tuple[Any, Any]:
    # Resolved once: looking an op up through torch.ops on every call costs ~5 us, 17 times per decode step.
    try:
        return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary
    except (AttributeError, RuntimeError):
        return None, None


_LINEAR, _LINEAR_ADD = _mkldnn_ops()


def rms_norm_hf(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    # LlamaRMSNorm / Qwen3RMSNorm's dtype handling (fp32 statistics, rounded to x's dtype, then the weight);
    # torch's fused kernel computes their fp32 formula bit for bit.
    x32 = torch.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return x32.to(x.dtype) if w is None else w * x32.to(x.dtype)


def norm_params(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or eps is None or w is None or w.dim() != 1:
        raise Unsupported(f"norm {type(norm).__name__}")
    return w.detach(), float(eps)


def linear_params(mod: nn.Module, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of the affine map ``mod`` computes.

    Plain peft LoRA is folded directly, ``W + sum_a s_a B_a A_a`` in fp32 rounded once to the base dtype (one
    rounding: the closest a single weight gets to peft's bf16 base output plus fp32 LoRA term); other
    wrapped linears are probed with the identity. Either way a random probe must then agree with ``mod`` to
    a few roundings of its dtype, else ``Unsupported``.
    """
    if type(mod) is nn.Linear:
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    p = next(mod.parameters(), None)
    if p is None:
        raise Unsupported(f"{type(mod).__name__} has no parameters")
    folded = _fold_lora(mod)
    if folded is not None:
        w_OI, bias_O = folded
        dtype = w_OI.dtype
    else:
        dtype = p.dtype
        bias_1O = mod(torch.zeros(1, in_features, dtype=dtype))
        w_OI = (mod(torch.eye(in_features, dtype=dtype)) - bias_1O).t().contiguous()
        bias_O = bias_1O[0] if bool(bias_1O.any()) else None
    probe = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    expect = mod(probe)
    got = F.linear(probe, w_OI, bias_O)
    # fp32: 1e-3 relative (as before). bf16 / fp16: mod itself rounds its output (and peft adds the LoRA term
    # after rounding the base output), so agreement is only up to a few ulps: 1e-3 (< 1 bf16 ulp, 2^-8) would
    # reject every trained adapter and silently send sampling to the slow HF decoder. A non-affine map misses
    # by O(1), far beyond either bound.
    rtol = max(1e-3, 4 * torch.finfo(expect.dtype).eps)
    if not torch.allclose(
        got.float(), expect.float(), rtol=rtol, atol=max(1e-4, rtol) * float(expect.abs().max()) + 1e-6
    ):
        err = float((got.float() - expect.float()).abs().max() / expect.float().abs().max())
        raise Unsupported(f"{type(mod).__name__} is not an affine map (max error {err:.2e} of max |output|)")
    return w_OI, bias_O


def _fold_lora(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Effective (weight, bias) of a plain peft LoRA linear, or None for anything else (then it is probed)."""
    base = getattr(mod, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(mod, "lora_A") or getattr(mod, "merged", False):
        return None
    bias = None if base.bias is None else base.bias.detach()
    if getattr(mod, "disable_adapters", False):
        return base.weight.detach(), bias
    w = base.weight.detach().float()
    for name in getattr(mod, "active_adapters", []):
        if name not in mod.lora_A:
            continue
        if name in getattr(mod, "lora_variant", {}) or getattr(mod, "use_dora", {}).get(name, False):
            return None  # DoRA and other variants: not W + sBA
        a, b = mod.lora_A[name], mod.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return None
        w = w + float(mod.scaling[name]) * (b.weight.detach().float() @ a.weight.detach().float())
    return w.to(base.weight.dtype), bias


def cat_bias(biases: list[torch.Tensor | None], sizes: list[int], like: torch.Tensor) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([like.new_zeros(n) if b is None else b for b, n in zip(biases, sizes, strict=True)])
