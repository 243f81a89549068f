"""Data loading through `datasets`: every format gives the same tokens, errors name row and field, the tokenized
Arrow cache hits and misses on the right changes, and training batches resume at the same row."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from flows.sft_config import DataConfig
from infra.config import BadInputError
from infra.s3_server import S3Endpoint
from tasks.data_cache import TokenizedSet, render_batch, tokenize_cached
from tasks.data_io import DataLoadError, chat_validator, fields_validator, load_rows
from tasks.prepare_data import DataValidationError, prepare_dataset
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401

MAXLEN = 96


def conv(i: int) -> list[dict[str, str]]:
    sys = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
    extra = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] if i % 4 == 1 else []
    return [*sys, *extra, {"role": "user", "content": f"reverse {i:04d}"},
            {"role": "assistant", "content": f"Answer: {f'{i:04d}'[::-1]}"}]


ROWS = [{"messages": conv(i), "answer": f"{i:04d}"[::-1]} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    from flows.preflight import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def reference(tok) -> list[tuple[list[int], list[float]]]:
    from training_core.renderers import TrainOnWhat, get_renderer

    r = get_renderer("chat_template", tok)
    return [r.build_supervised_example(x["messages"], TrainOnWhat.LAST_ASSISTANT_MESSAGE) for x in ROWS]


def write_formats(d: Path) -> dict[str, str]:
    import datasets

    d.mkdir(parents=True, exist_ok=True)
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "t.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(d / "t.parquet"))
    datasets.Dataset.from_list([{"messages": json.dumps(r["messages"]), "answer": r["answer"]} for r in ROWS]) \
        .to_csv(str(d / "t.csv"), index=False)
    ds.save_to_disk(str(d / "arrow"))
    (d / "plain").mkdir()
    ds.select(range(20)).to_parquet(str(d / "plain" / "train-00000.parquet"))
    ds.select(range(20, 40)).to_parquet(str(d / "plain" / "train-00001.parquet"))
    return {k: str(d / v) for k, v in {"jsonl": "t.jsonl", "json": "t.json", "parquet": "t.parquet",
                                       "csv": "t.csv", "arrow": "arrow", "dir": "plain"}.items()}


def tokens_of(ts: TokenizedSet) -> list[tuple[list[int], list[float]]]:
    return ts.examples(list(range(len(ts))))


def test_every_format_round_trips_to_the_same_tokens(tmp_path: Path, tok, reference) -> None:
    specs = write_formats(tmp_path / "src")
    for kind, spec in specs.items():
        ts = tokenize_cached(spec, tok, "chat_template", "last_assistant_message", MAXLEN, tmp_path / "cache")
        assert not ts.cached and len(ts) == 40, kind
        assert tokens_of(ts) == reference, kind
    # the batched renderer is the renderer, token for token, in every train_on_what mode
    from training_core.renderers import get_renderer

    r = get_renderer("chat_template", tok)
    for tow in ("all_assistant_messages", "last_assistant_message", "all_messages"):
        assert render_batch(r, [x["messages"] for x in ROWS], tow) == \
            [r.build_supervised_example(x["messages"], tow) for x in ROWS]


def test_column_mapping_and_sharegpt_turns(tmp_path: Path, tok, reference) -> None:
    import datasets

    role = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"conversation": [{"from": role[m["role"]], "value": m["content"]} for m in r["messages"]],
              "answer": r["answer"]} for r in ROWS]
    datasets.Dataset.from_list(share).to_parquet(str(tmp_path / "share.parquet"))
    ds = load_rows(str(tmp_path / "share.parquet"), {"messages": "conversation"}, chat_validator(need_answer=True))
    assert ds.column_names == ["messages", "answer"] and ds[5]["messages"] == ROWS[5]["messages"]
    ts = tokenize_cached(str(tmp_path / "share.parquet"), tok, "chat_template", "last_assistant_message", MAXLEN,
                         tmp_path / "cache", columns={"messages": "conversation"})
    assert tokens_of(ts) == reference
    with pytest.raises(DataValidationError, match=r"data.columns.messages=dialog: no such column"):
        load_rows(str(tmp_path / "share.parquet"), {"messages": "dialog"})
    # other recipes' row shapes: preference pairs under the user's names, checked by field
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"question": f"q{i}", "good": "a", "bad": "b" if i != 3 else ""}) + "\n"
                             for i in range(5)))
    shape = fields_validator({"prompt": str, "chosen": str, "rejected": str})
    with pytest.raises(DataValidationError, match=rf"{pairs}:4: field 'rejected': empty"):
        load_rows(str(pairs), {"prompt": "question", "chosen": "good", "rejected": "bad"}, shape)
    ok = load_rows(str(pairs), {"prompt": "question", "chosen": "good"}, fields_validator({"prompt": str,
                                                                                         "chosen": str}))
    assert ok.column_names == ["prompt", "chosen", "bad"] and ok[2]["prompt"] == "q2"
    # the SFT pipeline takes the mapping from the config: data.columns.messages=conversation
    (tmp_path / "eval.jsonl").write_text(json.dumps({**ROWS[0], "messages": conv(999)}) + "\n")
    info = prepare_dataset(DataConfig(train_file=str(tmp_path / "share.parquet"), eval_file=str(tmp_path /
                                      "eval.jsonl"), columns={"messages": "conversation"}, replay=""), tmp_path)
    first = json.loads(Path(info.train_path).read_text().splitlines()[3])
    assert info.n_train == 40 and first["messages"] == ROWS[3]["messages"]
    # `tuneloop data validate` / `run sft` preflight: the same formats, the same mapping, rows named by index
    from flows.preflight import check_data
    from flows.sft_config import PipelineConfig
    from infra.config import load_config

    over = [f"run_root={tmp_path}/runs", "data.replay=", f"data.train_file={tmp_path / 'share.parquet'}",
            f"data.eval_file={tmp_path / 'eval.jsonl'}", "data.columns.messages=conversation"]
    assert check_data(load_config(PipelineConfig, None, over), tok).n_train == 40
    with pytest.raises(BadInputError, match=rf"rows render to more than data.max_length=30 tokens: "
                       rf"{tmp_path / 'share.parquet'} row \d+ \(\d+ tokens\)"):
        check_data(load_config(PipelineConfig, None, [*over, "data.max_length=30"]), tok)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_errors_name_row_and_field_before_anything_is_written(tmp_path: Path, tok, fmt: str) -> None:
    import datasets

    bad = [dict(r) for r in ROWS[:10]]
    bad[6] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}], "answer": "a"}
    if fmt == "jsonl":
        path = tmp_path / "t.jsonl"  # a blank line: the error names the line an editor shows, not the index
        path.write_text("".join(json.dumps(r) + "\n" for r in bad[:3]) + "\n" +
                        "".join(json.dumps(r) + "\n" for r in bad[3:]))
        where = f"{path}:8"
    else:
        path = tmp_path / "t.parquet"
        datasets.Dataset.from_list(bad).to_parquet(str(path))
        where = f"{path} row 6"
    needle = f"{where}: field 'messages[1].role': 'robot' is not one of"
    with pytest.raises(DataValidationError) as e:
        load_rows(str(path), None, chat_validator())
    assert needle in str(e.value)
    cache = tmp_path / "cache"
    with pytest.raises(DataValidationError) as e:
        tokenize_cached(str(path), tok, "chat_template", "last_assistant_message", MAXLEN, cache)
    assert needle in str(e.value)
    assert not (cache / "tokenized").exists() or not any((cache / "tokenized").iterdir()), "no entry, no debris"
    evl = tmp_path / "e.jsonl"
    evl.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataValidationError) as e:
        prepare_dataset(DataConfig(train_file=str(path), eval_file=str(evl), replay=""), tmp_path / "prep")
    assert needle in str(e.value) and not (tmp_path / "prep").exists()
    # over-long rows are located the same way
    ok = tmp_path / f"ok.{fmt}"
    if fmt == "jsonl":
        ok.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:10]))
    else:
        datasets.Dataset.from_list(ROWS[:10]).to_parquet(str(ok))
    with pytest.raises(DataValidationError, match=r"10 examples exceed data.max_length=8 tokens \(e.g. "
                       + (rf"{ok}:1\)" if fmt == "jsonl" else rf"{ok} row 0\)")):
        tokenize_cached(str(ok), tok, "chat_template", "last_assistant_message", 8, cache)


def test_hub_id_offline_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataLoadError, match=r"org/chats:test: a hub dataset, but HF_HUB_OFFLINE=1 \(offline mode\)"):
        load_rows("org/chats:test")
    with pytest.raises(DataLoadError, match=r"\./missing.parquet: no such file or directory"):
        load_rows("./missing.parquet")


def test_cache_hit_and_miss_on_changes(tmp_path: Path, tok) -> None:
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = (tok, "chat_template", "last_assistant_message", MAXLEN, tmp_path / "cache")
    a, b = tokenize_cached(str(src), *args), tokenize_cached(str(src), *args)
    assert (a.cached, b.cached, a.key) == (False, True, b.key) and tokens_of(a) == tokens_of(b)
    c = tokenize_cached(str(src), tok, "chat_template", "all_assistant_messages", MAXLEN, tmp_path / "cache")
    e = tokenize_cached(str(src), tok, "role_colon", "last_assistant_message", MAXLEN, tmp_path / "cache")
    m = tokenize_cached(str(src), *args, columns={"messages": "conversation"})  # already ours: same rows
    assert not (c.cached or e.cached or m.cached) and len({a.key, c.key, e.key, m.key}) == 4
    assert tokens_of(m) == tokens_of(a) and tokens_of(c) != tokens_of(a) and tokens_of(e) != tokens_of(a)
    # max_length does not change tokens (rows are refused, never cut): a hit, but checked on the hit too
    d = tokenize_cached(str(src), tok, "chat_template", "last_assistant_message", MAXLEN + 1, tmp_path / "cache")
    assert d.cached and d.key == a.key
    with pytest.raises(DataValidationError, match=rf"40 examples exceed data.max_length=8 tokens \(e.g. {src}:1\)"):
        tokenize_cached(str(src), tok, "chat_template", "last_assistant_message", 8, tmp_path / "cache")
    st = src.stat()
    edited = src.read_text().replace("reverse 0007", "reverse 0070")
    src.write_text(edited)  # same size: only the content changed
    import os

    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: content decides
    f = tokenize_cached(str(src), *args)
    assert not f.cached and f.key != a.key and tokens_of(f)[7] != tokens_of(a)[7]


def test_resume_continues_the_epoch_at_the_same_row(tmp_path: Path, tok, reference) -> None:
    from recipes.sft import batch_indices, build_datums

    src = tmp_path / "t.parquet"
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(src))
    args = (str(src), tok, "chat_template", "last_assistant_message", MAXLEN, tmp_path / "cache")
    first = tokenize_cached(*args)
    bs, seed, steps, crash = 6, 3, 16, 9  # 16 steps of 6 = 2.4 epochs; the crash is mid-epoch 1
    straight = [first.datums(batch_indices(s, bs, len(first), seed)) for s in range(steps)]
    resumed = tokenize_cached(*args)  # a new process after the crash: a cache hit, a fresh object
    assert resumed.cached
    after = [resumed.datums(batch_indices(s, bs, len(resumed), seed)) for s in range(crash, steps)]
    ref = build_datums([{**r, "id": str(i)} for i, r in enumerate(ROWS)], tok, "chat_template",
                       "last_assistant_message", MAXLEN)  # the in-memory path: the same datums
    for s, batch in zip(range(crash, steps), after, strict=True):
        want = [ref[i] for i in batch_indices(s, bs, 40, seed)]
        assert [x.model_input.to_ints() for x in batch] == [x.model_input.to_ints() for x in straight[s]] \
            == [x.model_input.to_ints() for x in want]
        assert [x.loss_fn_inputs["weights"].data for x in batch] == [x.loss_fn_inputs["weights"].data for x in want]
    # within an epoch no row repeats; across the boundary the next epoch's permutation continues
    seen = [i for s in range(7) for i in batch_indices(s, bs, 40, seed)][:40]
    assert sorted(seen) == list(range(40))


def test_s3_dataset_through_the_real_server(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path,  # noqa: F811
                                            monkeypatch, tok, reference) -> None:
    from infra.storage import open_storage

    for k, v in s3_endpoint.aws_env().items():  # the credentials checkpoints use: env / AWS chain
        monkeypatch.setenv(k, v)
    specs = write_formats(tmp_path / "src")
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    st = open_storage(f"s3://{s3_bucket}/{prefix}")
    st.put_file("chats.parquet", specs["parquet"])
    for f in Path(specs["arrow"]).iterdir():
        st.put_file(f"arrow/{f.name}", f)
    for spec in (f"s3://{s3_bucket}/{prefix}/chats.parquet", f"s3://{s3_bucket}/{prefix}/arrow"):
        ts = tokenize_cached(spec, tok, "chat_template", "last_assistant_message", MAXLEN, tmp_path / "cache")
        assert tokens_of(ts) == reference, spec
    with pytest.raises(DataLoadError, match="no such object or prefix"):
        load_rows(f"s3://{s3_bucket}/{prefix}/nope.parquet", cache_dir=tmp_path / "c")


def test_streaming_stats_count_exactly(tmp_path: Path, tok, reference, capsys) -> None:
    import argparse

    from tuneloop_cli.data_cli import add_data_stats_command

    rows = ROWS + ROWS[:3] + [{**ROWS[5], "messages": [{**m, "content": "  " + m["content"] + " "}
                                                       for m in ROWS[5]["messages"]]}]  # whitespace-only change
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evl = tmp_path / "e.parquet"
    import datasets

    fresh = {"messages": [{"role": "user", "content": "an unseen question"}, {"role": "assistant", "content": "x"}],
             "answer": "x"}
    datasets.Dataset.from_list([ROWS[2], ROWS[30], fresh]).to_parquet(str(evl))
    ap = argparse.ArgumentParser()
    add_data_stats_command(ap.add_subparsers())
    max_len = sorted(len(t) for t, _ in reference)[30]  # 9+ of the 44 rows are longer
    args = ap.parse_args(["stats", str(src), f"run_root={tmp_path}/runs", f"data.max_length={max_len}",
                          "--eval-file", str(evl), "--json", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    from training_core.renderers import get_renderer

    r = get_renderer("chat_template", tok)
    lengths = [len(r.build_supervised_example(x["messages"], "last_assistant_message")[0]) for x in rows]
    assert s["n_rows"] == 44 and s["tokens_total"] == sum(lengths) and s["length_max"] == max(lengths)
    assert s["n_over_max_length"] == sum(n > max_len for n in lengths)
    assert s["truncation_share"] == pytest.approx(s["n_over_max_length"] / 44)
    assert sum(s["length_hist"]["counts"]) == 44
    assert (s["n_duplicates"], s["duplicate_groups"][0]) == (4, [0, 40])  # rows 0-2 twice + row 5 re-spaced
    c = s["contamination"]["eval"]
    assert (c["contaminated"], c["of"]) == (2, 3)  # its question is a training turn; the fresh one is not
    assert c["examples"] == [{"eval_index": 0, "train_index": 2}, {"eval_index": 1, "train_index": 30}]
    assert "duplicates: 4 (9.09%)" in capsys.readouterr().out


def test_streamed_quality_report_equals_the_list_based_one(tmp_path: Path, tok, reference) -> None:
    """tasks.data_stats.quality_report (the data stage's, from Arrow) == evals.data_quality's report on lists."""
    from evals.data_quality import DataQualityConfig, check_training_data
    from tasks.data_stats import quality_report
    from training_core.renderers import TrainOnWhat, get_renderer

    rows = ROWS + ROWS[:3] + [{**ROWS[5], "messages": [{**m, "content": "  " + m["content"] + " "}
                                                       for m in ROWS[5]["messages"]]}]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = {"target": [json.dumps(ROWS[7]["messages"][:-1]), "an unseen question", "reverse 0031"]}
    cfg = DataQualityConfig(max_tokens=sorted(len(t) for t, _ in reference)[30], max_listed=3, ngram=3)
    r = get_renderer("chat_template", tok)
    ref = check_training_data([x["messages"] for x in rows], tok,
                              lambda m: r.build_supervised_example(m, TrainOnWhat.LAST_ASSISTANT_MESSAGE),
                              tmp_path / "ref", eval_sets=evals, config=cfg, raise_on_blocking=False)
    ts = tokenize_cached(str(src), tok, "chat_template", "last_assistant_message", 0, tmp_path / "cache")
    got = quality_report(load_rows(str(src)), ts.dataset, tok, tmp_path / "got", eval_sets=evals, config=cfg,
                         raise_on_blocking=False)
    a, b = got.to_dict(), ref.to_dict()
    assert a["stats"].pop("length_mean") == pytest.approx(b["stats"].pop("length_mean"), rel=1e-12)
    assert a == b
    checks = {p["check"]: p["severity"] for p in b["problems"]}
    assert checks == {"overlong": "error", "duplicates": "error", "contamination": "error"}  # all three exercised
    assert [(x["eval_index"], x["train_index"]) for x in b["stats"]["contamination"]["target"]["examples"]] == \
        [(2, 31)]  # "reverse 0031" is row 31's question (the JSON-quoted prompt has no 3 words in a row of a turn)
    for f in ("data_quality.json", "data_quality.html", "token_lengths.png"):
        assert (tmp_path / "got" / f).stat().st_size > 0


def test_streamed_prepare_writes_what_the_list_path_builds(tmp_path: Path) -> None:
    """A user file without replay is prepared row by row: the same entry as the in-memory path's rows."""
    from tasks.prepare_data import build_rows

    paths = write_formats(tmp_path / "src")
    evl = tmp_path / "e.jsonl"
    evl.write_text("".join(json.dumps({**r, "messages": conv(100 + i)}) + "\n" for i, r in enumerate(ROWS[:4])))
    for fmt in ("jsonl", "parquet"):
        cfg = DataConfig(train_file=paths[fmt], eval_file=str(evl), replay="")
        info = prepare_dataset(cfg, tmp_path / f"prep-{fmt}")
        train, ev = build_rows(cfg)
        assert (info.n_train, info.n_eval) == (40, 4)
        assert Path(info.train_path).read_text().splitlines() == \
            [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in train]
        assert [json.loads(x) for x in Path(info.eval_path).read_text().splitlines()] == ev
    leak = tmp_path / "leak.jsonl"
    leak.write_text(evl.read_text() + "".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    with pytest.raises(DataValidationError, match="4 eval rows also appear in the training set"):
        prepare_dataset(DataConfig(train_file=str(leak), eval_file=str(evl), replay=""), tmp_path / "prep-leak")
    assert not (tmp_path / "prep-leak").exists()  # nothing written for a refused file
