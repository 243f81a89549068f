"""Resume and init_from against the config, a corrupt newest checkpoint, corrupt checkpoints given to eval/compare."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.sft_config import PipelineConfig
from infra.config import BadInputError, load_config
from recipes.common import adopt_init_from, latest_checkpoint
from recipes.sft import train_sft
from tasks.prepare_data import DatasetInfo, prepare_dataset

BASE = ["model.rank=8", "data.n_train=64", "data.n_eval=16", "train.batch_size=4", "train.steps=6",
        "train.save_every=2", "train.eval_loss_examples=4", "train.warmup_steps=1", "data.replay="]


def _cfg(*extra: str) -> PipelineConfig:
    return load_config(PipelineConfig, None, [*BASE, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    return prepare_dataset(_cfg().data, tmp_path_factory.mktemp("cache"))


def _corrupt(ckpt: str | Path, name: str = "adapter_model.safetensors") -> None:
    p = Path(ckpt) / name
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit of bit rot: same size, another sha256
    p.write_bytes(bytes(raw))


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one(
        data: DatasetInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    part = train_sft(_cfg(), data.train_path, data.eval_path, run, stop_after=4)  # step-2 and step-4 committed
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest[0] == 4
    _corrupt(newest[1])
    with caplog.at_level(logging.WARNING, logger="recipes.common"):
        done = train_sft(_cfg(), data.train_path, data.eval_path, run)
    assert done.resumed_from == 2 and [s for s, _ in done.losses] == [3, 4, 5, 6]
    assert any(newest[1] in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    # the corrupt one is kept aside for inspection, and step 4 was saved again in the same directory
    (aside,) = Path(newest[1]).parent.glob("step-000004.corrupt-*")
    assert (Path(newest[1]) / "manifest.json").is_file() and aside.is_dir()
    # the run's curve: steps 1-2 from before the resume point, then the steps re-run after it
    assert [s for s, _ in done.loss_history] == [1, 2, 3, 4, 5, 6]
    assert done.loss_history[:2] == part.losses[:2]
    ref = train_sft(_cfg(), data.train_path, data.eval_path, tmp_path / "ref")
    a = load_file(Path(done.checkpoint) / "adapter_model.safetensors")
    b = load_file(Path(ref.checkpoint) / "adapter_model.safetensors")
    for k in a:  # same trajectory as an uninterrupted run (resume is exact on one process)
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_resume_refuses_a_checkpoint_that_does_not_match_the_config(data: DatasetInfo, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_sft(_cfg(), data.train_path, data.eval_path, run, stop_after=2)
    with pytest.raises(BadInputError, match=r"model\.rank: checkpoint 8, config 4.*model\.lora_alpha"):
        train_sft(_cfg("model.rank=4", "model.lora_alpha=8"), data.train_path, data.eval_path, run)
    with pytest.raises(BadInputError, match=r"model\.train_unembed: checkpoint False, config True"):
        train_sft(_cfg("model.train_unembed=true"), data.train_path, data.eval_path, run)
    done = train_sft(_cfg(), data.train_path, data.eval_path, run)  # the run's own settings resume fine
    assert done.resumed_from == 2


def test_init_from_config_takes_the_checkpoints_model_values(data: DatasetInfo, tmp_path: Path) -> None:
    src = train_sft(_cfg("train.steps=2"), data.train_path, data.eval_path, tmp_path / "src")
    cfg = _cfg(f"init_from={src.checkpoint}", "model.rank=16", "model.lora_alpha=3", "model.train_mlp=false")
    changed = adopt_init_from(cfg, tmp_path / "run")
    assert changed == {"rank": (8, 16), "lora_alpha": (64.0, 3.0), "train_mlp": (True, False)}
    # the config (what the pipeline logs to MLflow) now says what training really uses
    assert (cfg.model.rank, cfg.model.lora_alpha, cfg.model.train_mlp) == (8, 64.0, True)
    assert adopt_init_from(cfg, tmp_path / "run") == {}
    res = train_sft(cfg, data.train_path, data.eval_path, tmp_path / "run")
    assert res.steps == 6 and load_file(Path(res.checkpoint) / "adapter_model.safetensors").keys() == \
        load_file(Path(src.checkpoint) / "adapter_model.safetensors").keys()


@pytest.mark.parametrize("damage", ["flip", "manifest"])
def test_eval_and_compare_refuse_a_corrupt_checkpoint_in_one_line(
        data: DatasetInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    from tuneloop_cli.main import main as cli

    ck = train_sft(_cfg("train.steps=1"), data.train_path, data.eval_path, tmp_path / "run").checkpoint
    if damage == "flip":
        _corrupt(ck)
    else:
        (Path(ck) / "manifest.json").unlink()  # half-written: never load it as something else
    capsys.readouterr()
    for argv in (["eval", ck], ["compare", ck, "tiny", "--no-gate"]):
        rc = cli([*argv, "--n", "2", "--benchmarks", "arithmetic", "--results-dir", str(tmp_path / "res")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, err
        assert len(err.splitlines()) == 1 and ck in err, err
        assert ("does not match its manifest" if damage == "flip" else "manifest.json") in err, err


def test_checkpoint_directories_have_portable_names(data: DatasetInfo, tmp_path: Path) -> None:
    """No ':' (or other characters Windows, S3 tooling or scp choke on) in any path a run writes."""
    import re

    run = tmp_path / "run"
    res = train_sft(_cfg("train.steps=3"), data.train_path, data.eval_path, run)
    names = {part for p in run.rglob("*") for part in p.relative_to(run).parts}
    assert Path(res.checkpoint).relative_to(run).parts[0] == "checkpoints"
    assert [n for n in names if not re.fullmatch(r"[A-Za-z0-9._-]+", n)] == []


def test_a_resumed_run_keeps_one_checkpoint_directory(data: DatasetInfo, tmp_path: Path) -> None:
    """Every attempt of a run (kill, retry, resume) saves into the same session directory, not a new one each."""
    run = tmp_path / "run"
    train_sft(_cfg(), data.train_path, data.eval_path, run, stop_after=2)
    train_sft(_cfg(), data.train_path, data.eval_path, run, stop_after=2)
    done = train_sft(_cfg(), data.train_path, data.eval_path, run)
    assert done.resumed_from == 4
    (session,) = [p.name for p in (run / "checkpoints").iterdir()]
    assert sorted(p.name for p in (run / "checkpoints" / session / "weights").iterdir()) == [
        "step-000002", "step-000004", "step-000006"]
