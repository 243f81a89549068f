"""The engine: one base model per process, many LoRA adapters on it, one ordered worker thread.

Several training/sampling clients on the same base share its weights (peft multi-adapter); memory grows
by adapters, not by bases. All model work runs on the engine's worker, so calls from different clients are
serialized and each call activates its own adapter first.

Packed rows: a datum may carry an optional `segment_ids` entry in `loss_fn_inputs` (one int per token; a
new sequence starts wherever the id changes). Such a datum holds several sequences: each gets its own causal
block and positions from 0 (generic path: a 4-D block mask + `position_ids`; fast path: the same in
`fast_train`), so its per-token logprobs equal the unpacked ones. `segment_ids` is not a loss input (the
losses never see it); a datum without it in a packed batch is one sequence. Batches without any
`segment_ids` (every Tinker client) run exactly the unpacked code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training_core import losses
from training_core.futures import APIFuture, OrderedWorker
from training_core.model_loading import LoadedBase, load_base, lora_target_modules
from training_core.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig, TensorData

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A request is malformed (bad token ids, lengths, loss inputs); raised before any compute."""


class NonFiniteError(RuntimeError):
    """A loss or gradient is NaN/inf: the step was refused, so the adapter and its Adam state stay as they were."""


# loss_fn_inputs a datum may leave out while others in its batch carry them: the value a missing one means.
# `weights` missing means "every token counts" (Tinker's cross_entropy), so a mixed batch must not drop them all.
INPUT_DEFAULTS: dict[str, float] = {"weights": 1.0}
# loss_fn_inputs that describe the model input rather than the loss: read by `target_logprobs`, never passed on.
LAYOUT_INPUTS = frozenset({"segment_ids"})


@dataclass
class AdapterState:
    name: str
    lora: LoraConfig
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.AdamW | None = None
    step: int = 0  # optimizer steps applied so far
    pending_grads: bool = False
    version: int = 0  # bumped whenever the weights change (optimizer step, load): keys the sampler's caches
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Owns a base model, its adapters and the worker that runs all compute on them."""

    def __init__(self, base: LoadedBase, compute_dtype: str = "float32") -> None:
        self.base = base
        self.compute_dtype = compute_dtype
        self.model: nn.Module = base.model
        self.adapters: dict[str, AdapterState] = {}
        self.worker = OrderedWorker(f"tuneloop-engine:{base.name}")
        self._ids = itertools.count()
        self._fast_ok: bool | None = None  # decided on first use (see `_use_fast_path`)
        self._zombie: str | None = None  # a removed adapter peft still holds (see `remove_adapter`)
        self._linear_leaves = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ---- adapters ------------------------------------------------------------------------------
    def new_adapter_name(self, prefix: str = "lora") -> str:
        return f"{prefix}{next(self._ids)}"

    def add_adapter(self, name: str, lora: LoraConfig) -> AdapterState:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        targets = lora_target_modules(self._linear_leaves, lora.train_attn, lora.train_mlp, lora.train_unembed)
        cfg = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        seed = lora.seed if lora.seed is not None else 0
        with torch.random.fork_rng():  # adapter init never perturbs the caller's RNG stream
            torch.manual_seed(seed)
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, cfg)
            else:
                self.model = get_peft_model(self.model, cfg, adapter_name=name)
        if self._zombie is not None:  # another adapter exists now: the last removed one can really go
            zombie, self._zombie = self._zombie, None
            self._delete_peft_adapter(zombie)
        params = {n: p for n, p in self.model.named_parameters() if f".{name}." in n}
        for p in params.values():
            p.data = p.data.float()  # adapters train in fp32 even over a bf16 base
        st = AdapterState(name=name, lora=lora, params=params)
        self.adapters[name] = st
        return st

    def remove_adapter(self, name: str) -> None:
        """Free adapter `name`: its LoRA weights, gradients, Adam moments and cached sampling weights."""
        from peft import PeftModel

        from training_core import sampling_decoders

        st = self.adapters.pop(name, None)
        if st is None:
            return
        # Drop our references first, so the memory goes even if peft's delete below fails.
        if st.optimizer is not None:
            st.optimizer.state.clear()
        st.optimizer = None
        for p in st.params.values():
            p.grad = None
        st.params.clear()
        sampling_decoders.forget(self.model, name)
        if not isinstance(self.model, PeftModel) or name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            # peft cannot hold zero adapters (its `active_adapter` would name a deleted one, and base-model
            # sampling through `disable_adapter` fails): keep this one's LoRA weights until the next adapter
            # is added. Bounded: at most one adapter's weights, never its gradients or Adam state.
            self._zombie = name
            return
        self._delete_peft_adapter(name)

    def _delete_peft_adapter(self, name: str) -> None:
        try:
            with warnings.catch_warnings():  # deleting the active adapter is routine here: we re-point below
                warnings.filterwarnings("ignore", message=r".*was active which is now deleted")
                self.model.delete_adapter(name)
        except Exception:  # runs in finalizers too, where nobody reads an exception: say it here
            log.exception("engine %s: could not delete adapter %s from the model", self.base.name, name)
            raise
        # peft re-points its own `active_adapter` only in some cases; a stale one breaks `disable_adapter`
        if self.model.active_adapter not in self.model.peft_config:
            self.model.active_adapter = next(iter(self.model.peft_config))

    def weights_key(self, adapter: str | None) -> tuple[str | None, Any]:
        """(adapter, version): the version changes whenever the weights `adapter` computes with change.

        None is the base model, whose weights the engine never changes. The explicit counter covers optimizer
        steps and loads (fused AdamW does not bump tensors' `_version`); data_ptr / `_version` cover code that
        edits the parameters in place or swaps their storage.
        """
        if adapter is None:
            return None, 0
        st = self.adapters[adapter]
        return adapter, (st.version, tuple((p.data_ptr(), p._version) for p in st.params.values()))

    def activate(self, name: str | None) -> contextlib.AbstractContextManager[Any]:
        """Select adapter `name` (None = the bare base model) for the next computation."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.base_model.set_adapter(name)
        for n, p in self.model.named_parameters():  # peft toggles requires_grad; keep only this adapter live
            p.requires_grad_(f".{name}." in n)
        return contextlib.nullcontext()

    def submit(self, fn: Callable[[], Any]) -> APIFuture[Any]:
        return self.worker.submit(fn)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, data: list[Datum], loss_fn: str | None) -> None:
        if not data:
            raise InputError("empty batch: forward_backward needs at least one Datum")
        vocab, max_len = self.base.vocab_size, self.base.max_length
        need = losses.LOSS_INPUTS.get(loss_fn, ("target_tokens",)) if loss_fn else ("target_tokens",)
        for i, d in enumerate(data):
            toks = d.model_input.to_ints()
            T = len(toks)
            if T == 0:
                raise InputError(f"datum {i}: empty model_input")
            if T > max_len:
                raise InputError(f"datum {i}: {T} tokens exceed the model's context of {max_len}")
            bad = [(j, t) for j, t in enumerate(toks) if not 0 <= t < vocab]
            if bad:
                raise InputError(f"datum {i}: token id {bad[0][1]} at position {bad[0][0]} outside vocab [0, {vocab})")
            for key in need:
                if key not in d.loss_fn_inputs:
                    raise InputError(f"datum {i}: loss_fn_inputs is missing {key!r} (needed by {loss_fn})")
            for key, td in d.loss_fn_inputs.items():
                n = len(td.data)
                if n != T:
                    raise InputError(f"datum {i}: loss_fn_inputs[{key!r}] has {n} values, model_input has {T} tokens")
            tgt = d.loss_fn_inputs["target_tokens"].data
            badt = [t for t in tgt if not 0 <= int(t) < vocab]
            if badt:
                raise InputError(f"datum {i}: target token id {badt[0]} outside vocab [0, {vocab})")
            seg = d.loss_fn_inputs.get("segment_ids")
            if seg is not None and (seg.dtype != "int64" or min(seg.data) < 0):
                raise InputError(f"datum {i}: loss_fn_inputs['segment_ids'] must be non-negative integers")

    # ---- compute -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _use_fast_path(self) -> bool:
        """bf16 compute over bf16 base weights on a supported architecture: the fused path of `fast_train`."""
        if self._fast_ok is None:
            from training_core import fast_train

            try:
                fast_train.check_supported(self.model)
                emb = self.model.get_input_embeddings().weight
                self._fast_ok = self.compute_dtype == "bfloat16" and emb.dtype == torch.bfloat16
            except fast_train.Unsupported as e:
                log.info("engine %s: generic compute path (%s)", self.base.name, e)
                self._fast_ok = False
        return self._fast_ok

    def target_logprobs(
        self, data: list[Datum], adapter: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token logprobs of targets, `lp_B_T` (right-padded) and the validity mask `mask_B_T`."""
        B = len(data)
        lens = [d.model_input.length for d in data]
        T = max(lens)
        pad = int(self.base.tokenizer.pad_token_id or 0)
        tokens_B_T = torch.full((B, T), pad, dtype=torch.long)
        targets_B_T = torch.zeros((B, T), dtype=torch.long)
        for i, d in enumerate(data):
            n = lens[i]
            tokens_B_T[i, :n] = torch.as_tensor(d.model_input.to_ints(), dtype=torch.long)
            targets_B_T[i, :n] = torch.as_tensor(d.loss_fn_inputs["target_tokens"].data, dtype=torch.long)
        mask_B_T = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
        segs_B_T = packed_segments(data, T)  # None unless some datum is a packed row
        if self._use_fast_path():
            from training_core import fast_train

            try:
                lp_B_T = fast_train.target_logprobs(self.model, adapter, tokens_B_T, targets_B_T, segs_B_T)
                return lp_B_T * mask_B_T, mask_B_T
            except fast_train.Unsupported as e:  # e.g. an adapter on the embedding: generic path from now on
                log.info("engine %s: generic compute path (%s)", self.base.name, e)
                self._fast_ok = False
        with self._autocast():
            if segs_B_T is None:
                logits_B_T_V = self.model(input_ids=tokens_B_T, attention_mask=mask_B_T.long()).logits
            else:
                from training_core.fast_train import block_causal_mask, segment_positions, segment_runs

                runs_B_T = segment_runs(segs_B_T)
                logits_B_T_V = self.model(input_ids=tokens_B_T, attention_mask=block_causal_mask(runs_B_T)[:, None],
                                          position_ids=segment_positions(runs_B_T)).logits
        V = logits_B_T_V.shape[-1]
        lp_B_T = -torch.nn.functional.cross_entropy(
            logits_B_T_V.float().reshape(-1, V), targets_B_T.reshape(-1), reduction="none"
        ).reshape(B, T)
        return lp_B_T * mask_B_T, mask_B_T

    @staticmethod
    def split(lp_B_T: torch.Tensor, data: list[Datum]) -> list[torch.Tensor]:
        return [lp_B_T[i, : d.model_input.length] for i, d in enumerate(data)]

    @staticmethod
    def flat_inputs(data: list[Datum]) -> dict[str, torch.Tensor]:
        """Each loss input over all datums' tokens, concatenated; checked for NaN/inf (which would poison Adam).

        A key some datums leave out takes its documented default there (`INPUT_DEFAULTS`: missing `weights`
        is all ones); any other key must be given by every datum or none, else `InputError`.
        """
        keys = sorted(set().union(*(d.loss_fn_inputs.keys() for d in data)) - LAYOUT_INPUTS)
        out = {}
        for k in keys:
            parts = []
            for i, d in enumerate(data):
                td = d.loss_fn_inputs.get(k)
                if td is not None:
                    parts.append(td.to_torch().reshape(-1).float())
                elif k in INPUT_DEFAULTS:
                    parts.append(torch.full((d.model_input.length,), INPUT_DEFAULTS[k]))
                else:
                    have = next(j for j, e in enumerate(data) if k in e.loss_fn_inputs)
                    raise InputError(f"datum {i}: loss_fn_inputs has no {k!r} while datum {have} has one; "
                                     f"give {k!r} to every datum of the batch or to none")
            flat = torch.cat(parts)
            if k != "target_tokens" and not bool(torch.isfinite(flat).all()):
                lens = torch.tensor([len(p) for p in parts])
                bad = int(torch.searchsorted(lens.cumsum(0), int((~torch.isfinite(flat)).nonzero()[0]), right=True))
                raise InputError(f"datum {bad}: loss_fn_inputs[{k!r}] holds NaN or inf")
            out[k] = flat
        return out

    def forward_backward(
        self, adapter: str | None, data: list[Datum], loss_fn: str, cfg: dict[str, float] | None, backward: bool
    ) -> ForwardBackwardOutput:
        losses.check_loss_fn(loss_fn, cfg)
        self.validate(data, loss_fn)
        inputs = self.flat_inputs(data)  # before any compute: a malformed batch costs nothing
        with self.activate(adapter):
            grad_ctx = contextlib.nullcontext() if backward else torch.no_grad()
            with grad_ctx:
                lp_B_T, _ = self.target_logprobs(data, adapter)
                lp_list = self.split(lp_B_T, data)
                loss = losses.compute_loss(loss_fn, torch.cat(lp_list), inputs, cfg)
                if backward:
                    self._check_loss(adapter, loss)
                    loss.backward()
                    self.adapters[adapter].pending_grads = True  # type: ignore[index]
        return self._output(lp_list, {"loss:sum": float(loss.detach())})

    def forward_backward_custom(
        self, adapter: str, data: list[Datum], fn: Callable[[list[Datum], list[torch.Tensor]], Any]
    ) -> ForwardBackwardOutput:
        """User loss on logprobs with autograd, in one forward pass (Tinker needs two)."""
        self.validate(data, None)
        with self.activate(adapter):
            lp_B_T, _ = self.target_logprobs(data, adapter)
            lp_list = self.split(lp_B_T, data)
            loss, metrics = fn(data, lp_list)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise InputError("forward_backward_custom: the loss function must return (scalar tensor, metrics dict)")
            self._check_loss(adapter, loss)
            loss.backward()
            self.adapters[adapter].pending_grads = True
        out = {f"{k}" if ":" in k else f"{k}:sum": float(v) for k, v in (metrics or {}).items()}
        out["loss:sum"] = float(loss.detach())
        return self._output(lp_list, out)

    def _check_loss(self, adapter: str | None, loss: torch.Tensor) -> None:
        # A NaN/inf loss would put NaN in every gradient it reaches: refuse before backward, so the
        # gradients accumulated so far (and the weights) stay usable. One scalar check per call.
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(f"forward_backward on adapter {adapter}: the loss is {float(loss.detach())}; "
                                 "no gradient was accumulated (check the loss inputs and the learning rate)")

    @staticmethod
    def _output(lp_list: list[torch.Tensor], metrics: dict[str, float]) -> ForwardBackwardOutput:
        outs = [{"logprobs": TensorData.from_torch(lp.detach())} for lp in lp_list]
        return ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outs, metrics=metrics)

    def optim_step(self, adapter: str, adam: AdamParams) -> dict[str, float]:
        st = self.adapters[adapter]
        params = list(st.params.values())
        hp = {"learning_rate": adam.learning_rate, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps,
              "weight_decay": adam.weight_decay, "grad_clip_norm": adam.grad_clip_norm or 0.0}
        bad_hp = {k: v for k, v in hp.items() if not math.isfinite(float(v))}
        if bad_hp:
            raise InputError(f"optim_step: AdamParams {bad_hp} must be finite")
        if st.optimizer is None:
            st.optimizer = torch.optim.AdamW(params, lr=adam.learning_rate, fused=True)
        for g in st.optimizer.param_groups:
            # fused: one kernel for all adapter tensors (CPU AdamW otherwise loops over them op by op);
            # also set on optimizers rebuilt by a checkpoint load, so a resumed run does the same math
            g.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                     weight_decay=adam.weight_decay, fused=True, foreach=False)
        metrics: dict[str, float] = {}
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            # The total norm clipping needs anyway: one reduction, and NaN/inf anywhere makes it non-finite.
            norm = torch.nn.utils.get_total_norm(grads)
            if not bool(torch.isfinite(norm)):
                st.optimizer.zero_grad(set_to_none=True)
                st.pending_grads = False
                raise NonFiniteError(f"optim_step on adapter {adapter} refused: the gradient norm is {float(norm)}; "
                                     f"weights, Adam state and step ({st.step}) are unchanged, gradients discarded")
            if adam.grad_clip_norm and adam.grad_clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, norm)
                metrics["grad_norm:mean"] = float(norm)
        elif adam.grad_clip_norm and adam.grad_clip_norm > 0:
            metrics["grad_norm:mean"] = 0.0
        if not st.pending_grads:
            log.warning("optim_step on adapter %s with no accumulated gradients", adapter)
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        st.pending_grads = False
        st.step += 1
        st.version += 1
        metrics["step:max"] = float(st.step)
        return metrics


def packed_segments(data: list[Datum], T: int) -> torch.Tensor | None:
    """`segs_B_T` of a batch with packed rows (-1 on padding; a datum without `segment_ids` is one sequence),
    or None when no datum has `segment_ids` (the unpacked path)."""
    if not any("segment_ids" in d.loss_fn_inputs for d in data):
        return None
    segs_B_T = torch.full((len(data), T), -1, dtype=torch.long)
    for i, d in enumerate(data):
        td = d.loss_fn_inputs.get("segment_ids")
        n = d.model_input.length
        segs_B_T[i, :n] = torch.as_tensor(td.data, dtype=torch.long) if td is not None else 0
    return segs_B_T


_ENGINES: dict[tuple[str, str], Engine] = {}
_LOCK = threading.Lock()


def get_engine(base_model: str, compute_dtype: str = "float32", load_dtype: str = "float32") -> Engine:
    """The process-wide engine for `base_model` (created on first use, then shared)."""
    key = (base_model, f"{load_dtype}/{compute_dtype}")
    with _LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = Engine(load_base(base_model, load_dtype), compute_dtype=compute_dtype)
            _ENGINES[key] = eng
        return eng


def iter_engines() -> Iterator[Engine]:
    return iter(list(_ENGINES.values()))
