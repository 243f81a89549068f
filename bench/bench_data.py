"""bench_data: preparing a chat dataset (validate + render + tokenize + cache), today's path vs `datasets`.

    python -m bench.bench_data [--n 1000000] [--n-today 50000] [--num-proc 1] [--no-merge]

A seeded synthetic chat dataset (system turns, multi-turn rows, 5-60-word prompts, 3-30-word answers) is
written as JSONL and Parquet. Each side runs in its own child process (so its peak RSS is its own, read from
`getrusage`; with `--num-proc > 1` the map workers' peak is reported too):

- `today`: `read_chat_jsonl` (the line reader, every row validated) + ids + `recipes.sft.build_datums` (the
  renderer per row, every Datum in a Python list): what the SFT path did before issue 16.
- `new`: `tasks.data_cache.tokenize_cached` (datasets load, streamed validation, batched render + tokenize
  with `map`, over-length / weight checks, atomic save of the memory-mapped Arrow entry).
- `new_hit`: the same call again on the same file: a cache hit (hash the file, open the entry).
- `prepare`, `stage` (`--stage`): the SFT pipeline's data stage itself on the big JSONL: `prepare_data_task`
  (validate + ids + the prepared train.jsonl, streamed) and `data_quality_task` (after `new` built its cache:
  a cache hit, then the streamed report: lengths, weights, duplicate hashes, contamination against 200 eval
  prompts, JSON/HTML/PNG): `data_stage_prepare_peak_rss_mib_1m`, `data_quality_peak_rss_mib_1m`.
  `--stage-only --workdir DIR` runs just these on an existing workdir (data + `cache-big`).

The ratio `data_prepare_rows_per_s_ratio` compares both sides on the same `--n-today` rows of the same JSONL
(today's path holds everything in memory, so it is not run at 1M); the new path is then run at `--n` for
`data_prepare_peak_rss_mib_1m` and rows/s (JSONL and Parquet), and the hit time. Goals (issue 16): RSS
< 2048 MiB at 1M rows, ratio >= 2, hit < 5 s.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import merge_results, print_table  # noqa: E402

WORDS = ("the model reads a short note about rivers mountains numbers and small towns then answers "
         "with care while checking each step of its work before it writes one clear line").split()
MAX_LENGTH = 1024
MODEL = "tiny"


def synth_row(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    msgs: list[dict[str, str]] = []
    if i % 10 == 0:
        msgs.append({"role": "system", "content": "You are concise."})
    for _ in range(2 if i % 10 == 5 else 1):
        msgs.append({"role": "user", "content": f"q{i} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
    return {"messages": msgs, "answer": str(i)}


def generate(d: Path, n: int, n_small: int) -> dict[str, str]:
    """JSONL (n rows), its first n_small rows, and Parquet (n rows, written in chunks: flat memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": d / f"chat-{n}.jsonl", "small": d / f"chat-{n_small}.jsonl", "parquet": d / f"chat-{n}.parquet"}
    writer = None
    with open(paths["jsonl"], "w") as big, open(paths["small"], "w") as small:
        for start in range(0, n, 50_000):
            rows = [synth_row(i) for i in range(start, min(n, start + 50_000))]
            for k, r in enumerate(rows):
                line = json.dumps(r) + "\n"
                big.write(line)
                if start + k < n_small:
                    small.write(line)
            table = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(paths["parquet"], table.schema)
            writer.write_table(table)
    if writer is not None:
        writer.close()
    return {k: str(v) for k, v in paths.items()}


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # Linux: KiB


def cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (map workers): robust to a loaded machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(side: str, path: str, cache: str, num_proc: int) -> dict[str, Any]:
    """One measured side, in this (fresh) process; prints one JSON line."""
    from flows.preflight import load_tokenizer

    tok = load_tokenizer(MODEL)
    rss0 = peak_rss_mib()
    t0, c0 = time.perf_counter(), cpu_s()
    if side in ("stage", "prepare"):
        return stage_child(side, path, cache, tok, rss0)
    if side == "today":
        from recipes.sft import build_datums
        from tasks.prepare_data import _with_ids, read_chat_jsonl

        rows = _with_ids(read_chat_jsonl(path))
        datums = build_datums(rows, tok, "chat_template", "last_assistant_message", MAX_LENGTH)
        n, tokens = len(datums), sum(d.model_input.length + 1 for d in datums)
        cached = False
    else:
        from tasks.data_cache import tokenize_cached

        ts = tokenize_cached(path, tok, "chat_template", "last_assistant_message", MAX_LENGTH, cache,
                             num_proc=num_proc)
        import pyarrow.compute as pc

        n, tokens, cached = len(ts), int(pc.sum(ts.dataset.data.column("length")).as_py()), ts.cached
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    return {"side": side, "rows": n, "tokens": tokens, "seconds": round(dt, 2), "rows_per_s": round(n / dt, 1),
            "cpu_s": round(dc, 2), "rows_per_cpu_s": round(n / dc, 1), "loadavg_1m": round(os.getloadavg()[0], 1),
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_tokenizer_mib": round(rss0, 1), "cached": cached}


def stage_child(side: str, path: str, cache: str, tok: Any, rss0: float) -> dict[str, Any]:
    """The SFT flow's data stage on `path`, `cache` as the flow's cache root: `prepare` = `prepare_data_task`
    (validate + ids + the prepared train.jsonl, streamed for a user file without replay), `stage` =
    `data_quality_task` on `path` itself (so the `new` side's tokenized entry is a hit)."""
    import dataclasses

    from flows.sft_config import PipelineConfig
    from infra.config import load_config
    from tasks.data_stage import data_quality_task, prepare_data_task
    from tasks.prepare_data import DatasetInfo

    n = sum(1 for _ in open(path, "rb"))
    Path(cache).mkdir(parents=True, exist_ok=True)
    evl = Path(cache) / "eval-200.jsonl"
    evl.write_text("".join(json.dumps(synth_row(n + k)) + "\n" for k in range(200)))  # rows the set lacks
    cfg = load_config(PipelineConfig, None, [f"model.base_model={MODEL}", f"data.max_length={MAX_LENGTH}",
                                             f"data.train_file={path}", f"data.eval_file={evl}", "data.replay="])
    t0, c0 = time.perf_counter(), cpu_s()  # the count above is not the stage's work
    if side == "prepare":
        info = prepare_data_task.fn(dataclasses.asdict(cfg), str(Path(cache) / "prepared"))
        tokens, problems = 0, [f"{info.n_train} train rows"]
    else:
        ds = DatasetInfo(str(Path(cache) / "datasets" / "bench"), path, str(evl), n, 200, "bench", True)
        out = data_quality_task.fn(dataclasses.asdict(cfg), ds, str(Path(cache) / "data_quality"))
        tokens, problems = out["stats"]["tokens_total"], out["problems"]
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    return {"side": side, "rows": n, "tokens": tokens, "seconds": round(dt, 2),
            "rows_per_s": round(n / dt, 1), "cpu_s": round(dc, 2), "rows_per_cpu_s": round(n / dc, 1),
            "loadavg_1m": round(os.getloadavg()[0], 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_after_tokenizer_mib": round(rss0, 1), "cached": True, "problems": problems}


def run_child(side: str, path: str, cache: str, num_proc: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "bench.bench_data", "--child", side, path, cache, str(num_proc)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{side} on {path} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["input"] = Path(path).name
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="rows of the big dataset (new path)")
    ap.add_argument("--n-today", type=int, default=50_000, help="rows both paths prepare for the ratio")
    ap.add_argument("--num-proc", type=int, default=1, help="datasets.map processes of the new path")
    ap.add_argument("--workdir", default="", help="where the data and caches go (default: a temp dir, removed)")
    ap.add_argument("--no-merge", action="store_true", help="do not write bench/results.json")
    ap.add_argument("--stage", action="store_true", help="also measure the data-quality stage at --n rows")
    ap.add_argument("--stage-only", action="store_true", help="only the stage side, on --workdir's data + cache")
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "PATH", "CACHE", "NUM_PROC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        side, path, cache, num_proc = args.child
        print(json.dumps(child(side, path, cache, int(num_proc))))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tuneloop-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.stage_only:
        big_path = str(work / f"chat-{args.n}.jsonl")
        prep = run_child("prepare", big_path, str(work / "cache-stage"), args.num_proc)
        st = run_child("stage", big_path, str(work / "cache-big"), args.num_proc)
        figures = stage_figures(prep, st)
        print(json.dumps(figures, indent=2))
        if not args.no_merge:
            print(f"merged into {merge_results(figures)}")
        return 0
    st = prep = None
    try:
        t = time.perf_counter()
        paths = generate(work, args.n, args.n_today)
        print(f"generated {args.n} rows (JSONL + Parquet) in {time.perf_counter() - t:.0f}s", flush=True)
        res = []
        # the ratio: both paths on the same small JSONL, interleaved today/new/today/new (shared machine)
        for rnd in range(2):
            res.append(run_child("today", paths["small"], str(work / f"cache-small-{rnd}"), args.num_proc))
            res.append(run_child("new", paths["small"], str(work / f"cache-small-n{rnd}"), args.num_proc))
        big = run_child("new", paths["jsonl"], str(work / "cache-big"), args.num_proc)
        hit = run_child("new_hit", paths["jsonl"], str(work / "cache-big"), args.num_proc)
        pq = run_child("new", paths["parquet"], str(work / "cache-pq"), args.num_proc)
        res += [big, hit, pq]
        if args.stage:
            prep = run_child("prepare", paths["jsonl"], str(work / "cache-stage"), args.num_proc)
            st = run_child("stage", paths["jsonl"], str(work / "cache-big"), args.num_proc)
            res += [prep, st]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    assert hit["cached"], "the second run on the same file must be a cache hit"
    figures = summarize(res, Path(paths["small"]).name, big, hit, pq, args.n_today, args.n, args.num_proc)
    if st is not None and prep is not None:
        figures |= stage_figures(prep, st)
    print_table(res, ["side", "input", "rows", "seconds", "rows_per_s", "cpu_s", "rows_per_cpu_s", "peak_rss_mib",
                      "cached"])
    print(json.dumps(figures, indent=2))
    if not args.no_merge:
        print(f"merged into {merge_results(figures)}")
    return 0


def stage_figures(prep: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    return {"data_stage_prepare_peak_rss_mib_1m": prep["peak_rss_mib"], "data_stage_prepare_seconds_1m": prep["seconds"],
            "data_quality_peak_rss_mib_1m": st["peak_rss_mib"], "data_quality_seconds_1m": st["seconds"],
            "data_quality_rows_per_cpu_s_1m": st["rows_per_cpu_s"]}


def summarize(res: list[dict[str, Any]], small: str, big: dict[str, Any], hit: dict[str, Any],
              pq: dict[str, Any], n_today: int, n: int, num_proc: int) -> dict[str, Any]:
    """The figures: the ratio of medians over the interleaved rounds (the suite's convention), the best-of
    ratio, and the same per CPU second (other processes on a shared machine move wall time, much less CPU)."""
    from statistics import median

    today = [r for r in res if r["side"] == "today"]
    new_small = [r for r in res if r["side"] == "new" and r["input"] == small]

    def ratio(key: str, agg: Any) -> float:
        return round(agg([r[key] for r in new_small]) / agg([r[key] for r in today]), 2)

    return {
        "data_prepare_rows_per_s_ratio": ratio("rows_per_s", median),
        "data_prepare_rows_per_s_ratio_best_of": ratio("rows_per_s", max),
        "data_prepare_rows_per_cpu_s_ratio": ratio("rows_per_cpu_s", median),
        "data_prepare_rows_per_s_today": max(r["rows_per_s"] for r in today),
        "data_prepare_rows_per_s_new": max(r["rows_per_s"] for r in new_small),
        "data_prepare_today_peak_rss_mib": max(r["peak_rss_mib"] for r in today),
        "data_prepare_new_peak_rss_mib_small": max(r["peak_rss_mib"] for r in new_small),
        "data_prepare_ratio_rows": n_today,
        "data_prepare_peak_rss_mib_1m": big["peak_rss_mib"],
        "data_prepare_rows_per_s_1m_jsonl": big["rows_per_s"],
        "data_prepare_rows_per_s_1m_parquet": pq["rows_per_s"],
        "data_prepare_peak_rss_mib_1m_parquet": pq["peak_rss_mib"],
        "data_prepare_cache_hit_s_1m": hit["seconds"],
        "data_prepare_rows_per_cpu_s_1m_jsonl": big["rows_per_cpu_s"],
        "data_prepare_rows_big": n,
        "data_prepare_num_proc": num_proc,
        "data_prepare_loadavg_1m": max(r["loadavg_1m"] for r in res),
    }


if __name__ == "__main__":
    sys.exit(main())
