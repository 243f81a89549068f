"""Packing in training: packed rows through the ENGINE give the unpacked logprobs, gradients and SFT loss.

A packed datum carries `segment_ids` in `loss_fn_inputs`; the engine (generic HF + peft path and the fused
bf16 path of `fast_train`) gives each sequence its own causal block and positions from 0. Checked: per-token
logprobs equal one-example-per-row (LoRA adapter on, fp32 ~1e-6), gradients of a packed batch equal the sum
of the per-sequence gradients, the fused attention's block mask equals SDPA's, and an SFT run with
`data.packing=true` sends fewer rows per step with the same first-step loss and a falling loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flows.sft_config import PipelineConfig
from infra.config import load_config
from tasks.packing import pack_indices, packed_datums
from training_core import ServiceClient, fast_train, types
from training_core.engine import InputError
from training_core.renderers import datum_from_tokens_weights

LENS = [9, 14, 5, 21, 7, 12, 3]
MAX_LEN = 32


def _examples() -> list[tuple[list[int], list[float]]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(5, 1000, (n,), generator=g).tolist(), torch.rand(n, generator=g).tolist()) for n in LENS]


def _client(tmp_path: Path, dtype: str):  # noqa: ANN202 - a TrainingClient
    sc = ServiceClient(checkpoint_root=tmp_path / dtype, compute_dtype=dtype, load_dtype=dtype)
    tc = sc.create_lora_training_client("tiny", rank=8, seed=0)
    st = tc._engine.adapters[tc._adapter]
    with torch.no_grad():  # LoRA B off zero: the adapter changes every logprob
        noise = torch.Generator().manual_seed(1)
        for _, p in sorted(st.params.items()):
            p.copy_(0.02 * torch.randn(p.shape, generator=noise) + p)
    return tc, st


def _grads(st) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {n: p.grad.clone() for n, p in st.params.items()}
    for p in st.params.values():
        p.grad = None
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_packed_rows_give_unpacked_logprobs_and_gradients(tmp_path: Path, dtype: str) -> None:
    examples = _examples()
    unpacked = [datum_from_tokens_weights(t, w) for t, w in examples]
    bins = pack_indices(LENS, MAX_LEN)
    packed = packed_datums(examples, MAX_LEN, bins)
    assert bins == [[3, 5], [0, 1, 2, 4], [6]]  # first-fit decreasing of input lengths 20, 11 | 8, 13, 4, 6 | 2
    assert packed[0].loss_fn_inputs["segment_ids"].data == [0] * 20 + [1] * 11
    assert packed[0].model_input.to_ints() == examples[3][0][:-1] + examples[5][0][:-1]
    tc, st = _client(tmp_path, dtype)
    assert tc._engine._use_fast_path() == (dtype == "bfloat16")  # bf16 over bf16 weights: the fused path

    # reference: each sequence alone, its gradient accumulated (the sum over sequences)
    lp_ref = [tc.forward_backward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
              for d in unpacked]
    g_ref = _grads(st)
    # packed rows plus one plain datum (no segment_ids: one sequence) in the same batch
    out = tc.forward_backward([*packed, unpacked[2]], "cross_entropy").result()
    g_packed = _grads(st)
    lp_rows = [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
    lp_packed = {i: lp_rows[r][s:s + n] for r, b in enumerate(bins)
                 for i, s, n in zip(b, [sum(LENS[j] - 1 for j in b[:k]) for k in range(len(b))],
                                    [LENS[j] - 1 for j in b], strict=True)}
    tol = 1e-5 if dtype == "float32" else 2e-2
    for i in range(len(examples)):
        torch.testing.assert_close(lp_packed[i], lp_ref[i], atol=tol, rtol=0)
    torch.testing.assert_close(lp_rows[-1], lp_ref[2], atol=tol, rtol=0)
    mean_err = float(torch.cat([lp_packed[i] - lp_ref[i] for i in range(len(examples))]).abs().mean())
    assert mean_err < (1e-6 if dtype == "float32" else 1e-3), mean_err
    # the packed batch's gradient = sum of the per-sequence gradients (+ the plain datum's once more);
    # in bf16 within the rounding that batching alone causes (the same sequences as one padded batch)
    tc.forward_backward([unpacked[2]], "cross_entropy").result()
    g_extra = _grads(st)
    tc.forward_backward([*unpacked, unpacked[2]], "cross_entropy").result()
    g_batch = _grads(st)

    def rel(g: dict[str, torch.Tensor]) -> float:
        return max(float((g[k] - g_ref[k] - g_extra[k]).norm() / (g_ref[k] + g_extra[k]).norm()) for k in g_ref)

    print(f"{dtype}: packed grad rel err {rel(g_packed):.2e}, unpacked batch {rel(g_batch):.2e}; lp {mean_err:.2e}")
    if dtype == "float32":
        assert rel(g_packed) < 1e-5
    else:
        assert rel(g_packed) < 1e-2 and rel(g_packed) < 2 * rel(g_batch) + 1e-4, (rel(g_packed), rel(g_batch))


def test_engine_without_segment_ids_the_same_row_leaks_and_bad_ids_are_refused(tmp_path: Path) -> None:
    examples = _examples()[:2]
    tc, _ = _client(tmp_path, "float32")
    (packed,) = packed_datums(examples, MAX_LEN)
    leak = types.Datum(model_input=packed.model_input, loss_fn_inputs={
        k: v for k, v in packed.loss_fn_inputs.items() if k != "segment_ids"})
    lp_ok, lp_leak = (tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
                      for d in (packed, leak))
    torch.testing.assert_close(lp_ok[:8], lp_leak[:8], atol=1e-5, rtol=0)  # the first sequence sees nothing else
    assert float((lp_ok[8:] - lp_leak[8:]).abs().max()) > 1e-2  # the second one would see the first
    bad = types.Datum(model_input=packed.model_input, loss_fn_inputs={
        **packed.loss_fn_inputs, "segment_ids": [-1] * packed.model_input.length})
    with pytest.raises(InputError, match="segment_ids"):
        tc.forward([bad], "cross_entropy").result()


def test_fused_path_fp32_packed_equals_unpacked_with_gradients() -> None:
    """fast_train.target_logprobs itself (fp32: its SDPA branch) on a GQA Llama with LoRA, vs row by row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg).eval(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        adapter_name="a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in (6, 9, 4)]
    # one packed row of 6 + 9 tokens, one of 4 + padding
    tokens_B_T = torch.zeros((2, 15), dtype=torch.long)
    tokens_B_T[0] = torch.cat(seqs[:2])
    tokens_B_T[1, :4] = seqs[2]
    targets_B_T = tokens_B_T.roll(-1, 1)
    segs_B_T = torch.tensor([[0] * 6 + [1] * 9, [0] * 4 + [-1] * 11])
    lp_B_T = fast_train.target_logprobs(model, "a", tokens_B_T, targets_B_T, segs_B_T)
    spans = [(0, 0, 6), (0, 6, 9), (1, 0, 4)]
    loss = -sum(lp_B_T[r, s:s + n].sum() for r, s, n in spans)
    g_packed = torch.autograd.grad(loss, params)
    loss_ref = 0.0
    for (r, s, n), _ in zip(spans, seqs, strict=True):
        lp_ref = fast_train.target_logprobs(model, "a", tokens_B_T[r:r + 1, s:s + n], targets_B_T[r:r + 1, s:s + n])
        torch.testing.assert_close(lp_B_T[r, s:s + n], lp_ref[0], atol=1e-5, rtol=0)
        loss_ref = loss_ref - lp_ref.sum()
    for a, b in zip(g_packed, torch.autograd.grad(loss_ref, params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def test_fused_bf16_attention_block_mask_equals_sdpa() -> None:
    """The bf16 branch's kernel (_CausalAttention, GQA grouping) with a packed row's mask == SDPA's, in fp64."""
    B, T, H, KV, D = 2, 10, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (H, KV, KV))
    runs_B_T = fast_train.segment_runs(torch.tensor([[0] * 3 + [1] * 7, [5] * 6 + [-1] * 4]))
    assert fast_train.segment_positions(runs_B_T)[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    allowed_B_T_T = fast_train.block_causal_mask(runs_B_T)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed_B_T_T[:, None], scale=0.3, enable_gqa=True).transpose(1, 2)
    g_o = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g_o)
    G = H // KV
    mask = torch.zeros((B, T, T), dtype=torch.float64).masked_fill_(~allowed_B_T_T, float("-inf"))
    out = fast_train._CausalAttention.apply(q.permute(0, 2, 1, 3).reshape(B, KV, G * T, D),
                                            k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), 0.3,
                                            mask.repeat(1, G, 1)[:, None])
    out = out.view(B, H, T, D).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g_o), ref_grads, strict=True):  # its backward's delta is fp32
        torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-5)
    # the bf16 entry point takes the same branch and agrees to bf16 precision
    o16 = fast_train._attention(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), 0.3,
                                allowed_B_T_T)
    torch.testing.assert_close(o16.double(), ref.detach(), atol=3e-2, rtol=3e-2)


def test_sft_with_packing_sends_fewer_rows_and_learns(tmp_path: Path) -> None:
    from recipes.sft import train_sft
    from tasks.prepare_data import prepare_dataset

    base = ["model.rank=8", "data.n_train=64", "data.n_eval=16", "train.batch_size=8", "train.steps=6",
            "train.save_every=100", "train.eval_loss_examples=4", "train.warmup_steps=1", "data.replay=",
            "data.max_length=64"]
    data = prepare_dataset(load_config(PipelineConfig, None, base).data, tmp_path / "data")
    runs = {}
    for packing in (False, True):
        cfg = load_config(PipelineConfig, None, [*base, f"data.packing={str(packing).lower()}"])
        steps: list[dict[str, float]] = []
        res = train_sft(cfg, data.train_path, data.eval_path, tmp_path / f"run-{packing}",
                        on_step=lambda s, m, steps=steps: steps.append(m))
        runs[packing] = (res, steps)
    (_, steps_u), (res_p, steps_p) = runs[False], runs[True]
    assert all("packed_rows" not in m for m in steps_u)
    rows = [m["packed_rows"] for m in steps_p]
    assert len(rows) == 6 and all(1 <= r < 8 for r in rows), rows  # fewer forward rows than the batch size
    # same examples, same initial weights: the first step's loss is the unpacked one
    assert abs(steps_p[0]["train_loss"] - steps_u[0]["train_loss"]) < 1e-4
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(steps_p, steps_u, strict=True)) < 1e-3
    assert res_p.losses[-1][1] < res_p.losses[0][1]  # and it learns
    assert res_p.eval_loss_after < res_p.eval_loss_before
