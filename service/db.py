"""Durable server state through SQLAlchemy: sessions, training runs, checkpoints, sampling sessions, futures.

An embedded SQLite file by default (WAL, so listings read while a step's result is written); any
SQLAlchemy URL works (`--db postgresql://...`). Every method opens its own short session, so the store is
safe to call from the HTTP loop, the engine worker and the writer thread alike. Rows carry their owner (the
API key's id): every lookup filters on it, which is what makes another tenant's objects 404 and invisible.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class ApiSession(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    tags: Mapped[Any] = mapped_column(JSON, default=list)
    user_metadata: Mapped[Any] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Run(Base):
    """A training run = one LoRA model (`{session_id}:train:{n}`)."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(Text)
    lora: Mapped[Any] = mapped_column(JSON)
    user_metadata: Mapped[Any] = mapped_column(JSON, nullable=True)
    create_request_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_request_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    tinker_path: Mapped[str] = mapped_column(String(512), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # training | sampler
    name: Mapped[str] = mapped_column(String(256))
    storage_prefix: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # PostgreSQL's INTEGER stops at 2 GiB
    user_metadata: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SamplingSession(Base):
    __tablename__ = "sampling_sessions"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(Text)
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # None: base model or ephemeral
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FutureRow(Base):
    """A submitted request; `target` + `seq_id` is the idempotency key of the SDK's retries."""

    __tablename__ = "futures"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(128), index=True)
    seq_id: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed
    content_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def default_db_url(state_dir: Path) -> str:
    return f"sqlite:///{(state_dir / 'tuneloop-serve.db').resolve()}"


def normalize_db_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean the installed psycopg 3 driver (SQLAlchemy's default for a bare
    `postgresql://` is psycopg2, which the stack does not ship)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


class Store:
    def __init__(self, url: str) -> None:
        url = normalize_db_url(url)
        kw: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:  # a database server: drop connections it closed (its restart, an idle timeout) before use
            kw["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kw)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def get(self, model: type[Any], key: str, owner: str) -> Any:
        """The row, or None when it does not exist or belongs to another key (callers answer 404 for both)."""
        with self._sessions() as s:
            row = s.get(model, key)
            return row if row is not None and row.owner == owner else None

    def add(self, row: Any) -> None:
        with self.tx() as s:
            s.merge(row)

    def touch_run(self, run_id: str) -> None:
        with self.tx() as s:
            run = s.get(Run, run_id)
            if run is not None:
                run.last_request_time = utcnow()

    def heartbeat(self, session_id: str) -> None:
        with self.tx() as s:
            row = s.get(ApiSession, session_id)
            if row is not None:
                row.last_heartbeat = utcnow()

    def finish_session(self, session_id: str, reason: str) -> None:
        with self.tx() as s:
            row = s.get(ApiSession, session_id)
            if row is not None:
                row.finished = reason

    def finish_future(self, request_id: str, state: str, content_type: str, payload: bytes) -> None:
        with self.tx() as s:
            row = s.get(FutureRow, request_id)
            if row is not None:
                row.state, row.content_type, row.payload = state, content_type, payload

    def find_future(self, target: str, seq_id: int, owner: str) -> FutureRow | None:
        with self._sessions() as s:
            return s.scalars(select(FutureRow).where(FutureRow.target == target, FutureRow.seq_id == seq_id,
                                                     FutureRow.owner == owner)).first()

    def fail_pending_futures(self, payload: bytes) -> int:
        """At start-up: whatever was in flight when the server died is reported failed, never half-applied."""
        with self.tx() as s:
            rows = s.scalars(select(FutureRow).where(FutureRow.state == "pending")).all()
            for r in rows:
                r.state, r.content_type, r.payload = "failed", "application/json", payload
            return len(rows)

    def prune_futures(self, older_than: dt.datetime) -> int:
        """Results are kept for the SDK's retries, not forever."""
        with self.tx() as s:
            res = s.execute(delete(FutureRow).where(FutureRow.created_at < older_than, FutureRow.state != "pending"))
            return int(res.rowcount or 0)

    def list_runs(self, owner: str, limit: int, offset: int) -> tuple[list[Run], int]:
        with self._sessions() as s:
            q = select(Run).where(Run.owner == owner)
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(Run.created_at.desc()).limit(limit).offset(offset)).all()
            return list(rows), int(total)

    def list_checkpoints(self, owner: str, run_id: str | None, limit: int | None = None,
                         offset: int = 0) -> tuple[list[Checkpoint], int]:
        with self._sessions() as s:
            q = select(Checkpoint).where(Checkpoint.owner == owner)
            if run_id is not None:
                q = q.where(Checkpoint.run_id == run_id)
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            q = q.order_by(Checkpoint.created_at.desc()).offset(offset)
            rows = s.scalars(q.limit(limit) if limit else q).all()
            return list(rows), int(total)

    def delete_checkpoint(self, tinker_path: str, owner: str) -> Checkpoint | None:
        with self.tx() as s:
            row = s.get(Checkpoint, tinker_path)
            if row is None or row.owner != owner:
                return None
            s.delete(row)
            return row


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    # NORMAL: a committed row survives kill -9 (the WAL is in the OS page cache); FULL would fsync every
    # step's result for power-loss safety only
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
