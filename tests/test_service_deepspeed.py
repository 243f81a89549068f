"""`tuneloop serve --backend deepspeed --world-size 2`: the real `tinker==0.38.0` SDK against runs that train on
2 DeepSpeed ZeRO-2 CPU ranks (gloo) owned by the server process.

The reference is the same steps on the in-process single-process engine (training_core.ServiceClient); the
tolerance is tests/test_deepspeed.py's for ZeRO-2 vs local (`loss:sum` rtol 2e-6: only the order of fp32
sums differs). The server and its ranks are stopped by the fixture, and the test checks that no rank is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["TINKER_TELEMETRY"] = "0"

import tinker  # noqa: E402
from tinker import types  # noqa: E402

from tests.service_fixtures import Server, make_key  # noqa: E402
from training_core import ServiceClient  # noqa: E402
from training_core import types as core_types  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BASE = "tiny"
LOSS_RTOL = 2e-6  # tests/test_deepspeed.py: ZeRO-2 on 2 ranks vs the single-process engine
RANK, SEED = 4, 7
PROMPT = [5, 17, 33, 60, 61, 62, 90, 120]
LRS = [1e-2, 5e-3, 1e-2, 5e-3]


def rows(step: int) -> list[list[int]]:
    """5 ragged sequences (3 + 2 per rank); SFT on the same batch every step, so the loss must fall."""
    return [[3 + (i * 7 + j * 5) % 280 for j in range(8 + (3 * i) % 9)] for i in range(5)]


def sdk_batch(step: int) -> list[types.Datum]:
    return [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                        loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * (len(r) - 1)}) for r in rows(step)]


def core_batch(step: int) -> list[core_types.Datum]:
    import torch

    return [core_types.Datum(model_input=core_types.ModelInput.from_ints(r[:-1]),
                             loss_fn_inputs={"target_tokens": torch.tensor(r[1:]),
                                             "weights": torch.ones(len(r) - 1)}) for r in rows(step)]


def sdk_steps(tc: Any, start: int, end: int) -> list[float]:
    out = []
    for s in range(start, end):
        fb = tc.forward_backward(sdk_batch(s), "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=LRS[s]))
        out.append(fb.result(timeout=120).metrics["loss:sum"])
        op.result(timeout=120)
    return out


def local_reference(root: Path, steps: int) -> list[float]:
    sc = ServiceClient(checkpoint_root=root)
    tc = sc.create_lora_training_client(BASE, rank=RANK, seed=SEED)
    out = []
    for s in range(steps):
        fb = tc.forward_backward(core_batch(s), "cross_entropy")
        tc.optim_step(core_types.AdamParams(learning_rate=LRS[s])).result()
        out.append(fb.result().metrics["loss:sum"])
    return out


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    state = tmp_path_factory.mktemp("serve-ds")
    keys = state / "keys.json"
    key = make_key(keys, "alice")
    srv = Server(state, keys, extra_args=("--backend", "deepspeed", "--world-size", "2", "--zero-stage", "2"),
                 extra_env={"DS_ACCELERATOR": "cpu"})
    try:
        srv.start()
        yield srv, key
    finally:
        srv.stop()


def test_deepspeed_backend_trains_resumes_and_samples(server: tuple[Server, str],
                                                      tmp_path: Path) -> None:
    srv, key = server
    sc = tinker.ServiceClient(base_url=srv.url, api_key=key)
    tc = sc.create_lora_training_client(base_model=BASE, rank=RANK, seed=SEED).result(timeout=240)
    assert tc.get_info().lora_rank == RANK
    assert srv.proc is not None
    ranks = children(srv.proc.pid)
    assert len(ranks) >= 2, ranks  # the 2 DeepSpeed ranks are the server's children

    got = sdk_steps(tc, 0, 3)
    path = tc.save_state("mid").result(timeout=120).path
    got += sdk_steps(tc, 3, 4)
    ref = local_reference(tmp_path, 4)
    assert got == pytest.approx(ref, rel=LOSS_RTOL, abs=0), (got, ref)
    assert all(b < a for a, b in zip(got, got[1:], strict=False)), got
    # the ranks wrote it (the local engine's checkpoints carry no backend)
    trainer = json.loads((srv.state / "checkpoints" / tc.model_id / "weights" / "mid" / "trainer_state.json")
                         .read_text())
    assert (trainer["backend"], trainer["world_size"], trainer["zero_stage"], trainer["step"]) == ("deepspeed", 2, 2, 3)

    # a new run from the state (adapter + Adam moments), on the ranks too, repeats step 3
    resumed = sc.create_training_client_from_state_with_optimizer(path).result(timeout=240)
    assert sdk_steps(resumed, 3, 4) == pytest.approx(got[3:], rel=LOSS_RTOL, abs=0)

    # sampling: the run's weights, saved by the ranks, loaded by the server's local engine
    fwd = tc.forward(sdk_batch(0), "cross_entropy").result(timeout=120)
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=5, seed=3, temperature=1.0)
    r = sampler.sample(prompt, num_samples=2, sampling_params=params).result(timeout=120)
    assert len(r.sequences) == 2 and all(len(s.tokens) == len(s.logprobs) > 0 for s in r.sequences)
    first = rows(0)[0]
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(first)).result(timeout=120)
    want = fwd.loss_fn_outputs[0]["logprobs"].tolist()
    assert lps[1:] == pytest.approx(want, abs=1e-5)  # the trained weights, not the base model's
    named = tc.save_weights_for_sampler("final").result(timeout=120).path  # a listed sampler checkpoint
    lps_named = sc.create_sampling_client(model_path=named).compute_logprobs(
        types.ModelInput.from_ints(first)).result(timeout=120)
    assert lps_named[1:] == pytest.approx(want, abs=1e-5)

    # a built-in RL loss on the ranks: ppo at the sampler's own logprobs has ratio 1, so loss:sum == -sum(adv)
    s = r.sequences[0]
    toks, n, adv = PROMPT + list(s.tokens), len(PROMPT) - 1, 0.5
    datum = types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]), loss_fn_inputs={
        "target_tokens": toks[1:], "logprobs": [0.0] * n + list(s.logprobs),
        "advantages": [0.0] * n + [adv] * len(s.tokens)})
    cfg = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    got_ppo = tc.forward_backward([datum], "ppo", cfg).result(timeout=120).metrics["loss:sum"]
    assert got_ppo == pytest.approx(-adv * len(s.tokens), rel=1e-4, abs=1e-4)

    srv.stop()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in ranks), f"ranks left running: {ranks}"
