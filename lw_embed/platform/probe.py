"""Capability probes: what the agent may do here, decided by trying, not by reading bits.

Interface: ``/proc/self/status`` (CapEff, NoNewPrivs, Seccomp), ``/proc/version`` and
``/proc/cmdline`` (gVisor markers),
``uname(2)``; and two throw-away child processes: one is ``PTRACE_SEIZE``d, interrupted
and asked for ``PTRACE_GET_SYSCALL_INFO``; the other installs an allow-all seccomp filter
(after ``NO_NEW_PRIVS`` if it lacks ``CAP_SYS_ADMIN``). A runtime that denies ptrace or
seccomp through its own seccomp profile (gVisor, a locked-down container) is seen as it
is, whatever the capability bits say.

Capability: none to run; the results say which capabilities are usable.

Cost: two fork()s of a small process and a few syscalls: about 2-5 ms, once at start.

Failure modes: a probe that cannot run (fork fails) reports the technique as unavailable
with the error as the reason; it never raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform as _platform
import signal
from dataclasses import dataclass, field
from typing import Any

from lw_embed.kernel import ptrace as pt
from lw_embed.kernel import seccomp

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Probe results plus the technique chosen per source and why."""

    probes: dict[str, Probe]
    techniques: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    effects: tuple[str, ...] = ()

    def ok(self, name: str) -> bool:
        p = self.probes.get(name)
        return bool(p and p.ok)

    def report(self) -> dict[str, Any]:
        """The ``agent.capabilities`` payload."""
        return {
            "effects": list(self.effects),
            "probes": {k: {"detail": v.detail, "ok": v.ok} for k, v in sorted(self.probes.items())},
            "reasons": dict(sorted(self.reasons.items())),
            "techniques": dict(sorted(self.techniques.items())),
        }


def _status_fields() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def has_cap(cap_eff_hex: str, cap: int) -> bool:
    try:
        return bool(int(cap_eff_hex, 16) >> cap & 1)
    except ValueError:
        return False


def errname(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def probe_ptrace() -> tuple[Probe, Probe]:
    """(ptrace, syscall_info): can we SEIZE a child, and does GET_SYSCALL_INFO work."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        return Probe(False, f"fork failed: {exc}"), Probe(False, "not probed")
    if pid == 0:  # child: wait until the parent is done with us
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        try:
            pt.seize(pid, pt.PTRACE_O_EXITKILL)
        except OSError as exc:
            return Probe(False, f"PTRACE_SEIZE: {errname(exc.errno or 0)}"), Probe(
                False, "no ptrace"
            )
        try:
            pt.interrupt(pid)
            os.waitpid(pid, pt.WALL)
            pt.get_syscall_info(pid)
            info = Probe(True, "PTRACE_GET_SYSCALL_INFO")
        except OSError as exc:
            info = Probe(False, f"PTRACE_GET_SYSCALL_INFO: {errname(exc.errno or 0)}")
        return Probe(True, "PTRACE_SEIZE"), info
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        os.close(w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, pt.WALL)


def probe_seccomp(need_nnp: bool) -> Probe:
    """Can a child install a seccomp filter (setting NO_NEW_PRIVS first if needed)."""
    try:
        pid = os.fork()
    except OSError as exc:
        return Probe(False, f"fork failed: {exc}")
    if pid == 0:
        code = 0
        try:
            if need_nnp:
                seccomp.set_no_new_privs()
            seccomp.install(seccomp.build_trace_filter([]))
        except OSError as exc:
            code = min(exc.errno or 1, 255)
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255
    if code == 0:
        return Probe(True, "SECCOMP_MODE_FILTER" + (" after NO_NEW_PRIVS" if need_nnp else ""))
    return Probe(False, f"PR_SET_SECCOMP: {errname(code)}")


def _kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    parts = release.split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= want
    except (IndexError, ValueError):
        return False


#: the fixed, fake kernel build gVisor reports in /proc/version (and uname -v)
GVISOR_BUILD = "#1 SMP Sun Jan 10 15:06:54 PST 2016"


def _read_small(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return ""


def gvisor_marker(proc: str = "/proc") -> str:
    """Which gVisor marker this sandbox shows, or ``""`` when none.

    gVisor (Cloud Run gen1, ``runsc``) boots a fake kernel: ``/proc/cmdline`` is
    ``BOOT_IMAGE=/vmlinuz-4.4.0-gvisor quiet`` and ``/proc/version`` carries a fixed build
    string (newer releases dropped the word gVisor from it, so both files are read).
    ``dmesg`` ("Starting gVisor...") is not used: it often needs privilege.
    """
    cmdline = _read_small(f"{proc}/cmdline")
    if "gvisor" in cmdline.lower():
        return f"{proc}/cmdline: {cmdline.strip()[:80]}"
    version = _read_small(f"{proc}/version")
    if "gVisor" in version or GVISOR_BUILD in version:
        return f"{proc}/version: {version.strip()[:80]}"
    return ""


def probe(mode: str = "auto", seccomp_mode: str = "auto", nnp_mode: str = "auto",
          want_seccomp: bool = True) -> Capabilities:  # fmt: skip
    """Run every probe and choose the process technique.

    ``mode``: auto | ptrace | procfs (tracer.mode); ``seccomp_mode``: auto | on | off;
    ``nnp_mode``: auto | never; ``want_seccomp``: some syscall needs tracing at all.
    """
    st = _status_fields()
    capeff = st.get("CapEff", "0")
    release = _platform.release()
    probes: dict[str, Probe] = {
        "cap_sys_ptrace": Probe(has_cap(capeff, CAP_SYS_PTRACE)),
        "cap_sys_admin": Probe(has_cap(capeff, CAP_SYS_ADMIN)),
        "cap_net_raw": Probe(has_cap(capeff, CAP_NET_RAW)),
        "cap_net_admin": Probe(has_cap(capeff, CAP_NET_ADMIN)),
        "kernel": Probe(_kernel_at_least(release, (4, 8)), release),
        "gvisor": Probe(bool(gv := gvisor_marker()), gv),
        "no_new_privs_set": Probe(st.get("NoNewPrivs", "0") == "1"),
        "seccomp_mode": Probe(True, st.get("Seccomp", "unknown")),
    }
    techniques: dict[str, str] = {}
    reasons: dict[str, str] = {}
    effects: list[str] = []

    if mode == "procfs":
        probes["ptrace"] = Probe(False, "not probed (tracer.mode = procfs)")
    else:
        probes["ptrace"], probes["syscall_info"] = probe_ptrace()

    need_nnp = not probes["cap_sys_admin"].ok and not probes["no_new_privs_set"].ok
    if probes["ptrace"].ok and want_seccomp and seccomp_mode != "off":
        if need_nnp and nnp_mode == "never":
            probes["seccomp"] = Probe(False, "needs NO_NEW_PRIVS (tracer.no_new_privs = never)")
        else:
            probes["seccomp"] = probe_seccomp(need_nnp)

    if not probes["ptrace"].ok:
        techniques["processes"] = "procfs"
        reasons["processes"] = (
            f"ptrace unavailable ({probes['ptrace'].detail}): /proc reconciliation, "
            "short-lived processes can be missed"
        )
    elif probes.get("seccomp", Probe(False)).ok and probes.get("syscall_info", Probe(False)).ok:
        techniques["processes"] = "ptrace+seccomp"
        reasons["processes"] = "PTRACE_SEIZE with a seccomp filter: only traced syscalls stop"
        if need_nnp:
            effects.append(
                "NO_NEW_PRIVS is set on the workload (no CAP_SYS_ADMIN): setuid and "
                "file-capability binaries do not gain privilege; set tracer.seccomp = "
                "\"off\" to keep them working without syscall tracing"
            )
    else:
        techniques["processes"] = "ptrace"
        if not want_seccomp:
            why = "no syscall needs tracing"
        elif seccomp_mode == "off":
            why = "tracer.seccomp = off"
        elif not probes.get("syscall_info", Probe(False)).ok:
            why = f"no PTRACE_GET_SYSCALL_INFO ({probes['syscall_info'].detail})"
        else:
            why = f"seccomp unavailable ({probes['seccomp'].detail})"
        reasons["processes"] = f"PTRACE_SEIZE events only, no syscall tracing: {why}"
    if mode == "ptrace" and techniques["processes"] == "procfs":
        reasons["processes"] += " (tracer.mode = ptrace was asked for)"
    techniques["network.connect"] = (
        "seccomp" if techniques["processes"] == "ptrace+seccomp" and want_seccomp else "none"
    )
    return Capabilities(probes, techniques, reasons, tuple(effects))
