"""tinker-cookbook 0.6.1, unmodified, as a client of `tuneloop serve`.

Its recipes run as subprocesses that only know TINKER_BASE_URL / TINKER_API_KEY, exactly as a user's shell
would start them: `chat_sl.train` (SFT) on the conversations file bundled with the cookbook, then
`math_rl.train` (RL, importance sampling) on the generated arithmetic env, starting from the SFT weights.
The assertions read what the cookbook itself logged (`metrics.jsonl`, `checkpoints.jsonl` in log_path) and
what the SDK's own CLI (`tinker checkpoint list`, `tinker run info`) reports back from the server.

Offline: the model is the `tiny` preset's local directory (the cookbook uses `model_name` both as the
tokenizer path and as the base model it sends), and https goes to a closed local port so the cookbook's
one pricing-file fetch fails at once instead of reaching out (the server is plain http on 127.0.0.1).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker_cookbook

from tests.service_fixtures import BIN, Server, make_key, offline_env
from training_core.presets import resolve_model_path

CONVERSATIONS = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"


@pytest.fixture(scope="module")
def cook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("serve-cookbook")
    keys = state / "keys.json"
    key = make_key(keys, "cook")
    srv = Server(state, keys)
    try:
        srv.start()
        env = offline_env(
            TINKER_BASE_URL=srv.url, TINKER_API_KEY=key, TINKER_COOKBOOK_RUNS_DIR=str(state / "runs"),
            HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        yield {"server": srv, "env": env, "dir": state, "model": str(resolve_model_path("tiny")), "shared": {}}
    finally:
        srv.stop()


def run_recipe(cook: dict[str, Any], module: str, log_path: Path, *args: str) -> list[dict[str, Any]]:
    """`python -m tinker_cookbook.recipes.<module> ...` to completion; the metrics it logged, one per step."""
    cmd = [sys.executable, "-m", f"tinker_cookbook.recipes.{module}", f"model_name={cook['model']}",
           "renderer_name=role_colon", "lora_rank=8", "eval_every=0", "behavior_if_log_dir_exists=delete",
           f"log_path={log_path}", *args]
    out = subprocess.run(cmd, cwd=cook["dir"], env=cook["env"], capture_output=True, text=True, timeout=300)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert "Training completed successfully" in out.stdout + out.stderr, tail
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def tinker_cli(cook: dict[str, Any], *args: str) -> Any:
    """The SDK's own CLI against the server, JSON output."""
    out = subprocess.run([str(BIN / "tinker"), "-f", "json", *args], env=cook["env"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def saved(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]


def test_cookbook_chat_sl_trains_and_its_checkpoints_are_listed(cook: dict[str, Any]) -> None:
    log_path = cook["dir"] / "sl"
    # 128 conversations, 16 per batch: 8 distinct batches, one epoch; constant LR so the fall is the model's
    metrics = run_recipe(cook, "chat_sl.train", log_path, f"dataset={CONVERSATIONS}", "batch_size=16",
                         "max_length=512", "max_steps=8", "save_every=4", "learning_rate=5e-3",
                         "lr_schedule=constant")
    assert [m["step"] for m in metrics] == list(range(8))
    nll = [m["train_mean_nll"] for m in metrics]
    assert all(math.isfinite(x) for x in nll), nll
    # measured: 8.1 -> 4.9 (random-init tiny model learning English text); batch-to-batch noise is ~0.3
    assert sum(nll[-2:]) / 2 < sum(nll[:2]) / 2 - 1.0, nll
    assert all(m["num_sequences"] == 16 and m["num_tokens"] > 16 for m in metrics)

    ckpts = saved(log_path)
    assert [c["name"] for c in ckpts] == ["000004", "final"]
    run_id = ckpts[-1]["state_path"].removeprefix("tinker://").split("/")[0]
    listed = {c["tinker_path"]: c for c in tinker_cli(cook, "checkpoint", "list", "--run-id", run_id)["checkpoints"]}
    for c in ckpts:
        assert listed[c["state_path"]]["checkpoint_type"] == "training"
        assert listed[c["sampler_path"]]["checkpoint_type"] == "sampler"
        assert listed[c["state_path"]]["size_bytes"] > 0
    info = tinker_cli(cook, "run", "info", run_id)
    assert info["base_model"] == cook["model"] and info["lora_rank"] == 8
    assert (info["user_metadata"] or {}).get("renderer_name") == "role_colon"  # what the cookbook tagged
    cook["shared"]["sft_state"] = ckpts[-1]["state_path"]


def test_cookbook_math_rl_from_the_sft_weights_logs_rewards(cook: dict[str, Any]) -> None:
    sft_state = cook["shared"].get("sft_state")
    assert sft_state, "runs after the SFT test (same module)"
    log_path = cook["dir"] / "rl"
    steps, groups, group_size, max_tokens = 2, 2, 4, 8
    metrics = run_recipe(cook, "math_rl.train", log_path, "env=arithmetic", "loss_fn=importance_sampling",
                         f"group_size={group_size}", f"groups_per_batch={groups}", f"max_tokens={max_tokens}",
                         f"max_steps={steps}", "save_every=1", f"load_checkpoint_path={sft_state}")
    per_step = [m for m in metrics if "env/all/reward/total" in m]
    assert [m["step"] for m in per_step] == list(range(steps))
    # then one closing row with the run's token totals
    assert metrics[-1]["tokens/cumulative/trained"] == sum(m["tokens/trained"] for m in per_step)
    for m in per_step:
        # every step logged its rollouts' rewards (the arithmetic env: 1 if right, minus a format penalty)
        assert -1.0 <= m["env/all/reward/total"] <= 1.0 and math.isfinite(m["env/all/reward/total"]), m
        assert 0.0 <= m["env/all/correct"] <= 1.0 and 0.0 <= m["env/all/format"] <= 1.0
        assert m["env/all/total_episodes"] == groups * group_size
        assert 0 < m["env/all/total_ac_tokens"] <= groups * group_size * max_tokens
        assert m["tokens/trained"] > 0
        # the logprobs the server's sampler returned equal what its training forward computes at the same
        # weights: the cookbook's own sample-vs-train KL estimate is ~0 (measured ~1e-8)
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m["optim/kl_sample_train_v1"]
        assert math.isfinite(m["optim/entropy"]) and m["optim/entropy"] > 0

    ckpts = saved(log_path)
    assert [c["name"] for c in ckpts] == ["000001", "000002", "final"]
    run_id = ckpts[-1]["state_path"].removeprefix("tinker://").split("/")[0]
    assert not sft_state.startswith(f"tinker://{run_id}/")  # a new run, from the SFT run's weights
    listed = {c["tinker_path"] for c in tinker_cli(cook, "checkpoint", "list", "--limit", "0")["checkpoints"]}
    assert {p for c in ckpts for p in (c["state_path"], c["sampler_path"])} <= listed
    assert sft_state in listed  # the SFT run's checkpoints are still there, in the same listing
    # the CLI's run listing shows both runs; its delete removes a checkpoint from every later listing
    runs = {r["training_run_id"] for r in tinker_cli(cook, "run", "list", "--limit", "0")["runs"]}
    assert {run_id, sft_state.removeprefix("tinker://").split("/")[0]} <= runs
    gone = ckpts[0]["state_path"]
    out = subprocess.run([str(BIN / "tinker"), "checkpoint", "delete", "-y", gone], env=cook["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    left = {c["tinker_path"] for c in tinker_cli(cook, "checkpoint", "list", "--limit", "0")["checkpoints"]}
    assert gone not in left and ckpts[-1]["state_path"] in left
