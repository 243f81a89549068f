"""The distillation recipe: the reverse-KL advantage, the tokenizer check, both modes improving a student on a
short run, exact resume, and prompt-only data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from infra.config import BadInputError
from recipes.distill import (
    ModelRef,
    check_same_tokenizer,
    gap_closed,
    heldout_reverse_kl,
    reference_models,
    resolve_model,
    reverse_kl_advantages,
    skill_benchmark,
    train_distill,
)
from recipes.distill_config import DistillConfig
from recipes.prompt_data import PromptDataError, load_prompts


def test_reverse_kl_advantage_equals_the_formula() -> None:
    student_lp = torch.tensor([-0.5, -2.0, -0.1, -3.0, -1.0])
    teacher_lp = torch.tensor([-1.5, -0.5, -0.1, -4.0, -0.25])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    # reverse KL per token = (lp_s - lp_t) * mask = [1.0, -1.5, 0.0, 1.0, 0]; A = -coef * rkl with coef 0.5
    adv, rkl = reverse_kl_advantages(student_lp, teacher_lp, mask, kl_coef=0.5, discount=0.0)
    assert rkl.tolist() == [1.0, -1.5, 0.0, 1.0, 0.0]
    assert adv.tolist() == [-0.5, 0.75, 0.0, -0.5, 0.0]
    # discounted: A_t = sum_{k>=t} 0.5**(k-t) a_k, by hand from the end: -0.5, -0.25, 0.75 - 0.125, ...
    adv_d, _ = reverse_kl_advantages(student_lp, teacher_lp, mask, kl_coef=0.5, discount=0.5)
    expected = [-0.5 + 0.5 * (0.75 + 0.5 * (0.0 + 0.5 * -0.5)), 0.75 + 0.5 * (0.0 + 0.5 * -0.5), 0.5 * -0.5,
                -0.5, 0.0]
    assert torch.allclose(adv_d, torch.tensor(expected), atol=1e-7, rtol=0)
    # a baseline b shifts every unmasked token's KL: A = -coef * (rkl - b)
    adv_b, _ = reverse_kl_advantages(student_lp, teacher_lp, mask, kl_coef=0.5, discount=0.0, baseline=0.25)
    assert adv_b.tolist() == [-0.375, 0.875, 0.125, -0.375, 0.0]


def test_gap_closed() -> None:
    assert gap_closed(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert gap_closed(0.0, 0.0, 1.0) == 0.0
    assert gap_closed(0.5, 0.7, 0.5) != gap_closed(0.5, 0.7, 0.5)  # NaN: no gap to close


def _other_tokenizer_model(tmp_path: Path, change: bool) -> str:
    from transformers import AutoTokenizer

    from training_core.presets import resolve_model_path

    d = tmp_path / ("changed" if change else "same")
    src = Path(resolve_model_path("tiny"))
    d.mkdir()
    for f in src.iterdir():  # the tokenizer files and config: the check never loads the weights
        if f.is_file() and f.suffix in (".json", ".txt", ".jinja", ".model"):
            shutil.copy(f, d / f.name)
    if change:
        tok = AutoTokenizer.from_pretrained(d)
        tok.add_tokens(["<|not-in-the-student|>"])
        tok.save_pretrained(d)
    return str(d)


def test_tokenizer_mismatch_is_refused_naming_both(tmp_path: Path) -> None:
    same = _other_tokenizer_model(tmp_path, change=False)
    check_same_tokenizer(resolve_model(same, tmp_path), ModelRef("tiny", "tiny"))  # same vocab, other dir: fine
    other = _other_tokenizer_model(tmp_path, change=True)
    with pytest.raises(BadInputError) as e:
        check_same_tokenizer(resolve_model(other, tmp_path), ModelRef("tiny", "tiny"))
    msg = str(e.value)
    assert other in msg and "'tiny'" in msg and "different tokenizers" in msg and "vocab 1025" in msg
    run = tmp_path / "run"
    cfg = DistillConfig(teacher=other, init_from="")
    with pytest.raises(BadInputError, match="different tokenizers"):
        train_distill(cfg, run)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # refused before any work


def test_prompt_sources(tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}], "answer": "x"}) + "\n"
                    + json.dumps({"prompt": "Reverse the digits 1234."}) + "\n"
                    + json.dumps({"prompt": "Reverse the digits 1234."}) + "\n")  # a duplicate: dropped
    rows = load_prompts(str(chat))
    assert [r.messages for r in rows] == [[{"role": "user", "content": "hi"}],
                                          [{"role": "user", "content": "Reverse the digits 1234."}]]
    assert rows[0].answer == "x" and rows[1].answer is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}))
    with pytest.raises(PromptDataError, match=r"bad.jsonl:2: field 'messages\[0\].role'"):
        load_prompts(str(bad))
    task = load_prompts("task:reverse", 5, seed=0, task_kwargs={"length": 4})
    assert len(task) == 5 and all(r.answer == r.messages[0]["content"][-5:-1][::-1] for r in task)
    train = {r.messages[0]["content"] for r in load_prompts("task:reverse", 1000, seed=0, task_kwargs={"length": 4})}
    held = {ex.messages[0]["content"] for ex in skill_benchmark(DistillConfig(), 200).examples}
    assert len(train) == 1000 and len(held) == 200 and not train & held  # the skill benchmark is held out


# ---- short real runs ------------------------------------------------------------------------------------
STEPS = 20


def _cfg(tmp: Path, **kw: object) -> DistillConfig:
    cfg = DistillConfig()
    cfg.reference.cache_dir = str(tmp / "ref")
    cfg.reference.teacher_steps, cfg.reference.student_steps, cfg.reference.n_train = 60, 20, 500
    cfg.distill.prompts_per_step, cfg.distill.group_size = 4, 4
    for k, v in kw.items():
        section, _, name = k.partition("__")
        setattr(getattr(cfg, section) if name else cfg, name or section, v)
    return cfg


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("distill")
    reference_models(_cfg(tmp))
    return tmp


@pytest.mark.parametrize("mode", ["on_policy", "off_policy"])
def test_each_mode_improves_the_student(ref_dir: Path, tmp_path: Path, mode: str) -> None:
    cfg = _cfg(ref_dir, mode=mode, train__steps=STEPS)
    teacher, student = reference_models(cfg)
    kl_before = heldout_reverse_kl(cfg, teacher, student)
    res = train_distill(cfg, tmp_path / "run")
    kl_after = heldout_reverse_kl(cfg, teacher, res.checkpoint)
    print(mode, "held-out reverse KL", kl_before, "->", kl_after)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)  # measured: x0.81 off-policy, x0.83 on-policy
    rows = [json.loads(x) for x in Path(res.metrics_path).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["student_tokens"] == sum(r["step_tokens"] for r in rows)
    if mode == "on_policy":
        assert all(r["sample_tokens_per_s"] > 0 and r["teacher_tokens_per_s"] > 0 for r in rows)


def test_a_stopped_run_resumes_exactly(ref_dir: Path, tmp_path: Path) -> None:
    from training_core.state import read_trainer_state

    cfg = _cfg(ref_dir, train__steps=4, train__save_every=2, distill__prompts_per_step=2, distill__group_size=2)
    full = train_distill(cfg, tmp_path / "full")
    part = train_distill(cfg, tmp_path / "part", stop_after=3)  # checkpoint at 2, step 3 is lost
    assert part.checkpoint == "" and part.resumed_from == 0
    resumed = train_distill(cfg, tmp_path / "part")
    assert resumed.resumed_from == 2 and read_trainer_state(resumed.checkpoint)["step"] == 4
    a = _tensors(full.checkpoint)
    b = _tensors(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(x) for x in Path(full.metrics_path).read_text().splitlines()]
    rows_b = [json.loads(x) for x in Path(resumed.metrics_path).read_text().splitlines()]
    keep = ("step", "reverse_kl", "student_tokens", "is_loss_sum", "sample_score")
    assert [{k: r[k] for k in keep} for r in rows_a] == [{k: r[k] for k in keep} for r in rows_b]


def _tensors(ckpt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(f).items()})
    assert out, f"no tensors in {ckpt}"
    return out
