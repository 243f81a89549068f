"""DPO recipe: loss and gradient vs an independent implementation, per-step losses vs TRL's DPOTrainer,
reference logprobs computed once, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipes import dpo
from recipes.dpo_config import DPOConfig, DPOTrainConfig, PrefDataConfig, WarmupConfig
from recipes.preference_data import prepare_preferences
from training_core import ServiceClient, TrainingClient, types
from training_core.model_loading import resolve

LORA = {"rank": 4, "lora_alpha": 8.0, "train_unembed": False, "seed": 3}


def _cfg(tmp: Path, **train: object) -> DPOConfig:
    cfg = DPOConfig(cache_root=str(tmp / "cache"), data=PrefDataConfig(n_train=24, n_eval=8),
                    warmup=WarmupConfig(steps=0),
                    train=DPOTrainConfig(**{"steps": 4, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                                            "save_every": 2, "ref_batch_size": 16, **train}))
    for k, v in LORA.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve("tiny"))


def _hf_lora_model(tc: TrainingClient) -> torch.nn.Module:
    """A fresh HF model + peft LoRA (same config) holding `tc`'s adapter weights, for the independent side."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    eng = tc._engine
    st = eng.adapters[tc._adapter]
    model = AutoModelForCausalLM.from_pretrained(resolve("tiny"), torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=st.lora.rank, lora_alpha=st.lora.alpha, lora_dropout=0.0,
                                            target_modules=targets, bias="none"))
    ours = {n.replace(f".{tc._adapter}.", ".default."): p.detach() for n, p in st.params.items()}
    theirs = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(ours[n])
    return peft


def test_loss_and_gradient_equal_independent_implementation(tmp_path: Path, tok: object) -> None:
    cfg = _cfg(tmp_path)
    ds = prepare_preferences(cfg.data, tok, cfg.cache_root)
    pairs = ds.train[:3]
    with ServiceClient(checkpoint_root=tmp_path / "ck") as sc:
        tc = sc.create_lora_training_client("tiny", rank=4, seed=3, train_unembed=False, lora_alpha=8.0)
        # one SFT step first, so that LoRA B != 0 and both A and B get gradients
        tc.forward_backward(dpo.pair_datums(pairs)[:3], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        ref_B2 = torch.tensor([[-9.0, -7.5], [-6.0, -8.0], [-12.0, -11.0]])  # crafted reference logprobs
        beta, ls, sft_w = 0.3, 0.1, 0.7
        out = tc.forward_backward_custom(dpo.pair_datums(pairs), dpo.make_loss_fn(ref_B2, beta, ls, sft_w)).result()
        st = tc._engine.adapters[tc._adapter]
        grads = {n.replace(f".{tc._adapter}.", ".default."): p.grad.clone() for n, p in st.params.items()}
        model = _hf_lora_model(tc)

    # independent: plain torch over the HF model, one sequence at a time, no engine code
    def seq_logp(prompt: list[int], comp: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([prompt + comp])
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp_T = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        comp_lp = lp_T[len(prompt) - 1:]
        return comp_lp.sum(), comp_lp

    total_nll, n_tok, losses = torch.zeros(()), 0, []
    for (c_ref, r_ref), p in zip(ref_B2.tolist(), pairs, strict=True):
        lc, toks_c = seq_logp(p.prompt_ids, p.chosen_ids)
        lr, _ = seq_logp(p.prompt_ids, p.rejected_ids)
        z = beta * ((lc - c_ref) - (lr - r_ref))
        losses.append((1 - ls) * torch.log1p(torch.exp(-z)) + ls * torch.log1p(torch.exp(z)))
        total_nll, n_tok = total_nll - toks_c.sum(), n_tok + len(p.chosen_ids)
    loss = torch.stack(losses).mean() + sft_w * total_nll / n_tok
    loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    theirs = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(float(g.abs().max()) > 1e-4 for n, g in grads.items() if "lora_A" in n)
    for n, g in grads.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-4, atol=1e-6, msg=n)


def test_per_step_losses_equal_trl_dpo_trainer(tmp_path: Path, tok: object) -> None:
    """Same 8 pairs, same LoRA init, fp32, constant lr, AdamW, no clipping: 4 steps of the whole set.

    Tolerance: relative 1e-4 (float32 roundoff across two different forward implementations and 4 Adam steps).
    """
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    beta, lr, sft_w, steps = 0.2, 3e-3, 0.5, 4
    cfg = _cfg(tmp_path, steps=steps, batch_size=8, learning_rate=lr, beta=beta, sft_weight=sft_w,
               grad_clip_norm=0.0, beta2=0.999, min_lr_ratio=1.0, save_every=100)
    cfg.data.n_train = 8
    res = dpo.train_dpo(cfg, tmp_path / "ours")
    ours = [loss for _, loss in res.loss_history]

    ds = prepare_preferences(cfg.data, tok, cfg.cache_root)
    with ServiceClient(checkpoint_root=tmp_path / "ck2") as sc:  # the same initial adapter as the run's
        model = _hf_lora_model(sc.create_lora_training_client("tiny", rank=4, seed=3, train_unembed=False,
                                                              lora_alpha=8.0))
    seen: list[float] = []

    class PreTokenized(DPOTrainer):  # feed TRL our token ids (its tokenization is not what is compared)
        def _prepare_dataset(self, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
            return dataset

        def compute_loss(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            loss = super().compute_loss(*args, **kwargs)
            seen.append(float(loss.detach()))
            return loss

    data = Dataset.from_list([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                               "rejected_ids": p.rejected_ids} for p in ds.train])
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0, beta=beta,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_w], use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=1000, gradient_checkpointing=False, max_length=None,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0, remove_unused_columns=False)
    trainer = PreTokenized(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert len(seen) == steps and len(ours) == steps
    assert ours[0] != ours[-1]  # the losses move: the comparison covers the updates, not only the init
    for a, b in zip(ours, seen, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_reference_logprobs_computed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: object) -> None:
    calls: list[int] = []
    real = TrainingClient.forward

    def counting(self: TrainingClient, data: list, *a: object, **k: object):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        return real(self, data, *a, **k)

    monkeypatch.setattr(TrainingClient, "forward", counting)
    cfg = _cfg(tmp_path, sft_weight=0.0)
    first = dpo.train_dpo(cfg, tmp_path / "a")
    # reference: 24 train pairs in batches of 16 (2 forwards) + 8 eval pairs (1); held-out eval before/after (2)
    assert calls == [32, 16, 16, 16, 16]
    calls.clear()
    second = dpo.train_dpo(cfg, tmp_path / "b")
    assert calls == [16, 16]  # only the held-out evals: the reference comes from the dataset cache
    assert second.ref_key == first.ref_key and (Path(first.dataset_dir) / f"ref-{first.ref_key}").is_dir()
    assert [x for _, x in second.loss_history] == [x for _, x in first.loss_history]
    # the cached values are the starting model's (a fresh adapter = the base model) logprobs
    ds = prepare_preferences(cfg.data, tok, cfg.cache_root)
    _, ref_tr, _ = dpo.reference_logprobs(cfg, None, ds, None)  # no service needed: a cache hit
    with ServiceClient(checkpoint_root=tmp_path / "ck") as sc:
        base = sc.create_lora_training_client("tiny", rank=4, seed=3, train_unembed=False, lora_alpha=8.0)
        direct = dpo.sequence_logprobs(base, ds.train[:5], 5)
    torch.testing.assert_close(ref_tr[:5], direct, rtol=1e-5, atol=1e-4)
    assert first.losses[0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    stats = json.loads((tmp_path / "a" / "data_quality.json").read_text())
    assert stats == first.data_stats and stats["n_train"] == 24 and stats["contaminated_eval_prompts"] == 0
    assert stats["eval_prompts_checked"] == 8 + 200  # held-out pairs + the behaviour benchmark's prompts


def test_stopped_run_resumes_exactly_with_warmup_chain(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, steps=6, save_every=2)
    cfg.warmup = WarmupConfig(steps=3, batch_size=8)
    full = dpo.train_dpo(cfg, tmp_path / "full")
    part = dpo.train_dpo(cfg, tmp_path / "part", stop_after=3)
    assert part.checkpoint == "" and len(part.losses) == 3
    rest = dpo.train_dpo(cfg, tmp_path / "part")
    assert rest.resumed_from == 2  # the newest committed checkpoint; step 3 is redone, never applied twice
    assert rest.loss_history == full.loss_history
    assert rest.start_checkpoint is not None and rest.start_checkpoint.endswith(dpo.WARMUP_NAME)
    from safetensors.torch import load_file

    a = load_file(str(next(Path(full.checkpoint).glob("*.safetensors"))))
    b = load_file(str(next(Path(rest.checkpoint).glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.heldout_accuracy_after == full.heldout_accuracy_after
