"""Environment registry: a name in `RLConfig.env.name` -> the dataset of env group builders.

- `arithmetic`: a `data.generators` task (`env.task`, `env.task_kwargs`) as single-turn problems, or problem
  files (`env.train_file` / `env.eval_file`, `env.columns`; any format of tasks.data_io.load_rows);
- `tool_calc`: the multi-turn calculator env (`env.task_kwargs`: digits, ops; `env.max_turns`);
- `bench:<name>`: a built-in code-graded benchmark of `evals.builtin` through the benchmark adapter.

New envs register a builder with `register_env(name, fn)`; `fn(env_cfg) -> RLDataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.base import FailureRewards, RLDataset

EnvBuilder = Callable[[Any], RLDataset]
ENVS: dict[str, EnvBuilder] = {}


def register_env(name: str, fn: EnvBuilder) -> EnvBuilder:
    ENVS[name] = fn
    return fn


def failure_rewards(env_cfg: Any) -> FailureRewards:
    return FailureRewards(overflow=env_cfg.overflow_reward, unparseable=env_cfg.unparseable_reward,
                          error=env_cfg.error_reward)


def _arithmetic(c: Any) -> RLDataset:
    from envs.arithmetic import GeneratedTaskDataset

    return GeneratedTaskDataset(c.task, c.task_kwargs, c.n_train, c.n_eval, c.seed, failure_rewards(c),
                                c.system_prompt or None, train_file=getattr(c, "train_file", ""),
                                eval_file=getattr(c, "eval_file", ""), columns=getattr(c, "columns", None))


def _tool_calc(c: Any) -> RLDataset:
    from envs.tool_calc import ToolCalcDataset

    kw = {k: c.task_kwargs[k] for k in ("digits", "ops") if k in c.task_kwargs}
    return ToolCalcDataset(c.n_train, c.n_eval, c.seed, max_turns=c.max_turns, failure=failure_rewards(c),
                           system_prompt=c.system_prompt or None, **kw)


register_env("arithmetic", _arithmetic)
register_env("tool_calc", _tool_calc)


def build_dataset(env_cfg: Any) -> RLDataset:
    """The dataset named by `env_cfg.name`; KeyError naming the known envs otherwise."""
    name = env_cfg.name
    if name.startswith("bench:"):
        from envs.bench_env import dataset_from_benchmark

        return dataset_from_benchmark(name.split(":", 1)[1], n=env_cfg.n_train + env_cfg.n_eval, seed=env_cfg.seed,
                                      eval_percent=env_cfg.eval_percent, failure=failure_rewards(env_cfg))
    if name not in ENVS:
        raise KeyError(f"unknown env {name!r}; known: {sorted(ENVS)} or bench:<builtin benchmark>")
    return ENVS[name](env_cfg)
