"""Run model-written code against a benchmark's tests in a locked-down subprocess.

Each program runs in a fresh `python -I -S` of the base interpreter (isolated: no PYTHON* variables,
no site-packages, no script or cwd entry on sys.path: the standard library only, the repo is not
importable) with its own temporary directory as cwd, HOME
and TMPDIR, a minimal environment, and limits set before any untrusted line runs: address space
(RLIMIT_AS), CPU seconds, file size, no core dumps. Where the kernel allows unprivileged user namespaces
(`unshare -r`), the program gets an empty network namespace and a mount namespace in which the repo and
the venv are covered by an empty tmpfs; in every case socket creation is disabled in the preamble. A wall-clock timeout kills the whole process group.

This stops accidents (infinite loops, memory bombs, stray writes, network calls) from a model's code;
it is not a security boundary against code written to escape (use a VM/container for that).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from evals.graders import Grade, Grader, register_grader


@dataclass(frozen=True)
class ExecLimits:
    timeout_s: float = 10.0  # wall clock, the whole program including its tests
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 16

    def tag(self) -> str:
        return f"t{self.timeout_s:g}s-cpu{self.cpu_s}s-mem{self.memory_mb}m-f{self.file_mb}m"


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str = ""


# Runs first, in the child, before the untrusted code: limits cannot be raised again (hard == soft) and
# socket constructors raise. `_socket` is patched too so `import _socket` is no way around it.
_PREAMBLE = """\
import resource as _r, socket as _s, _socket as _ss
for _k, _v in ((_r.RLIMIT_AS, {mem}), (_r.RLIMIT_CPU, {cpu}), (_r.RLIMIT_FSIZE, {fsize}), (_r.RLIMIT_CORE, 0)):
    _r.setrlimit(_k, (_v, _v))
def _no_net(*a, **k):
    raise OSError("network access is disabled in the code sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        _no_net()
_s.socket = _ss.socket = _NoSocket
_s.create_connection = _s.socket_pair = _s.socketpair = _s.getaddrinfo = _s.fromfd = _no_net
del _r, _s, _ss, _k, _v
"""


def _interpreter() -> str:
    # The base interpreter, not the venv's: with -S it sees the standard library only, so neither the
    # project (installed editable) nor its dependencies can be imported by the model's code.
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def hidden_dirs() -> list[str]:
    """The repo and the venv, covered by an empty tmpfs inside the sandbox's mount namespace."""
    repo = str(Path(__file__).resolve().parents[2])
    interp = _interpreter()
    cands = [d for d in dict.fromkeys([repo, os.path.realpath(sys.prefix)])
             if os.path.isdir(d) and not interp.startswith(d + os.sep)]
    # a venv inside the repo is already covered (and no longer exists to mount on once the repo is)
    return [d for d in cands if not any(d != o and d.startswith(o + os.sep) for o in cands)]


@cache
def isolation_level() -> str:
    """'netns+mountns' (no network, repo and venv hidden), 'netns' (no network) or 'none', by what
    `unshare -r` (unprivileged user namespaces) allows on this kernel."""
    exe = shutil.which("unshare")
    if exe is None:
        return "none"
    probe = " && ".join(f"mount -t tmpfs none {shlex.quote(d)}" for d in hidden_dirs()) or "true"
    for flags, level in (("-rnm", "netns+mountns"), ("-rn", "netns")):
        cmd = [exe, flags, "sh", "-c", probe if "m" in flags[2:] else "true"]
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return level
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "none"


def sandbox_description(limits: ExecLimits) -> str:
    return f"subprocess python -I -S, own tmpdir, clean env, {limits.tag()}, socket-block, {isolation_level()}"


def _command(path: str) -> list[str]:
    py = [_interpreter(), "-I", "-S", path]
    level = isolation_level()
    exe = shutil.which("unshare") or "unshare"
    if level == "netns+mountns":
        mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(d)}" for d in hidden_dirs())
        script = (mounts + " && " if mounts else "") + "exec " + " ".join(shlex.quote(a) for a in py)
        return [exe, "-rnm", "sh", "-c", script]
    if level == "netns":
        return [exe, "-rn", *py]
    return py


def run_program(program: str, limits: ExecLimits = ExecLimits()) -> ExecResult:
    """Run `program` (source text) and report whether it exited 0 after reaching its last line."""
    nonce = secrets.token_hex(8)
    # The nonce is printed only after every test ran, so an early `sys.exit(0)` in the model's code is a fail.
    source = (_PREAMBLE.format(mem=limits.memory_mb << 20, cpu=limits.cpu_s, fsize=limits.file_mb << 20)
              + "\n" + program + f"\n\nprint('__done__{nonce}')\n")
    tmp = tempfile.mkdtemp(prefix="tuneloop-exec-")
    try:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        cmd = _command(path)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        # Output goes to files, not pipes: a child the program forks cannot hold the run open, and
        # RLIMIT_FSIZE caps how much it can print.
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                return ExecResult(False, "timeout", f"exceeded {limits.timeout_s:g}s wall clock")
            finally:
                _kill_group(proc)  # children the program left behind
        with open(out_path, "rb") as f:
            stdout = f.read().decode("utf-8", "replace")
        if proc.returncode == 0 and f"__done__{nonce}" in stdout:
            return ExecResult(True, "passed")
        if proc.returncode < 0 and -proc.returncode in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult(False, "timeout", f"killed by signal {-proc.returncode} (CPU limit)")
        with open(err_path, "rb") as f:
            err = f.read()[-4000:]
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        return ExecResult(False, "failed", " | ".join(tail)[-500:] or f"exit code {proc.returncode}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(programs: Sequence[str], limits: ExecLimits = ExecLimits(), workers: int = 4) -> list[ExecResult]:
    """Many programs in parallel threads (each is its own process; threads only wait)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


# ---------------------------------------------------------------- building programs from model output

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a response: the first fenced block with a `def`, else the first block, else the raw text."""
    blocks = _FENCE.findall(text)
    for b in blocks:
        if re.search(r"^\s*def\s", b, re.MULTILINE):
            return b
    return blocks[0] if blocks else text


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval: a full function from the model replaces the prompt's stub; otherwise the model's text
    continues the prompt (the body, as in the original harness). Then `check(entry_point)`."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # keep the prompt first for its imports and helper functions; the model's def overrides the stub
        body = prompt.rstrip() + "\n    pass\n\n" + code
    else:
        body = prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, tests: Sequence[str], setup: str = "") -> str:
    return f"{setup}\n{extract_code(code)}\n\n" + "\n".join(tests) + "\n"


@register_grader
class CodeExecGrader(Grader):
    """Pass/fail of the benchmark's tests on the model's code (meta['lang_task']: humaneval | mbpp)."""

    kind = "code_exec"
    version = "1"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024) -> None:
        self.limits = ExecLimits(timeout_s=float(timeout_s), cpu_s=max(1, int(timeout_s)), memory_mb=int(memory_mb))

    def params(self) -> dict[str, Any]:
        return {"timeout_s": self.limits.timeout_s, "memory_mb": self.limits.memory_mb}

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        return None if meta.get("task") in ("humaneval", "mbpp") else "meta.task must be humaneval or mbpp"

    @staticmethod
    def program(output: str, meta: Mapping[str, Any]) -> str:
        if meta["task"] == "humaneval":
            return humaneval_program(meta["prompt"], output, meta["test"], meta["entry_point"])
        return mbpp_program(output, meta["test_list"], meta.get("test_setup_code", ""))

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        res = run_program(self.program(output, meta), self.limits)
        return Grade(res.status if res.passed else f"{res.status}: {res.detail}"[:300], float(res.passed))
