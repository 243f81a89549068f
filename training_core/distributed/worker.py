"""A worker rank: `python -m training_core.distributed.worker`, started by the controller or by a launcher.

Environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torch.distributed; torchrun and
`deepspeed` set them) plus TUNELOOP_DS_CONTROLLER and TUNELOOP_DS_AUTHKEY (where the controller listens).
The rank connects to the controller, joins the process group, then executes the controller's commands
in order until `shutdown` or until the controller goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import Client, Connection
from typing import Any

from training_core.distributed import protocol as P

log = logging.getLogger("training_core.distributed.worker")


def _die_with_parent() -> None:
    """Exit when the controller process dies (no orphan ranks holding memory or ports).

    A watchdog thread, not PR_SET_PDEATHSIG: that signal follows the *thread* that spawned us, and the
    controller may start ranks from a short-lived thread (a Prefect task, an executor).
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:  # re-parented: the controller is gone
                os._exit(1)

    threading.Thread(target=watch, name="tuneloop-ds-parent-watch", daemon=True).start()


def _quiet() -> None:
    # torch 2.13 deprecation floods from DeepSpeed's collectives; they say nothing about this code.
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed\..*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def init_distributed(rank: int, world_size: int) -> str:
    import deepspeed
    import torch
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if os.environ.get(P.ENV_SHM_COMM) != "1":
        # The shm op only serves inference all-reduce; skipping it avoids a ~30 s gcc JIT on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = os.environ.get(P.ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get(P.ENV_TIMEOUT, "600")))
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timeout,
        rank=rank,
        world_size=world_size,
        verbose=False,
    )
    return backend


def handle(
    op: str, sid: int | None, args: dict[str, Any], sessions: dict[int, Any], rank: int, world_size: int
) -> Any:
    from training_core.distributed import checkpoint_io
    from training_core.distributed.session import Session

    if op == "ping":
        return {"rank": rank, "pid": os.getpid()}
    if op == "init_session":
        assert sid is not None
        s = sessions[sid] = Session(args, rank, world_size)
        return s.info()
    if sid not in sessions:
        raise KeyError(f"no session {sid} on rank {rank} (closed, or never created)")
    s = sessions[sid]
    if op == "close_session":
        sessions.pop(sid).close()
        import gc

        gc.collect()
        return None
    if op in ("forward", "backward_linear"):
        return s.forward(args)
    if op == "optim_step":
        return s.optim_step(args["adam"])
    if op == "get_params":
        return checkpoint_io.gather_params(s)
    if op == "get_optimizer":
        return checkpoint_io.gather_optimizer(s)
    if op == "stats":
        return stats(s)
    if op == "save":
        return checkpoint_io.save(s, args)
    if op == "load":
        return checkpoint_io.load(s, args)
    raise ValueError(f"unknown op {op!r}")


def stats(s: Any) -> dict[str, float]:
    """Memory of this rank: peak/current RSS and the numbers of elements ZeRO keeps here."""
    import resource

    from training_core.distributed import checkpoint_io

    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    inner = s.engine.optimizer.optimizer
    flats = checkpoint_io.flat_partitions(s)
    return {
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
        "model_param_numel": sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
                                 for p in s.model.parameters()),
        "fp32_master_numel": sum(int(f.numel()) for f in flats),
        "optimizer_state_numel": sum(int(v.numel()) for f in flats for v in inner.state.get(f, {}).values()
                                     if hasattr(v, "numel") and v.dim() > 0),
    }


def serve(conn: Connection, rank: int, world_size: int) -> int:
    sessions: dict[int, Any] = {}
    while True:
        try:
            msg = P.recv(conn)
        except (EOFError, OSError):
            return 0  # the controller went away: nothing left to serve
        op = msg.get("op")
        if op == "shutdown":
            for s in sessions.values():
                with contextlib.suppress(Exception):
                    s.close()
            P.send(conn, {"ok": True, "result": None})
            return 0
        try:
            result = handle(op, msg.get("sid"), msg.get("args") or {}, sessions, rank, world_size)
            reply = {"ok": True, "result": result}
        except Exception as e:  # reported to the controller, which decides whether the pool survives
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        try:
            P.send(conn, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            P.send(conn, {"ok": False, "error": f"cannot send the result of {op}: {e!r}", "traceback": ""})


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(message)s"
    )
    if os.environ.get(P.ENV_DIE_WITH_PARENT) == "1":
        _die_with_parent()
    _quiet()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ[P.ENV_CONTROLLER].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[P.ENV_AUTHKEY]))
    P.send(conn, {"hello": rank, "pid": os.getpid(), "host": socket.gethostname()})
    try:
        backend = init_distributed(rank, world_size)
    except Exception as e:
        P.send(
            conn, {"ready": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        )
        return 1
    P.send(conn, {"ready": True, "backend": backend})
    code = serve(conn, rank, world_size)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
