"""RL environments: protocols (envs.base), built-in envs (arithmetic, tool_calc, bench_env), registry."""

from envs.base import Env, EnvGroupBuilder, FailureRewards, ProblemEnv, RLDataset, StepResult

__all__ = ["Env", "EnvGroupBuilder", "FailureRewards", "ProblemEnv", "RLDataset", "StepResult"]
