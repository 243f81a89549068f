"""One training session inside a worker rank: base model (+ LoRA), a DeepSpeed ZeRO engine, compute ops.

Runs only in worker processes (imports DeepSpeed). Model construction mirrors `Engine.add_adapter`, and
the logprob computation *is* `Engine.target_logprobs` (called on a view of this session), so one rank
computes exactly what the single-process engine computes on the same datums.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training_core import losses
from training_core.engine import Engine
from training_core.model_loading import lora_target_modules
from training_core.types import Datum, LoraConfig

log = logging.getLogger(__name__)
ADAPTER = "dstrain"  # adapter name inside the worker; checkpoints use canonical (name-free) keys


@dataclass
class _BaseView:
    """The fields of `LoadedBase` that `Engine.target_logprobs` reads."""

    tokenizer: Any


class _OnDevice:
    """Calls the DeepSpeed engine with inputs moved to its device and returns logits on the CPU.

    A no-op on CPU ranks; on GPU ranks it lets the CPU-side loss code of the engine run unchanged.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, **kw: torch.Tensor) -> Any:
        dev = self.engine.device
        out = self.engine(**{k: v.to(dev) for k, v in kw.items()})
        if out.logits.device.type != "cpu":
            out.logits = out.logits.cpu()
        return out


class _EngineView:
    """Duck-types the part of `Engine` used by `target_logprobs`, with the DeepSpeed engine as the model."""

    def __init__(self, engine: Any, tokenizer: Any, compute_dtype: str) -> None:
        self.model, self.base, self.compute_dtype = _OnDevice(engine), _BaseView(tokenizer), compute_dtype

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return Engine._autocast(self)  # type: ignore[arg-type]

    def _use_fast_path(self) -> bool:
        return False  # the fused bf16 path assumes an in-process peft model, not a DeepSpeed-wrapped one


def canonical_key(param_name: str) -> str:
    return param_name.replace(f".{ADAPTER}.", ".")


class Session:
    def __init__(self, args: dict[str, Any], rank: int, world_size: int) -> None:
        import deepspeed

        self.rank, self.world_size = rank, world_size
        self.zero_stage: int = int(args["zero_stage"])
        self.model_path: str = args["model_path"]
        self.compute_dtype: str = args.get("compute_dtype", "float32")
        self.lora = LoraConfig(**args["lora"]) if args.get("lora") is not None else None
        ds_config: dict[str, Any] = args["ds_config"]
        self.tokenizer, model = self._load(ds_config, bool(args.get("zero3_init")), args.get("model_config"))
        cfg = model.config
        emb = model.get_input_embeddings().weight
        self.vocab_size = int(emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0])
        self.max_length = int(
            getattr(cfg, "max_position_embeddings", 0) or getattr(self.tokenizer, "model_max_length", 2048)
        )
        self.arch = getattr(cfg, "model_type", None)
        if self.lora is not None:
            model, self.params = self._add_lora(model, self.lora)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            self.params = dict(model.named_parameters())  # tied weights appear once
        self.names = list(self.params)  # optimizer/checkpoint order, as in the single-process engine
        self.model = model
        opt = torch.optim.AdamW(list(self.params.values()), lr=1e-4)  # hyper-parameters are set at every step
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config=ds_config,
            model_parameters=list(self.params.values()),
            dist_init_required=False,
        )
        self.view = _EngineView(self.engine, self.tokenizer, self.compute_dtype)
        self.step = 0
        self.pending_grads = False
        self.hparams: dict[str, Any] | None = None  # last AdamW hyper-parameters (saved with the state)

    # ---- construction --------------------------------------------------------------------------------
    def _load(self, ds_config: dict[str, Any], zero3_init: bool,
              model_config: dict[str, Any] | None) -> tuple[Any, nn.Module]:
        """The base from `model_path`, or (benchmarks) a random init of `model_config` with the tokenizer of
        `model_path`. Under ZeRO-3 with `zero3_init`, parameters are partitioned as they are created."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        hf_ds = None
        if zero3_init and self.zero_stage == 3:
            # ZeRO-3 init: every rank materializes only its own shard of the weights while loading.
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(ds_config)
        try:
            if model_config is not None:
                cfg = AutoConfig.for_model(**model_config)
                with torch.random.fork_rng():
                    torch.manual_seed(int(model_config.get("seed", 0)))
                    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        finally:
            if hf_ds is not None:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()  # later sessions in this process load normally
        model.eval()  # no dropout: the same as the single-process engine
        return tok, model

    def _add_lora(self, model: nn.Module, lora: LoraConfig) -> tuple[nn.Module, dict[str, nn.Parameter]]:
        """Exactly `Engine.add_adapter` on a fresh base (same targets, config, seed and parameter order)."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        targets = lora_target_modules(leaves, lora.train_attn, lora.train_mlp, lora.train_unembed)
        cfg = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng():
            torch.manual_seed(lora.seed if lora.seed is not None else 0)
            model = get_peft_model(model, cfg, adapter_name=ADAPTER)
        params = {n: p for n, p in model.named_parameters() if f".{ADAPTER}." in n}
        for p in params.values():
            p.data = p.data.float()
        return model, params

    def peft_config_dict(self) -> dict[str, Any] | None:
        if self.lora is None:
            return None
        cfg = self.model.peft_config[ADAPTER].to_dict()  # type: ignore[index,operator]
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        cfg["base_model_name_or_path"] = self.model_path
        return cfg

    def key(self, name: str) -> str:
        """Checkpoint key of a trainable parameter: PEFT canonical key (LoRA) or the HF name (full)."""
        return canonical_key(name) if self.lora is not None else name

    def info(self) -> dict[str, Any]:
        n_all = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())
        n_train = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.params.values())
        return {
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "arch": self.arch,
            "param_names": [self.key(n) for n in self.names],
            "n_params": n_all,
            "n_trainable": n_train,
            "peft_config": self.peft_config_dict(),
        }

    # ---- compute ------------------------------------------------------------------------------------
    def forward(self, args: dict[str, Any]) -> dict[str, Any]:
        data: list[Datum] = args["data"]
        stand_in, backward = bool(args["stand_in"]), bool(args["backward"])
        with contextlib.nullcontext() if backward else torch.no_grad():
            lp_B_T, _ = Engine.target_logprobs(self.view, data)  # type: ignore[arg-type]
            lp_list = Engine.split(lp_B_T, data)
            if (
                args.get("grads") is not None
            ):  # custom loss, second pass: the linear surrogate sum(lp * dL/dlp)
                loss = sum(
                    ((lp * g.to(lp.dtype)).sum() for lp, g in zip(lp_list, args["grads"], strict=True)),
                    torch.zeros((), dtype=lp_B_T.dtype),
                )
            else:
                flat = Engine.flat_inputs(data)
                loss = losses.compute_loss(
                    args["loss_fn"], torch.cat(lp_list), flat, args.get("loss_fn_config")
                )
            if backward:
                # DeepSpeed averages gradients over ranks; the API's loss is a sum over all datums' tokens.
                self.engine.backward(loss * (0.0 if stand_in else float(self.world_size)))
                self.pending_grads = True
        if stand_in:
            return {"logprobs": [], "loss": 0.0}
        return {"logprobs": [lp.detach().float().cpu() for lp in lp_list], "loss": float(loss.detach())}

    def optim_step(self, adam: dict[str, Any]) -> dict[str, float]:
        zopt = self.engine.optimizer
        hp = {
            "lr": float(adam["learning_rate"]),
            "betas": (float(adam["beta1"]), float(adam["beta2"])),
            "eps": float(adam["eps"]),
            "weight_decay": float(adam["weight_decay"]),
        }
        for g in zopt.optimizer.param_groups:
            g.update(hp)
        self.hparams = {**hp, "betas": list(hp["betas"])}
        clip = float(adam.get("grad_clip_norm") or 0.0)
        zopt.clip_grad = clip  # ZeRO clips inside its step with torch's coefficient max_norm / (norm + 1e-6)
        metrics: dict[str, float] = {}
        if self.pending_grads:
            self.engine.step()
            if clip > 0:
                norm = self.engine.get_global_grad_norm()
                metrics["grad_norm:mean"] = float(norm) if norm is not None else float("nan")
        else:
            log.warning("optim_step with no accumulated gradients: parameters unchanged")
        self.pending_grads = False
        self.step += 1
        metrics["step:max"] = float(self.step)
        return metrics

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.destroy()
        self.engine = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
        self.params = {}
