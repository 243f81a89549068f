"""RL performance: one GRPO-style iteration, ours vs TRL ``GRPOTrainer``; sampler tokens/s at RL batch sizes.

    python -m bench.bench_rl [--rounds 3] [--warmup 1] [--threads 1] [--groups 4] [--group-size 8]
                             [--max-tokens 64] [--trl-precisions fp32,bf16] [--sampler-repeats 2]
                             [--skip-iteration] [--skip-sampler] [--no-write]

Part 1, one RL iteration (``rl_iteration_tokens_per_s_ratio_vs_trl_grpo``, goal >= 2). Same model (the
``tiny-30m`` preset: 29M-param Llama, vocab 8192, random init), same prompts (addition problems of
``data.generators`` rendered with the model's chat template to text, tokenized by the tokenizer on both
sides), ``--groups`` problems x ``--group-size`` samples, exactly ``--max-tokens`` new tokens per sample (EOS
off on both sides, so both sample and train on the same number of tokens), temperature 1, same grader
(``data.generators.score``), same LoRA (r=16, alpha=32, q/k/v/o/gate/up/down, no dropout), same AdamW math.

- ``ours``: the recipe's iteration over the engine's primitives (as ``examples/rl_minimal.py``):
  ``save_weights_and_get_sampling_client`` -> ``sample_batch(prompts, num_samples=group_size)`` (sampler
  logprobs) -> grade -> group-centred advantages -> ``forward_backward(data, "importance_sampling")`` +
  ``optim_step``. Every sample is trained (also zero-advantage ones, which the recipe may drop), so both
  sides do the same work. bf16 base weights + fp32 LoRA (``--ours-precisions`` adds fp32).
- ``trl``: ``GRPOTrainer`` in its own process (``bench/trl_grpo_worker.py``): ``num_iterations=1``,
  ``beta=0`` (no reference model), ``scale_rewards="none"`` (group-centred advantages), ``loss_type="dapo"``,
  one optimizer step per generation batch (no old-logprob pass), ``generate`` (no vLLM), gradient
  checkpointing off (faster on CPU), fp32 and bf16 autocast; its best precision counts.
  Loss: on-policy both are ``-sum_t A_t * exp(lp_t - stopgrad(lp_t))`` over completion tokens; TRL divides by
  the number of completion tokens (a constant scale of the gradient, the same compute), ours sums (Tinker's
  definition); TRL's clipping is inactive at ratio 1. TRL also computes per-token entropy in its loss pass
  and only the completion positions' logits; ours computes logprobs for prompt positions too.
- tokens/s = (sampled tokens + trained tokens) / iteration seconds, trained tokens = prompt + completion
  tokens of every sample; both sides report their counts and the bench checks they are equal. Sides alternate
  round by round (ours, trl_fp32, trl_bf16, ...), medians of ``--rounds`` rounds after ``--warmup``; the
  same torch thread count on every side (``--threads``). Also the share of the iteration spent sampling
  (+ grading + advantages; ours includes the weight snapshot) vs training.

Part 2, sampler tokens/s at the batch sizes RL uses (16, 64, 128 sequences = 2, 8, 16 prompts x 8 samples),
``training_core.sampler.sample_batch`` vs HF ``generate(num_return_sequences=8, do_sample)``, same model and
prompts, ``--max-tokens`` new tokens, temperature 1, top_p 1, no top-k, fp32 and bf16 weights each (as
``bench_sampling``), each side at its best precision: ``rl_sampler_tokens_per_s_ratio_vs_generate_bs{16,64,128}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench.train_sides import TARGETS  # noqa: E402

MODEL = "tiny-30m"
RANK, ALPHA, LR = 16, 32, 1e-5
SAMPLER_BATCHES = (16, 64, 128)


@dataclass
class RlConfig:
    model: str = MODEL
    groups: int = 4
    group_size: int = 8
    max_tokens: int = 64
    threads: int = 1
    prompts: list[str] = field(default_factory=list)  # rendered text, one per problem, in iteration order
    answers: list[str] = field(default_factory=list)

    def problems_of(self, it: int) -> tuple[list[str], list[str]]:
        s = slice(it * self.groups, (it + 1) * self.groups)
        return self.prompts[s], self.answers[s]


@dataclass
class IterStats:
    total_s: float
    sample_s: float
    completion_tokens: int
    prompt_tokens: int  # summed over all samples (a prompt counts once per sample), no padding
    loss: float
    reward_sum: float

    @property
    def tokens(self) -> int:  # sampled + trained (prompt + completion of every sample)
        return 2 * self.completion_tokens + self.prompt_tokens


def make_problems(model_path: str, n: int, seed: int = 1) -> tuple[list[str], list[str]]:
    """``n`` addition problems rendered with the chat template (generation prompt) as text, and answers."""
    from transformers import AutoTokenizer

    from data.generators import train_eval

    tok = AutoTokenizer.from_pretrained(model_path)
    rows, _ = train_eval("addition", n_train=n, n_eval=1, seed=seed, digits=2)
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows]
    return prompts, [r["answer"] for r in rows]


def group_advantages(rewards: list[float], group_size: int) -> list[float]:
    """GRPO advantages without std scaling (TRL ``scale_rewards="none"``): reward minus its group's mean."""
    out = []
    for g in range(0, len(rewards), group_size):
        grp = rewards[g : g + group_size]
        mean = sum(grp) / len(grp)
        out.extend(r - mean for r in grp)
    return out


def rl_datum(prompt: list[int], sampled: list[int], logprobs: list[float], adv: float) -> Any:
    """The recipe's datum (examples/rl_minimal.py): prompt positions carry logprob 0 and advantage 0."""
    from training_core import types

    tokens = prompt + sampled
    n_p, T = len(prompt), len(prompt) + len(sampled) - 1
    lp = [0.0] * (n_p - 1) + list(logprobs)
    adv_T = [0.0] * (n_p - 1) + [adv] * len(sampled)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:]), "logprobs": torch.tensor(lp[:T]),
                                       "advantages": torch.tensor(adv_T[:T])})


class OursRlSide:
    """The recipe's iteration over the engine's primitives, in this process."""

    def __init__(self, cfg: RlConfig, precision: str = "bf16") -> None:
        from training_core import ServiceClient, types

        self.key, self.cfg, self.types = f"ours_{precision}", cfg, types
        dt = "bfloat16" if precision == "bf16" else "float32"
        sc = ServiceClient(checkpoint_root=tempfile.mkdtemp(prefix="bench-rl-"), compute_dtype=dt, load_dtype=dt)
        self.tc = sc.create_lora_training_client(cfg.model, rank=RANK, lora_alpha=ALPHA, seed=0, train_unembed=False)
        self.tok = self.tc.get_tokenizer()
        self.adam = types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        self.it = 0

    def iteration(self) -> IterStats:
        t = self.types
        prompts, answers = self.cfg.problems_of(self.it)
        n = self.cfg.group_size
        params = t.SamplingParams(max_tokens=self.cfg.max_tokens, temperature=1.0, top_p=1.0, top_k=-1,
                                  seed=self.it, stop=[])  # stop=[]: EOS off, exactly max_tokens (as TRL's side)
        t0 = time.perf_counter()
        ids = self.tok(text=prompts)["input_ids"]  # what TRL does with text prompts
        sampler = self.tc.save_weights_and_get_sampling_client()
        outs = sampler.sample_batch([t.ModelInput.from_ints(p) for p in ids], params, num_samples=n).result()
        sampler.close()
        seqs = [(p, s) for p, o in zip(ids, outs, strict=True) for s in o.sequences]
        texts = self.tok.batch_decode([s.tokens for _, s in seqs], skip_special_tokens=True)
        rewards = [self._score(x, answers[i // n]) for i, x in enumerate(texts)]
        adv = group_advantages(rewards, n)
        data = [rl_datum(p, s.tokens, s.logprobs or [], a) for (p, s), a in zip(seqs, adv, strict=True)]
        t1 = time.perf_counter()
        fb = self.tc.forward_backward(data, "importance_sampling")
        opt = self.tc.optim_step(self.adam)
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        t2 = time.perf_counter()
        self.it += 1
        return IterStats(t2 - t0, t1 - t0, sum(len(s.tokens) for _, s in seqs), sum(len(p) for p, _ in seqs),
                         loss, sum(rewards))

    @staticmethod
    def _score(text: str, answer: str) -> float:
        from data.generators import score

        return score(text, answer)

    def close(self) -> None:
        self.tc.close()


class TrlGrpoSide:
    """``GRPOTrainer.train()`` in its own process (accelerate's state is a per-process singleton), parked by a
    callback before each step until ``iteration()`` lets it run one."""

    def __init__(self, cfg: RlConfig, model_path: str, iterations: int, precision: str,
                 grad_ckpt: bool = False) -> None:
        self.key = f"trl_{precision}" + ("_ckpt" if grad_ckpt else "")
        repo = Path(__file__).resolve().parent.parent
        n = iterations * cfg.groups
        spec = {"model_path": model_path, "prompts": cfg.prompts[:n], "answers": cfg.answers[:n],
                "groups": cfg.groups, "group_size": cfg.group_size, "max_tokens": cfg.max_tokens,
                "iterations": iterations, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "lr": LR,
                "precision": precision, "grad_ckpt": grad_ckpt, "threads": cfg.threads}
        fd, spec_path = tempfile.mkstemp(prefix="bench-rl-trl-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(spec, fh)
        env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "OMP_NUM_THREADS": str(cfg.threads)}
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-rl-{self.key}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.trl_grpo_worker", spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=repo)
        self._read("ready")  # its set-up (imports, model, LoRA) is not timed

    def _read(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while line and not line.startswith(prefix):  # skip whatever the libraries print
            line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            with open(self.log.name, errors="replace") as fh:
                tail = fh.read()[-3000:]
            raise RuntimeError(f"{self.key}: the GRPOTrainer worker exited (rc {rc}); its stderr ends:\n{tail}")
        return line

    def iteration(self) -> IterStats:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        _, total, gen, n_c, n_p, loss, r = self._read("step ").split()
        return IterStats(float(total), float(gen), int(n_c), int(n_p), float(loss), float(r))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the worker stops before its next step
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # never leave a worker behind
                self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def run_iteration_bench(cfg: RlConfig, model_path: str, rounds: int, warmup: int,
                        ours_precisions: tuple[str, ...] = ("bf16",),
                        trl_precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    iters = warmup + rounds
    if len(cfg.prompts) < iters * cfg.groups:
        cfg.prompts, cfg.answers = make_problems(model_path, iters * cfg.groups)
    sides: list[Any] = []
    try:
        sides += [OursRlSide(cfg, p) for p in ours_precisions]
        sides += [TrlGrpoSide(cfg, model_path, iters, p) for p in trl_precisions]
        stats: dict[str, list[IterStats]] = {s.key: [] for s in sides}
        for r in range(iters):
            for s in sides:  # alternate: load from other processes hits every side alike
                st = s.iteration()
                if r >= warmup:
                    stats[s.key].append(st)
            print(f"round {r + 1}/{iters}: " + ", ".join(
                f"{k} {v[-1].total_s:.2f}s (sampling {v[-1].sample_s:.2f}s)" for k, v in stats.items() if v),
                flush=True)
    finally:
        for s in sides:
            s.close()
    return summarize_iterations(cfg, stats, rounds, warmup)


def summarize_iterations(cfg: RlConfig, stats: dict[str, list[IterStats]], rounds: int,
                         warmup: int) -> dict[str, Any]:
    counts = {k: [(s.completion_tokens, s.prompt_tokens) for s in v] for k, v in stats.items()}
    if len({tuple(c) for c in counts.values()}) != 1:  # each round, every side must do the same work
        raise AssertionError(f"sides differ in (completion, prompt) tokens per iteration: {counts}")
    n_c = statistics.median(c for c, _ in next(iter(counts.values())))
    n_p = statistics.median(p for _, p in next(iter(counts.values())))
    med = {k: statistics.median(s.total_s for s in v) for k, v in stats.items()}
    share = {k: statistics.median(s.sample_s / s.total_s for s in v) for k, v in stats.items()}
    tps = {k: statistics.median(s.tokens / s.total_s for s in v) for k, v in stats.items()}
    best_ours = max((k for k in tps if k.startswith("ours")), key=tps.__getitem__)
    best_trl = max((k for k in tps if k.startswith("trl")), key=tps.__getitem__)
    res: dict[str, Any] = {
        "rl_iteration_tokens_per_s_ratio_vs_trl_grpo": round(tps[best_ours] / tps[best_trl], 3),
        "rl_iteration_tokens_per_s_ours": round(tps[best_ours], 1),
        "rl_iteration_tokens_per_s_trl_grpo": round(tps[best_trl], 1),
        "rl_iteration_sampling_share_ours": round(share[best_ours], 3),
        "rl_iteration_sampling_share_trl_grpo": round(share[best_trl], 3),
    }
    res["rl_iteration_bench_setup"] = {
        "model": cfg.model, "groups": cfg.groups, "group_size": cfg.group_size, "max_tokens": cfg.max_tokens,
        "lora_rank": RANK, "lora_alpha": ALPHA, "lr": LR, "torch_threads": cfg.threads,
        "rounds": rounds, "warmup": warmup, "best_ours": best_ours, "best_trl": best_trl,
        "sampled_tokens_per_iter_median": n_c, "trained_tokens_per_iter_median": n_c + n_p,
        "tokens_per_iter_all": {k: [s.tokens for s in v] for k, v in stats.items()},
        "trl": "GRPOTrainer num_iterations=1 beta=0 loss_type=dapo scale_rewards=none, generate (no vLLM), "
               "no gradient checkpointing, generation_batch_size = train batch",
        "iteration_s_median": {k: round(v, 3) for k, v in med.items()},
        "sampling_s_median": {k: round(statistics.median(s.sample_s for s in v), 3) for k, v in stats.items()},
        "training_s_median": {k: round(statistics.median(s.total_s - s.sample_s for s in v), 3)
                              for k, v in stats.items()},
        "sampling_share_median": {k: round(v, 3) for k, v in share.items()},
        "tokens_per_s_median": {k: round(v, 1) for k, v in tps.items()},
        "iteration_s_all": {k: [round(s.total_s, 3) for s in v] for k, v in stats.items()},
        "loss_all": {k: [round(s.loss, 5) for s in v] for k, v in stats.items()},
        "reward_sum_all": {k: [s.reward_sum for s in v] for k, v in stats.items()},
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    return res


# ---- part 2: sampler tokens/s at RL batch sizes ----------------------------------------------------------
def generate_tokens_per_s(model: torch.nn.Module, prompts: list[list[int]], num_samples: int, new_tokens: int,
                          pad_id: int) -> float:
    """HF ``generate`` at its best for RL: left-padded prompts, ``num_return_sequences``, exactly new_tokens."""
    P = max(len(p) for p in prompts)
    ids_BP = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask_BP = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids_BP, attention_mask=mask_BP, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=num_samples, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id)
    dt = time.perf_counter() - t0
    assert out.shape == (len(prompts) * num_samples, P + new_tokens), out.shape
    return len(prompts) * num_samples * new_tokens / dt


def sample_tokens_per_s(model: torch.nn.Module, prompts: list[list[int]], num_samples: int, new_tokens: int) -> float:
    from training_core.sampler import sample_batch
    from training_core.types import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, seed=0, stop=[], temperature=1.0, top_k=-1, top_p=1.0)
    t0 = time.perf_counter()
    res = sample_batch(model, prompts, params, num_samples, eos_token_ids=[])
    dt = time.perf_counter() - t0
    assert all(len(s.tokens) == new_tokens for g in res for s in g)
    return len(prompts) * num_samples * new_tokens / dt


def run_sampler_bench(model_path: str, prompts_text: list[str], new_tokens: int, repeats: int,
                      group_size: int = 8, batches: tuple[int, ...] = SAMPLER_BATCHES) -> dict[str, Any]:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    m32 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    models = {"fp32": m32, "bf16": copy.deepcopy(m32).to(torch.bfloat16)}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = tok(text=prompts_text[: max(batches) // group_size])["input_ids"]
    runs: dict[str, list[float]] = {}

    def one(bs: int, side: str, prec: str) -> float:
        p = ids[: bs // group_size]
        if side == "hf":
            return generate_tokens_per_s(models[prec], p, group_size, new_tokens, pad_id)
        return sample_tokens_per_s(models[prec], p, group_size, new_tokens)

    combos = [(bs, side, prec) for bs in batches for side in ("hf", "ours") for prec in ("fp32", "bf16")]
    for c in combos:  # warm-up
        one(*c)
    for r in range(repeats):  # interleaved rounds
        for bs, side, prec in combos:
            runs.setdefault(f"{side}_{prec}_bs{bs}", []).append(one(bs, side, prec))
        print(f"sampler round {r + 1}/{repeats} done", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    res: dict[str, Any] = {}
    best: dict[str, str] = {}
    for bs in batches:
        o = max((f"ours_fp32_bs{bs}", f"ours_bf16_bs{bs}"), key=med.__getitem__)
        h = max((f"hf_fp32_bs{bs}", f"hf_bf16_bs{bs}"), key=med.__getitem__)
        best[f"bs{bs}"] = f"{o.rsplit('_', 1)[0]} vs {h.rsplit('_', 1)[0]}"
        res[f"rl_sampler_tokens_per_s_ratio_vs_generate_bs{bs}"] = round(med[o] / med[h], 3)
        res[f"rl_sampler_tokens_per_s_ours_bs{bs}"] = round(med[o], 1)
        res[f"rl_sampler_tokens_per_s_generate_bs{bs}"] = round(med[h], 1)
    res["rl_sampler_bench_setup"] = {
        "model": MODEL, "group_size": group_size, "new_tokens": new_tokens, "repeats": repeats,
        "prompt_tokens": [len(p) for p in ids], "torch_threads": torch.get_num_threads(), "best": best,
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_all": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="timed iterations per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first iterations per side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same on every side")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ours-precisions", default="bf16", help="subset of fp32,bf16")
    ap.add_argument("--trl-precisions", default="fp32,bf16", help="subset of fp32,bf16")
    ap.add_argument("--sampler-repeats", type=int, default=2)
    ap.add_argument("--skip-iteration", action="store_true")
    ap.add_argument("--skip-sampler", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not merge into bench/results.json")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    from bench.common import DEFAULT_RESULTS, REPO_ROOT, merge_results, print_table
    from training_core.presets import resolve_model_path

    path = resolve_model_path(MODEL)
    cfg = RlConfig(groups=args.groups, group_size=args.group_size, max_tokens=args.max_tokens, threads=args.threads)
    cfg.prompts, cfg.answers = make_problems(path, (args.warmup + args.rounds) * args.groups + max(SAMPLER_BATCHES))
    res: dict[str, Any] = {}
    if not args.skip_iteration:
        res.update(run_iteration_bench(cfg, path, args.rounds, args.warmup, tuple(args.ours_precisions.split(",")),
                                       tuple(args.trl_precisions.split(","))))
        s = res["rl_iteration_bench_setup"]
        print_table([{"side": k, "iteration s": v, "sampling s": s["sampling_s_median"][k],
                      "training s": s["training_s_median"][k], "sampling share": s["sampling_share_median"][k],
                      "tokens/s": s["tokens_per_s_median"][k]} for k, v in s["iteration_s_median"].items()])
        if not args.no_write:  # each part is stored as soon as it is measured
            merge_results({k: v for k, v in res.items() if k.startswith("rl_iteration")})
    if not args.skip_sampler:
        res.update(run_sampler_bench(path, cfg.prompts, args.max_tokens, args.sampler_repeats, args.group_size))
        med = res["rl_sampler_bench_setup"]["tokens_per_s_median"]
        print_table([{"side": k, "tokens/s (median)": v} for k, v in med.items()])
        if not args.no_write:
            merge_results({k: v for k, v in res.items() if k.startswith("rl_sampler")})
    print_table([{"figure": k, "value": v} for k, v in res.items() if not isinstance(v, dict)])
    if not args.no_write and res:
        print(f"wrote {REPO_ROOT / DEFAULT_RESULTS}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
