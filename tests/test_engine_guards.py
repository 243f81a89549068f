"""Engine guards: mixed loss inputs, NaN/inf refusal, strict ServiceClient arguments, freeing adapters."""

from __future__ import annotations

import gc
import math

import psutil
import pytest
import torch

from training_core import ServiceClient, types
from training_core.engine import InputError, NonFiniteError


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    return ServiceClient(checkpoint_root=tmp_path_factory.mktemp("ck"))


@pytest.fixture
def tc(sc):
    client = sc.create_lora_training_client("tiny", rank=4, seed=1)
    with torch.no_grad():  # LoRA B off zero: every factor gets a gradient
        for p in client._engine.adapters[client._adapter].params.values():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    yield client
    client.close()


def _datum(seed: int, n: int, **inputs: object) -> types.Datum:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(5, 300, (n + 1,), generator=g)
    return types.Datum(model_input=types.ModelInput.from_ints(toks[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": toks[1:], **inputs})


def _params(tc) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tc.trainable_parameters().items()}


# ---- mixed weights -----------------------------------------------------------------------------------------
def test_datum_without_weights_counts_all_tokens_and_others_keep_their_mask(tc):
    masked = _datum(0, 8, weights=[0.0] * 5 + [1.0] * 3)  # prompt tokens masked out
    plain = _datum(1, 6)  # no weights: every token counts (cross_entropy's documented default)
    lp_m, lp_p = (tc.forward([d]).result().loss_fn_outputs[0]["logprobs"].to_torch() for d in (masked, plain))
    want = -(float(lp_m[5:].sum()) + float(lp_p.sum()))
    got = tc.forward([masked, plain]).result().metrics["loss:sum"]
    # before the fix the mixed batch dropped `weights` for every datum and trained on the masked prompt too
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(-(float(lp_m.sum()) + float(lp_p.sum())), rel=1e-3)


def test_key_without_a_default_on_some_datums_is_an_error(tc):
    a = _datum(0, 5, advantages=[1.0] * 5)
    b = _datum(1, 5)
    with pytest.raises(InputError, match="datum 1: loss_fn_inputs has no 'advantages' while datum 0 has one"):
        tc.forward([a, b], "cross_entropy").result()


# ---- NaN / inf ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["advantages", "logprobs", "weights"])
def test_non_finite_inputs_are_refused_before_compute(tc, key):
    good = {"advantages": [0.5] * 6, "logprobs": [-3.0] * 6, "weights": [1.0] * 6}
    bad = dict(good, **{key: [0.5, float("nan"), 0.5, 0.5, float("inf"), 0.5]})
    data = [_datum(0, 6, **good), _datum(1, 6, **bad)]
    with pytest.raises(InputError, match=rf"datum 1: loss_fn_inputs\['{key}'\] holds NaN or inf"):
        tc.forward_backward(data, "ppo").result()
    assert all(p.grad is None for p in tc._engine.adapters[tc._adapter].params.values())


def test_non_finite_loss_is_refused_and_accumulates_nothing(tc):
    # finite inputs, but exp(lp - q) overflows: the importance-sampling loss is -inf
    d = _datum(0, 6, advantages=[1.0] * 6, logprobs=[-1e6] * 6)
    with pytest.raises(NonFiniteError, match="the loss is -inf"):
        tc.forward_backward([d], "importance_sampling").result()
    st = tc._engine.adapters[tc._adapter]
    assert all(p.grad is None for p in st.params.values()) and not st.pending_grads


def test_non_finite_gradient_refuses_the_step_and_keeps_weights_and_adam_state(tc, tmp_path):
    adam = types.AdamParams(learning_rate=1e-2)
    tc.forward_backward([_datum(2, 6)]).result()
    tc.optim_step(adam).result()  # Adam moments exist now
    st = tc._engine.adapters[tc._adapter]
    before = _params(tc)
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in st.optimizer.state.items()}

    def nan_grad(data, lps):  # loss value 0 (finite), gradient inf: sqrt'(0)
        return sum(torch.sqrt(lp - lp.detach()).sum() for lp in lps), {}

    tc.forward_backward_custom([_datum(3, 6)], nan_grad).result()
    with pytest.raises(NonFiniteError, match="refused: the gradient norm is (nan|inf)"):
        tc.optim_step(adam).result()
    assert tc.step == 1
    for k, v in tc.trainable_parameters().items():
        assert torch.equal(v, before[k]), k
    for p, s in st.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    # the poisoned gradients were discarded: the next step trains normally, and what gets saved is finite
    tc.forward_backward([_datum(4, 6)]).result()
    tc.optim_step(adam).result()
    assert tc.step == 2 and all(bool(torch.isfinite(v).all()) for v in tc.trainable_parameters().values())
    with pytest.raises(InputError, match="AdamParams .*learning_rate.* must be finite"):
        tc.optim_step(types.AdamParams(learning_rate=math.nan)).result()


def test_non_finite_weights_are_never_checkpointed(tc, tmp_path):
    with torch.no_grad():  # e.g. poisoned by code outside the engine's guarded steps
        next(iter(tc._engine.adapters[tc._adapter].params.values()))[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to save .*hold NaN/inf"):
        tc.save_state("poisoned").result()
    assert not (tc._root / tc.model_id / "weights" / "poisoned").exists()


# ---- ServiceClient arguments -------------------------------------------------------------------------------
def test_service_client_rejects_unknown_and_bad_arguments():
    with pytest.raises(TypeError, match="compute_dtpye"):
        ServiceClient(compute_dtpye="bfloat16")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        ServiceClient(compute_dtype="bf16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        ServiceClient(load_dtype="fp8")
    ServiceClient(base_url="http://unused", api_key="k")  # tinker scripts pass these: accepted, ignored


# ---- freeing adapters --------------------------------------------------------------------------------------
def _cycle(sc, how: str) -> None:
    tc = sc.create_lora_training_client("tiny", rank=16, seed=0)
    tc.forward_backward([_datum(0, 16)])
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # gradients and Adam moments allocated
    snap = tc.save_weights_and_get_sampling_client()
    if how == "close":
        snap.close()
        tc.close()
    elif how == "service":
        sc.close()
    del tc, snap  # "drop": the finalizers free them
    gc.collect()


def test_closed_or_dropped_clients_free_their_adapters(sc):
    eng = sc.create_lora_training_client("tiny", rank=4)._engine  # dropped at once: freed too
    n_params = lambda: sum(p.numel() for p in eng.model.parameters())  # noqa: E731
    eng.submit(lambda: None).result()
    _cycle(sc, "close")  # warm-up: allocator and import state
    adapters0, params0 = len(eng.adapters), eng.submit(n_params).result()
    rss0 = psutil.Process().memory_info().rss
    for i in range(12):
        _cycle(sc, ("close", "drop", "service")[i % 3])
    eng.submit(lambda: None).result()  # queued frees have run
    adapters1, params1 = len(eng.adapters), eng.submit(n_params).result()
    grew = psutil.Process().memory_info().rss - rss0
    print(f"12 create/train/snapshot/free cycles: adapters {adapters0} -> {adapters1}, "
          f"model parameters {params0} -> {params1}, RSS {grew / 2**20:+.1f} MiB")
    assert adapters1 == adapters0 and params1 == params0
    with pytest.raises(RuntimeError, match="is closed"):
        tc = sc.create_lora_training_client("tiny", rank=4)
        tc.close()
        tc.forward([_datum(0, 4)])
