"""save_state / load_state: exact resume in a fresh process, weights-only vs with-optimizer, integrity."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from training_core import ServiceClient, types
from training_core.checkpoint import CheckpointExistsError, CorruptCheckpointError

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from safetensors.torch import save_file
    from training_core import ServiceClient, types
    mode, root, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        toks = torch.randint(5, 300, (4, 10), generator=g)
        return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                            loss_fn_inputs={"target_tokens": t[1:], "weights": torch.ones(9)}) for t in toks]
    sc = ServiceClient(checkpoint_root=root)
    if mode == "resume":
        tc = sc.create_training_client_from_state_with_optimizer(open(root + "/path.txt").read())
    else:
        torch.manual_seed(123)  # the resumed process does not seed: its RNG state comes from the checkpoint
        tc = sc.create_lora_training_client("tiny", rank=4, seed=7)
    start = tc.step
    for s in range(start, start + n):
        tc.forward_backward(batch(s), "cross_entropy")
        # torch.rand inside the loop: RNG state must be restored on resume too
        lr = 1e-2 * (1 + float(torch.rand(())))
        tc.optim_step(types.AdamParams(learning_rate=lr, weight_decay=0.01)).result()
    if mode == "first":
        saved = tc.save_state("half").result().path
        open(root + "/path.txt", "w").write(saved)
    save_file({k: v.contiguous() for k, v in tc.trainable_parameters().items()}, out)
    print(json.dumps({"step": tc.step}))
''')


def _run(mode: str, root: Path, out: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(root), str(out), str(n)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_resume_in_fresh_process_equals_uninterrupted(tmp_path):
    straight = _run("straight", tmp_path / "a", tmp_path / "straight.safetensors", 6)
    first = _run("first", tmp_path / "b", tmp_path / "half.safetensors", 3)
    resumed = _run("resume", tmp_path / "b", tmp_path / "resumed.safetensors", 3)
    assert straight["step"] == 6 and first["step"] == 3
    assert resumed["step"] == 6, "resume must continue at step 3 and apply exactly 3 more steps"
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    half = load_file(tmp_path / "half.safetensors")
    assert any((half[k] - a[k]).abs().max() > 1e-4 for k in a), "half-way weights must differ from final ones"


def _batch(vocab: int) -> list[types.Datum]:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(5, vocab, (2, 9), generator=g)
    return [types.Datum(model_input=types.ModelInput.from_ints(x[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": x[1:], "weights": torch.ones(8)}) for x in t]


def _params(tc) -> dict[str, torch.Tensor]:
    return {k.split(".lora_")[0] + k.split(".lora_")[1][1:]: v.clone() for k, v in tc.trainable_parameters().items()}


def test_load_state_is_weights_only_and_with_optimizer_restores_moments(tmp_path):
    sc = ServiceClient(checkpoint_root=tmp_path)
    tc = sc.create_lora_training_client("tiny", rank=4, seed=3)
    data = _batch(tc._engine.base.vocab_size)
    adam = types.AdamParams(learning_rate=5e-3)
    for _ in range(3):
        tc.forward_backward(data)
        tc.optim_step(adam)
    path = tc.save_state("s3").result().path
    tc.forward_backward(data)
    tc.optim_step(adam).result()
    cont = [v.clone() for v in tc.trainable_parameters().values()]

    w_only = sc.create_training_client_from_state(path)
    with_opt = sc.create_training_client_from_state_with_optimizer(path)
    assert w_only.step == 0 and with_opt.step == 3
    for a, b in zip(w_only.trainable_parameters().values(), with_opt.trainable_parameters().values(), strict=True):
        torch.testing.assert_close(a, b)  # same weights right after loading
    for c in (w_only, with_opt):
        c.forward_backward(data)
        c.optim_step(adam).result()
    got_opt = list(with_opt.trainable_parameters().values())
    got_w = list(w_only.trainable_parameters().values())
    for a, b in zip(got_opt, cont, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # with optimizer: continues exactly
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(got_w, cont, strict=True)), \
        "weights-only load restarts Adam moments, so its next step must differ"

    # load_state into an existing client resets its optimizer too
    tc.load_state(path).result()
    assert tc.step == 0
    with pytest.raises(ValueError, match="sampler weights only"):
        sp = tc.save_weights_for_sampler("samp").result().path
        tc.load_state_with_optimizer(sp).result()


def test_checkpoint_is_never_overwritten_and_tampering_is_refused(tmp_path):
    sc = ServiceClient(checkpoint_root=tmp_path)
    tc = sc.create_lora_training_client("tiny", rank=4, seed=3)
    path = Path(tc.save_state("a").result().path)
    with pytest.raises(CheckpointExistsError):
        tc.save_state("a").result()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                      "trainer_state.json", "adapter_config.json"}
    # tamper one byte of the weights
    f = path / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="adapter_model.safetensors does not match"):
        sc.create_training_client_from_state(str(path))
    # a half-written checkpoint (no manifest) is refused
    p2 = Path(tc.save_state("b").result().path)
    (p2 / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest.json"):
        tc.load_state(str(p2)).result()
    # nothing in a checkpoint is a pickle
    for g in p2.iterdir():
        assert g.suffix in (".safetensors", ".json"), g


def test_multi_lora_shares_the_base_model():
    sc = ServiceClient()
    first = sc.create_lora_training_client("tiny-30m", rank=8)
    eng = first._engine
    base_bytes = sum(p.numel() * p.element_size() for n, p in eng.model.named_parameters() if "lora_" not in n)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    others = [sc.create_lora_training_client("tiny-30m", rank=8) for _ in range(3)]
    rss1 = proc.memory_info().rss
    assert all(o._engine is eng for o in others)
    adapter_bytes = sum(p.numel() * 4 for p in first.trainable_parameters().values())
    grew = rss1 - rss0
    # 3 more clients: memory grows by ~3 adapters, nowhere near one more base model
    assert grew < 0.5 * base_bytes, f"RSS grew {grew / 2**20:.1f} MiB; base is {base_bytes / 2**20:.1f} MiB"
    print(f"base {base_bytes / 2**20:.1f} MiB, adapter {adapter_bytes / 2**20:.2f} MiB, "
          f"3 more clients grew RSS by {grew / 2**20:.1f} MiB")
    for o in others:  # clients are independent: training one leaves the others untouched
        assert o._adapter != first._adapter
    before = [v.clone() for v in others[1].trainable_parameters().values()]
    data = _batch(eng.base.vocab_size)
    others[0].forward_backward(data)
    others[0].optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = list(others[1].trainable_parameters().values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_async_twins_and_ordering(tmp_path):
    sc = ServiceClient(checkpoint_root=tmp_path)
    tc = sc.create_lora_training_client("tiny", rank=4, seed=3)
    data = _batch(tc._engine.base.vocab_size)

    async def loop() -> list[float]:
        losses = []
        for _ in range(3):
            fb = await tc.forward_backward_async(data, "cross_entropy")
            op = await tc.optim_step_async(types.AdamParams(learning_rate=1e-2))
            losses.append((await fb).metrics["loss:sum"])
            await op.result_async()
        return losses

    losses = asyncio.run(loop())
    assert losses[2] < losses[0]
    assert tc.step == 3
    info = tc.get_info()
    assert info.lora_rank == 4 and info.model_data.model_name == "tiny"
