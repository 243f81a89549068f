"""Render + tokenize a dataset with `datasets.map` into a memory-mapped Arrow cache; training reads from it.

    ts = tokenize_cached("train.parquet", tokenizer, "chat_template", "last_assistant_message", 128, cache_root)
    datums = ts.datums(batch_indices(step, batch_size, len(ts), seed))     # only this batch is materialised

Features:
- `map(batched=True, num_proc=N)` renders and tokenizes; rows become `input_ids` (int32), `weights`
  (float32), `length`, `row` (+ `id` when the source has one), written by the map straight into the entry's
  Arrow file(s) and read back memory-mapped: RSS does not grow with the dataset, and nothing is copied.
- The cache key is the source's content hash / `datasets` fingerprint + column mapping + renderer +
  tokenizer (vocab, template, special tokens) + train_on_what + format version: a changed input or a config
  that changes tokens is a miss, an identical rerun a hit. `max_length` is checked on every call (hit or
  miss: one Arrow max over `length`) but is not in the key: rows are refused, never truncated. An entry is
  published by an atomic rename, so a crashed build is never read.
- `render_batch`: the chat_template renderer's spans (jinja, per row) with one batched Rust encode per map
  batch, token for token equal to `renderer.build_supervised_example` (self-checked on the first row of
  every batch; on any mismatch it falls back to the renderer). Other renderers run per row.
- Validation runs inside the map (one pass): schema (`validate_fn`), renderability, weights (some weight,
  EOS trained); then over-long rows are found from the Arrow `length` column. Errors name the row (file:line
  for JSONL, file row i otherwise) and the entry is published only when all passed.

Trade-off: the render of each row still calls jinja (the template is the source of truth); the speed-up
over per-row `build_supervised_example` comes from the batched encode and from not keeping Python lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data_io import chat_validator, load_rows, normalize_turns, resolve_source, source_fingerprint

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_MAP_BATCH = 512


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary + normalisation + template + special tokens: anything that changes the tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def render_batch(renderer: Any, messages_list: list[list[dict[str, Any]]], train_on_what: str
                 ) -> list[tuple[list[int], list[float]]]:
    """(tokens, weights) of each conversation, equal to `renderer.build_supervised_example` for each."""
    from training_core.renderer_base import TrainOnWhat, check_messages, is_trained_turn
    from training_core.renderers import ChatTemplateRenderer

    tow = TrainOnWhat(train_on_what)
    backend = getattr(renderer.tokenizer, "_tokenizer", None) if isinstance(renderer, ChatTemplateRenderer) \
        else None
    if backend is None or tow == TrainOnWhat.ALL_MESSAGES or not messages_list:
        return [renderer.build_supervised_example(m, tow) for m in messages_list]
    fast = _fast_renderer(renderer)
    spans = []
    for msgs in messages_list:
        check_messages(msgs)
        full, ends = fast._message_ends(msgs)  # the renderer's own (prefix-checked) turn boundaries
        turns = [(fast._output_start(msgs, i, full, ends[i - 1] if i > 0 else 0, ends[i]), ends[i])
                 for i in range(len(msgs)) if is_trained_turn(msgs, i, tow)]
        spans.append((full, turns))
    encs = backend.encode_batch([f for f, _ in spans], add_special_tokens=False)
    stops = set(renderer._stop_ids)
    out = []
    for (_, turns), enc in zip(spans, encs, strict=True):
        tokens, offsets = list(enc.ids), enc.offsets
        weights = [0.0] * len(tokens)
        for s, e in turns:
            idx = [j for j, (a, b) in enumerate(offsets) if (a < e and b > s) or (a == b and s <= a < e)]
            stop_pos = [j for j in idx if tokens[j] in stops]
            if stop_pos:
                idx = [j for j in idx if j <= stop_pos[-1]]
            for j in idx:
                weights[j] = 1.0
        out.append((tokens, weights))
    # Self-check: the first row must equal the renderer's (a tokenizer wrapper with extra pre-processing,
    # a header token spanning into the content: fall back to the reference implementation).
    if out[0] != tuple(renderer.build_supervised_example(messages_list[0], tow)):
        log.warning("batched render differs from %s.build_supervised_example: per-row render", renderer.name)
        return [renderer.build_supervised_example(m, tow) for m in messages_list]
    return out


def _fast_renderer(renderer: Any) -> Any:
    """A shallow copy of a ChatTemplateRenderer whose template render skips `apply_chat_template`'s per-call
    set-up (half the cost) for plain `{role, content: str}` turns: the compiled jinja template gets what
    `apply_chat_template` gives it (messages, add_generation_prompt, tools/documents None, special tokens).
    Everything else (prefix checks, spans) is the renderer's own code; `render_batch` self-checks the result."""
    import copy

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(renderer.tokenizer.chat_template)
    except Exception:  # noqa: BLE001 - another transformers version: the renderer as is
        return renderer
    kwargs = dict(getattr(renderer.tokenizer, "special_tokens_map", {}))
    slow = renderer._render

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        if all(len(m) == 2 and isinstance(m.get("content"), str) and "role" in m for m in messages):
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
        return slow(messages, add_generation_prompt)

    fast = copy.copy(renderer)
    fast._render = render
    return fast


@dataclass
class TokenizedSet:
    """A tokenized dataset in the Arrow cache; `datums(indices)` builds only the asked rows."""

    dir: str
    key: str
    n: int
    cached: bool
    max_tokens: int
    _ds: Any = None

    def __len__(self) -> int:
        return self.n

    @property
    def dataset(self) -> Any:
        if self._ds is None:
            import datasets

            shards = sorted(Path(self.dir).glob("data*.arrow"))  # one per map process
            parts = [datasets.Dataset.from_file(str(p)) for p in shards]  # memory-mapped
            self._ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return self._ds

    def examples(self, indices: list[int]) -> list[tuple[list[int], list[float]]]:
        batch = self.dataset.select_columns(["input_ids", "weights"])[indices]
        return list(zip(batch["input_ids"], batch["weights"], strict=True))

    def datums(self, indices: list[int]) -> list[Any]:
        from training_core.renderers import datum_from_tokens_weights

        return [datum_from_tokens_weights(t, w) for t, w in self.examples(indices)]


def cache_key(fingerprint: str, tokenizer: Any, renderer: str, train_on_what: str,
              columns: dict[str, str] | None = None, need_answer: bool = False) -> str:
    """Everything the tokens depend on. Not `max_length`: rows are never truncated (an over-long row is
    refused), so the same entry serves every limit and the length check runs on hits too."""
    blob = {"v": CACHE_VERSION, "data": fingerprint, "tok": tokenizer_fingerprint(tokenizer), "renderer": renderer,
            "train_on_what": train_on_what, "columns": dict(sorted((columns or {}).items())),
            "need_answer": need_answer}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def _map_fn(renderer_name: str, tokenizer: Any, train_on_what: str, need_answer: bool, validate: bool) -> Any:
    """The `map` function: validate each row, render + tokenize the batch, check its weights; a bad row is
    named `<row i>` here (cheap) and located (file:line / file row i) by `tokenize_cached`."""
    from training_core.renderers import get_renderer, validate_supervised_batch

    state: dict[str, Any] = {}
    check = chat_validator(need_answer)

    def fn(batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[Any]]:
        if "r" not in state:  # built once per worker process
            r = state["r"] = get_renderer(renderer_name, tokenizer)
            state["eos"] = r.get_end_of_turn_sequences() if hasattr(r, "get_end_of_turn_sequences") \
                else r.get_stop_sequences()
        cols = list(batch)
        msgs = []
        for j, i in enumerate(idx):
            row = {c: batch[c][j] for c in cols if batch[c][j] is not None}
            msgs.append(check(row, f"<row {i}>")["messages"] if validate else normalize_turns(row["messages"]))
        try:
            ex = render_batch(state["r"], msgs, train_on_what)
        except ValueError:  # the renderer refused a row: find which, and name it
            for i, m in zip(idx, msgs, strict=True):
                try:
                    state["r"].build_supervised_example(m, train_on_what)
                except ValueError as e:
                    raise _bad(f"<row {i}>: field 'messages': cannot be rendered: {e}") from None
            raise
        try:
            validate_supervised_batch(ex, state["eos"], [f"<row {i}>" for i in idx])
        except ValueError as e:
            raise _bad(str(e)) from None
        return {"input_ids": [t for t, _ in ex], "weights": [w for _, w in ex], "length": [len(t) for t, _ in ex],
                "row": idx}

    return fn


def _bad(msg: str) -> Exception:
    from tasks.prepare_data import DataValidationError

    return DataValidationError(msg)


def tokenize_cached(spec: str, tokenizer: Any, renderer_name: str, train_on_what: str, max_length: int,
                    cache_root: str | Path, columns: dict[str, str] | None = None, num_proc: int = 1,
                    need_answer: bool = False, validate: bool = True) -> TokenizedSet:
    """The tokenized Arrow cache entry of `spec` (built on a miss); raises DataValidationError on bad rows."""
    from tasks.prepare_data import DataValidationError

    root = Path(cache_root) / "tokenized"
    ds_cache = Path(cache_root) / "hf"
    src = resolve_source(spec, ds_cache)
    # a file is keyed by its bytes before anything is parsed (a hit costs one hash); a directory or a hub
    # dataset by the fingerprint of the loaded dataset
    ds = None if src.path and Path(src.path).is_file() else load_rows(src, columns, None, cache_dir=ds_cache)
    key = cache_key(source_fingerprint(src, ds), tokenizer, renderer_name, train_on_what, columns, need_answer)
    d = root / key
    if (d / "tuneloop_meta.json").is_file():
        meta = json.loads((d / "tuneloop_meta.json").read_text())
        log.info("tokenized cache hit %s", d)
        hit = TokenizedSet(str(d), key, meta["n"], True, meta["max_tokens"])
        if max_length and hit.max_tokens > max_length:
            _refuse_overlong(hit.dataset.data.column("length"), max_length, src)
        return hit
    t0 = time.time()
    if ds is None:
        ds = load_rows(src, columns, None, cache_dir=ds_cache)
    keep = [c for c in ("id",) if c in ds.column_names]
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # every row is validated inside the map (one pass over the data); the entry is published only after
    # the whole map and the length check succeeded, so a bad dataset leaves no cache entry
    try:
        tok_ds = ds.map(_map_fn(renderer_name, tokenizer, train_on_what, need_answer, validate), batched=True,
                        batch_size=_MAP_BATCH, with_indices=True, num_proc=num_proc if num_proc > 1 else None,
                        remove_columns=[c for c in ds.column_names if c not in keep],
                        features=_features(keep), desc="render+tokenize",
                        cache_file_name=str(tmp / "data.arrow"),  # written in place: the entry's own file
                        new_fingerprint=key)  # the cache key: no dill hashing of the function (it printed bytecode)
    except Exception as e:  # noqa: BLE001 - also datasets' wrapper of a worker's error: find ours
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e)
        if "<row " not in msg:
            raise
        raise DataValidationError(re.sub(r"<row (\d+)>", lambda m: locate(src, int(m.group(1))), msg)) from None
    import pyarrow.compute as pc

    lengths_N = tok_ds.data.column("length")  # the Arrow column itself: no Python list of 1M ints
    len_col = int(pc.max(lengths_N).as_py() or 0)
    if max_length and len_col > max_length:
        shutil.rmtree(tmp, ignore_errors=True)
        _refuse_overlong(lengths_N, max_length, src)
    (tmp / "tuneloop_meta.json").write_text(json.dumps({"n": len(tok_ds), "max_tokens": len_col, "spec": spec,
                                                        "renderer": renderer_name, "max_length": max_length}))
    try:
        os.replace(tmp, d)  # atomic publish: readers see a whole entry or none
    except OSError:  # another process published the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenized %d rows of %s in %.1fs -> %s", len(tok_ds), spec, time.time() - t0, d)
    return TokenizedSet(str(d), key, len(tok_ds), False, len_col)


def _refuse_overlong(lengths_N: Any, max_length: int, src: Any) -> None:
    import pyarrow.compute as pc

    from tasks.prepare_data import DataValidationError

    over_N = pc.greater(lengths_N, max_length)
    first = int(pc.index(over_N, True).as_py())
    raise DataValidationError(f"{int(pc.sum(over_N).as_py())} examples exceed data.max_length={max_length} "
                              f"tokens (e.g. {locate(src, first)}); raise max_length or shorten them: "
                              f"truncation would drop the EOS")


def locate(src: Any, index: int) -> str:
    """Row `index` as the user finds it: `file:line` for JSONL, `file row i` otherwise."""
    from tasks.data_io import _jsonl_line_of

    return src.where(index, _jsonl_line_of(src.path, index) if src.kind == "jsonl" else None)


def _features(keep: list[str]) -> Any:
    import datasets

    f = {"input_ids": datasets.Sequence(datasets.Value("int32")), "weights": datasets.Sequence(
        datasets.Value("float32")), "length": datasets.Value("int32"), "row": datasets.Value("int64")}
    if keep:
        f["id"] = datasets.Value("string")
    return datasets.Features(f)
