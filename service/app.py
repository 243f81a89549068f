"""`tuneloop serve`: the Tinker HTTP API (as spoken by the `tinker` 0.38.0 SDK) over training_core's engine.

This module holds the handshake, sessions, futures (long-poll) and REST listings; the work endpoints are in
`service.training`, checkpoint download (signed file URLs, checkpoint TTL) in `service.download`. Anything else
under /api/v1 answers 501 naming the endpoint.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from service import download, training
from service.checkpoints import BadPathError, CheckpointStore, TinkerPath
from service.common import Ctx, parse_model, read_json
from service.db import ApiSession, Checkpoint, Run, Store, default_db_url
from service.keys import KeyRing
from service.runtime import Runtime
from service.schemas import CreateSessionReq

log = logging.getLogger("tuneloop.serve")


@dataclass
class ServeConfig:
    state_dir: Path = Path(".tuneloop/serve")
    db_url: str | None = None
    storage_uri: str | None = None
    keys_file: Path | None = None
    compute_dtype: str = "float32"
    load_dtype: str = "float32"
    poll_timeout_s: float = 25.0
    max_body_bytes: int = 256 << 20
    backend: str = "local"  # "deepspeed": runs train on `world_size` DeepSpeed ZeRO ranks
    world_size: int = 2
    zero_stage: int = 2

    def resolved(self) -> tuple[str, str, Path]:
        db = self.db_url or default_db_url(self.state_dir)
        storage = self.storage_uri or f"file://{(self.state_dir / 'checkpoints').resolve()}"
        keys = self.keys_file or self.state_dir / "keys.json"
        return db, storage, keys


def _iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()  # SQLite drops the zone


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {"checkpoint_id": TinkerPath.parse(c.tinker_path).checkpoint_id, "checkpoint_type": c.kind,
            "time": _iso(c.created_at), "tinker_path": c.tinker_path, "size_bytes": c.size_bytes, "public": False,
            "user_metadata": c.user_metadata, "expires_at": _iso(c.expires_at)}


def create_app(cfg: ServeConfig) -> FastAPI:
    db_url, storage_uri, keys_file = cfg.resolved()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(db_url)
    ctx = Ctx(runtime=Runtime(store, cfg.compute_dtype, cfg.load_dtype), store=store,
              ckpts=CheckpointStore(storage_uri, cfg.state_dir / "checkpoint-cache"), keys=KeyRing(keys_file),
              poll_timeout_s=cfg.poll_timeout_s, max_body_bytes=cfg.max_body_bytes)
    if cfg.backend == "deepspeed":
        from service.backend_deepspeed import DeepSpeedBackend

        ctx.runtime.trainer = DeepSpeedBackend(cfg.state_dir / "deepspeed-scratch", world_size=cfg.world_size,
                                               zero_stage=cfg.zero_stage, compute_dtype=cfg.compute_dtype)
    elif cfg.backend != "local":
        raise ValueError(f"backend must be 'local' or 'deepspeed', got {cfg.backend!r}")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        ctx.runtime.start()
        from sqlalchemy.engine import make_url

        shown = make_url(db_url).render_as_string(hide_password=True)  # never log a database password
        log.info("tuneloop serve: db %s, storage %s, keys %s", shown, storage_uri, keys_file)
        yield
        if ctx.runtime.trainer is not None:
            ctx.runtime.trainer.close()  # the DeepSpeed ranks stop with the server

    app = FastAPI(title="tuneloop serve", lifespan=lifespan)
    app.state.ctx = ctx
    app.include_router(_core_router(ctx))
    app.include_router(training.build_router(ctx))
    app.include_router(download.build_router(ctx))
    app.include_router(_not_implemented_router(ctx))
    return app


def _run_json(r: Run, store: Store) -> dict[str, Any]:
    cks, _ = store.list_checkpoints(r.owner, r.id)
    last = {kind: next((checkpoint_json(c) for c in cks if c.kind == kind), None) for kind in ("training", "sampler")}
    return {"training_run_id": r.id, "base_model": r.base_model, "model_owner": r.owner, "is_lora": True,
            "corrupted": False, "lora_rank": r.lora.get("rank"), "last_request_time": _iso(r.last_request_time),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
            "user_metadata": r.user_metadata}


def _core_router(ctx: Ctx) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    rt, store = ctx.runtime, ctx.store
    auth = Depends(ctx.auth)

    @r.get("/healthz")
    async def healthz() -> dict[str, str]:  # unauthenticated: for probes
        return {"status": "ok"}

    @r.post("/client/config")
    async def client_config(owner: str = auth) -> dict[str, Any]:
        return {"pjwt_auth_enabled": False}  # keep the raw tml- key on every request (no JWT exchange)

    @r.post("/client/dynamic_config")
    async def dynamic_config(owner: str = auth) -> dict[str, Any]:
        return {}

    @r.post("/telemetry")
    async def telemetry(owner: str = auth) -> dict[str, str]:
        return {"status": "accepted"}  # dropped: self-hosted, nothing phones home

    @r.get("/get_server_capabilities")
    async def capabilities(owner: str = auth) -> dict[str, Any]:
        from training_core.presets import PRESETS

        return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in sorted(PRESETS)]}

    @r.post("/create_session")
    async def create_session(request: Request, owner: str = auth) -> dict[str, Any]:
        req = parse_model(CreateSessionReq, await read_json(request))
        sid = f"sess-{uuid.uuid4().hex[:12]}"
        store.add(ApiSession(id=sid, owner=owner, tags=req.tags, user_metadata=req.user_metadata or {}))
        return {"session_id": sid, "type": "create_session"}

    @r.post("/session_heartbeat")
    async def heartbeat(request: Request, owner: str = auth) -> dict[str, Any]:
        sid = str((await read_json(request)).get("session_id", ""))
        if store.get(ApiSession, sid, owner) is None:
            raise HTTPException(404, f"session_id: session {sid!r} not found")
        rt.background(store.heartbeat, sid)  # never let a busy database delay the answer
        return {"type": "session_heartbeat"}

    @r.post("/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request, owner: str = auth) -> dict[str, Any]:
        if store.get(ApiSession, session_id, owner) is None:
            raise HTTPException(404, f"session {session_id!r} not found")
        reason = (await read_json(request)).get("reason") or {}
        store.finish_session(session_id, str(reason.get("type", "success")) if isinstance(reason, dict) else "success")
        rt.release_session(session_id)
        return {}

    @r.post("/retrieve_future")
    async def retrieve_future(request: Request, owner: str = auth) -> Response:
        rid = str((await read_json(request)).get("request_id", ""))
        rec = await rt.wait(rid, owner, ctx.poll_timeout_s)
        if rec is None:
            raise HTTPException(404, f"request_id: future {rid!r} not found")
        if rec.state == "pending":
            return JSONResponse({"type": "try_again", "request_id": rid, "queue_state": "active"})
        rt.forget(rid)
        return Response(rec.payload or b"{}", media_type=rec.content_type or "application/json")

    # ---- REST listings (only the caller's own objects) -----------------------------------------
    @r.get("/training_runs")
    async def list_runs(owner: str = auth, limit: int = Query(20, ge=0, le=1000), offset: int = Query(0, ge=0)
                        ) -> dict[str, Any]:
        runs, total = store.list_runs(owner, limit or 1000, offset)
        return {"training_runs": [_run_json(x, store) for x in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.get("/training_runs/{run_id}")
    async def get_run(run_id: str, owner: str = auth) -> dict[str, Any]:
        run = store.get(Run, run_id, owner)
        if run is None:
            raise HTTPException(404, f"training run {run_id!r} not found")
        return _run_json(run, store)

    @r.get("/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str, owner: str = auth) -> dict[str, Any]:
        if store.get(Run, run_id, owner) is None:
            raise HTTPException(404, f"training run {run_id!r} not found")
        cks, total = store.list_checkpoints(owner, run_id)
        return {"checkpoints": [checkpoint_json(c) for c in cks],
                "cursor": {"offset": 0, "limit": total, "total_count": total}}

    @r.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, owner: str = auth) -> dict[str, Any]:
        try:
            tp = TinkerPath.parse(f"tinker://{run_id}/{checkpoint_id}", "checkpoint_id")
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None
        row = store.delete_checkpoint(str(tp), owner)  # unlisted first, then the files
        if row is None:
            raise HTTPException(404, f"checkpoint {tp} not found")
        ctx.ckpts.delete(tp.prefix)
        return {}

    @r.get("/checkpoints")
    async def list_checkpoints(owner: str = auth, limit: int = Query(20, ge=0, le=10000),
                               offset: int = Query(0, ge=0)) -> dict[str, Any]:
        cks, total = store.list_checkpoints(owner, None, limit or None, offset)
        return {"checkpoints": [checkpoint_json(c) for c in cks],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.post("/weights_info")
    async def weights_info(request: Request, owner: str = auth) -> dict[str, Any]:
        path = str((await read_json(request)).get("tinker_path", ""))
        try:
            tp = TinkerPath.parse(path, "tinker_path")
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None
        run = store.get(Run, tp.run_id, owner)
        if run is None or store.get(Checkpoint, str(tp), owner) is None:
            raise HTTPException(404, f"tinker_path: checkpoint {path!r} not found")
        return {"base_model": run.base_model, "is_lora": True, "lora_rank": run.lora.get("rank"),
                "train_attn": run.lora.get("train_attn"), "train_mlp": run.lora.get("train_mlp"),
                "train_unembed": run.lora.get("train_unembed")}
    return r


def _not_implemented_router(ctx: Ctx) -> APIRouter:
    r = APIRouter()
    auth = Depends(ctx.auth)

    @r.api_route("/api/v1/{endpoint:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_implemented(endpoint: str, request: Request, owner: str = auth) -> JSONResponse:
        name = f"{request.method} /api/v1/{endpoint}"
        # x-should-retry: the SDK's transport would otherwise retry a 5xx ten times
        return JSONResponse({"detail": f"{name} is not implemented by tuneloop serve", "endpoint": name},
                            status_code=501, headers={"x-should-retry": "false"})

    return r
