"""`tuneloop serve` survives kill -9, on its embedded SQLite file and on a real PostgreSQL server.

The PostgreSQL case starts its own server (Debian's `postgresql` package, `make sysdeps`) on 127.0.0.1 and
points `tuneloop serve --db postgresql://...` at it. In both cases: train, checkpoint, SIGKILL the server in
the middle of a step, restart it on the same database and storage, and check that everything committed is
listed and loads, the in-flight step is reported failed, and a resumed client continues the trajectory
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.service_fixtures import Postgres, Server, make_key
from tests.test_service import BASE, BATCH, BIG, PROMPT, _fwdbwd, _post, _result, train_steps


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None  # the default: sqlite under the state dir
        return
    pg = Postgres()
    try:
        pg.start()
        # the bare scheme an operator would write; the server picks the installed psycopg 3 driver
        yield pg.url.replace("postgresql+psycopg://", "postgresql://")
    finally:
        pg.stop()


def _counts(url: str) -> dict[str, int]:
    """Rows per table, read straight from the database server (not through `tuneloop serve`)."""
    import sqlalchemy as sa

    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with eng.connect() as c:
            return {t: int(c.execute(sa.text(f"select count(*) from {t}")).scalar_one())
                    for t in ("runs", "checkpoints", "futures")}
    finally:
        eng.dispose()


def test_kill9_restart_on_the_same_database(db_url: str | None, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    env: dict[str, Any] = {"alice": make_key(keys, "alice"), "http": httpx.Client(timeout=60)}
    srv = env["server"] = Server(tmp_path, keys, db_url)
    try:
        srv.start()
        sc = tinker.ServiceClient(base_url=srv.url, api_key=env["alice"])
        rc = tinker.RestClient(base_url=srv.url, api_key=env["alice"])
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=3).result(timeout=180)
        first = train_steps(tc, 2)
        state = tc.save_state("mid").result(timeout=120).path
        rest = train_steps(tc, 2)
        assert rest[-1] < first[0], first + rest
        sampler_path = tc.save_weights_for_sampler("last").result(timeout=120).path
        want = tc.save_weights_and_get_sampling_client().sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=4, seed=5)).result(timeout=120)

        def listing() -> tuple[set[str], set[str]]:
            runs = rc.list_training_runs(limit=100).result(timeout=120).training_runs
            cks = rc.list_user_checkpoints(limit=1000).result(timeout=120).checkpoints
            return {r.training_run_id for r in runs}, {c.tinker_path for c in cks}

        before = listing()
        assert tc.model_id in before[0] and {state, sampler_path} <= before[1]
        if db_url is not None:  # the rows really are in PostgreSQL, and no SQLite file was made
            counts = _counts(db_url)
            assert counts["runs"] == 1 and counts["checkpoints"] == len(before[1]) and counts["futures"] > 5
            assert not list(tmp_path.glob("*.db"))

        # a step in flight when the server dies
        sid = _post(env, "create_session", json={}).json()["session_id"]
        rid = _post(env, "create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": BASE,
                                               "lora_config": {"rank": 4}}).json()["request_id"]
        model_id = _result(env, rid).json()["model_id"]
        in_flight = _fwdbwd(env, model_id, 1, BIG, forward_only=False)
        srv.kill9()
        srv.start()

        failed = _result(env, in_flight).json()  # reported failed, never half-applied
        assert failed["category"] == "server" and "restarted" in failed["error"], failed
        assert _post(env, "optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {}}
                     ).status_code == 410
        after = listing()
        assert after[0] == before[0] | {model_id} and after[1] == before[1]

        # every committed checkpoint loads: the sampler one samples what it sampled before the kill, the
        # training state resumes the trajectory exactly (adapter and optimizer moments)
        got = sc.create_sampling_client(model_path=sampler_path).sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=4, seed=5)).result(timeout=120)
        assert got.sequences[0].tokens == want.sequences[0].tokens
        resumed = sc.create_training_client_from_state_with_optimizer(state).result(timeout=180)
        assert train_steps(resumed, 2) == pytest.approx(rest, rel=1e-5)
        weights_only = sc.create_training_client_from_state(state).result(timeout=180)
        assert weights_only.forward(BATCH, "cross_entropy").result(timeout=120).metrics["loss:sum"] == \
            pytest.approx(rest[0], rel=1e-5)
    finally:
        env["http"].close()
        srv.stop()
