"""The server's live state: futures, training runs in seq_id order, samplers, and jobs on the engine.

Compute never runs on the HTTP event loop: every job goes to training_core's engine worker (one ordered
thread per base model, shared by all LoRA runs on that base), and base-model loads go to a plain thread.
A job's result is encoded and written to the database on the worker, before the future becomes visible,
so a result a client has seen is durable, and a kill -9 leaves only never-answered work (reported failed at
the next start).

Per run, requests execute in `seq_id` order whatever their arrival order (the SDK sends the chunks of one
forward_backward concurrently, first chunk last): a request waits in `pending` until every smaller seq_id
has been handed to the engine, whose FIFO worker then preserves the order. A request rejected at submit
still consumes its seq_id (a no-op), so one bad request never stalls the run behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.db import FutureRow, Store
from training_core.engine import Engine, InputError
from training_core.model_loading import ModelLoadError

log = logging.getLogger("tuneloop.serve")

PROTO = "application/x-protobuf"
JSON_CT = "application/json"
Result = tuple[str, bytes]  # (content type, body)
Job = Callable[[], Result]


def json_result(obj: dict[str, Any]) -> Result:
    return JSON_CT, json.dumps(obj).encode()


def error_payload(message: str, category: str) -> bytes:
    return json.dumps({"error": message, "category": category}).encode()


class FutureRec:
    """One submitted request. `event` is set on the loop once `payload` is final."""

    def __init__(self, request_id: str, owner: str, kind: str, target: str, seq_id: int) -> None:
        self.request_id, self.owner, self.kind, self.target, self.seq_id = request_id, owner, kind, target, seq_id
        self.event = asyncio.Event()
        self.state = "pending"
        self.content_type: str | None = None
        self.payload: bytes | None = None

    def complete(self, state: str, content_type: str, payload: bytes) -> None:
        self.state, self.content_type, self.payload = state, content_type, payload
        self.event.set()


@dataclass
class LiveModel:
    run_id: str
    owner: str
    session_id: str
    base_model: str
    engine: Engine
    adapter: str
    next_seq: int = 1
    pending: dict[int, tuple[Job | None, Callable[[], None] | None, FutureRec]] = field(default_factory=dict)
    by_seq: dict[int, str] = field(default_factory=dict)  # seq_id -> request_id (recent ones; older: database)
    ephemeral: list[str] = field(default_factory=list)  # snapshot sampler ids, oldest first
    touched: float = 0.0  # monotonic time of the last last_request_time write


@dataclass
class LiveSampler:
    id: str
    owner: str
    base_model: str
    engine: Engine
    adapter: str | None  # None: the bare base model
    model_path: str | None
    by_seq: dict[int, str] = field(default_factory=dict)
    owned_adapter: bool = False


class Runtime:
    MAX_EPHEMERAL_PER_RUN = 8  # RL loops snapshot every step; older snapshots are evicted with their adapter
    MAX_LOADED_SAMPLERS = 32
    MAX_FINISHED_IN_MEMORY = 2000
    RECENT_SEQS = 1024
    FUTURE_RETENTION_H = 7 * 24  # finished results stay retrievable this long (DB rows, then pruned)

    def __init__(self, store: Store, compute_dtype: str = "float32", load_dtype: str = "float32") -> None:
        self.store = store
        self.compute_dtype, self.load_dtype = compute_dtype, load_dtype
        self.futures: dict[str, FutureRec] = {}
        self.models: dict[str, LiveModel] = {}
        self.samplers: dict[str, LiveSampler] = {}
        self.creating: dict[str, FutureRec] = {}  # run id -> the future creating it
        self.tasks: set[asyncio.Future[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        # bookkeeping writes nobody waits for (heartbeats): one thread, in order
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tuneloop-serve-db")
        self.trainer: Any = None  # `--backend deepspeed`: service.backend_deepspeed.DeepSpeedBackend

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        n = self.store.fail_pending_futures(error_payload(
            "the server restarted before this request finished; it was not applied", "server"))
        if n:
            log.warning("%d requests were in flight when the server stopped: reported as failed", n)
        self._janitor = asyncio.get_running_loop().create_task(self._prune_loop())

    async def _prune_loop(self) -> None:
        from service.db import utcnow

        while True:
            cutoff = utcnow() - dt.timedelta(hours=self.FUTURE_RETENTION_H)
            try:
                await asyncio.to_thread(self.store.prune_futures, cutoff)
            except Exception:  # a busy database: try again next round
                log.exception("pruning old futures failed")
            await asyncio.sleep(3600)

    def background(self, fn: Callable[..., Any], *args: Any) -> None:
        self._writer.submit(fn, *args)

    # ---- engines -------------------------------------------------------------------------------
    async def engine_for(self, base_model: str) -> Engine:
        from training_core.engine import get_engine

        # the first use of a base loads it from disk (seconds): a thread, never the loop
        return await asyncio.to_thread(get_engine, base_model, self.compute_dtype, self.load_dtype)

    async def training_engine_for(self, base_model: str) -> Engine:
        """Where a run trains: the local engine, or (`--backend deepspeed`) the DeepSpeed ranks."""
        if self.trainer is not None:
            eng: Engine = await asyncio.to_thread(self.trainer.engine_for, base_model)
            return eng
        return await self.engine_for(base_model)

    # ---- futures -------------------------------------------------------------------------------
    def new_future(self, owner: str, kind: str, target: str, seq_id: int) -> FutureRec:
        rec = FutureRec(uuid.uuid4().hex, owner, kind, target, seq_id)
        self.store.add(FutureRow(request_id=rec.request_id, owner=owner, kind=kind, target=target, seq_id=seq_id))
        self.futures[rec.request_id] = rec
        return rec

    def _finish(self, rec: FutureRec, state: str, ct: str, payload: bytes,
                on_done: Callable[[], None] | None) -> None:
        """Called on the worker thread: persist, then publish on the loop."""
        try:
            self.store.finish_future(rec.request_id, state, ct, payload)
        except Exception:  # the client still gets its answer; only durability of this one result is lost
            log.exception("could not persist the result of %s", rec.request_id)
        assert self.loop is not None

        def publish() -> None:
            if on_done is not None and state == "done":
                on_done()
            rec.complete(state, ct, payload)
            if len(self.futures) > self.MAX_FINISHED_IN_MEMORY:  # results stay readable from the database
                done = [r for r, f in self.futures.items() if f.state != "pending"]
                for rid in done[: len(done) // 2]:
                    del self.futures[rid]

        self.loop.call_soon_threadsafe(publish)

    def wrap(self, rec: FutureRec, job: Job, on_done: Callable[[], None] | None = None) -> Callable[[], None]:
        def run() -> None:
            try:
                ct, payload = job()
                self._finish(rec, "done", ct, payload, on_done)
            except (InputError, ModelLoadError, ValueError, KeyError, FileNotFoundError) as e:
                self._finish(rec, "failed", JSON_CT, error_payload(str(e), "user"), None)
            except Exception as e:
                log.exception("%s %s failed", rec.kind, rec.request_id)
                self._finish(rec, "failed", JSON_CT, error_payload(f"{type(e).__name__}: {e}", "server"), None)

        return run

    def run_on_engine(self, engine: Engine, rec: FutureRec, job: Job, on_done: Callable[[], None] | None = None
                      ) -> None:
        engine.submit(self.wrap(rec, job, on_done))

    def fail_now(self, rec: FutureRec, message: str, category: str = "user") -> None:
        payload = error_payload(message, category)
        self.store.finish_future(rec.request_id, "failed", JSON_CT, payload)
        rec.complete("failed", JSON_CT, payload)

    async def wait(self, request_id: str, owner: str, timeout: float) -> FutureRec | FutureRow | None:
        """The finished future (memory or database), the pending one after `timeout`, or None (404)."""
        rec = self.futures.get(request_id)
        if rec is None:  # finished long ago, or before a restart: the database has it
            return self.store.get(FutureRow, request_id, owner)
        if rec.owner != owner:
            return None
        if rec.state == "pending":
            try:
                await asyncio.wait_for(rec.event.wait(), timeout)
            except TimeoutError:
                pass
        return rec

    # ---- per-run ordering ----------------------------------------------------------------------
    def forget(self, request_id: str) -> None:
        """A delivered result leaves memory (a retried retrieve reads it from the database)."""
        rec = self.futures.get(request_id)
        if rec is not None and rec.state != "pending":
            del self.futures[request_id]

    def seen(self, by_seq: dict[int, str], target: str, seq_id: int, owner: str) -> str | None:
        """request_id of an earlier submit of (target, seq_id): the SDK's retries resubmit the same seq_id."""
        rid = by_seq.get(seq_id)
        if rid is None and by_seq and seq_id < min(by_seq):
            row = self.store.find_future(target, seq_id, owner)
            rid = row.request_id if row is not None else None
        return rid

    @staticmethod
    def remember(by_seq: dict[int, str], seq_id: int, request_id: str) -> None:
        by_seq[seq_id] = request_id
        if len(by_seq) > 2 * Runtime.RECENT_SEQS:  # keep the recent window; the database has the rest
            for k in sorted(by_seq)[: Runtime.RECENT_SEQS]:
                del by_seq[k]

    def submit_ordered(self, model: LiveModel, seq_id: int, kind: str, job: Job | None,
                       reject: str | None = None, on_done: Callable[[], None] | None = None) -> FutureRec:
        """Queue `job` as request `seq_id` of `model` (callers checked `seen` first).

        `on_done` runs on the loop after the job succeeds, before its future is answered.
        """
        rec = self.new_future(model.owner, kind, model.run_id, seq_id)
        self.remember(model.by_seq, seq_id, rec.request_id)
        if seq_id < model.next_seq:
            self.fail_now(rec, f"seq_id {seq_id} is behind the run's next seq_id {model.next_seq}")
            return rec
        if reject is not None:
            self.fail_now(rec, reject)
            job = None
        model.pending[seq_id] = (job, on_done, rec)
        while model.next_seq in model.pending:
            j, cb, r = model.pending.pop(model.next_seq)
            if j is not None:
                self.run_on_engine(model.engine, r, j, cb)
            model.next_seq += 1
        return rec

    def add_sampler(self, s: LiveSampler) -> None:
        """Register; samplers opened from a checkpoint are reopened on demand, so only the most recently
        used MAX_LOADED_SAMPLERS keep their adapter in memory."""
        self.samplers[s.id] = s
        reopenable = [k for k, v in self.samplers.items() if v.model_path is not None]
        for k in reopenable[: max(0, len(reopenable) - self.MAX_LOADED_SAMPLERS)]:
            self.drop_sampler(k)

    def touch_sampler(self, s: LiveSampler) -> None:
        self.samplers[s.id] = self.samplers.pop(s.id)  # dict order is the LRU order

    def release_session(self, session_id: str) -> None:
        """The client closed its session: free the adapters of its runs and samplers (the runs and their
        checkpoints stay listed; a run resumes from a checkpoint). Work already queued still runs first:
        the removals queue behind it on the same FIFO worker."""
        for run_id in [k for k, m in self.models.items() if m.session_id == session_id]:
            m = self.models.pop(run_id)
            for sid in m.ephemeral:
                self.drop_sampler(sid)
            eng, name = m.engine, m.adapter
            eng.submit(lambda eng=eng, name=name: eng.remove_adapter(name))
        for sid in [k for k in self.samplers if k.startswith(f"{session_id}:")]:
            self.drop_sampler(sid)

    def evict_ephemeral(self, model: LiveModel) -> None:
        while len(model.ephemeral) > self.MAX_EPHEMERAL_PER_RUN:
            sid = model.ephemeral.pop(0)
            self.drop_sampler(sid)

    def drop_sampler(self, sid: str) -> None:
        s = self.samplers.pop(sid, None)
        if s is not None and s.owned_adapter and s.adapter is not None:
            eng, name = s.engine, s.adapter
            eng.submit(lambda: eng.remove_adapter(name))
