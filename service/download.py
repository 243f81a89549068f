"""Checkpoint download for `tinker checkpoint download`: signed per-file URLs served by this server.

The CLI exports a training checkpoint as external weights (`save_weights_external`, in `service.training`),
asks for `external_weights_urls`, renews the export's TTL, fetches every URL with plain `urllib` (no API
key), then deletes the export. Here a URL is `/api/v1/checkpoint_files/<run>/<segment>/<name>/<file>` with
`expires` and an HMAC `sig` over (prefix, file, expires) under a per-process secret: it is valid for one file
of one checkpoint until it expires (or the server restarts), and only files listed in the checkpoint's
manifest (and the manifest itself) are served, from the committed local copy of the checkpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import time
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse

from service.checkpoints import BadPathError, TinkerPath
from service.common import Ctx, read_json
from service.db import Checkpoint, utcnow
from training_core.checkpoint import read_manifest

URL_TTL_S = 3600
MANIFEST = "manifest.json"


def build_router(ctx: Ctx) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    store, ckpts = ctx.store, ctx.ckpts
    auth = Depends(ctx.auth)
    secret = os.urandom(32)

    def sign(prefix: str, name: str, expires: int) -> str:
        return hmac.new(secret, f"{prefix}\n{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def own(run_id: str, checkpoint_id: str, owner: str) -> TinkerPath:
        try:
            tp = TinkerPath.parse(f"tinker://{run_id}/{checkpoint_id}", "checkpoint_id")
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None
        if store.get(Checkpoint, str(tp), owner) is None:
            raise HTTPException(404, f"checkpoint {tp} not found")
        return tp

    def files_of(tp: TinkerPath) -> list[str]:
        return [*sorted(read_manifest(ckpts.read_dir(tp.prefix))["files"]), MANIFEST]

    @r.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
    async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, owner: str = auth
                                    ) -> dict[str, Any]:
        tp = own(run_id, checkpoint_id, owner)
        expires = int(time.time()) + URL_TTL_S
        base = str(request.base_url).rstrip("/")
        urls = {name: f"{base}/api/v1/checkpoint_files/{tp.prefix}/{quote(name)}?expires={expires}"
                      f"&sig={sign(tp.prefix, name, expires)}" for name in files_of(tp)}
        return {"urls": urls, "expires": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat()}

    @r.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
    async def set_ttl(run_id: str, checkpoint_id: str, request: Request, owner: str = auth) -> dict[str, Any]:
        tp = own(run_id, checkpoint_id, owner)
        ttl = (await read_json(request)).get("ttl_seconds")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
            raise HTTPException(400, "ttl_seconds: a positive integer or null")
        with store.tx() as s:
            row = s.get(Checkpoint, str(tp))
            if row is not None:
                row.expires_at = utcnow() + dt.timedelta(seconds=ttl) if ttl else None
        return {}

    @r.get("/checkpoint_files/{run_id}/{segment}/{name}/{file:path}")
    async def checkpoint_file(run_id: str, segment: str, name: str, file: str, expires: int = Query(...),
                              sig: str = Query(...)) -> FileResponse:
        try:
            tp = TinkerPath.parse(f"tinker://{run_id}/{segment}/{name}")
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None
        if expires < time.time() or not hmac.compare_digest(sig, sign(tp.prefix, file, expires)):
            raise HTTPException(403, "the download URL is invalid or has expired; ask for new URLs")
        with store.tx() as s:  # the signature proves the caller was given this URL by the owner
            committed = s.get(Checkpoint, str(tp)) is not None
        if not committed or file not in files_of(tp):
            raise HTTPException(404, f"{file!r} of checkpoint {tp} not found")
        return FileResponse(ckpts.read_dir(tp.prefix) / file, media_type="application/octet-stream")

    return r

