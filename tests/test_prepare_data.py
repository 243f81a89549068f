"""Data prep: bad rows name file, line and field and nothing is written; the cache is verified, not trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.sft_config import DataConfig
from tasks.prepare_data import DataValidationError, prepare_dataset


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Answer: 4"}],
        "answer": "4"}


@pytest.mark.parametrize("bad,line,needle", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, 2,
     "field 'messages[1].role': 'robot' is not one of"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, 2,
     "field 'messages[0].content': missing or not a string"),
    ({"prompt": "no messages"}, 2, "field 'messages': missing"),
    ('{"messages": [', 2, "invalid JSON"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, 2,
     "field 'messages[1].role': the last message must be the assistant's"),
])
def test_malformed_row_names_file_line_field_and_writes_nothing(tmp_path, bad, line, needle):
    train = _write(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    evl = _write(tmp_path / "eval.jsonl", [GOOD])
    cache = tmp_path / "cache"
    cfg = DataConfig(train_file=str(train), eval_file=str(evl))
    with pytest.raises(DataValidationError) as e:
        prepare_dataset(cfg, cache)
    assert f"{train}:{line}:" in str(e.value) and needle in str(e.value)
    assert not cache.exists() or not any(cache.rglob("*.jsonl")), "nothing may be written for a bad dataset"


def test_eval_rows_need_an_answer(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GOOD])
    row = dict(GOOD)
    row.pop("answer")
    evl = _write(tmp_path / "eval.jsonl", [GOOD, row])
    with pytest.raises(DataValidationError, match=r"eval.jsonl:2: field 'answer'"):
        prepare_dataset(DataConfig(train_file=str(train), eval_file=str(evl)), tmp_path / "c")


def test_cache_hit_and_deleted_artifact_is_recomputed(tmp_path):
    cfg = DataConfig(n_train=50, n_eval=20)
    a = prepare_dataset(cfg, tmp_path)
    b = prepare_dataset(cfg, tmp_path)
    assert not a.cached and b.cached and a.dir == b.dir
    Path(a.train_path).unlink()  # the cache entry's artifact disappears
    c = prepare_dataset(cfg, tmp_path)
    assert not c.cached and Path(c.train_path).read_text() == Path(b.eval_path).parent.joinpath("train.jsonl").read_text()
    # a tampered artifact is recomputed too
    Path(c.eval_path).write_text("garbage\n")
    d = prepare_dataset(cfg, tmp_path)
    assert not d.cached and json.loads(Path(d.eval_path).read_text().splitlines()[0])["answer"]
    other = prepare_dataset(DataConfig(n_train=50, n_eval=20, seed=1), tmp_path)
    assert other.hash != a.hash
    shutil.rmtree(tmp_path / "datasets")


def test_train_and_eval_are_disjoint(tmp_path):
    info = prepare_dataset(DataConfig(n_train=300, n_eval=100), tmp_path)
    tr = {json.loads(x)["id"] for x in Path(info.train_path).read_text().splitlines()}
    ev = {json.loads(x)["id"] for x in Path(info.eval_path).read_text().splitlines()}
    assert len(tr) == 300 and len(ev) == 100 and not tr & ev


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_replay_mixes_the_configured_share_of_general_text(tmp_path):
    from data.generators import PROSE_PROMPTS

    cfg = DataConfig(n_train=80, n_eval=10, replay="builtin:prose", replay_fraction=0.2)
    info = prepare_dataset(cfg, tmp_path / "a")
    train, evl = _rows(info.train_path), _rows(info.eval_path)
    is_prose = [r["messages"][0]["content"] in PROSE_PROMPTS for r in train]
    assert (len(train), sum(is_prose)) == (100, 20)  # 20 % of the final set
    assert 0 < is_prose.index(True) < 80 and any(is_prose[50:]), "interleaved, not appended"
    assert not any(r["messages"][0]["content"] in PROSE_PROMPTS for r in evl)  # eval is the task only
    again = prepare_dataset(cfg, tmp_path / "b")
    assert _rows(again.train_path) == train  # seeded: the same mix every time
    plain = prepare_dataset(DataConfig(n_train=80, n_eval=10, replay=""), tmp_path / "c")
    assert plain.n_train == 80 and _rows(plain.eval_path) == evl
    with pytest.raises(ValueError, match="replay_fraction"):  # the typed config refuses it when built
        prepare_dataset(DataConfig(n_train=80, n_eval=10, replay="builtin:prose", replay_fraction=1.0), tmp_path)


def test_replay_auto_follows_the_base_model(tmp_path):
    from tasks.prepare_data import resolve_replay

    assert resolve_replay(DataConfig(), "tiny").replay == "builtin:prose"  # a tuneloop-built random-init base
    assert resolve_replay(DataConfig(), str(tmp_path)).replay == ""  # any other model: no guessing
    assert resolve_replay(DataConfig(replay=""), "tiny").replay == ""


def test_replay_file_rows_are_validated_and_sampled(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GOOD] * 8)
    evl = _write(tmp_path / "eval.jsonl", [{**GOOD, "answer": "four"}])
    other = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
    replay = _write(tmp_path / "replay.jsonl", other)
    info = prepare_dataset(DataConfig(train_file=str(train), eval_file=str(evl), replay=str(replay),
                                      replay_fraction=0.5), tmp_path / "c")
    rows = _rows(info.train_path)
    assert len(rows) == 16 and sum(r["messages"][0]["content"].startswith("q") for r in rows) == 8
    bad = _write(tmp_path / "bad.jsonl", [*other[:2], {"messages": [{"role": "user", "content": "x"}]}])
    cache = tmp_path / "bad-cache"
    with pytest.raises(DataValidationError, match=r"bad.jsonl:3: field 'messages\[0\].role'"):
        prepare_dataset(DataConfig(train_file=str(train), eval_file=str(evl), replay=str(bad)), cache)
    assert not cache.exists() or not any(cache.rglob("*.jsonl"))
