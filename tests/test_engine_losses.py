"""forward_backward: each loss's value and gradients match an independent plain-PyTorch computation."""

from __future__ import annotations

import pytest
import torch

from training_core import ServiceClient, types

LOSSES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.3}),
]


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    sc = ServiceClient(checkpoint_root=tmp_path_factory.mktemp("ck"))
    client = sc.create_lora_training_client("tiny", rank=4, seed=1)
    # Move LoRA B off zero so gradients flow through every adapter matrix.
    with torch.no_grad():
        for p in client._engine.adapters[client._adapter].params.values():
            p.add_(0.02 * torch.randn_like(p))
    return client


def make_batch(vocab: int, seed: int = 0) -> list[types.Datum]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for T in (7, 12, 4):  # ragged lengths: padding must not leak into the loss
        toks = torch.randint(5, vocab, (T,), generator=g)
        tgt = torch.randint(5, vocab, (T,), generator=g)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(toks.tolist()),
            loss_fn_inputs={
                "target_tokens": tgt,
                "weights": (torch.rand(T, generator=g) > 0.3).float(),
                "logprobs": -torch.rand(T, generator=g) * 3 - 4,  # sampler logprobs
                "advantages": torch.randn(T, generator=g),
            },
        ))
    return data


def reference_loss(name: str, lp: torch.Tensor, d: types.Datum, cfg: dict) -> torch.Tensor:
    """The formulas of tinker-api.md section 4, written out per datum."""
    w = d.loss_fn_inputs["weights"].to_torch()
    q = d.loss_fn_inputs["logprobs"].to_torch()
    a = d.loss_fn_inputs["advantages"].to_torch()
    r = torch.exp(lp - q)
    if name == "cross_entropy":
        return -(lp * w).sum()
    if name == "importance_sampling":
        return -(r * a).sum()
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    if name == "ppo":
        return -torch.min(r * a, r.clamp(lo, hi) * a).sum()
    if name == "cispo":
        return -(r.clamp(lo, hi).detach() * lp * a).sum()
    if name == "dro":
        return -((lp * a - 0.5 * cfg["beta"] * (lp - q) ** 2) * w).sum()
    raise AssertionError(name)


def grads_of(tc) -> dict[str, torch.Tensor]:
    st = tc._engine.adapters[tc._adapter]
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in st.params.items()}


def zero_grads(tc) -> None:
    for p in tc._engine.adapters[tc._adapter].params.values():
        p.grad = None


def reference_grads(tc, data, name, cfg) -> tuple[float, list[torch.Tensor], dict[str, torch.Tensor]]:
    # on the engine's worker: all model access is serialized there (other clients' clean-up runs there too)
    return tc._engine.submit(lambda: _reference_grads(tc, data, name, cfg)).result()


def _reference_grads(tc, data, name, cfg) -> tuple[float, list[torch.Tensor], dict[str, torch.Tensor]]:
    eng = tc._engine
    zero_grads(tc)
    total = torch.zeros(())
    lps = []
    with eng.activate(tc._adapter):
        for d in data:  # one datum at a time, no padding, explicit log_softmax
            ids = torch.tensor([d.model_input.to_ints()])
            logits = eng.model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(-1, d.loss_fn_inputs["target_tokens"].to_torch()[:, None])[:, 0]
            lps.append(lp.detach())
            total = total + reference_loss(name, lp, d, cfg)
        total.backward()
    g = grads_of(tc)
    zero_grads(tc)
    return float(total), lps, g


@pytest.mark.parametrize("name,cfg", LOSSES)
def test_loss_and_gradients_match_reference(tc, name, cfg):
    data = make_batch(tc._engine.base.vocab_size)
    ref_loss, ref_lps, ref_g = reference_grads(tc, data, name, cfg)
    out = tc.forward_backward(data, name, cfg).result()
    got = grads_of(tc)
    zero_grads(tc)
    tc._engine.adapters[tc._adapter].pending_grads = False
    assert out.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    for o, lp in zip(out.loss_fn_outputs, ref_lps, strict=True):
        torch.testing.assert_close(o["logprobs"].to_torch(), lp, atol=1e-5, rtol=1e-5)
    nonzero = 0
    for k in ref_g:
        # float32 sums in another order (batched vs one datum at a time): 1.4e-6 seen on a 3e-3 element, so the
        # absolute floor scales with the tensor's largest gradient; a wrong gradient is off by O(1) of it
        torch.testing.assert_close(got[k], ref_g[k], atol=max(1e-6, 1e-3 * float(ref_g[k].abs().max())), rtol=1e-4)
        nonzero += int(ref_g[k].abs().sum() > 0)
    assert nonzero == len(ref_g), "every LoRA matrix should receive gradient"
    if name in ("cross_entropy", "dro"):
        # these two honour `weights` as a mask (documented; the reference applies it): the batch's masked
        # tokens must change the loss, and leaving `weights` out must mean all ones
        ones, unweighted = ([types.Datum(model_input=d.model_input, loss_fn_inputs={
            **{k: v for k, v in d.loss_fn_inputs.items() if k != "weights"},
            **({"weights": torch.ones(d.model_input.length)} if with_ones else {})}) for d in data]
            for with_ones in (True, False))
        loss_ones = tc.forward(ones, name, cfg).result().metrics["loss:sum"]
        assert tc.forward(unweighted, name, cfg).result().metrics["loss:sum"] == pytest.approx(loss_ones, rel=1e-6)
        assert abs(loss_ones - ref_loss) > 1e-3 * abs(ref_loss), "the weights mask must change the loss"


def test_forward_is_forward_backward_without_gradients(tc):
    data = make_batch(tc._engine.base.vocab_size, seed=3)
    zero_grads(tc)
    f = tc.forward(data, "cross_entropy").result()
    assert all(g.abs().sum() == 0 for g in grads_of(tc).values())
    fb = tc.forward_backward(data, "cross_entropy").result()
    zero_grads(tc)
    tc._engine.adapters[tc._adapter].pending_grads = False
    assert f.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-6)


def test_custom_loss_single_pass_matches_two_pass(tc):
    """Tinker runs a custom loss in two passes (forward, then CE with weights = -dL/dlogprobs); we do one."""
    data = make_batch(tc._engine.base.vocab_size, seed=5)

    def custom(batch, logprobs):
        # A non-linear loss of the logprobs: squared distance to a per-datum target value.
        loss = sum(((lp - d.loss_fn_inputs["logprobs"].to_torch()) ** 2).mean() for d, lp in zip(batch, logprobs, strict=True))
        return loss, {"custom_term:sum": float(loss)}

    zero_grads(tc)
    out = tc.forward_backward_custom(data, custom).result()
    one_pass = grads_of(tc)
    zero_grads(tc)
    # Two-pass reference, exactly as the tinker SDK does it client-side.
    fwd = tc.forward(data, "cross_entropy").result()
    lps = [o["logprobs"].to_torch().requires_grad_(True) for o in fwd.loss_fn_outputs]
    loss, _ = custom(data, lps)
    loss.backward()
    ce_data = [types.Datum(model_input=d.model_input,
                           loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                                           "weights": -lp.grad}) for d, lp in zip(data, lps, strict=True)]
    tc.forward_backward(ce_data, "cross_entropy").result()
    two_pass = grads_of(tc)
    zero_grads(tc)
    tc._engine.adapters[tc._adapter].pending_grads = False
    assert out.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-5)
    assert "custom_term:sum" in out.metrics
    for k in one_pass:
        torch.testing.assert_close(one_pass[k], two_pass[k], atol=1e-6, rtol=1e-4)


def test_bad_inputs_fail_before_compute(tc):
    vocab = tc._engine.base.vocab_size
    ok = make_batch(vocab)[0]
    with pytest.raises(ValueError, match="datum 0: token id .* outside vocab"):
        tc.forward([types.Datum(model_input=types.ModelInput.from_ints([1, vocab + 5]),
                                loss_fn_inputs={"target_tokens": [1, 2]})]).result()
    with pytest.raises(ValueError, match="exceed the model's context"):
        n = tc._engine.base.max_length + 1
        tc.forward([types.Datum(model_input=types.ModelInput.from_ints([1] * n),
                                loss_fn_inputs={"target_tokens": [1] * n})]).result()
    with pytest.raises(ValueError, match="missing 'advantages'"):
        bad = types.Datum(model_input=ok.model_input, loss_fn_inputs={"target_tokens": ok.loss_fn_inputs["target_tokens"],
                                                                      "logprobs": ok.loss_fn_inputs["logprobs"]})
        tc.forward([bad], "ppo").result()
    with pytest.raises(ValueError, match="has 3 values, model_input has 7"):
        tc.forward([types.Datum(model_input=ok.model_input, loss_fn_inputs={"target_tokens": [1, 2, 3]})]).result()
    with pytest.raises(ValueError, match="unknown loss_fn"):
        tc.forward([ok], "nope").result()
    with pytest.raises(ValueError, match="not used by 'cross_entropy'"):
        tc.forward([ok], "cross_entropy", {"beta": 1.0}).result()


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        ServiceClient().create_lora_training_client("no-such-model", rank=4)
