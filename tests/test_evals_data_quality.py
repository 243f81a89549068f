"""Data quality report: every check on a hand-built dataset with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from evals.builtin import builtin_benchmark
from evals.data_quality import DataQualityConfig, DataQualityError, check_training_data


class WordTokenizer:
    """Whitespace tokenizer with a growing vocab: enough to count and decode tokens."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inv: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab)
                self.inv[self.vocab[w]] = w
            out.append(self.vocab[w])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.inv[i] for i in ids) + " "


ROLES = {"system", "user", "assistant"}


def make_render(tok: WordTokenizer, train_on_assistant: bool = True):  # type: ignore[no-untyped-def]
    def render(messages: list[dict[str, str]]) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        weights: list[float] = []
        for m in messages:
            if m["role"] not in ROLES:
                raise KeyError(f"unknown role {m['role']!r}")
            ids = tok.encode(f"<|im_start|>{m['role']} {m['content']} <|im_end|>")
            w = 1.0 if (m["role"] == "assistant" and train_on_assistant) else 0.0
            tokens += ids
            weights += [0.0] + [w] * (len(ids) - 1)
        return tokens, weights

    return render


def conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def clean_set(n: int = 20) -> list[list[dict[str, str]]]:
    return [conv(f"Tell me fact number {i} about otters please", f"Otters hold hands fact {i} is true") for i in range(n)]


def test_clean_set_writes_report(tmp_path: Path) -> None:
    tok = WordTokenizer()
    data = clean_set()
    rep = check_training_data(data, tok, make_render(tok), tmp_path, eval_sets={"arith": builtin_benchmark("arithmetic", 20)})
    assert rep.blocking == [] and rep.problems == []
    # Known counts: user turn = 10 tokens (weight 0), assistant turn = 9 tokens, 8 of them weighted.
    assert rep.stats["tokens_total"] == 20 * 19 and rep.stats["tokens_weighted"] == 20 * 8
    assert rep.stats["weighted_token_share"] == pytest.approx(8 / 19)
    assert rep.stats["length_min"] == rep.stats["length_max"] == 19
    shown = rep.stats["rendered_example"]
    assert [w for _, w in shown] == [0.0] * 10 + [0.0] + [1.0] * 8
    assert shown[11][0].strip() == "Otters"
    img = mpimg.imread(tmp_path / "token_lengths.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    page = (tmp_path / "data_quality.html").read_text()
    assert "token_lengths.png" in page and page.count("class='w'") == 8
    assert json.loads((tmp_path / "data_quality.json").read_text())["blocking"] is False


def test_zero_loss_weights_block(tmp_path: Path) -> None:
    tok = WordTokenizer()
    with pytest.raises(DataQualityError, match="no token has a positive loss weight"):
        check_training_data(clean_set(), tok, make_render(tok, train_on_assistant=False), tmp_path)
    saved = json.loads((tmp_path / "data_quality.json").read_text())  # the report exists despite the raise
    assert saved["blocking"] and saved["stats"]["weighted_token_share"] == 0.0


def test_duplicates_empty_overlong_render_errors(tmp_path: Path) -> None:
    tok = WordTokenizer()
    data = clean_set(20)
    data += [data[3], data[3], [{"role": "user", "content": "  "}], [{"role": "robot", "content": "beep"}]]
    data += [conv("long " * 50, "answer")]
    cfg = DataQualityConfig(max_tokens=40, max_duplicate_fraction=0.5, max_overlong_fraction=0.5)
    rep = check_training_data(data, tok, make_render(tok), tmp_path, config=cfg, raise_on_blocking=False)
    by = {p.check: p for p in rep.problems}
    assert by["duplicates"].severity == "warning" and rep.stats["n_duplicates"] == 2
    assert "[3, 20, 21]" in by["duplicates"].message
    assert by["empty"].severity == "error" and "22" in by["empty"].message
    assert by["render"].severity == "error" and "example 23: KeyError" in by["render"].message
    assert by["overlong"].severity == "warning" and rep.stats["n_overlong"] == 1 and "24" in by["overlong"].message
    assert rep.stats["n_no_weight"] == 1  # the empty user-only example has no assistant tokens
    with pytest.raises(DataQualityError) as ei:
        check_training_data(data, tok, make_render(tok), tmp_path, config=DataQualityConfig(max_tokens=40))
    msg = str(ei.value)
    assert "[duplicates]" in msg and "[overlong]" in msg and "[render]" in msg and "data_quality.html" in msg


def test_contamination_with_every_eval_set(tmp_path: Path) -> None:
    tok = WordTokenizer()
    arith = builtin_benchmark("arithmetic", 30)
    held = builtin_benchmark("heldout_text", 10)
    leaked_q = arith.examples[7].messages[0]["content"]  # a short prompt (< 13 words): whole-text match
    words = str(held.examples[2].target).split()
    leaked_span = " ".join(words[3:3 + 13])  # a 13-word window inside a longer text
    data = clean_set(10) + [conv(leaked_q, "42")] + [conv("Please continue: " + leaked_span + " and so on", "ok")]
    rep = check_training_data(data, tok, make_render(tok), tmp_path, raise_on_blocking=False,
                              eval_sets={"arithmetic": arith, "heldout": held, "clean": ["nothing in common here"]})
    cont = rep.stats["contamination"]
    assert cont["arithmetic"]["contaminated"] == 1 and cont["arithmetic"]["examples"][0] == {
        "eval_index": 7, "train_index": 10, "eval_text": leaked_q}
    assert cont["heldout"]["contaminated"] >= 1
    assert any(e["eval_index"] == 2 and e["train_index"] == 11 for e in cont["heldout"]["examples"])
    assert cont["clean"]["contaminated"] == 0
    assert sum(p.check == "contamination" and p.severity == "error" for p in rep.problems) == 2
    # A 12-word overlap is below the 13-gram threshold: not flagged.
    short = " ".join(words[3:3 + 12])
    rep2 = check_training_data(clean_set(5) + [conv(short, "ok")], tok, make_render(tok), tmp_path,
                               eval_sets={"heldout": held}, raise_on_blocking=False)
    assert rep2.stats["contamination"]["heldout"]["contaminated"] == 0
