"""CLI: `tuneloop serve ...` and `tuneloop keys create|list|revoke`.

Registered into the main parser through `add_serve_commands(subparsers)`; nothing heavy is imported until a
command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path(".tuneloop/serve")


def _keys_file(args: argparse.Namespace) -> Path:
    return Path(args.keys) if args.keys else Path(args.state_dir) / "keys.json"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import ServeConfig, create_app

    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        os.environ.setdefault(k, v)  # the server never reaches a hub unless the operator says so
    keys = _keys_file(args)
    if not keys.exists():
        logging.getLogger("tuneloop.serve").warning(
            "no keys file at %s: every request gets 401 until `tuneloop keys create NAME` adds a key", keys)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    cfg = ServeConfig(state_dir=Path(args.state_dir), db_url=args.db, storage_uri=args.storage, keys_file=keys,
                      compute_dtype=args.dtype, load_dtype=args.dtype, max_body_bytes=args.max_body_mb << 20,
                      backend=args.backend, world_size=args.world_size, zero_stage=args.zero_stage)
    app = create_app(cfg)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service.keys import create_key

    secret, rec = create_key(_keys_file(args), args.name)
    print(secret)  # shown once; only its sha256 is stored
    print(f"created key {rec.name!r} (id {rec.id}) in {_keys_file(args)}; export TINKER_API_KEY={secret}",
          file=__import__("sys").stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from service.keys import list_keys

    for k in list_keys(_keys_file(args)):
        print(f"{k.id}  {k.name:<24} {k.created_at}  {'revoked' if k.revoked else 'active'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service.keys import revoke_key

    rec = revoke_key(_keys_file(args), args.name)
    print(f"revoked key {rec.name!r} (id {rec.id})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                   help="where the default database, checkpoints and keys file live (default .tuneloop/serve)")
    p.add_argument("--keys", help="API keys file (default STATE_DIR/keys.json)")


def add_serve_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="serve the Tinker API (for the tinker SDK) on this machine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", help="SQLAlchemy URL (default sqlite:///STATE_DIR/tuneloop-serve.db)")
    serve.add_argument("--storage", help="checkpoint storage, file://PATH or s3://bucket/prefix "
                                         "(default file://STATE_DIR/checkpoints)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="base weights and compute dtype")
    serve.add_argument("--torch-threads", type=int, default=0,
                       help="intra-op threads of the engine (0: torch's default); 1 is much faster on an "
                            "oversubscribed CPU, where OpenMP threads spin waiting for each other")
    serve.add_argument("--backend", default="local", choices=["local", "deepspeed"],
                       help="where runs train: this process's engine, or DeepSpeed ZeRO ranks (sampling stays local)")
    serve.add_argument("--world-size", type=int, default=2, help="DeepSpeed ranks (--backend deepspeed)")
    serve.add_argument("--zero-stage", type=int, default=2, choices=[2, 3], help="ZeRO stage (--backend deepspeed)")
    serve.add_argument("--max-body-mb", type=int, default=256, help="larger request bodies get 413")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--access-log", action="store_true")
    _common(serve)
    serve.set_defaults(func=cmd_serve)

    keys = subparsers.add_parser("keys", help="API keys of `tuneloop serve`")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="mint a key (printed once) and store its hash")
    c.add_argument("name")
    _common(c)
    c.set_defaults(func=cmd_keys_create)
    ls = ksub.add_parser("list", help="list keys (ids and names, never secrets)")
    _common(ls)
    ls.set_defaults(func=cmd_keys_list)
    rv = ksub.add_parser("revoke", help="revoke a key by name or id (takes effect without a restart)")
    rv.add_argument("name")
    _common(rv)
    rv.set_defaults(func=cmd_keys_revoke)


def main(argv: list[str] | None = None) -> int:
    """`python -m service`: `serve` is the default command, so `python -m service --port 8001` works."""
    ap = argparse.ArgumentParser(prog="python -m service")
    sub = ap.add_subparsers(dest="command")
    add_serve_commands(sub)
    argv = list(argv or [])
    if not argv or argv[0] not in ("serve", "keys", "-h", "--help"):
        argv = ["serve", *argv]
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"tuneloop: error: {e}", file=__import__("sys").stderr)
        return 2
