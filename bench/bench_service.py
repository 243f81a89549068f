"""`tuneloop serve` over HTTP (the real `tinker` 0.38.0 SDK) against the same calls in-process.

Model `tiny-30m`, LoRA r=16 (q/k/v/o/gate/up/down, no unembedding), bf16 base weights and compute on both sides
(the server runs with `--dtype bfloat16`, in-process `ServiceClient(compute_dtype="bfloat16")`), the same
intra-op thread count on both sides (`--threads`, passed to the server as `--torch-threads`). The server is a
`python -m service` subprocess on 127.0.0.1; the in-process engine lives in this process. Only one side
computes at a time: every measurement alternates the sides (A, B, A, B, ...) and reports medians.

- step: `forward_backward(B=8 x T=256, cross_entropy)` + `optim_step`, the SDK's async pattern (the next
  batch submitted before awaiting the previous one); seconds per step over `--steps` pipelined steps.
  `service_step_time_ratio_vs_inprocess` = median service / median in-process (goal <= 1.10).
- sample: 16 samples x 128 new tokens of one 32-token prompt from the base model, same seed on both sides.
  `service_sample_time_ratio_vs_inprocess` (goal <= 1.15).
- overhead: one synchronous `forward` (cross_entropy, no gradient) at B = 1, 4, 8, 16 (T=256): service minus in-process, in ms.
- concurrency: 4 training runs on one base through the server, concurrently (one thread each) vs one after
  another; tokens/s of each.

    python -m bench.bench_service [--threads 1] [--rounds 5] [--steps 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, merge_results, print_table
from service.health import wait_healthy

MODEL, RANK, T, B = "tiny-30m", 16, 256, 8
SAMPLES, NEW_TOKENS, PROMPT_LEN = 16, 128, 32
OVERHEAD_BATCHES = (1, 4, 8, 16)


class ServerProc:
    def __init__(self, threads: int) -> None:
        import socket

        from service.keys import create_key

        self.dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        keys = self.dir / "keys.json"
        self.key = create_key(keys, "bench")[0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TINKER_TELEMETRY": "0",
               "OMP_NUM_THREADS": str(threads)}
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port), "--state-dir", str(self.dir),
             "--keys", str(keys), "--dtype", "bfloat16", "--torch-threads", str(threads), "--log-level", "warning"],
            cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, 180, lambda: (self.dir / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def rows(batch: int, seed: int) -> list[list[int]]:
    import torch

    return torch.randint(3, 8000, (batch, T + 1), generator=torch.Generator().manual_seed(seed)).tolist()


def data(types: Any, batch: int, seed: int) -> list[Any]:
    return [types.Datum(model_input=types.ModelInput.from_ints(r[:T]),
                        loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * T}) for r in rows(batch, seed)]


def pipelined_steps(tc: Any, types: Any, adam: Any, n: int) -> float:
    """Seconds per step: step i+1 is submitted before step i's results are awaited (the SDK's pattern)."""
    t0 = time.perf_counter()
    prev: tuple[Any, Any] | None = None
    for i in range(n):
        fb = tc.forward_backward(data(types, B, i), "cross_entropy")
        op = tc.optim_step(adam)
        if prev is not None:
            prev[0].result()
            prev[1].result()
        prev = (fb, op)
    assert prev is not None
    prev[0].result()
    prev[1].result()
    return (time.perf_counter() - t0) / n


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in sides.items():
            out[k].append(fn())
    return out


def run(threads: int, rounds: int, steps: int) -> dict[str, Any]:
    import tinker
    import torch
    from tinker import types as st

    import training_core
    from training_core import types as lt

    torch.set_num_threads(threads)
    srv = ServerProc(threads)
    try:
        sdk = tinker.ServiceClient(base_url=srv.url, api_key=srv.key)
        local = training_core.ServiceClient(checkpoint_root=tempfile.mkdtemp(prefix="bench-serve-local-"),
                                            compute_dtype="bfloat16", load_dtype="bfloat16")
        stc = sdk.create_lora_training_client(base_model=MODEL, rank=RANK, seed=0, train_unembed=False).result()
        ltc = local.create_lora_training_client(MODEL, rank=RANK, seed=0, train_unembed=False)
        s_adam, l_adam = st.AdamParams(learning_rate=1e-4), lt.AdamParams(learning_rate=1e-4)
        loss_s = stc.forward_backward(data(st, B, 99), "cross_entropy").result().metrics["loss:sum"]
        loss_l = ltc.forward_backward(data(lt, B, 99), "cross_entropy").result().metrics["loss:sum"]
        print(f"same work check: first loss service {loss_s:.4f} vs in-process {loss_l:.4f}", flush=True)

        step = interleave({"service": lambda: pipelined_steps(stc, st, s_adam, steps),
                           "inprocess": lambda: pipelined_steps(ltc, lt, l_adam, steps)}, rounds)
        print(f"step s: {step}", flush=True)

        prompt_ids = rows(1, 7)[0][:PROMPT_LEN]
        ssc = sdk.create_sampling_client(base_model=MODEL).result()
        lsc = local.create_sampling_client(base_model=MODEL)
        counts: dict[str, int] = {}

        def sample(side: str) -> float:
            client, types = (ssc, st) if side == "service" else (lsc, lt)
            params = types.SamplingParams(max_tokens=NEW_TOKENS, seed=0, temperature=1.0)
            t0 = time.perf_counter()
            res = client.sample(types.ModelInput.from_ints(prompt_ids), num_samples=SAMPLES,
                                sampling_params=params).result()
            dt = time.perf_counter() - t0
            counts[side] = sum(len(s.tokens) for s in res.sequences)
            return dt

        samp = interleave({"service": lambda: sample("service"), "inprocess": lambda: sample("inprocess")}, rounds)
        print(f"sample s: {samp} tokens {counts}", flush=True)

        overhead: dict[str, Any] = {}
        for b in OVERHEAD_BATCHES:
            ds, dl = data(st, b, 50 + b), data(lt, b, 50 + b)
            o = interleave({"service": lambda ds=ds: timed(lambda: stc.forward(ds, "cross_entropy").result()),
                            "inprocess": lambda dl=dl: timed(lambda: ltc.forward(dl, "cross_entropy").result())},
                           max(3, rounds))
            ms, ml = statistics.median(o["service"]), statistics.median(o["inprocess"])
            overhead[f"B{b}"] = {"service_ms": round(ms * 1e3, 1), "inprocess_ms": round(ml * 1e3, 1),
                                 "overhead_ms": round((ms - ml) * 1e3, 1)}
        print(f"overhead: {overhead}", flush=True)

        runs = [sdk.create_lora_training_client(base_model=MODEL, rank=RANK, seed=i, train_unembed=False).result()
                for i in range(4)]
        conc_steps = max(2, steps)

        def sequential() -> float:
            return timed(lambda: [pipelined_steps(tc, st, s_adam, conc_steps) for tc in runs])

        def concurrent() -> float:
            def go() -> None:
                ths = [threading.Thread(target=pipelined_steps, args=(tc, st, s_adam, conc_steps)) for tc in runs]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
            return timed(go)

        conc = interleave({"concurrent": concurrent, "sequential": sequential}, max(1, rounds // 2))
        tokens = 4 * conc_steps * B * T
    finally:
        srv.stop()

    med = {k: statistics.median(v) for k, v in {**{f"step_{k}": v for k, v in step.items()},
                                                 **{f"sample_{k}": v for k, v in samp.items()},
                                                 **{f"runs4_{k}": v for k, v in conc.items()}}.items()}
    return {
        "service_step_time_ratio_vs_inprocess": round(med["step_service"] / med["step_inprocess"], 3),
        "service_sample_time_ratio_vs_inprocess": round(med["sample_service"] / med["sample_inprocess"], 3),
        "service_request_overhead_ms": overhead,
        "service_4runs_concurrent_tokens_per_s": round(tokens / med["runs4_concurrent"], 1),
        "service_4runs_sequential_tokens_per_s": round(tokens / med["runs4_sequential"], 1),
        "service_bench_setup": {
            "model": MODEL, "lora_rank": RANK, "dtype": "bfloat16", "batch": B, "seq_len": T,
            "torch_threads": threads, "rounds": rounds, "pipelined_steps_per_round": steps,
            "sample": f"{SAMPLES} x {NEW_TOKENS} new tokens, {PROMPT_LEN}-token prompt",
            "sample_tokens": counts, "first_loss": {"service": loss_s, "inprocess": loss_l},
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "all_s": {f"step_{k}": [round(x, 4) for x in v] for k, v in step.items()}
            | {f"sample_{k}": [round(x, 4) for x in v] for k, v in samp.items()}
            | {f"runs4_{k}": [round(x, 3) for x in v] for k, v in conc.items()},
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="pipelined steps per timed round")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.threads, args.rounds, args.steps)
    print_table([{"figure": k, "value": v} for k, v in res.items() if isinstance(v, int | float)])
    for b, o in res["service_request_overhead_ms"].items():
        print(f"  forward {b}: {o}")
    if not args.no_write:
        print(f"wrote {merge_results(res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
