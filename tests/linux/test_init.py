"""PID-1 duties of ``lw-embed run -- CMD`` on the real kernel (DESIGN.md section 2).

Exit codes, signal forwarding (optionally to the process group), the signal state the
workload inherits, reaping of orphans as a real PID 1, the subreaper, the shutdown grace of
the whole tree and its deadline, terminals and job control, and config errors that must
stop the run before anything starts.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces, unshare)"),
]

PY = sys.executable
SIGRT3 = signal.SIGRTMIN + 3


def soon(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll ``pred`` every 10 ms for up to ``timeout`` seconds; its last value."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def numbers(path: Path) -> list[int]:
    """The signal numbers a recorder wrote, in order."""
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def message_lines(stderr: bytes) -> list[str]:
    """stderr without the agent's own log records (``lw-embed[core]: WARNING ...``): under
    CPU load the core may log that it killed a slow worker, which is not the message."""
    return [ln for ln in stderr.decode().strip().splitlines() if not ln.startswith("lw-embed[")]


# --- 1. exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 3, 42, 127, 128, 200, 254, 255])
def test_exit_code_passes_through(run_wrapper: Any, code: int) -> None:
    r = run_wrapper(["sh", "-c", f"exit {code}"])
    assert r.returncode == code, r.stderr


def test_exit_codes_sampled_over_0_255(run_wrapper: Any) -> None:
    """One wrapper per code. All 256 would take 45-100 s here (0.18-0.4 s per run, more
    under load), so a spread sample is run instead: every 17th code, 0 to 255 (the
    parametrized set above covers the interesting edges)."""
    codes = list(range(0, 256, 17))
    assert codes[-1] == 255
    t0 = time.monotonic()
    got = {}
    for code in codes:
        got[code] = run_wrapper(["sh", "-c", f"exit {code}"], timeout=20).returncode
        assert time.monotonic() - t0 < 120, "sampled exit-code loop is far too slow"
    assert got == {c: c for c in codes}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV,
                                 signal.SIGABRT, signal.SIGHUP, signal.SIGUSR1])  # fmt: skip
def test_killed_by_signal_gives_128_plus_n(run_wrapper: Any, sig: signal.Signals) -> None:
    # ulimit -c 0: no core file for SEGV/ABRT (and the run's cwd is the tmp dir anyway).
    # The wrapper hands on ignored signals, so a test run under nohup (SIGHUP ignored)
    # would see exit 3: the signal gets its default action in the wrapper's environment.
    def default_disposition() -> None:
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)

    r = run_wrapper(["sh", "-c", f"ulimit -c 0; kill -{sig.name[3:]} $$; exit 3"],
                    preexec_fn=default_disposition)  # fmt: skip
    assert r.returncode == 128 + sig, r.stderr


def test_missing_command_gives_127_and_one_line(run_wrapper: Any) -> None:
    name = "lw-embed-test-no-such-command"
    r = run_wrapper([name, "arg"])
    assert r.returncode == 127
    lines = message_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert name in lines[0]


def test_missing_command_by_path_gives_127(run_wrapper: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "nodir" / "nothing")
    r = run_wrapper([path])
    assert r.returncode == 127
    lines = message_lines(r.stderr)
    assert len(lines) == 1 and path in lines[0], r.stderr


def test_not_executable_gives_126(run_wrapper: Any, tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\ntouch ran\n")
    script.chmod(0o644)  # even root cannot execve a file without any x bit
    r = run_wrapper([str(script)])
    assert r.returncode == 126, r.stderr
    lines = message_lines(r.stderr)
    assert len(lines) == 1 and str(script) in lines[0], r.stderr
    assert not (tmp_path / "ran").exists()


# --- 2. signals -------------------------------------------------------------------------

SEQUENCE = [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
            SIGRT3, signal.SIGTERM]  # fmt: skip


def test_signals_forwarded_in_order_and_exit_code(wrapper: Any, tmp_path: Path) -> None:
    rec, ready = tmp_path / "rec", tmp_path / "ready"
    proc = wrapper.start([PY, wrapper.helper("init_sigrecorder.py"), str(rec), str(ready), "77"])
    wrapper.wait_for(ready.exists, 15, "the signal recorder to be ready")
    assert int(ready.read_text()) in wrapper.descendants(proc.pid)
    for i, sig in enumerate(SEQUENCE):
        os.kill(proc.pid, sig)
        # wait for this one to arrive (or give up after 5 s and let the assert show it)
        soon(lambda n=i + 1: len(numbers(rec)) >= n, 5)
        time.sleep(0.05)
    rc = proc.wait(timeout=15)
    assert numbers(rec) == [int(s) for s in SEQUENCE], wrapper.log(proc)
    assert rc == 77


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


# sh (the direct child) records USR1 through a trap; the grandchild is a recorder started
# in the background (same process group: sh -c has no job control).
PGROUP_SCRIPT = """
trap 'echo 10 >> "$1"' USR1
"$3" "$4" "$2" "$5" &
p=$!
while kill -0 $p 2>/dev/null; do wait $p; done
"""


@pytest.mark.parametrize("pgroup", [True, False], ids=["pgroup", "no-pgroup"])
def test_pgroup_forwarding_reaches_grandchild(wrapper: Any, tmp_path: Path,
                                              pgroup: bool) -> None:  # fmt: skip
    sh_rec, gc_rec, ready = tmp_path / "sh.rec", tmp_path / "gc.rec", tmp_path / "ready"
    cmd = ["sh", "-c", PGROUP_SCRIPT, "sh", str(sh_rec), str(gc_rec), PY,
           wrapper.helper("init_sigrecorder.py"), str(ready)]  # fmt: skip
    proc = wrapper.start(cmd, pgroup=pgroup)
    wrapper.wait_for(ready.exists, 15, "the grandchild recorder to be ready")
    gc_pid = int(ready.read_text())
    sh_pid = _ppid(gc_pid)
    assert _ppid(sh_pid) == proc.pid  # wrapper -> sh -> recorder
    assert os.getpgid(gc_pid) == os.getpgid(sh_pid) == sh_pid  # the workload's own group
    os.kill(proc.pid, signal.SIGUSR1)
    wrapper.wait_for(lambda: numbers(sh_rec) == [10], 5, "the direct child to get SIGUSR1")
    if pgroup:
        wrapper.wait_for(lambda: 10 in numbers(gc_rec), 5, "the grandchild to get SIGUSR1")
    else:
        time.sleep(0.5)  # time enough for a forwarded signal to arrive: it must not
        assert 10 not in numbers(gc_rec), "without --pgroup only the direct child gets it"
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=15)
    assert rc == 128 + signal.SIGTERM  # sh has no TERM trap
    assert numbers(sh_rec) == [10]
    gc = numbers(gc_rec)
    assert signal.SIGTERM in gc  # with --pgroup forwarded; without, the wrapper's drain TERM
    assert (gc[0] == signal.SIGUSR1) if pgroup else (signal.SIGUSR1 not in gc), gc


# --- 3. inherited state -------------------------------------------------------------------


def _sig_line(text: str, name: str) -> int:
    return next(int(ln.split()[1], 16) for ln in text.splitlines() if ln.startswith(name + ":"))


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_workload_inherits_ignored_and_blocked_signals(run_wrapper: Any, wrapper: Any,
                                                       tmp_path: Path) -> None:  # fmt: skip
    launcher_state = tmp_path / "launcher.state"
    prefix = [PY, wrapper.helper("init_sig_launcher.py"), str(launcher_state), "--"]
    r = run_wrapper(["cat", "/proc/self/status"], prefix=prefix)
    assert r.returncode == 0, r.stderr
    status = r.stdout.decode()
    given = launcher_state.read_text()
    ign, blk = _sig_line(status, "SigIgn"), _sig_line(status, "SigBlk")
    # what the launcher set
    assert _sig_line(given, "SigBlk") == bit(signal.SIGUSR2)
    assert _sig_line(given, "SigIgn") & bit(signal.SIGUSR1)
    assert not _sig_line(given, "SigIgn") & (bit(signal.SIGPIPE) | bit(signal.SIGXFSZ))
    # what the workload got
    assert ign & bit(signal.SIGUSR1), f"SIGUSR1 no longer ignored: SigIgn={ign:016x}"
    assert not ign & bit(signal.SIGPIPE), f"SIGPIPE left ignored by Python: SigIgn={ign:016x}"
    assert not ign & bit(signal.SIGXFSZ), f"SIGXFSZ left ignored by Python: SigIgn={ign:016x}"
    assert ign == _sig_line(given, "SigIgn"), f"SigIgn {ign:016x} != given {given!r}"
    assert blk == bit(signal.SIGUSR2), f"SigBlk={blk:016x}, want only SIGUSR2"


def test_stdio_cwd_and_env_are_inherited(run_wrapper: Any, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(256 * 1024)  # more than a pipe buffer
    r = run_wrapper(["cat"], input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data

    work = tmp_path / "some dir"
    work.mkdir()
    r = run_wrapper(
        ["sh", "-c", 'pwd -P; echo "$LWTEST_MARK"; echo to-stderr >&2; exit 4'],
        cwd=work, env={"LWTEST_MARK": "marker value 42"},
    )  # fmt: skip
    assert r.returncode == 4
    assert r.stdout.decode().splitlines() == [str(work.resolve()), "marker value 42"]
    assert "to-stderr" in r.stderr.decode()


# --- 4. zombies as a real PID 1 ------------------------------------------------------------

ZOMBIE_SCRIPT = """
for d in {delays}; do ( sleep $d & ); done
( sh -c 'sleep 0.3; grep PPid: /proc/$$/status' & )
sleep 1.2
exec "$1" "$2" sleep
"""


def test_pid1_reaps_100_orphans(run_wrapper: Any, wrapper: Any) -> None:
    """Orphans sleep 0..1 s; the workload sleeps 1.2 s after making them, then the count is
    taken 200 ms after the last ``sleep`` exited (waited for, so load cannot make a still
    running orphan look like a missed reap)."""
    rng = random.Random(20240601)
    delays = " ".join(f"{rng.random():.3f}" for _ in range(100))
    script = ZOMBIE_SCRIPT.format(delays=delays)
    r = run_wrapper(["sh", "-c", script, "sh", PY, wrapper.helper("init_count_zombies.py")],
                    prefix=["unshare", "--pid", "--fork", "--mount-proc"], timeout=30)  # fmt: skip
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    lines = out.split("\n")
    assert "PPid:\t1" in lines, f"the orphans were not adopted by PID 1: {out!r}"
    counts = [ln for ln in lines if ln.startswith("zombies ")]
    assert counts == ["zombies 0"], f"{out}\n{err}"


# --- 5. subreaper ------------------------------------------------------------------------


def test_subreaper_adopts_orphans(wrapper: Any, tmp_path: Path) -> None:
    out = tmp_path / "orphan"
    proc = wrapper.start([PY, wrapper.helper("init_orphan_ppid.py"), str(out)])
    rc = proc.wait(timeout=20)
    assert rc == 0, wrapper.log(proc)
    gc, ppid, parent = (int(x) for x in out.read_text().split())
    assert proc.pid != 1
    assert parent == proc.pid  # sanity: the workload is the wrapper's child
    assert ppid == proc.pid, f"orphan {gc} was adopted by {ppid}, not by the wrapper {proc.pid}"


# --- 6. shutdown: the grandchild's grace, and the deadline --------------------------------

GRACE_SCRIPTS = {
    # pgroup: TERM reaches sh and the grandchild; sh dies of it
    True: '"$1" "$2" "$3" "$4" & wait',
    # no pgroup: only sh gets TERM and exits 5; the wrapper must TERM the grandchild
    False: 'trap "exit 5" TERM; "$1" "$2" "$3" "$4" & wait',
}


@pytest.mark.parametrize("pgroup", [True, False], ids=["pgroup", "no-pgroup"])
def test_grandchild_gets_its_grace(wrapper: Any, tmp_path: Path, pgroup: bool) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    cmd = ["sh", "-c", GRACE_SCRIPTS[pgroup], "sh", PY, wrapper.helper("init_slow_term.py"),
           str(ready), str(done)]  # fmt: skip
    proc = wrapper.start(cmd, pgroup=pgroup)
    wrapper.wait_for(ready.exists, 15, "the slow grandchild to be ready")
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=15)
    assert done.exists(), "the wrapper exited before its grandchild finished shutting down"
    assert done.read_text() == "done\n"
    assert rc == (128 + signal.SIGTERM if pgroup else 5)


def test_term_ignored_is_killed_after_grace(wrapper: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "grace.toml"
    cfg.write_text("[shutdown]\ngrace = 2.0\nflush = 0.5\n")
    ready = tmp_path / "ready"
    proc = wrapper.start(
        ["sh", "-c", 'trap "" TERM; : > "$1"; exec sleep 30', "sh", str(ready)], config=cfg
    )
    wrapper.wait_for(ready.exists, 15, "the workload to start")
    time.sleep(0.1)  # let sh exec sleep
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=20)
    elapsed = time.monotonic() - t0
    assert rc == 128 + signal.SIGKILL, wrapper.log(proc)
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f}s with grace = 2.0"


# --- 7. terminals ---------------------------------------------------------------------------


def _make_ctty() -> None:  # in the child, after setsid(): the pty slave on fd 0 becomes its tty
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    def __init__(self, wrapper: Any, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        try:
            self.proc = wrapper.start(cmd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                      start_new_session=True, preexec_fn=_make_ctty)  # fmt: skip
        finally:
            os.close(slave)
        self.buf = b""
        self.pos = 0

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Read until ``needle`` appears after what earlier expects consumed."""
        end = time.monotonic() + timeout
        while needle not in self.buf[self.pos :]:
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {needle!r}; got {self.buf[self.pos :]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every slave fd is closed
                    chunk = b""
                if not chunk:
                    pytest.fail(f"terminal closed waiting for {needle!r}; got {self.buf!r}")
                self.buf += chunk
        i = self.buf.index(needle, self.pos) + len(needle)
        seen, self.pos = self.buf[self.pos : i], i
        return seen

    def close(self) -> None:
        os.close(self.master)


def test_ctrl_c_on_a_terminal_reaches_the_workload(wrapper: Any) -> None:
    tty = Pty(wrapper, [PY, wrapper.helper("init_tty_sigint.py")])
    try:
        tty.expect(b"ready fg=")
        fg = tty.expect(b"\n")
        assert fg.strip() == b"True", "the workload's group is not the terminal's foreground"
        tty.send(b"\x03")
        tty.expect(b"got SIGINT")
        assert tty.proc.wait(timeout=10) == 0
    finally:
        tty.close()


def test_job_control_in_interactive_bash(wrapper: Any, tmp_path: Path) -> None:
    env = {"TERM": "dumb", "PS1": "PROMPT$ ", "HISTFILE": str(tmp_path / "bash_history"),
           "INPUTRC": "/dev/null"}  # fmt: skip
    tty = Pty(wrapper, ["bash", "--norc", "--noprofile", "-i"], env=env)
    try:
        early = tty.expect(b"PROMPT$ ")
        assert b"no job control" not in early and b"cannot set terminal" not in early, early
        tty.send(b"sleep 30\n")

        job: list[int] = []

        def sleep_in_foreground() -> bool:
            for pid in wrapper.descendants(tty.proc.pid):
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "sleep" and os.getpgid(pid) == os.tcgetpgrp(tty.master):
                        job.append(pid)
                        return True
                except OSError:
                    continue
            return False

        def state(pid: int) -> str:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return stat[stat.rindex(")") + 2]

        wrapper.wait_for(sleep_in_foreground, 10, "sleep 30 to be the foreground job")
        tty.send(b"\x1a")  # Ctrl-Z
        tty.expect(b"Stopped")
        tty.expect(b"PROMPT$ ")
        # stopped for real (group-stop kept by the tracer), not resumed behind bash's back
        time.sleep(0.2)
        assert state(job[0]) in ("T", "t"), f"job state {state(job[0])!r} after Ctrl-Z"
        # JOB''DONE: the echoed input line must not match the expectation
        tty.send(b"kill %1; sleep 0.2; echo JOB''DONE; exit 0\n")
        tty.expect(b"JOBDONE")
        assert tty.proc.wait(timeout=10) == 0
    finally:
        tty.close()


def test_ctrl_z_suspends_the_wrapper_and_fg_resumes_it(wrapper: Any, tmp_path: Path) -> None:
    """The shell that started the wrapper gets its terminal back on Ctrl-Z (the wrapper
    stops itself along with the workload) and ``fg`` continues both."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LW_EMBED_")}
    env.update({"TERM": "dumb", "PS1": "PROMPT$ ", "INPUTRC": "/dev/null",
                "HISTFILE": str(tmp_path / "bash_history")})  # fmt: skip
    master, slave = os.openpty()
    try:
        shell = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=slave,
                                 stdout=slave, stderr=slave, env=env, cwd=str(tmp_path),
                                 start_new_session=True, preexec_fn=_make_ctty)  # fmt: skip
    finally:
        os.close(slave)
    wrapper.started.append(shell)
    tty = Pty.__new__(Pty)
    tty.master, tty.proc, tty.buf, tty.pos = master, shell, b"", 0
    try:
        tty.expect(b"PROMPT$ ")
        script = "sleep 1.5; echo RESUMED''-OK"
        cmd = " ".join(shlex.quote(a) for a in wrapper.argv(["sh", "-c", script]))
        tty.send(cmd.encode() + b"\n")
        def sleeping() -> bool:
            for p in wrapper.descendants(shell.pid):
                try:
                    if Path(f"/proc/{p}/comm").read_text().strip() == "sleep":
                        return True
                except OSError:
                    continue
            return False

        wrapper.wait_for(sleeping, 10, "the workload's sleep")
        time.sleep(0.2)
        tty.send(b"\x1a")  # Ctrl-Z: the workload's group stops, so must the wrapper
        tty.expect(b"Stopped")
        tty.expect(b"PROMPT$ ")  # the shell has its terminal back
        tty.send(b"fg\n")
        tty.expect(b"RESUMED-OK")
        tty.send(b"echo EXIT''=$?\n")
        tty.expect(b"EXIT=0")
        tty.send(b"exit 0\n")
        assert shell.wait(timeout=10) == 0
    finally:
        tty.close()


# --- 8. config errors stop the run before it starts ------------------------------------------


def test_unknown_config_key_exits_2_before_running(run_wrapper: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tracer]\nargv_max_bytez = 100\n")
    marker = tmp_path / "workload-ran"
    r = run_wrapper(["sh", "-c", f"touch '{marker}'"], config=bad)
    assert r.returncode == 2
    assert "tracer.argv_max_bytez" in r.stderr.decode()
    assert not marker.exists(), "the workload ran despite the config error"


def test_bad_env_override_exits_2_before_running(run_wrapper: Any, tmp_path: Path) -> None:
    marker = tmp_path / "workload-ran"
    r = run_wrapper(["sh", "-c", f"touch '{marker}'"],
                    env={"LW_EMBED_TRACER_ARGV_MAX_BYTES": "abc"})  # fmt: skip
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "tracer.argv_max_bytes" in err, err
    assert not marker.exists(), "the workload ran despite the config error"


def test_validate_config(wrapper: Any, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[shutdown]\ngrace = 2.0\nflush = 0.5\n\n[signals]\npgroup = true\n")
    r = wrapper.cli(["validate-config", str(good)])
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[shutdown]\ngrace = 2.0\ngraec = 1.0\n")
    r = wrapper.cli(["validate-config", str(bad)])
    assert r.returncode == 2
    assert "shutdown.graec" in r.stderr
