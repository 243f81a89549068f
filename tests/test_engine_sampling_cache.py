"""The fused decoder's weights are read once per (adapter, weights version), not on every `sample()`."""

from __future__ import annotations

import logging

import pytest
import torch

from training_core import ServiceClient, sampler, sampling_decoders, state, types
from training_core.sampling_decoders import FusedWeights, Unsupported

PROMPT = types.ModelInput.from_ints([5, 17, 33, 90, 41, 7, 12])
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts weight reads (FusedWeights constructions)."""
    calls: list[int] = []

    class Counting(FusedWeights):
        def __init__(self, *a: object, **k: object) -> None:
            calls.append(1)
            super().__init__(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling_decoders, "FusedWeights", Counting)
    return calls


@pytest.fixture
def tc(tmp_path):
    client = ServiceClient(checkpoint_root=tmp_path).create_lora_training_client("tiny", rank=4, seed=0)
    with torch.no_grad():  # LoRA B off zero, so the adapter changes the samples
        for p in client._engine.adapters[client._adapter].params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    yield client
    client.close()


def _uncached(smp) -> tuple[list[int], list[float]]:
    """The same greedy sample with the weights read afresh (the reference for every cached answer)."""
    eng = smp._engine

    def run() -> tuple[list[int], list[float]]:
        with eng.activate(smp._adapter):
            seq = sampler.sample_batch(eng.model, [PROMPT.to_ints()], GREEDY, eos_token_ids=[])[0][0]
        return seq.tokens, seq.logprobs

    return eng.submit(run).result()


def _sample(smp) -> tuple[list[int], list[float]]:
    seq = smp.sample(PROMPT, 1, GREEDY).result().sequences[0]
    return seq.tokens, seq.logprobs


def test_weights_are_read_once_per_version_and_reread_when_they_change(tc, reads):
    smp = tc.save_weights_and_get_sampling_client()
    first = _sample(smp)
    assert _sample(smp) == first and _sample(smp) == first
    assert len(reads) == 1, "three samples of unchanged weights: one read"
    assert _uncached(smp) == first
    eng, name = smp._engine, smp._adapter

    # a load (new tensors, version bump) and an in-place edit (tensor _version) both invalidate the entry
    new = {k: 1.5 * v for k, v in state.adapter_tensors(eng, tc._adapter).items()}
    eng.submit(lambda: state.set_adapter_tensors(eng, name, new, "test")).result()
    loaded = _sample(smp)
    assert len(reads) == 3 and loaded == _uncached(smp) and loaded[1] != first[1]
    with torch.no_grad():
        for p in eng.adapters[name].params.values():
            p.mul_(0.5)
    edited = _sample(smp)
    assert len(reads) == 5 and edited == _uncached(smp) and edited[1] != loaded[1]

    # closing the client drops its cached weights
    smp.close()
    assert all(slot[0] != name for entries in sampling_decoders._CACHE.values() for slot in entries)


def test_optimizer_step_changes_the_weights_key(tc):
    # fused AdamW updates parameters without bumping their `_version`: the engine's own counter must change
    eng = tc._engine
    before = eng.weights_key(tc._adapter)
    versions = [p._version for p in eng.adapters[tc._adapter].params.values()]
    t = torch.randint(5, 300, (9,), generator=torch.Generator().manual_seed(1))
    tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                                     loss_fn_inputs={"target_tokens": t[1:]})])
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert eng.weights_key(tc._adapter) != before
    assert eng.weights_key(None) == eng.weights_key(None)  # the frozen base: one entry forever
    print("param _version before/after a fused AdamW step:", versions[:2],
          [p._version for p in eng.adapters[tc._adapter].params.values()][:2])


def test_fallback_to_the_hf_decoder_is_logged_once_per_weights(tc, monkeypatch, caplog):
    def refuse(self: object, *a: object, **k: object) -> None:
        raise Unsupported("forced in test")

    monkeypatch.setattr(FusedWeights, "__init__", refuse)
    smp = tc.save_weights_and_get_sampling_client()
    with caplog.at_level(logging.INFO, logger="training_core.sampling_decoders"):
        first = _sample(smp)
        assert _sample(smp) == first
    warned = [r for r in caplog.records if "slow HF decoder" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, caplog.text
    assert "llama" in warned[0].getMessage() and "forced in test" in warned[0].getMessage()
