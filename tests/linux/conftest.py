"""Shared helpers for the real-kernel tests: run ``lw-embed run`` as a real process.

Nothing here is autouse: the fixtures only do something for the tests that ask for them.
Every process a fixture starts is tracked and, if still there at the end of the test,
killed together with its descendants, by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
PY = sys.executable


def helper(name: str) -> str:
    """Absolute path of a script in tests/helpers/."""
    path = HELPERS / name
    assert path.exists(), path
    return str(path)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any LW_EMBED_* override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LW_EMBED_", "_LW_EMBED_"))}
    env.update(extra or {})
    return env


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (by the PPid links in /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc`` and every descendant of it, by pid; then reap ``proc``."""
    if proc.poll() is not None:
        return
    for _ in range(3):  # bounded: a few passes in case something forked meanwhile
        pids = descendants(proc.pid)
        for pid in [proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` every 10 ms until true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


class Wrapper:
    """Builds and runs ``python -m lw_embed run --output T/out --data-dir T/data ...``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.out = tmp / "out"
        self.data = tmp / "data"
        self.started: list[subprocess.Popen[Any]] = []
        self.logs: dict[int, Path] = {}

    def argv(self, cmd: Sequence[str], *, config: Path | str | None = None,
             pgroup: bool = False, prefix: Sequence[str] = ()) -> list[str]:  # fmt: skip
        args = [*prefix, PY, "-m", "lw_embed", "run"]
        if config is not None:
            args += ["--config", str(config)]
        args += ["--output", str(self.out), "--data-dir", str(self.data)]
        if pgroup:
            args.append("--pgroup")
        return [*args, "--", *cmd]

    def start(self, cmd: Sequence[str], *, config: Path | str | None = None,
              pgroup: bool = False, prefix: Sequence[str] = (),
              env: dict[str, str] | None = None, cwd: Path | str | None = None,
              **popen: Any) -> subprocess.Popen[Any]:  # fmt: skip
        """Start the wrapper (killed with its tree at teardown if still running).

        stdin and stdout default to /dev/null; stderr, unless given, goes to a file
        whose text :meth:`log` returns."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        log = self.tmp / f"wrapper-{len(self.started)}.stderr"
        with open(log, "wb") as err:
            popen.setdefault("stderr", err)
            proc = subprocess.Popen(
                self.argv(cmd, config=config, pgroup=pgroup, prefix=prefix),
                env=clean_env(env), cwd=str(cwd or self.tmp), **popen,
            )  # fmt: skip
        self.started.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[Any]) -> str:
        """What a started wrapper wrote to stderr (when :meth:`start` chose the file)."""
        try:
            return self.logs[proc.pid].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def run(self, cmd: Sequence[str], *, timeout: float = 30.0, input: bytes | None = None,
            **kw: Any) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        """Run the wrapper to completion, stdout/stderr captured; fail after ``timeout``."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.start(cmd, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"wrapper did not exit within {timeout}s: {proc.args}\n"
                        f"stdout={out!r}\nstderr={err!r}")  # fmt: skip
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cli(self, args: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Any other subcommand (``validate-config``...), run in the test's tmp dir."""
        return run_cli(args, env=env, cwd=self.tmp, timeout=timeout)

    # the module helpers, reachable from the fixture (test files do not import conftest)
    helper = staticmethod(helper)
    wait_for = staticmethod(wait_for)
    kill_tree = staticmethod(kill_tree)
    descendants = staticmethod(descendants)

    def cleanup(self) -> None:
        for proc in self.started:
            kill_tree(proc)


@pytest.fixture
def wrapper(tmp_path: Path) -> Iterator[Wrapper]:
    w = Wrapper(tmp_path)
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def run_wrapper(wrapper: Wrapper) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """``run_wrapper(cmd, *, config=None, pgroup=False, input=None, env=None, cwd=None,
    prefix=(), timeout=30)`` -> CompletedProcess with stdout/stderr bytes."""
    return wrapper.run


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | str,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python -m lw_embed ARGS`` (any subcommand), text output, bounded."""
    return subprocess.run(
        [PY, "-m", "lw_embed", *args], env=clean_env(env), cwd=str(cwd),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
