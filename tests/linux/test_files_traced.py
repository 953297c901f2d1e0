"""File monitoring under the whole agent (`lw-embed run --watch`): who-data from the traced
syscalls joined with inotify, and the cost of tracing them (seccomp stops counted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.linux.test_tracer import events

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, seccomp)"),
]

#: the workload waits until the agent's worker watches W (its inotify fdinfo lists W's
#: inode), so what it does is not racing the agent's start-up
WAIT_FOR_WATCH = r'''
import os, sys, time
ino = format(os.stat(sys.argv[1]).st_ino, "x")
def watched():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f" ino:{ino} " in f.read():
                        return True
            except OSError:
                pass
    return False
end = time.monotonic() + 60
while not watched() and time.monotonic() < end:
    time.sleep(0.02)
os.execvp(sys.argv[2], sys.argv[2:])
'''


def agent(tmp: Path, cmd: list[str], watch: Path | None, config: str = "",
          ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:  # fmt: skip
    tmp.mkdir(exist_ok=True)
    cfg = tmp / "lw.toml"
    if "[files]" not in config:  # only what the test watches, not the default trees too
        config = "[files]\ndefault_rules = false\n" + config
    # a loaded machine starves the worker (nice 10): give it time to drain at the end
    cfg.write_text(config + "[shutdown]\ngrace = 120\nflush = 60\n[aggregate.keys]\n")
    args = [sys.executable, "-m", "lw_embed", "run", "--output", str(tmp / "out"),
            "--data-dir", str(tmp / "data"), "--config", str(cfg)]  # fmt: skip
    if watch is not None:
        helper = tmp / "wait_for_watch.py"
        helper.write_text(WAIT_FOR_WATCH)
        args += ["--watch", str(watch), "--", sys.executable, str(helper), str(watch), *cmd]
    else:
        args += ["--", *cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc, events(tmp)


def _changes(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e["kind"] == "file.change"]


def _seccomp_stops(evs: list[dict[str, Any]]) -> int:
    status = [e for e in evs if e["kind"] == "agent.status"]
    assert status, "no agent.status event"
    return int(status[-1]["metrics"].get("stops.seccomp", 0))


@pytest.fixture
def w(tmp_path: Path) -> Path:
    d = tmp_path / "w"
    d.mkdir()
    return d.resolve()


def test_traced_shell_workload_each_action_names_its_process(tmp_path: Path, w: Path) -> None:
    script = ("echo a > W/f; mkdir -p W/d/e; echo b > W/d/e/g; mv W/f W/h; chmod 600 W/h; "
              "rm W/d/e/g").replace("W", str(w))  # fmt: skip
    _, evs = agent(tmp_path, ["sh", "-c", script], w)
    execs = {e["exec_id"]: e for e in evs if e["kind"] == "process.exec"}
    got = sorted((e["action"], e["path"]) for e in _changes(evs))
    assert got == sorted([
        ("create", f"{w}/f"), ("create", f"{w}/d"), ("create", f"{w}/d/e"),
        ("create", f"{w}/d/e/g"), ("rename", f"{w}/h"), ("attrib", f"{w}/h"),
        ("delete", f"{w}/d/e/g")])  # fmt: skip
    who = {}
    for e in _changes(evs):
        assert e["attribution"] == "syscall", e
        proc = execs[e["exec_id"]]  # the process.exec of the process that did it
        assert proc["pid"] == e["pid"]
        who[(e["action"], e["path"])] = os.path.basename(proc["exe"])
    sh = who[("create", f"{w}/f")]
    assert sh in ("sh", "dash", "bash") and who[("create", f"{w}/d/e/g")] == sh
    assert who[("create", f"{w}/d")] == who[("create", f"{w}/d/e")] == "mkdir"
    assert who[("rename", f"{w}/h")] == "mv"
    assert who[("attrib", f"{w}/h")] == "chmod"
    assert who[("delete", f"{w}/d/e/g")] == "rm"
    ren = next(e for e in _changes(evs) if e["action"] == "rename")
    assert ren["old_path"] == f"{w}/f"


def test_python_workload_write_names_pythons_pid_and_exe(tmp_path: Path, w: Path) -> None:
    code = f"import os; open('{w}/py.txt', 'w').write('hi'); print(os.getpid())"
    proc, evs = agent(tmp_path, [sys.executable, "-c", code], w)
    pid = int(proc.stdout.split()[-1])
    (ev,) = [e for e in _changes(evs) if e["path"] == f"{w}/py.txt"]
    assert ev["action"] == "create" and ev["attribution"] == "syscall"
    assert ev["pid"] == pid
    assert os.path.realpath(ev["exe"]) == os.path.realpath(sys.executable)
    assert ev["syscall"] in ("openat", "open") and ev["uid"] == os.getuid()


#: openat2 and fchmodat2 through syscall(2) (glibc wraps neither); prints the pid
RAW_CALLS = r"""
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
w = sys.argv[1].encode()
def openat2(path, flags):  # openat2 wants mode 0 unless it creates
    mode = 0o600 if flags & os.O_CREAT else 0
    how = ctypes.create_string_buffer(struct.pack("QQQ", flags, mode, 0), 24)
    fd = libc.syscall(437, -100, path, how, ctypes.c_size_t(24))
    assert fd >= 0, ctypes.get_errno()
    os.close(fd)
openat2(w + b"/o2.txt", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
for _ in range(50):
    openat2(w + b"/o2.txt", os.O_RDONLY | os.O_CLOEXEC)  # stops, but no record
time.sleep(1.5)  # past [files] coalesce_quiet: the chmod is an event of its own
rc = libc.syscall(452, -100, w + b"/o2.txt", ctypes.c_uint(0o640), 0)
assert rc == 0 or ctypes.get_errno() == 38, ctypes.get_errno()  # ENOSYS before Linux 6.6
print(os.getpid(), rc)
"""


def test_openat2_and_fchmodat2_are_attributed_and_read_only_openat2_dropped(
        tmp_path: Path, w: Path) -> None:  # fmt: skip
    proc, evs = agent(tmp_path, [sys.executable, "-c", RAW_CALLS, str(w)], w)
    pid, rc = (int(x) for x in proc.stdout.split()[-2:])
    mine = [e for e in _changes(evs) if e["path"] == f"{w}/o2.txt"]
    create = [e for e in mine if e["action"] == "create"]
    assert len(create) == 1 and create[0]["syscall"] == "openat2", mine
    assert create[0]["attribution"] == "syscall" and create[0]["pid"] == pid
    if rc == 0:  # the kernel has fchmodat2
        (attrib,) = [e for e in mine if e["action"] == "attrib"]
        assert attrib["syscall"] == "fchmodat2" and attrib["pid"] == pid
    # 50 read-only openat2: each stopped (BPF cannot see their flags) and sent nothing
    assert _seccomp_stops(evs) >= 51
    assert not [e for e in mine if e["action"] not in ("create", "attrib")]


def test_a_write_through_a_symlinked_root_is_attributed(tmp_path: Path) -> None:
    """/bin -> usr/bin on a usr-merged image: the rule names the link, inotify watches the
    target, the workload writes through the link; the traced path must join."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    cfg = f'[files]\ndefault_rules = false\n[[files.rules]]\npath = "{link}"\n'
    # (--watch of the target too: only so that the workload waits for the watch)
    _, evs = agent(tmp_path / "a", ["sh", "-c", f"echo x > {link}/viasym"], real, cfg)
    (ev,) = [e for e in _changes(evs) if e["path"].endswith("/viasym")]
    assert ev["path"] == f"{real.resolve()}/viasym"
    assert ev["attribution"] == "syscall" and ev["action"] == "create"


WRITES = "i=0; while [ $i -lt 200 ]; do : > {f}; i=$((i+1)); done"


def test_with_file_monitoring_off_write_opens_cost_zero_stops(tmp_path: Path) -> None:
    target = tmp_path / "x"
    off = "[files]\nenabled = false\n"
    _, evs = agent(tmp_path / "off", ["sh", "-c", WRITES.format(f=target)], None, off)
    assert _seccomp_stops(evs) == 0
    # the same workload with monitoring on (the file outside the roots: still stopped, the
    # core drops it on the prefix test): the count above would have seen them
    cfg = (f'[files]\nenabled = true\ndefault_rules = false\n'
           f'[[files.rules]]\npath = "{tmp_path}/r"\n')
    (tmp_path / "r").mkdir()
    _, evs = agent(tmp_path / "on", ["sh", "-c", WRITES.format(f=target)], None, cfg)
    assert _seccomp_stops(evs) >= 200


def test_read_only_opens_never_stop_with_monitoring_on(tmp_path: Path, w: Path) -> None:
    (w / "r.txt").write_text("x")
    reads = f"i=0; while [ $i -lt 200 ]; do read x < {w}/r.txt; i=$((i+1)); done"
    _, evs = agent(tmp_path, ["sh", "-c", reads], w)
    assert _seccomp_stops(evs) == 0  # a read-only open never stops
    assert _changes(evs) == []
