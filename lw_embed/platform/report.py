"""The ``lw-embed env`` report: platform, identity, probes and the technique per source.

Interface: :func:`build` runs :func:`lw_embed.platform.identity.detect` (environment,
``/proc/self/cgroup``, ``/proc/self/mountinfo``, the platform's metadata endpoint) and
:func:`lw_embed.platform.probe.probe`; :func:`render` turns the result into text for a
person. The JSON form (``lw-embed env --json``) is the dict :func:`build` returns.

Capability: none to run; the probes say which capabilities are usable.

Cost: the probes (two forks, a few ms) plus at most the metadata budget (1 s default);
per worker source, its module's import and its ``probe(cfg, mode)`` when it has one
(sources without one are listed as ``?``: building them could start scans).

Failure modes: none of its own — an endpoint that is down shows as
``identity.metadata = "failed"`` (or ``timeout``) with the reason in
``identity.errors``; a probe that cannot run shows as unavailable with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lw_embed import __version__
from lw_embed.config import Config
from lw_embed.platform import detect, identity, probe


def _identity_dict(ident: identity.Identity) -> dict[str, Any]:
    return {
        "cloud": dict(ident.cloud),
        "container_id": ident.container_id,
        "container_id_source": ident.container_id_source,
        "errors": list(ident.errors),
        "gvisor": ident.gvisor,
        "hostname": ident.hostname,
        "kubernetes": dict(ident.kubernetes),
        "metadata": ident.metadata,
    }


MODES = ("run", "sidecar", "in-app")
#: the worker's name for each mode (SourceContext.mode)
_WORKER_MODE = {"run": "wrapper", "sidecar": "sidecar", "in-app": "in-app"}


def build(cfg: Config, env: Mapping[str, str], *, budget: float = identity.DEFAULT_BUDGET,
          fetch: bool = True, root: str = "/", mode: str = "run") -> dict[str, Any]:  # fmt: skip
    """Everything ``lw-embed env`` shows, as JSON-ready data with sorted keys; the
    techniques are those of ``mode`` (run | sidecar | in-app)."""
    from lw_embed.sources.tracer import TracerOptions, seccomp_rules

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    ident = identity.detect(env, root=root, budget=budget, fetch=fetch)
    plat = detect.detect(env, identity=ident)
    grace, grace_source = detect.shutdown(cfg.shutdown.grace, env)  # exactly the cores'
    t = cfg.tracer
    if mode == "sidecar":  # no seccomp filter there: it could never be removed
        caps = probe.probe(t.mode, "off", t.no_new_privs, want_seccomp=False)
        if caps.techniques.get("processes") != "procfs":
            caps.techniques["processes"] = "ptrace"
            caps.reasons["processes"] = ("PTRACE_SEIZE of the processes in scope, no "
                                         "seccomp filter")  # fmt: skip
        caps.techniques["network.connect"] = "none"
        caps.reasons["network.connect"] = "sidecar mode installs no seccomp filter"
    elif mode == "in-app":
        caps = probe.Capabilities(probes={}, techniques={"processes": "procfs"},
                                  reasons={"processes": "in-app: the host's children from "
                                                        "/proc"})  # fmt: skip
    else:
        rules = seccomp_rules(TracerOptions(t.argv_max_bytes, t.argv_max_args,
                                            t.trace_connect))  # fmt: skip
        caps = probe.probe(t.mode, t.seccomp, t.no_new_privs, want_seccomp=bool(rules))
    for name, (tech, why) in source_techniques(cfg, _WORKER_MODE[mode]).items():
        caps.techniques[name], caps.reasons[name] = tech, why
    report: dict[str, Any] = {
        "identity": _identity_dict(ident),
        "limits": list(ident.limits),
        "mode": mode,
        "pid": os.getpid(),
        "platform": plat.name,
        "resource": ident.resource(),
        "shutdown_grace": grace,
        "shutdown_grace_source": grace_source,
        "version": __version__,
        **caps.report(),
    }
    return dict(sorted(report.items()))


def source_techniques(cfg: Config, mode: str) -> dict[str, tuple[str, str]]:
    """(technique, reason) of every worker source in ``mode``: the source module's cheap
    ``probe(cfg, mode)`` when it has one (nothing is built or started), else a pointer
    to the running agent's report."""
    import importlib

    from lw_embed.sources.base import FACTORIES

    out: dict[str, tuple[str, str]] = {}
    for name, target in FACTORIES.items():
        module = target.partition(":")[0]
        try:
            fn = getattr(importlib.import_module(module), "probe", None)
            if fn is None:
                out[name] = ("?", "decided when the source starts: see agent.capabilities")
                continue
            tech, why = fn(cfg, mode)
            out[name] = (str(tech), str(why))
        except Exception as exc:  # a broken source module is what the agent would see too
            out[name] = ("none", f"{type(exc).__name__}: {exc}")
    return out


def _kv(d: Mapping[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}{k:<22} {v}" for k, v in sorted(d.items())]


def render(report: Mapping[str, Any]) -> str:
    """The report for a person: one section per concern, techniques last."""
    ident = report["identity"]
    lines = [
        f"lw-embed {report['version']} ({report['mode']} mode) on {report['platform']} "
        f"(pid {report['pid']}); "
        f"shutdown grace {report['shutdown_grace']:g}s ({report['shutdown_grace_source']})",
        "",
        "identity:",
        f"  platform               {report['platform']}",
        f"  container_id           {ident['container_id'] or '-'} "
        f"(source: {ident['container_id_source']})",
        f"  hostname               {ident['hostname'] or '-'}",
    ]
    meta = ident["metadata"]
    lines.append(f"  metadata               {meta}")
    lines += [f"    error: {e}" for e in ident["errors"]]
    if ident["cloud"]:
        lines += ["", "cloud:", *_kv(ident["cloud"])]
    if ident["kubernetes"]:
        lines += ["", "kubernetes:", *_kv(ident["kubernetes"])]
    if ident["gvisor"]:
        lines += ["", f"gvisor: {ident['gvisor']}"]
    lines += ["", "probes:"]
    for name, p in report["probes"].items():
        lines.append(f"  {name:<18} {'yes' if p['ok'] else 'no ':<4} {p['detail']}".rstrip())
    lines += ["", "techniques:"]
    for src, tech in report["techniques"].items():
        lines.append(f"  {src:<18} {tech:<16} {report['reasons'].get(src, '')}".rstrip())
    if report["limits"]:
        lines += ["", "limits:"]
        lines += [f"  - {lim}" for lim in report["limits"]]
    lines += [f"\nnote: {eff}" for eff in report["effects"]]
    return "\n".join(lines)
