"""infra.tracking: keyed runs are continued after their process died, params of a continued run cannot change."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from infra import tracking
from infra.config import BadInputError


class _Killed(BaseException):
    pass


def test_keyed_runs_are_continued_and_their_params_are_fixed(tmp_path: Path) -> None:
    tracking.setup(f"sqlite:///{tmp_path}/mlflow.db", "t")
    with pytest.raises(_Killed), tracking.run("r", key="k1") as first:  # dies with its stage run open
        tracking.log_params({"train": {"steps": 10}})
        with tracking.run("train", nested=True, key="train") as stage:
            tracking.log_metrics({"loss": 3.0}, step=1)
            raise _Killed
    with tracking.run("r", key="k1") as again:
        assert again.info.run_id == first.info.run_id
        tracking.log_params({"train": {"steps": 10}, "extra": 1})  # same values (and new keys) are fine
        with pytest.raises(BadInputError, match=r"train\.steps: '10' -> '12'"):
            tracking.log_params({"train": {"steps": 12}})
        with tracking.run("train", nested=True, key="train") as stage2:
            assert stage2.info.run_id == stage.info.run_id
            tracking.log_metrics({"loss": 2.0}, step=2)
    client = MlflowClient()
    run = client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.RESUMED_TAG] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(stage.info.run_id, "loss")] == [(1, 3.0), (2, 2.0)]
    with tracking.run("r", key="k1") as fresh:  # a finished run is never reopened
        assert fresh.info.run_id != first.info.run_id
    with tracking.run("other", key="k2") as other:  # another key, another run
        assert other.info.run_id not in (first.info.run_id, fresh.info.run_id)
    assert mlflow.active_run() is None
