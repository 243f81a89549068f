"""A sweep's Optuna storage on the project's PostgreSQL database, beside MLflow's tables (a real server).

Both keep an `alembic_version` table: Optuna's goes into its own schema of the same database, so neither
store's migrations see the other's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service_fixtures import Postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_optuna_study_lives_in_mlflow_postgres_database_in_its_own_schema(pg: Postgres) -> None:
    import mlflow
    import optuna
    import sqlalchemy as sa

    from flows.sweep_config import default_storage

    client = mlflow.MlflowClient(tracking_uri=pg.url)
    exp = client.create_experiment("sweeps-here-too")  # MLflow's schema migrated into `public`
    storage = default_storage(pg.url)
    assert storage != pg.url and "search_path%3Doptuna" in storage
    study = optuna.create_study(study_name="s1", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 0.0, 1.0), n_trials=3)
    # a new process would reload it from the same URL: the sweep's resume path
    again = optuna.load_study(study_name="s1", storage=default_storage(pg.url))
    assert [t.params["lr"] for t in again.trials] == [t.params["lr"] for t in study.trials] and len(again.trials) == 3
    engine = sa.create_engine(pg.url)
    try:
        with engine.connect() as conn:
            tables = {(s, n) for s, n in conn.execute(sa.text(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_name IN ('alembic_version', 'experiments', 'studies', 'trials')"))}
    finally:
        engine.dispose()
    assert {("public", "alembic_version"), ("public", "experiments"), ("optuna", "alembic_version"),
            ("optuna", "studies"), ("optuna", "trials")} <= tables
    assert ("public", "studies") not in tables and ("optuna", "experiments") not in tables
    assert client.get_experiment(exp).name == "sweeps-here-too"  # MLflow's store still works beside it
