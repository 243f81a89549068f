"""DeepSpeed ZeRO-2/3 backend on 2 CPU ranks (gloo) against the single-process engine and plain PyTorch.

Tolerances (fp32 everywhere). Both sides run the same math; what differs is the order of fp32 sums:
each rank pads its own shard (other matmul shapes, other BLAS blocking), `loss:sum` adds two partial sums,
and ZeRO reduces two partial gradients. Unit roundoff is 6e-8, so:
- `loss:sum` (~300, summed over ~50 tokens): measured <= 3e-7 relative; we allow rtol 2e-6;
- per-token logprobs: measured <= 1e-6; atol 1e-5;
- grad norm: DeepSpeed accumulates it in fp64, torch's clip_grad_norm_ in fp32 (5e-5 off on a 262k-element
  embedding gradient), so the full fine-tuning reference computes it in fp64; rtol 1e-5. The norm is the
  check that catches a wrong loss scale (e.g. gradients averaged instead of summed over ranks): Adam's
  update is invariant to a gradient's scale, so parameters alone would not show it;
- parameters: Adam's first update of a coordinate is +-lr whatever the gradient's size, so a coordinate
  whose gradient is at roundoff level (~1e-9) can land 2 x lr away. We require every coordinate but at most
  1 in 10^4 to agree within 2e-5 (measured: 0-2 outliers among 79k LoRA / 3.4M full coordinates, the rest
  <= 2e-6), and none beyond 2 x lr x steps (Adam's step bound). A lost shard or a skipped accumulation
  moves most coordinates by ~lr and fails both;
- Adam moments are linear in the gradients (no amplification), but after k steps they also hold gradients
  taken at parameters that differ by the outliers above: max error <= 1e-4 x the tensor's max (measured
  <= 1.2e-5 for full fine-tuning, 1e-7 for LoRA).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from training_core import ServiceClient, types
from training_core.distributed import (
    DistributedWorkerError,
    WorkerPool,
    create_distributed_training_client,
)
from training_core.state import canonical_key

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL, LP_ATOL, PARAM_ATOL, MAX_OUTLIER_FRAC = 2e-6, 1e-5, 2e-5, 1e-4
ADAM_LORA = [types.AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0),
             types.AdamParams(learning_rate=5e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)]
# Full fine-tuning at a full-fine-tuning learning rate and eps=1e-8: with eps=1e-12 Adam maps roundoff-level
# gradients to +-lr updates, and 3.4M random-init weights at lr 1e-2 are chaotic (ZeRO-2 and ZeRO-3 then drift
# apart from *each other* by 1e-4 in loss by step 5): no comparison of trajectories is meaningful there.
ADAM_FULL = [types.AdamParams(learning_rate=1e-4, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0),
             types.AdamParams(learning_rate=5e-5, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)]
STEPS, SAVE_AT = 5, 3
LORA = types.LoraConfig(rank=4, seed=7, train_unembed=True)


def batches(step: int) -> list[list[types.Datum]]:
    """Step `step`'s forward_backward calls: 5 ragged datums (3+2 per rank); step 1 has two calls before its
    optim_step (accumulation); step 4 has one datum (rank 1 runs a stand-in with zero weight)."""
    g = torch.Generator().manual_seed(1000 + step)

    def datum(i: int) -> types.Datum:
        n = 6 + (3 * i + step) % 9
        t = torch.randint(5, 300, (n + 1,), generator=g)
        w = (torch.rand(n, generator=g) > 0.2).float()
        return types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                           loss_fn_inputs={"target_tokens": t[1:], "weights": w})

    if step == 4:
        return [[datum(0)]]
    calls = [[datum(i) for i in range(5)]]
    if step == 1:
        calls.append([datum(i) for i in range(3)])
    return calls


def adam(step: int, full: bool = False) -> types.AdamParams:
    return (ADAM_FULL if full else ADAM_LORA)[step % 2]


def lps(out: types.ForwardBackwardOutput) -> torch.Tensor:
    return torch.cat([o["logprobs"].to_torch().reshape(-1) for o in out.loss_fn_outputs])


def run_steps(tc: Any, start: int, end: int, save: bool = False, full: bool = False) -> dict[str, Any]:
    """Train steps [start, end); record losses, logprobs, grad norms; optionally save_state at SAVE_AT."""
    rec: dict[str, Any] = {"loss": [], "lp": [], "gnorm": [], "ckpt": None}
    for s in range(start, end):
        if save and s == SAVE_AT:
            rec["ckpt"] = tc.save_state(f"step-{s}").result().path
        outs = [tc.forward_backward(b, "cross_entropy") for b in batches(s)]
        m = tc.optim_step(adam(s, full)).result().metrics
        rec["loss"].append(sum(o.result().metrics["loss:sum"] for o in outs))
        rec["lp"].append(torch.cat([lps(o.result()) for o in outs]))
        rec["gnorm"].append(m.get("grad_norm:mean"))
    return rec


def assert_same_run(got: dict[str, Any], ref: dict[str, Any]) -> None:
    torch.testing.assert_close(torch.tensor(got["loss"], dtype=torch.float64),
                               torch.tensor(ref["loss"], dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    for a, b in zip(got["lp"], ref["lp"], strict=True):
        torch.testing.assert_close(a, b, atol=LP_ATOL, rtol=0)
    for a, b in zip(got["gnorm"], ref["gnorm"], strict=True):
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * b), (a, b)


def assert_params(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], bound: float = 0.1) -> None:
    """All coordinates within PARAM_ATOL but Adam-amplified roundoff outliers (<= 1e-4 of them, <= bound)."""
    assert got.keys() == ref.keys()
    diff = torch.cat([(got[k] - ref[k]).abs().reshape(-1) for k in ref])
    outliers = int((diff > PARAM_ATOL).sum())
    assert outliers <= MAX_OUTLIER_FRAC * diff.numel(), f"{outliers}/{diff.numel()} coordinates off by > {PARAM_ATOL}"
    assert float(diff.max()) <= bound, f"max parameter difference {float(diff.max()):.3g} > {bound}"


def assert_moments(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        scale = max(float(ref[k].abs().max()), 1e-30)
        err = float((got[k] - ref[k]).abs().max())
        assert err <= 1e-4 * scale, f"{k}: max error {err:.3g} vs scale {scale:.3g}"


# ---- references --------------------------------------------------------------------------------------------
def lora_ref_params(tc: Any) -> dict[str, torch.Tensor]:
    return {canonical_key(k, tc._adapter): v.clone() for k, v in tc.trainable_parameters().items()}


@pytest.fixture(scope="module")
def ref_lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-process engine: STEPS steps, a state checkpoint at SAVE_AT, final params."""
    sc = ServiceClient(checkpoint_root=tmp_path_factory.mktemp("ref_lora"))
    tc = sc.create_lora_training_client("tiny", rank=LORA.rank, seed=LORA.seed, train_unembed=LORA.train_unembed)
    rec = run_steps(tc, 0, STEPS, save=True)
    rec["params"] = lora_ref_params(tc)
    return rec


def full_ref(steps: int) -> dict[str, Any]:
    """Full fine-tuning in plain PyTorch (HF model + torch AdamW), independent of the engine's code."""
    from transformers import AutoModelForCausalLM

    from training_core.presets import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    rec: dict[str, Any] = {"loss": [], "lp": [], "gnorm": [], "snap": None}
    for s in range(steps):
        if s == SAVE_AT:
            names = list(params)
            rec["snap"] = ({k: v.detach().clone() for k, v in params.items()},
                           {f"{i}.{key}": opt.state[params[n]][key].clone() for i, n in enumerate(names)
                            for key in ("exp_avg", "exp_avg_sq")})
        total, lp_all = 0.0, []
        for data in batches(s):
            for d in data:  # one datum at a time: no padding at all in the reference
                toks = torch.tensor([d.model_input.to_ints()])
                logits = model(input_ids=toks).logits[0]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, d.loss_fn_inputs["target_tokens"].to_torch()
                                                                  .reshape(-1, 1)).squeeze(-1)
                loss = -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
                loss.backward()
                total += float(loss.detach())
                lp_all.append(lp.detach())
        a = adam(s, full=True)
        for g in opt.param_groups:
            g.update(lr=a.learning_rate, betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay)
        gn = None
        if a.grad_clip_norm:  # torch's clip_grad_norm_ semantics, the norm accumulated in fp64 as DeepSpeed does
            gn = float(torch.stack([p.grad.double().norm() for p in params.values()]).norm())
            coef = min(1.0, a.grad_clip_norm / (gn + 1e-6))
            for p in params.values():
                p.grad.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["loss"].append(total)
        rec["lp"].append(torch.cat(lp_all))
        rec["gnorm"].append(gn)
    rec["params"] = {k: v.detach().clone() for k, v in params.items()}
    return rec


@pytest.fixture(scope="module")
def ref_full() -> dict[str, Any]:
    return full_ref(STEPS)


class Pools:
    """One 2-rank pool for the module, started in the background (it imports while the single-process
    references compute) and restarted if a test consumed it."""

    def __init__(self) -> None:
        self.pool: WorkerPool | None = None
        self._start: Any = None

    def start(self) -> None:
        import concurrent.futures

        self._start = concurrent.futures.ThreadPoolExecutor(1).submit(
            WorkerPool, 2, timeout_s=120, startup_timeout_s=240)

    def get(self) -> WorkerPool:
        if self._start is not None:
            self.pool, self._start = self._start.result(), None
        if self.pool is None or self.pool.closed:
            self.pool = WorkerPool(2, timeout_s=120, startup_timeout_s=240)
        return self.pool


@pytest.fixture(scope="module")
def pools() -> Any:
    p = Pools()
    p.start()
    yield p
    if p._start is not None:
        p.pool = p._start.result()
    if p.pool is not None:
        p.pool.close()


def ds_client(pools: Pools, stage: int, lora: types.LoraConfig | None, root: Path) -> Any:
    return create_distributed_training_client("tiny", world_size=2, zero_stage=stage, lora=lora,
                                              checkpoint_root=root, pool=pools.get(), timeout_s=120)


# ---- parity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_parity_and_ws2_to_ws1_resume(stage, pools, ref_lora, tmp_path):
    """ZeRO LoRA == the single-process engine step by step; its checkpoint resumes in the engine exactly."""
    with ds_client(pools, stage, LORA, tmp_path) as tc:
        assert tc.step == 0
        got = run_steps(tc, 0, STEPS, save=True)
        assert_same_run(got, ref_lora)
        assert_params(tc.trainable_parameters(), ref_lora["params"])
        assert tc.step == STEPS and tc.get_info().is_lora and tc.get_info().lora_rank == LORA.rank
    ckpt = got["ckpt"]
    ref_files = Path(ref_lora["ckpt"])
    assert_params(load_file(Path(ckpt) / "adapter_model.safetensors"), load_file(ref_files / "adapter_model.safetensors"))
    assert_moments(load_file(Path(ckpt) / "optimizer.safetensors"), load_file(ref_files / "optimizer.safetensors"))
    # world size 2 -> world size 1, optimizer included: the engine continues as if never interrupted
    tc1 = ServiceClient(checkpoint_root=tmp_path / "ws1").create_training_client_from_state_with_optimizer(ckpt)
    assert tc1.step == SAVE_AT
    resumed = run_steps(tc1, SAVE_AT, STEPS)
    assert_params(lora_ref_params(tc1), ref_lora["params"])
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(ref_lora["loss"][SAVE_AT:]),
                               rtol=LOSS_RTOL, atol=0)


def test_ws1_to_ws2_resume_and_sampling(pools, ref_lora, tmp_path):
    """The engine's checkpoint continues on 2 ZeRO-2 ranks exactly; the sampler sees the trained weights."""
    with ds_client(pools, 2, LORA, tmp_path) as tc:
        assert tc.load_state_with_optimizer(ref_lora["ckpt"]).result() == SAVE_AT and tc.step == SAVE_AT
        got = run_steps(tc, SAVE_AT, STEPS)
        torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref_lora["loss"][SAVE_AT:]),
                                   rtol=LOSS_RTOL, atol=0)
        assert_params(tc.trainable_parameters(), ref_lora["params"])
        # weights only: same weights, fresh optimizer, step 0
        assert tc.load_state(ref_lora["ckpt"]).result() == 0 and tc.step == 0
        # sampling: the in-process sampler's prompt logprobs == the ranks' forward logprobs
        toks = list(range(10, 30))
        d = types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]), loss_fn_inputs={"target_tokens": toks[1:]})
        lp_ranks = lps(tc.forward([d, d, d]).result())[: len(toks) - 1]
        sc = tc.save_weights_and_get_sampling_client()
        lp_sampler = torch.tensor(sc.compute_logprobs(types.ModelInput.from_ints(toks)).result()[1:])
        torch.testing.assert_close(lp_sampler, lp_ranks, atol=LP_ATOL, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_full_finetune_parity(stage, pools, ref_full, tmp_path):
    with ds_client(pools, stage, None, tmp_path) as tc:
        got = run_steps(tc, 0, STEPS, save=stage == 3, full=True)
        assert_same_run(got, ref_full)
        assert_params(tc.trainable_parameters(), ref_full["params"], bound=1e-3)
        assert not tc.get_info().is_lora
    if stage != 3:
        return
    # the ZeRO-3 checkpoint holds the full (gathered) weights and Adam moments of step SAVE_AT
    params, moments = ref_full["snap"]
    assert_params(load_file(Path(got["ckpt"]) / "model.safetensors"), params, bound=1e-3)
    opt = load_file(Path(got["ckpt"]) / "optimizer.safetensors")
    assert_moments({k: v for k, v in opt.items() if not k.endswith(".step")}, moments)
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {float(SAVE_AT)}
    # ... and resumes under another ZeRO stage (different sharding) to the uninterrupted result
    with ds_client(pools, 2, None, tmp_path / "resume") as tc2:
        tc2.load_state_with_optimizer(got["ckpt"]).result()
        assert tc2.step == SAVE_AT
        run_steps(tc2, SAVE_AT, STEPS, full=True)
        assert_params(tc2.trainable_parameters(), ref_full["params"], bound=1e-3)


def test_custom_loss_matches_engine(pools, tmp_path):
    """forward_backward_custom with a loss that couples datums (a batch mean): two-pass == one-pass."""

    def loss_fn(data: list[types.Datum], lp_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        flat = torch.cat(lp_list)
        return (flat ** 2).mean() * 10 - flat.max(), {"n": float(flat.numel())}

    ref = ServiceClient(checkpoint_root=tmp_path / "ref").create_lora_training_client(
        "tiny", rank=LORA.rank, seed=LORA.seed, train_unembed=True)
    with ds_client(pools, 3, LORA, tmp_path) as tc:
        for s in range(2):
            data = batches(s)[0]
            a, b = tc.forward_backward_custom(data, loss_fn).result(), ref.forward_backward_custom(data, loss_fn).result()
            assert a.metrics["n:sum"] == b.metrics["n:sum"]
            assert abs(a.metrics["loss:sum"] - b.metrics["loss:sum"]) <= 1e-5 * abs(b.metrics["loss:sum"])
            tc.optim_step(adam(s)).result()
            ref.optim_step(adam(s)).result()
        assert_params(tc.trainable_parameters(), lora_ref_params(ref))


def test_bad_input_keeps_pool_usable(pools, tmp_path):
    from training_core.checkpoint import CheckpointExistsError
    from training_core.engine import InputError

    with ds_client(pools, 2, LORA, tmp_path) as tc:
        bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**6]),
                          loss_fn_inputs={"target_tokens": [1, 2, 3]})
        with pytest.raises(InputError, match="outside vocab"):
            tc.forward_backward([bad]).result()
        tc.save_weights_for_sampler("w").result()
        with pytest.raises(CheckpointExistsError):
            tc.save_weights_for_sampler("w").result()
        assert len(tc.forward(batches(0)[0]).result().loss_fn_outputs) == 5  # still serving


# ---- configs and isolation ---------------------------------------------------------------------------------
def test_configs_and_hostfile_parse():
    from deepspeed.launcher.runner import fetch_hostfile
    from deepspeed.runtime.config import DeepSpeedConfig

    from infra.deepspeed import load_config
    from training_core.distributed.protocol import build_ds_config

    for stage in (2, 3):
        cfg = load_config(stage)
        ds = DeepSpeedConfig(cfg)  # DeepSpeed's own validation of every field
        assert ds.zero_optimization_stage == stage and ds.zero_enabled
        assert ds.managed_gradient_accumulation is False
        assert not ds.float16_config.enabled and not ds.bfloat16_config.enabled
        assert "optimizer" not in cfg, "the torch AdamW is passed in: no DeepSpeed (JIT) optimizer"
        assert build_ds_config(stage, {"zero_optimization": {"reduce_bucket_size": 10}})[
            "zero_optimization"]["reduce_bucket_size"] == 10
    with pytest.raises(ValueError, match="managed_gradient_accumulation"):
        build_ds_config(2, {"managed_gradient_accumulation": True})
    hosts = fetch_hostfile(str(REPO / "infra" / "deepspeed" / "hostfile.example"))
    assert hosts is not None and sum(hosts.values()) == 4 and len(hosts) == 2


def test_core_does_not_import_deepspeed():
    code = ("import sys, training_core, training_core.distributed, training_core.service_client; "
            "sys.exit(1 if 'deepspeed' in sys.modules else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:] or "deepspeed was imported by the controller side"


# ---- failures (kept last: the kill test consumes the module's pool) ----------------------------------------
def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_hung_rank_fails_the_call_within_timeout():
    """SIGSTOP a rank: the call fails after the pool's timeout, and every rank is killed."""
    pool = WorkerPool(1, timeout_s=3, startup_timeout_s=240)  # one rank: the timeout path, at half the start-up cost
    assert [r["rank"] for r in pool.call("ping", None, {})] == [0]
    os.kill(pool.pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(DistributedWorkerError, match=r"rank\(s\) \[0\] did not answer ping .* within 3 s"):
        pool.submit(lambda: pool.call("ping", None, {})).result(timeout=60)
    assert time.monotonic() - t0 < 15
    assert pool.closed and all(_gone(p) for p in pool.pids)
    with pytest.raises(DistributedWorkerError, match="failed earlier"):
        pool.call("ping", None, {})
    shutil.rmtree(pool.log_dir)  # kept by the pool after a failure, for post-mortems


def test_killed_rank_fails_the_call_fast(pools, tmp_path):
    """SIGKILL a rank in the middle of a training step: the call fails within seconds, the rest is killed."""
    pool = pools.get()
    tc = ds_client(pools, 2, LORA, tmp_path)
    big = [d for s in range(4) for d in batches(s)[0]] * 20  # 320 datums: seconds of work per call
    tc.forward_backward(batches(0)[0]).result()
    fut = tc.forward_backward(big)
    time.sleep(0.5)
    os.kill(pool.pids[1], signal.SIGKILL)  # mid-call: rank 0 is left waiting in a gradient collective
    t0 = time.monotonic()
    with pytest.raises(DistributedWorkerError, match=r"rank 1 \(pid \d+\) killed by signal 9"):
        fut.result(timeout=60)
    assert time.monotonic() - t0 < 10, "a dead rank must fail the call within seconds, not the timeout"
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pool.pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pool.pids), "the controller must kill the surviving ranks"
    with pytest.raises(DistributedWorkerError, match="unusable"):
        tc.optim_step()
    shutil.rmtree(pool.log_dir)
