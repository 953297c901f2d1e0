"""End-to-end fixtures: the real wrapper (``lw-embed run``) shipping to the real bundled
ingest server (``lw-embed ingest``), both as subprocesses on loopback.

Nothing here is autouse. Every process a fixture starts is tracked and stopped at the end
of the test, by pid: ingest servers get SIGTERM (SIGKILL if they do not exit in 10 s),
wrappers still running get SIGKILL together with their descendants (found by the PPid
links in /proc, see :func:`tests.linux.conftest.kill_tree`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from lw_embed.kernel import procfs
from tests.linux.conftest import clean_env, kill_tree, run_cli, wait_for

PY = sys.executable
LISTENING = re.compile(r"^lw-embed ingest listening on (http://\S+:(\d+))$")
WORKER_MODULE = b"lw_embed.runtime.worker"

__all__ = [
    "PY",
    "Agent",
    "Ingest",
    "IngestFactory",
    "catches",
    "children",
    "exec_events",
    "find_worker",
    "free_port",
    "is_worker_of",
    "wait_for",
    "write_atomic_text",
]


# -- small helpers ------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound once and released, never listened)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_atomic_text(path: Path, text: str) -> None:
    """tmp + rename: the agent never reads a half-written config."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def children(pid: int) -> list[int]:
    """Live (non-zombie) children of ``pid``, by the PPid field of /proc/*/stat."""
    out: list[int] = []
    for child in procfs.list_pids():
        try:
            st = procfs.read_stat(child)
        except OSError:
            continue
        if st.state != "Z" and st.ppid == pid:
            out.append(child)
    return out


def find_worker(wrapper_pid: int, exclude: set[int] | frozenset[int] = frozenset()) -> int | None:
    """The live (non-zombie) worker of the wrapper ``wrapper_pid``: its child whose
    cmdline names ``lw_embed.runtime.worker``; pids in ``exclude`` are skipped."""
    for pid in children(wrapper_pid):
        if pid in exclude:
            continue
        if _cmdline_has_worker(pid):
            return pid
    return None


def is_worker_of(pid: int, wrapper_pid: int) -> bool:
    """Re-check, right before signalling ``pid``, that it is still that wrapper's live
    worker (a child of it, not a zombie, running ``lw_embed.runtime.worker``)."""
    return pid in children(wrapper_pid) and _cmdline_has_worker(pid)


def _cmdline_has_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return WORKER_MODULE in f.read().split(b"\0")
    except OSError:
        return False


def catches(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler installed for ``signum`` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def exec_events(events: Sequence[dict[str, Any]], argv: Sequence[str]) -> list[dict[str, Any]]:
    """The ``process.exec`` events whose argv is exactly ``argv``."""
    want = list(argv)
    return [e for e in events if e.get("kind") == "process.exec" and e.get("argv") == want]


# -- the ingest server --------------------------------------------------------------------


class Ingest(NamedTuple):
    """A running ``lw-embed ingest``; unpacks as ``url, token_file, token``."""

    url: str
    token_file: Path
    token: str

    @property
    def port(self) -> int:
        return int(urllib.parse.urlsplit(self.url).port or 0)

    def get(self, path: str, params: dict[str, str] | None = None, timeout: float = 30.0) -> bytes:
        url = self.url.rstrip("/") + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def events(self, kind: str | None = None, agent: str | None = None,
               limit: int = 100_000) -> list[dict[str, Any]]:  # fmt: skip
        """``GET /v1/events`` with the bearer token: the stored events, parsed."""
        params = {"limit": str(limit)}
        if kind is not None:
            params["kind"] = kind
        if agent is not None:
            params["agent"] = agent
        body = self.get("/v1/events", params)
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]

    def agents(self) -> list[dict[str, Any]]:
        out = json.loads(self.get("/v1/agents"))
        assert isinstance(out, list), out
        return out

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``lw-embed query|agents --server URL --token-file F ARGS``."""
        sub, *rest = args
        return run_cli([sub, "--server", self.url, "--token-file", str(self.token_file), *rest],
                       cwd=self.token_file.parent, timeout=timeout)  # fmt: skip

    def query_cli(self, *args: str) -> list[dict[str, Any]]:
        res = self.cli("query", *args)
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


class IngestFactory:
    """Starts ``python -m lw_embed ingest`` servers sharing one token; stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = secrets.token_hex(16)
        self.token_file = tmp / "ingest-token"
        self.token_file.write_text(self.token + "\n")
        os.chmod(self.token_file, 0o600)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, port: int = 0, db: Path | None = None, timeout: float = 30.0) -> Ingest:
        """Start a server on 127.0.0.1:``port`` (0: any) and wait for its listening line."""
        db = db or self.tmp / f"ingest-{len(self.procs)}.sqlite"
        log = self.tmp / f"ingest-{len(self.procs)}.stderr"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [PY, "-m", "lw_embed", "ingest", "--listen", f"127.0.0.1:{port}", "--db", str(db),
                 "--token-file", str(self.token_file)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                env=clean_env(), cwd=str(self.tmp),
            )  # fmt: skip
        self.procs.append(proc)
        self.logs.append(log)
        assert proc.stdout is not None
        end = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = end - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                pytest.fail(f"ingest did not start (rc={proc.poll()}): {buf!r}\n"
                            f"{log.read_text(errors='replace')}")  # fmt: skip
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    continue  # EOF: poll() says why on the next turn
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        m = LISTENING.match(line)
        assert m, f"unexpected first line from ingest: {line!r}"
        if port:
            assert int(m.group(2)) == port, line
        return Ingest(m.group(1), self.token_file, self.token)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def ingest_factory(tmp_path: Path) -> Iterator[IngestFactory]:
    f = IngestFactory(tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def ingest(ingest_factory: IngestFactory) -> Ingest:
    """A running ingest on 127.0.0.1:<any>: ``url, token_file, token = ingest``."""
    return ingest_factory.start()


@pytest.fixture
def query(ingest: Ingest) -> Callable[..., list[dict[str, Any]]]:
    """``query(kind=None, agent=None)`` -> the events stored at the ``ingest`` fixture."""
    return ingest.events


# -- the wrapper --------------------------------------------------------------------------


class Agent:
    """Runs ``python -m lw_embed run --backend URL --data-dir D --config F -- CMD`` with
    ``LW_EMBED_TOKEN`` in its environment (never on the command line)."""

    def __init__(self, tmp: Path, token: str) -> None:
        self.tmp = tmp
        self.token = token
        self.data = tmp / "data"
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    @property
    def spool(self) -> Path:
        return self.data / "spool"

    def instance_id(self) -> str:
        return (self.spool / "instance_id").read_text().strip()

    def config(self, text: str, name: str = "lw-embed.toml") -> Path:
        path = self.tmp / name
        write_atomic_text(path, text)
        return path

    def argv(self, cmd: Sequence[str], *, backend: str, config: Path | None,
             data_dir: Path | None) -> list[str]:  # fmt: skip
        args = [PY, "-m", "lw_embed", "run", "--backend", backend,
                "--data-dir", str(data_dir or self.data)]  # fmt: skip
        if config is not None:
            args += ["--config", str(config)]
        return [*args, "--", *cmd]

    def start(self, cmd: Sequence[str], *, backend: str, config: Path | None = None,
              data_dir: Path | None = None, env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start the wrapper; stdin/stdout /dev/null, stderr into a file (:meth:`log`)."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        log = self.tmp / f"wrapper-{len(self.started)}.stderr"
        with open(log, "wb") as err:
            popen.setdefault("stderr", err)
            proc = subprocess.Popen(
                self.argv(cmd, backend=backend, config=config, data_dir=data_dir),
                env=clean_env({"LW_EMBED_TOKEN": self.token, **(env or {})}),
                cwd=str(self.tmp), **popen,
            )  # fmt: skip
        self.started.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        try:
            return self.logs[proc.pid].read_text(errors="replace")
        except (KeyError, FileNotFoundError):
            return ""

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        """Wait for a started wrapper; fail the test (tree killed) after ``timeout``."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"wrapper did not exit within {timeout}s: {proc.args!r}\n{self.log(proc)}")

    def run(self, cmd: Sequence[str], *, timeout: float = 60.0,
            **kw: Any) -> tuple[int, float, str]:  # fmt: skip
        """Run to completion: (exit status, seconds taken, stderr text)."""
        t0 = time.monotonic()
        proc = self.start(cmd, **kw)
        rc = self.wait(proc, timeout)
        return rc, time.monotonic() - t0, self.log(proc)

    def cleanup(self) -> None:
        for proc in self.started:
            kill_tree(proc)


@pytest.fixture
def agent(tmp_path: Path, ingest_factory: IngestFactory) -> Iterator[Agent]:
    """The wrapper runner; its token is the one the ``ingest_factory`` servers accept."""
    a = Agent(tmp_path, ingest_factory.token)
    try:
        yield a
    finally:
        a.cleanup()


@pytest.fixture
def poll() -> Callable[..., None]:
    """``poll(pred, timeout=10, what=...)``: wait for a condition, bounded."""
    return wait_for
