"""What the controller and the worker ranks share: env vars, message shapes, errors, batch sharding.

Messages travel over `multiprocessing.connection` (TCP on 127.0.0.1 or the controller's address, HMAC
authkey handshake) as pickled small dicts:

    controller -> every rank   {"op": str, "sid": int | None, "args": dict}
    rank -> controller         {"ok": True, "result": Any} | {"ok": False, "error": str, "traceback": str}

Every op is sent to every rank (they all take part in the collectives); only rank 0's `result` carries
gathered values, except the per-shard results of forward passes, which the controller concatenates.
"""

from __future__ import annotations

import copy
import pickle
from multiprocessing.connection import Connection
from typing import Any

# ---- environment of a worker rank (the five torch.distributed ones plus ours) ----------------------------
ENV_CONTROLLER = "TUNELOOP_DS_CONTROLLER"  # "host:port" of the controller's listener
ENV_AUTHKEY = "TUNELOOP_DS_AUTHKEY"  # hex; HMAC key of the connection handshake
ENV_TIMEOUT = "TUNELOOP_DS_TIMEOUT_S"  # torch.distributed collective timeout
ENV_DIE_WITH_PARENT = "TUNELOOP_DS_DIE_WITH_PARENT"  # "1": exit when the spawning controller dies
ENV_BACKEND = "TUNELOOP_DS_BACKEND"  # "gloo" (CPU) or "nccl" (GPU); default: by device
ENV_SHM_COMM = "TUNELOOP_DS_SHM_COMM"  # "1": let DeepSpeed JIT-build its shm op (inference-only; off)

OPS = (  # what a worker understands (see worker.handle)
    "ping", "init_session", "close_session", "forward", "backward_linear", "optim_step",
    "get_params", "get_optimizer", "save", "load", "stats", "shutdown",
)


class DistributedError(RuntimeError):
    """Base class of this backend's errors."""


class DistributedWorkerError(DistributedError):
    """A rank died, hung past the timeout or lost its connection; all ranks were killed, the client is unusable."""


class DistributedCallError(DistributedError):
    """A call failed on every rank before any collective (bad input, bad checkpoint); the ranks are still fine."""


def send(conn: Connection, obj: Any) -> None:
    """Plain pickle (tensors by value). `Connection.send` would use torch's ForkingPickler reductions, which
    pass tensors as shared-memory fds: not across hosts, and not between processes that did not fork."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `n` items over `parts` ranks, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for r in range(parts):
        size = base + (1 if r < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def shard_batch(data: list[Any], world_size: int) -> list[tuple[list[Any], bool]]:
    """Each rank's datums and whether they are a stand-in.

    A rank with no datum of its own still runs forward/backward (ZeRO-3 gathers parameters inside the
    forward, and gradient reduction is a collective), on datum 0 with its loss scaled by 0.
    """
    shards = []
    for start, end in split_even(len(data), world_size):
        shards.append((data[start:end], False) if end > start else ([data[0]], True))
    return shards


def build_ds_config(stage: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """infra/deepspeed/zero{stage}.json with `overrides` merged in (nested dicts merge key by key)."""
    from infra.deepspeed import load_config

    cfg = load_config(stage)

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    merge(cfg, overrides or {})
    if cfg["zero_optimization"]["stage"] != stage:
        raise ValueError(
            f"ds_config overrides change zero_optimization.stage to "
            f"{cfg['zero_optimization']['stage']}, but zero_stage={stage}"
        )
    if cfg.get("managed_gradient_accumulation", True):
        raise ValueError(
            "ds_config must keep managed_gradient_accumulation=false: optim_step is the "
            "accumulation boundary, however many forward_backward calls preceded it"
        )
    return cfg
