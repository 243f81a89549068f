"""KV-cache decoders behind the sampler: a lean fused path for Llama-family models and an HF fallback.

Both expose the same four calls over a left-padded batch whose prompts fill cache slots ``[0, P)``:
``prefill(ids_BP, valid_BP)`` and ``step(tok_B, pos_B)`` return the next-token logits of each row, and
``select_rows`` / ``repeat_rows`` reorder the batch (dropping finished rows, fanning prompts out to samples).

Why a fused path: on CPU with small models, HF's per-step cost is mostly Python and dispatch overhead (mask
construction, cache concatenation, one module call per projection, LoRA wrappers). The fused path reads each
layer's effective weights once per weights version (``sampling_weights``: q/k/v and gate/up concatenated into
one matmul each, peft LoRA folded into its base weight, other wrapped linears probed, weights prepacked for
oneDNN), keeps a preallocated KV cache and a precomputed RoPE table, and issues about a tenth of the ops per
step. It computes the same function as the
HF model in fp32 (tests compare its logits with ``model(...)`` for Llama, Mistral, Qwen2 and Qwen3); any model
it does not recognise goes through ``HFDecoder``, which drives the HF model itself with a ``DynamicCache``.

Reading the weights (copying every projection, folding LoRA and norms, prepacking) costs about as much as a
short generation, so ``make_decoder`` keeps the ``FusedWeights`` of the last few (adapter, weights version)
seen per model when the caller names them (``cache_key``); ``forget`` drops an adapter's entries.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from training_core.sampling_weights import (
    LLAMA_FAMILY,
    Linear,
    Unsupported,
    cat_bias,
    linear_params,
    norm_params,
    rms_norm_hf,
)

_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}  # tables that do not depend on sequence length
_FIRST_ALLOC_NEW_TOKENS = 512  # cache slots for new tokens allocated up front; more are added by doubling
# Weight sets kept per model: each is about one copy of the model's projections (prepacked only), so two: the
# base and one adapter (an evaluation's two sides; an RL loop's current snapshot). Keyed by (adapter name,
# rows_hint); a new weights version of the same adapter replaces its entry, `forget` drops a deleted adapter's.
_CACHE_ENTRIES = 2

log = logging.getLogger(__name__)


class Decoder(Protocol):
    def prefill(self, ids_BP: torch.Tensor, valid_BP: torch.Tensor) -> torch.Tensor: ...
    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor: ...
    def select_rows(self, keep_R: torch.Tensor) -> None: ...
    def repeat_rows(self, n: int) -> None: ...


def make_decoder(
    base: nn.Module,
    max_positions: int,
    capacity: int,
    rows_hint: int = 16,
    cache_key: tuple[Hashable, Hashable] | None = None,
) -> Decoder:
    """The fused decoder when it supports ``base`` exactly, else the HF fallback (logged: it is much slower).

    ``max_positions``: positions the batch can reach (RoPE table size); ``capacity``: cache slots needed
    (padded prompt length + new tokens); ``rows_hint``: rows per decode step, to pick the weight packing.
    ``cache_key``: (adapter name, weights version) of the weights ``base`` computes with now; with it the
    weights read for a previous call with the same key are reused (the caller guarantees that the version
    changes whenever those weights do).
    """
    try:
        weights = _cached_weights(base, rows_hint, cache_key)  # logs why when it refuses
    except Unsupported:
        return HFDecoder(base)
    try:
        return FusedDecoder(base, max_positions, capacity, rows_hint, weights=weights)
    except Unsupported as e:  # this batch only (e.g. longer than a sliding window)
        log.info("sampler: HF decoder for this batch: %s", e)
        return HFDecoder(base)


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple[Hashable, int], tuple[Hashable, FusedWeights | str]]]
_CACHE = weakref.WeakKeyDictionary()


def _read_weights(base: nn.Module, rows_hint: int) -> FusedWeights:
    try:
        return FusedWeights(base, rows_hint)
    except Unsupported as e:
        model_type = getattr(base.config, "model_type", None)
        # A supported family falling back (e.g. an adapter the probe rejects) is a silent 5-10x slowdown: warn.
        level = logging.WARNING if model_type in LLAMA_FAMILY else logging.INFO
        log.log(level, "sampler: %s model uses the slow HF decoder, not the fused one: %s", model_type, e)
        raise


def _cached_weights(base: nn.Module, rows_hint: int, cache_key: tuple[Hashable, Hashable] | None) -> FusedWeights:
    if cache_key is None:
        return _read_weights(base, rows_hint)
    name, version = cache_key
    entries = _CACHE.setdefault(base, OrderedDict())
    slot = (name, rows_hint)
    hit = entries.get(slot)
    if hit is not None and hit[0] == version:
        entries.move_to_end(slot)
        if isinstance(hit[1], str):  # remembered refusal: same weights, same answer, logged once
            raise Unsupported(hit[1])
        return hit[1]
    entries.pop(slot, None)  # stale version: free it before reading the new one
    try:
        weights: FusedWeights | str = _read_weights(base, rows_hint)
    except Unsupported as e:
        weights = str(e)
    entries[slot] = (version, weights)
    while len(entries) > _CACHE_ENTRIES:
        entries.popitem(last=False)
    if isinstance(weights, str):
        raise Unsupported(weights)
    return weights


def forget(model: nn.Module, name: Hashable) -> None:
    """Drop the cached weights of adapter ``name`` (it is being deleted).

    Every model's entries under that name go: ``model`` may be a peft wrapper of the cached one, and a name
    shared by another engine's adapter only costs that one a re-read.
    """
    del model  # kept in the signature for callers' clarity; see above
    for entries in list(_CACHE.values()):
        for slot in [k for k in entries if k[0] == name]:
            del entries[slot]


class HFDecoder:
    """Drives the HF model step by step with a DynamicCache (any causal LM, including sliding windows)."""

    def __init__(self, base: nn.Module) -> None:
        from transformers import DynamicCache

        self.model = base
        self.cache = DynamicCache(config=base.config)
        self.mask_BL = torch.empty(0, 0, dtype=torch.long)

    def prefill(self, ids_BP: torch.Tensor, valid_BP: torch.Tensor) -> torch.Tensor:
        self.mask_BL = valid_BP.long()
        pos_BP = (self.mask_BL.cumsum(1) - 1).clamp_min(0)
        out = self.model(
            input_ids=ids_BP,
            attention_mask=self.mask_BL,
            position_ids=pos_BP,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        self.mask_BL = torch.cat([self.mask_BL, self.mask_BL.new_ones(self.mask_BL.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tok_B[:, None],
            attention_mask=self.mask_BL,
            position_ids=pos_B[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def select_rows(self, keep_R: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep_R)
        self.mask_BL = self.mask_BL[keep_R]

    def repeat_rows(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)
        self.mask_BL = self.mask_BL.repeat_interleave(n, dim=0)


@dataclass
class _Layer:
    ln1_w: torch.Tensor | None  # None: folded into the next projection
    ln1_eps: float
    qkv: Linear  # (H*D + 2*KV*D, d): q, k, v stacked
    qk_norm_w: torch.Tensor | None  # (H + KV, D): Qwen3's per-head q/k norms, stacked per head
    qk_norm_eps: float
    o: Linear
    ln2_w: torch.Tensor | None
    ln2_eps: float
    gate_up: Linear  # (2*I, d): gate, up stacked
    act: nn.Module
    down: Linear


def _check_supported(base: nn.Module) -> None:
    cfg = base.config
    if cfg.model_type not in LLAMA_FAMILY:
        raise Unsupported(f"model_type {cfg.model_type}")
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        raise Unsupported("unexpected module layout")
    rope_type = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope_type not in _STATIC_ROPE_TYPES:
        raise Unsupported(f"rope type {rope_type}")


def _check_window(base: nn.Module, capacity: int, layer_window: int | None) -> None:
    cfg = base.config
    window = getattr(cfg, "sliding_window", None)
    uses_window = cfg.model_type == "mistral" or any(
        "sliding" in str(t) for t in getattr(cfg, "layer_types", None) or []
    )
    if window is not None and uses_window and capacity > window:
        raise Unsupported("sliding-window attention beyond the window")
    if layer_window is not None and capacity > layer_window:
        raise Unsupported("sliding window")


class FusedWeights:
    """A model's weights as the fused decoder reads them, independent of any batch (so they can be reused)."""

    def __init__(self, base: nn.Module, rows_hint: int = 16) -> None:
        _check_supported(base)
        inner = base.model
        cfg = base.config
        attn0 = inner.layers[0].self_attn
        self.H = int(cfg.num_attention_heads)
        self.KV = int(cfg.num_key_value_heads)
        self.D = int(attn0.head_dim)
        self.scale = float(attn0.scaling)
        d = int(cfg.hidden_size)
        emb = base.get_input_embeddings()
        if type(emb) is nn.Embedding:
            self.embed_VD = emb.weight.detach()
        else:  # wrapped embedding (peft): materialise its effective table once
            self.embed_VD = emb(
                torch.arange(emb.num_embeddings if hasattr(emb, "num_embeddings") else cfg.vocab_size)
            )
        self.dtype = self.embed_VD.dtype
        # fp32 and bf16: each RMSNorm weight is folded into the projection after it (in fp32 a ~1e-7 relative
        # rounding change; in bf16 the weights round once more, within bf16's own noise), and attention runs
        # in fp32 over an fp32 KV cache holding the bf16 keys/values exactly (bf16 batched matmuls over
        # strided cache slices copy them first on CPU: slower than fp32 at decode sizes).
        self.fold_norms = self.dtype in (torch.float32, torch.bfloat16)
        self.attn_dtype = torch.float32 if self.fold_norms else self.dtype
        windows = [getattr(ly.self_attn, "sliding_window", None) for ly in inner.layers[: cfg.num_hidden_layers]]
        self.layer_window: int | None = min((w for w in windows if w is not None), default=None)
        self.layers = [
            self._read_layer(layer, d, rows_hint) for layer in inner.layers[: cfg.num_hidden_layers]
        ]
        norm_w, self.norm_eps = norm_params(inner.norm)
        head_w, head_b = linear_params(base.lm_head, d)
        self.norm_w: torch.Tensor | None = norm_w
        if self.fold_norms:
            head_w, self.norm_w = head_w * norm_w, None
        self.head = Linear(head_w, head_b, rows_hint)
        cos_1PD, _ = inner.rotary_emb(self.embed_VD[:1][None], torch.arange(1)[None])
        if cos_1PD.shape[-1] != self.D:
            raise Unsupported("partial rotary embedding")

    def _read_layer(self, layer: nn.Module, d: int, rows_hint: int) -> _Layer:
        at, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(at, name):
                raise Unsupported(f"attention without {name}")
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise Unsupported(f"mlp without {name}")
        (qw, qb), (kw, kb), (vw, vb) = (
            linear_params(getattr(at, n), d) for n in ("q_proj", "k_proj", "v_proj")
        )
        ow, ob = linear_params(at.o_proj, self.H * self.D)
        gw, gb = linear_params(mlp.gate_proj, d)
        uw, ub = linear_params(mlp.up_proj, d)
        dw, db = linear_params(mlp.down_proj, gw.shape[0])
        # The attention scale is folded into q (exact for power-of-two scales such as 1/8 at head_dim 64):
        # into Qwen3's q-norm weight when there is one (the norm would undo it otherwise), else into W_q, b_q.
        qk_norm_w, qk_eps = None, 0.0
        if hasattr(at, "q_norm"):
            (qnw, qk_eps), (knw, _) = norm_params(at.q_norm), norm_params(at.k_norm)
            qk_norm_w = torch.cat([(qnw * self.scale).expand(self.H, -1), knw.expand(self.KV, -1)])
        else:
            qw = qw * self.scale
            qb = None if qb is None else qb * self.scale
        ln1_w, ln1_eps = norm_params(layer.input_layernorm)
        ln2_w, ln2_eps = norm_params(layer.post_attention_layernorm)
        qkv_w, qkv_b = (
            torch.cat([qw, kw, vw]),
            cat_bias([qb, kb, vb], [qw.shape[0], kw.shape[0], vw.shape[0]], qw),
        )
        gu_w, gu_b = torch.cat([gw, uw]), cat_bias([gb, ub], [gw.shape[0], uw.shape[0]], gw)
        if self.fold_norms:  # W @ (w * n) == (W * w) @ n: one op less per norm
            qkv_w, gu_w, ln1_w, ln2_w = qkv_w * ln1_w, gu_w * ln2_w, None, None
        return _Layer(
            ln1_w=ln1_w,
            ln1_eps=ln1_eps,
            qkv=Linear(qkv_w, qkv_b, rows_hint),
            qk_norm_w=qk_norm_w,
            qk_norm_eps=qk_eps,
            o=Linear(ow, ob, rows_hint),
            ln2_w=ln2_w,
            ln2_eps=ln2_eps,
            gate_up=Linear(gu_w, gu_b, rows_hint),
            act=mlp.act_fn,
            down=Linear(dw, db, rows_hint),
        )


class FusedDecoder:
    """Lean decoder for Llama / Mistral / Qwen2 / Qwen3 (RMSNorm, RoPE, GQA, SwiGLU-style MLP).

    ``weights``: read once per weights version by ``make_decoder`` (else read here, for this decoder only).
    """

    def __init__(
        self, base: nn.Module, max_positions: int, capacity: int, rows_hint: int = 16,
        weights: FusedWeights | None = None,
    ) -> None:
        w = weights if weights is not None else FusedWeights(base, rows_hint)
        _check_window(base, capacity, w.layer_window)
        self.capacity = capacity  # slots the batch may need; the cache grows towards it on demand
        self.weights = w
        self.H, self.KV, self.D, self.scale = w.H, w.KV, w.D, w.scale
        self.embed_VD, self.dtype, self.fold_norms, self.attn_dtype = w.embed_VD, w.dtype, w.fold_norms, w.attn_dtype
        self.layers, self.norm_w, self.norm_eps, self.head = w.layers, w.norm_w, w.norm_eps, w.head
        cos_1PD, sin_1PD = base.model.rotary_emb(self.embed_VD[:1][None], torch.arange(max_positions)[None])
        half = self.D // 2
        self.cos_PD = cos_1PD[0]
        self.sin_rot_PD = torch.cat([-sin_1PD[0, :, :half], sin_1PD[0, :, half:]], dim=-1)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.bias_BL: torch.Tensor | None = None  # additive key mask (0 / -inf); None without padding
        self.length = 0

    # -- cache management -------------------------------------------------------------------------------------
    def select_rows(self, keep_R: torch.Tensor) -> None:
        self.k_cache = [k[keep_R] for k in self.k_cache]
        self.v_cache = [v[keep_R] for v in self.v_cache]
        if self.bias_BL is not None:
            self.bias_BL = self.bias_BL[keep_R]

    def repeat_rows(self, n: int) -> None:
        self.k_cache = [k.repeat_interleave(n, dim=0) for k in self.k_cache]
        self.v_cache = [v.repeat_interleave(n, dim=0) for v in self.v_cache]
        if self.bias_BL is not None:
            self.bias_BL = self.bias_BL.repeat_interleave(n, dim=0)

    def _grow(self, needed: int) -> None:
        """Double the cache (up to ``capacity``) so a large default max_tokens does not preallocate it all."""
        old = self.k_cache[0].shape[2]
        new = min(self.capacity, max(needed, 2 * old))
        if needed > new:
            raise RuntimeError(f"KV cache overflow: {needed} slots > capacity {self.capacity}")

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(*t.shape[:2], new, *t.shape[3:])
            out[:, :, :old] = t
            return out

        self.k_cache = [grown(k) for k in self.k_cache]
        self.v_cache = [grown(v) for v in self.v_cache]
        if self.bias_BL is not None:
            self.bias_BL = torch.cat(
                [self.bias_BL, self.bias_BL.new_zeros(self.bias_BL.shape[0], new - old)], 1
            )

    # -- forward ----------------------------------------------------------------------------------------------
    def prefill(self, ids_BP: torch.Tensor, valid_BP: torch.Tensor) -> torch.Tensor:
        B, P = ids_BP.shape
        shape = (B, self.KV, min(self.capacity, P + _FIRST_ALLOC_NEW_TOKENS), self.D)
        self.k_cache = [torch.zeros(shape, dtype=self.attn_dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.attn_dtype) for _ in self.layers]
        has_pad = not bool(valid_BP.all())
        mask_B1PP = None
        if has_pad:
            self.bias_BL = torch.zeros(B, shape[2], dtype=self.attn_dtype)
            self.bias_BL[:, :P].masked_fill_(~valid_BP, float("-inf"))
            causal_PP = torch.ones(P, P, dtype=torch.bool).tril()
            # A pad query attends to itself only, so its (unused) row stays finite.
            mask_B1PP = (causal_PP & valid_BP[:, None, :]) | torch.eye(P, dtype=torch.bool)
            mask_B1PP = mask_B1PP[:, None]
        pos_BP = (valid_BP.long().cumsum(1) - 1).clamp_min(0)
        x_BPd = self.embed_VD[ids_BP]
        x_BPd = self._layers(x_BPd, pos_BP, 0, mask_B1PP)
        self.length = P
        return self._head(x_BPd[:, -1])

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        x_B1d = self.embed_VD[tok_B][:, None]
        x_B1d = self._layers(x_B1d, pos_B[:, None], self.length, None)
        self.length += 1
        return self._head(x_B1d[:, 0])

    def _head(self, x_Bd: torch.Tensor) -> torch.Tensor:
        return self.head(self._rms(x_Bd, self.norm_w, self.norm_eps))

    def _layers(
        self, x_BTd: torch.Tensor, pos_BT: torch.Tensor, start: int, mask_B1TT: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, d = x_BTd.shape
        H, KV, D = self.H, self.KV, self.D
        end = start + T
        if end > self.k_cache[0].shape[2]:
            self._grow(end)
        cos_BT1D = self.cos_PD[pos_BT][:, :, None]
        sin_BT1D = self.sin_rot_PD[pos_BT][:, :, None]
        x = x_BTd.reshape(B * T, d)
        for li, ly in enumerate(self.layers):
            h = self._rms(x, ly.ln1_w, ly.ln1_eps)
            qkv_BTHD = ly.qkv(h).view(B, T, H + 2 * KV, D)
            qk = qkv_BTHD[:, :, : H + KV]
            if ly.qk_norm_w is not None:
                qk = self._rms(qk, None, ly.qk_norm_eps) * ly.qk_norm_w
            # RoPE, bit-identical to HF's q * cos + rotate_half(q) * sin: roll(q) * [-sin1, sin2]
            qk = qk * cos_BT1D + qk.roll(D // 2, dims=-1) * sin_BT1D
            k_cache, v_cache = self.k_cache[li], self.v_cache[li]
            k_cache[:, :, start:end] = qk[:, :, H:].transpose(1, 2)
            v_cache[:, :, start:end] = qkv_BTHD[:, :, H + KV :].transpose(1, 2)
            q = qk[:, :, :H].to(self.attn_dtype)
            if T == 1:
                o = self._decode_attention(q[:, 0], k_cache, v_cache, end)
            else:
                o_BHTD = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    k_cache[:, :, :end],
                    v_cache[:, :, :end],
                    attn_mask=mask_B1TT,
                    is_causal=mask_B1TT is None,
                    scale=1.0,  # folded into q
                    enable_gqa=True,
                )
                o = o_BHTD.transpose(1, 2).reshape(B * T, H * D)
            x = ly.o.add_to(x, o.to(self.dtype))
            h = self._rms(x, ly.ln2_w, ly.ln2_eps)
            gate, up = ly.gate_up(h).chunk(2, dim=-1)
            x = ly.down.add_to(x, ly.act(gate) * up)
        return x.view(B, T, d)

    def _decode_attention(
        self, q_BHD: torch.Tensor, k_BKCD: torch.Tensor, v_BKCD: torch.Tensor, end: int
    ) -> torch.Tensor:
        # One query per row: two bmm over (batch x kv-head) beat SDPA's dispatch here; GQA by grouping heads.
        B, H, D = q_BHD.shape
        KV, C = k_BKCD.shape[1], k_BKCD.shape[2]
        k_NLD = k_BKCD.view(B * KV, C, D)[:, :end]
        v_NLD = v_BKCD.view(B * KV, C, D)[:, :end]
        q_NGD = q_BHD.reshape(B * KV, H // KV, D)
        if self.bias_BL is None:
            scores_NGL = torch.bmm(q_NGD, k_NLD.transpose(1, 2))
        else:  # padded batch: add the key mask of each row inside the bmm
            bias_NGL = (
                self.bias_BL[:, None, None, :end].expand(B, KV, H // KV, end).reshape(B * KV, H // KV, end)
            )
            scores_NGL = torch.baddbmm(bias_NGL, q_NGD, k_NLD.transpose(1, 2))
        return torch.bmm(scores_NGL.softmax(dim=-1), v_NLD).view(B, H * D)

    def _rms(self, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32 or (w is None and x.dtype == torch.bfloat16):
            # one op: bit-identical to the HF formula in fp32; in bf16 fp32 statistics and one rounding
            return torch.rms_norm(x, (x.shape[-1],), w, eps)
        return rms_norm_hf(x, w, eps)
