"""The engine's bf16 fast path: a lean LoRA training forward/backward for Llama-family models.

Used only when the engine computes in bf16 over bf16 base weights and the model is Llama / Mistral / Qwen2 /
Qwen3 with plain LoRA (no dropout, no DoRA); anything else takes the generic Hugging Face + peft path. It does
the same work as that path (every position, every LoRA term, same rank) in fewer, larger kernels:

- q/k/v and gate/up base weights stacked once (a cached bf16 copy of those frozen weights), so each group is
  one matmul; the group's LoRA A's in one matmul, the LoRA scale folded into B, the LoRA products added in
  place into the base output, the whole group one autograd node with a hand-written backward (`_LoraLinear`);
- no dtype round trips: peft casts each LoRA input to fp32 and autocast casts it back, per module and step;
- RMSNorm in torch's fused kernel (fp32 statistics), RoPE on q and k at once;
- causal attention that keeps its softmax for the backward instead of recomputing it as the flash kernel
  does, GQA by grouping query heads (`_CausalAttention`); no attention mask: right-padded rows under a
  causal mask never see their padding, so every real position is exact;
- packed rows (optional `segment_ids_B_T`: several sequences in one row): a block-causal mask (a token sees
  only earlier tokens of its own sequence) and RoPE positions restarting at 0 per sequence, so each packed
  sequence computes exactly what it would alone; without segment ids the code path is the unpacked one
  (no mask tensor, shared positions). `segment_runs` / `segment_positions` / `block_causal_mask` are the
  helpers the engine's generic path and tasks.packing use too;
- target logprobs from bf16 logits with an fp32 log-sum-exp, chunked, keeping the softmax so the backward is
  one pass (`_TargetLogprob`; the generic path materialises fp32 logits, log-softmax and gradient).

Adapter weights stay fp32 leaves (their gradients and AdamW in fp32); they are cast to bf16 inside the graph.
Run in fp32, this path equals the generic one to fp32 roundoff (tests/test_fast_train.py).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The sampler's fused decoder reads the same architectures: one model-type list, one norm reader, one error.
from training_core.sampling_weights import LLAMA_FAMILY, Unsupported, norm_params

_CE_CHUNK = 1 << 22  # elements per fp32 chunk of the fused log-softmax (16 MB): few ops, bounded memory


@dataclass
class _Adapted:
    """One (possibly LoRA-wrapped) linear: base weight/bias and, if adapted, the LoRA factors and scale."""

    w: torch.Tensor
    b: torch.Tensor | None
    lora_a: torch.Tensor | None = None  # (r, in) fp32 leaf
    lora_b: torch.Tensor | None = None  # (out, r) fp32 leaf
    scale: float = 1.0


def _adapted(mod: nn.Module, adapter: str) -> _Adapted:
    base = getattr(mod, "base_layer", mod)
    if type(base) is not nn.Linear:
        raise Unsupported(f"{type(base).__name__} is not a plain Linear")
    out = _Adapted(base.weight, base.bias)
    if base is mod or getattr(mod, "disable_adapters", False):
        return out
    if getattr(mod, "merged", False) or adapter in getattr(mod, "lora_variant", {}):
        raise Unsupported("merged adapter or LoRA variant (DoRA, ...)")
    if adapter not in getattr(mod, "lora_A", {}):
        return out
    if not isinstance(mod.lora_dropout[adapter], nn.Identity):
        raise Unsupported("LoRA dropout")
    if mod.lora_A[adapter].bias is not None or mod.lora_B[adapter].bias is not None:
        raise Unsupported("LoRA bias")
    out.lora_a, out.lora_b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    out.scale = float(mod.scaling[adapter])
    return out


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    # RMSNorm with fp32 statistics (as LlamaRMSNorm), in torch's fused kernel; one rounding back to x's dtype.
    return torch.rms_norm(x.float(), (x.shape[-1],), None if w is None else w.float(), eps).to(x.dtype)


@dataclass
class _Stacked:
    """Frozen base weights of linears sharing an input, stacked once so they run as one matmul."""

    src: tuple[int, ...]  # data_ptrs of the sources: a changed base weight invalidates the stack
    w: torch.Tensor
    b: torch.Tensor | None


_STACKS: weakref.WeakKeyDictionary[nn.Module, dict[str, _Stacked]] = weakref.WeakKeyDictionary()


def _stacked(owner: nn.Module, key: str, mods: list[_Adapted]) -> _Stacked:
    src = tuple(m.w.data_ptr() for m in mods)
    cache = _STACKS.setdefault(owner, {})
    st = cache.get(key)
    if st is None or st.src != src:
        with torch.no_grad():
            w = torch.cat([m.w.detach() for m in mods])
            b = None
            if any(m.b is not None for m in mods):
                b = torch.cat([m.w.new_zeros(m.w.shape[0]) if m.b is None else m.b.detach() for m in mods])
        st = cache[key] = _Stacked(src, w, b)
    return st


class _LoraLinear(torch.autograd.Function):
    """x @ W^T + b with LoRA blocks: out[:, cols_i] += s_i * (x @ A_i^T) @ B_i^T, as one autograd node.

    W, b are frozen; the A's arrive stacked (R, I) so all of them take one matmul; the products are added in
    place into the base output. Backward: one matmul for every A's gradient, one for x's gradient (plus
    its LoRA part accumulated in place), skipped when x needs none (the first layer's input).
    """

    @staticmethod
    def forward(ctx, x_MI: torch.Tensor, w_NI: torch.Tensor, b_N: torch.Tensor | None,  # type: ignore[override]
                a_RI: torch.Tensor, blocks: tuple[tuple[int, int, int, int, float], ...],
                *b_list: torch.Tensor) -> torch.Tensor:
        dtype = x_MI.dtype
        a16_RI = a_RI.to(dtype)
        h_MR = x_MI @ a16_RI.t()
        out_MN = F.linear(x_MI, w_NI, b_N)
        b16 = [(b * blk[4]).to(dtype) for b, blk in zip(b_list, blocks, strict=True)]
        for (c0, n, r0, r, _), b16_nr in zip(blocks, b16, strict=True):
            out_MN[:, c0 : c0 + n].addmm_(h_MR[:, r0 : r0 + r], b16_nr.t())
        ctx.blocks = blocks
        ctx.save_for_backward(x_MI, w_NI, a16_RI, h_MR, *b16)
        return out_MN

    @staticmethod
    def backward(ctx, g_MN: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_MI, w_NI, a16_RI, h_MR, *b16 = ctx.saved_tensors
        g_MN = g_MN.to(x_MI.dtype)
        g_h, g_b = [], []
        for (c0, n, r0, r, scale), b16_nr in zip(ctx.blocks, b16, strict=True):
            g_blk = g_MN[:, c0 : c0 + n]
            g_h.append(g_blk @ b16_nr)  # d/dh of h @ (sB)^T
            g_b.append((g_blk.t() @ h_MR[:, r0 : r0 + r]).float().mul_(scale))  # d/dB = s * g^T h
        g_h_MR = torch.cat(g_h, 1)
        g_a = (g_h_MR.t() @ x_MI).float()
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = (g_MN @ w_NI).addmm_(g_h_MR, a16_RI)
        return (g_x, None, None, g_a, None, *g_b)


def _group(x_MI: torch.Tensor, mods: list[_Adapted], stack: _Stacked | None = None) -> torch.Tensor:
    """[mods[0](x) | mods[1](x) | ...] with their LoRA terms, as one base matmul (stacked weights)."""
    w, b = (stack.w, stack.b) if stack is not None else (mods[0].w, mods[0].b)
    blocks, a_list, b_list = [], [], []
    col = r0 = 0
    for m in mods:
        n = m.w.shape[0]
        if m.lora_a is not None:
            r = m.lora_a.shape[0]
            blocks.append((col, n, r0, r, m.scale))
            a_list.append(m.lora_a)
            b_list.append(m.lora_b)
            r0 += r
        col += n
    if not blocks:
        return F.linear(x_MI, w, b)
    a_RI = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    return _LoraLinear.apply(x_MI, w, b, a_RI, tuple(blocks), *b_list)


class _TargetLogprob(torch.autograd.Function):
    """log_softmax(logits)[target] with fp32 statistics over bf16 logits, chunked over rows.

    The forward keeps the softmax (in the logits' dtype) instead of the logits, so the backward is one pass,
    d lp / d logits = onehot - softmax, with no exp recomputed; the target entries, where 1 - p can cancel,
    come from the fp32 logprob.
    """

    @staticmethod
    def forward(ctx, logits_MV: torch.Tensor, targets_M: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        M, V = logits_MV.shape
        rows = max(1, _CE_CHUNK // V)
        keep = ctx.needs_input_grad[0]
        p_MV = torch.empty_like(logits_MV) if keep else None
        lse_M = torch.empty(M, dtype=torch.float32)
        for s in range(0, M, rows):
            x = logits_MV[s : s + rows].to(torch.float32, copy=True)  # scratch: never the logits themselves
            m = x.amax(-1, keepdim=True)
            z = x.sub_(m).exp_().sum(-1, keepdim=True)
            lse_M[s : s + rows] = (m + z.log())[:, 0]
            if p_MV is not None:
                p_MV[s : s + rows] = x.div_(z)
        lp_M = logits_MV.gather(1, targets_M[:, None])[:, 0].float() - lse_M
        if p_MV is not None:
            ctx.save_for_backward(p_MV, targets_M, lp_M)
        return lp_M

    @staticmethod
    def backward(ctx, g_M: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        p_MV, targets_M, lp_M = ctx.saved_tensors
        g_M = g_M.float()
        grad_MV = p_MV * (-g_M).to(p_MV.dtype)[:, None]
        grad_MV.scatter_(1, targets_M[:, None], (g_M * -torch.expm1(lp_M)).to(p_MV.dtype)[:, None])
        return grad_MV, None


class _CausalAttention(torch.autograd.Function):
    """Causal GQA attention that keeps the (bf16) softmax for the backward instead of recomputing it.

    q is grouped per KV head, (B, KV, G*T, D) with rows (g, t), so each KV head's G query heads share one
    matmul and K/V are never repeated. Scores and probabilities are in fp32 between the bf16 matmuls.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,  # type: ignore[override]
                mask_RT: torch.Tensor) -> torch.Tensor:
        s32 = torch.add(mask_RT, q @ k.transpose(-1, -2), alpha=scale)  # fp32: -inf above the diagonal
        p = torch.softmax(s32, dim=-1).to(q.dtype)
        o = p @ v
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, p, o)
        return o

    @staticmethod
    def backward(ctx, g_o: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, p, o = ctx.saved_tensors
        g_o = g_o.to(q.dtype)
        g_v = p.transpose(-1, -2) @ g_o
        delta = torch.linalg.vecdot(g_o.float(), o.float())[..., None]  # rowsum(p * dp) = rowsum(g_o * o)
        g_s = torch.sub(g_o @ v.transpose(-1, -2), delta).mul_(p).mul_(ctx.scale).to(q.dtype)
        return g_s @ k, g_s.transpose(-1, -2) @ q, g_v, None, None


def segment_runs(segment_ids_B_T: torch.Tensor) -> torch.Tensor:
    """Run index of each token: a new sequence starts wherever the id changes; -1 where the id is < 0 (padding).

    Runs, not raw ids, decide who sees whom, so ids only need to differ between neighbouring sequences.
    """
    change_B_T = torch.ones_like(segment_ids_B_T, dtype=torch.bool)
    change_B_T[:, 1:] = segment_ids_B_T[:, 1:] != segment_ids_B_T[:, :-1]
    return (change_B_T.long().cumsum(1) - 1).masked_fill(segment_ids_B_T < 0, -1)


def segment_positions(runs_B_T: torch.Tensor) -> torch.Tensor:
    """Position of each token within its run (0 at each sequence start), the RoPE positions of a packed row."""
    B, T = runs_B_T.shape
    idx_B_T = torch.arange(T).expand(B, T)
    start_B_T = torch.zeros((B, T), dtype=torch.long)
    start_B_T[:, 1:] = torch.where(runs_B_T[:, 1:] != runs_B_T[:, :-1], idx_B_T[:, 1:], 0)
    return idx_B_T - start_B_T.cummax(1).values


def block_causal_mask(runs_B_T: torch.Tensor) -> torch.Tensor:
    """`B x T x T` bool: query t sees key s iff s <= t in the same run; a padding query (run -1) sees only
    itself (an all-False row would make the softmax NaN; its output is masked by the caller anyway)."""
    T = runs_B_T.shape[1]
    real_B_T = runs_B_T >= 0
    same_B_T_T = (runs_B_T[:, :, None] == runs_B_T[:, None, :]) & real_B_T[:, None, :]
    mask_B_T_T = same_B_T_T & torch.ones((T, T), dtype=torch.bool).tril()[None]
    return mask_B_T_T | (torch.eye(T, dtype=torch.bool)[None] & ~real_B_T[:, :, None])


_ATTN_MAX_SCORES = 1 << 24  # B*H*T*T above this: the flash kernel (memory O(T) instead of O(T^2))


@functools.lru_cache(maxsize=4)  # a few recent lengths: a (G*T, T) mask is 32 MB at T=2048
def _causal_mask(G: int, T: int) -> torch.Tensor:
    return torch.full((T, T), float("-inf")).triu(1).repeat(G, 1)


def _attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, scale: float,
               allowed_B_T_T: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over (B, T, heads, D) views; returns (B, T, H, D), contiguous, in q's dtype.

    `allowed_B_T_T` (bool, packed rows): who may see whom instead of the plain causal mask.
    """
    B, T, H, D = q_BTHD.shape
    KV = k_BTKD.shape[2]
    if q_BTHD.dtype != torch.bfloat16 or B * H * T * T > _ATTN_MAX_SCORES:
        # fp32 flash kernel: faster than the bf16 one on CPU; the casts are O(T*D) per head
        o_BHTD = F.scaled_dot_product_attention(
            q_BTHD.transpose(1, 2).float(), k_BTKD.transpose(1, 2).float(), v_BTKD.transpose(1, 2).float(),
            attn_mask=None if allowed_B_T_T is None else allowed_B_T_T[:, None],
            is_causal=allowed_B_T_T is None, scale=scale, enable_gqa=H != KV,
        )
        return o_BHTD.transpose(1, 2).to(q_BTHD.dtype, memory_format=torch.contiguous_format)
    G = H // KV
    if allowed_B_T_T is None:
        mask_RT = _causal_mask(G, T)
    else:  # additive fp32 mask per row, rows (g, t) as q's grouping below: (B, 1, G*T, T)
        add_B_T_T = torch.zeros((B, T, T)).masked_fill_(~allowed_B_T_T, float("-inf"))
        mask_RT = add_B_T_T.repeat(1, G, 1)[:, None]
    q = q_BTHD.permute(0, 2, 1, 3).reshape(B, KV, G * T, D)  # head h = kv * G + g
    k = k_BTKD.transpose(1, 2).contiguous()
    v = v_BTKD.transpose(1, 2).contiguous()
    o = _CausalAttention.apply(q, k, v, scale, mask_RT)
    return o.view(B, H, T, D).transpose(1, 2).contiguous()


def _qk_norms(layers: nn.ModuleList, H: int, KV: int) -> tuple[list[torch.Tensor] | None, float]:
    """Qwen3's per-head q/k norm weights, stacked per layer as (H + KV, D) to normalise q and k at once."""
    if not hasattr(layers[0].self_attn, "q_norm"):
        return None, 0.0
    out, eps = [], 0.0
    for ly in layers:
        (qw, eps), (kw, _) = norm_params(ly.self_attn.q_norm), norm_params(ly.self_attn.k_norm)
        out.append(torch.cat([qw.expand(H, -1), kw.expand(KV, -1)]))
    return out, eps


def check_supported(model: nn.Module) -> None:
    """Raise `Unsupported` unless `model` (peft-wrapped or not) is a Llama-family decoder we can run fused."""
    inner = getattr(getattr(model, "base_model", model), "model", model)  # PeftModel -> LoraModel -> HF model
    cfg = getattr(inner, "config", None)
    if cfg is None or cfg.model_type not in LLAMA_FAMILY:
        raise Unsupported(f"model_type {getattr(cfg, 'model_type', None)}")
    body = getattr(inner, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(inner, "lm_head"):
        raise Unsupported("unexpected module layout")
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) and (
        cfg.model_type == "mistral" or any("sliding" in str(t) for t in getattr(cfg, "layer_types", None) or [])
    ):
        raise Unsupported("sliding-window attention")
    if type(body.embed_tokens) is not nn.Embedding:
        raise Unsupported("adapted embedding")


def target_logprobs(model: nn.Module, adapter: str | None, tokens_B_T: torch.Tensor,
                    targets_B_T: torch.Tensor, segment_ids_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """Logprobs `lp_B_T` (fp32) of `targets_B_T` after `tokens_B_T` under base + LoRA `adapter`, in bf16.

    Rows may be right-padded: positions after a row's end are garbage and must be masked by the caller.
    `segment_ids_B_T` (packed rows; -1 on padding): each run of equal ids is its own sequence, with its own
    causal block and positions from 0.
    """
    check_supported(model)
    inner = getattr(getattr(model, "base_model", model), "model", model)
    body, cfg = inner.model, inner.config
    name = adapter or ""
    B, T = tokens_B_T.shape
    M = B * T
    attn0 = body.layers[0].self_attn
    H, KV = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    D = int(attn0.head_dim)
    x_Md = F.embedding(tokens_B_T.reshape(M), body.embed_tokens.weight)
    allowed_B_T_T = None
    if segment_ids_B_T is None:
        pos_1T = torch.arange(T)[None]
    else:
        runs_B_T = segment_runs(segment_ids_B_T)
        pos_1T = segment_positions(runs_B_T)  # (B, T): the "1" broadcasts as B below
        allowed_B_T_T = block_causal_mask(runs_B_T)
    cos_1TD, sin_1TD = body.rotary_emb(x_Md[:1][None], pos_1T)  # HF's own RoPE table, in x's dtype
    if cos_1TD.shape[-1] != D:
        raise Unsupported("partial rotary embedding")
    half = D // 2
    cos_1T1D = cos_1TD[:, :, None]
    sin_rot_1T1D = torch.cat([-sin_1TD[..., :half], sin_1TD[..., half:]], -1)[:, :, None]
    qk_norm_w, qk_eps = _qk_norms(body.layers[: cfg.num_hidden_layers], H, KV)
    for li, layer in enumerate(body.layers[: cfg.num_hidden_layers]):
        at, mlp = layer.self_attn, layer.mlp
        h_Md = _rms(x_Md, *norm_params(layer.input_layernorm))
        qkv_mods = [_adapted(getattr(at, n), name) for n in ("q_proj", "k_proj", "v_proj")]
        qkv_BTND = _group(h_Md, qkv_mods, _stacked(at, "qkv", qkv_mods)).view(B, T, H + 2 * KV, D)
        qk_BTND = qkv_BTND[:, :, : H + KV]
        if qk_norm_w is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
            qk_BTND = _rms(qk_BTND, None, qk_eps) * qk_norm_w[li]
        # RoPE on q and k at once: q * cos + rotate_half(q) * sin == q * cos + roll(q) * [-sin1, sin2]
        qk_BTND = qk_BTND * cos_1T1D + qk_BTND.roll(half, dims=-1) * sin_rot_1T1D
        o_BTHD = _attention(qk_BTND[:, :, :H], qk_BTND[:, :, H:], qkv_BTND[:, :, H + KV :], float(attn0.scaling),
                            allowed_B_T_T)
        x_Md = x_Md + _group(o_BTHD.view(M, H * D), [_adapted(at.o_proj, name)])
        h_Md = _rms(x_Md, *norm_params(layer.post_attention_layernorm))
        gu_mods = [_adapted(mlp.gate_proj, name), _adapted(mlp.up_proj, name)]
        gate, up = _group(h_Md, gu_mods, _stacked(mlp, "gate_up", gu_mods)).chunk(2, dim=-1)
        x_Md = x_Md + _group(mlp.act_fn(gate) * up, [_adapted(mlp.down_proj, name)])
    h_Md = _rms(x_Md, *norm_params(body.norm))
    logits_MV = _group(h_Md, [_adapted(inner.lm_head, name)])
    return _TargetLogprob.apply(logits_MV, targets_B_T.reshape(M)).view(B, T)
