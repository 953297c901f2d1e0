"""The ``lw-embed env`` report: platform, identity, probes and the technique per source.

Interface: :func:`build` runs :func:`lw_embed.platform.identity.detect` (environment,
``/proc/self/cgroup``, ``/proc/self/mountinfo``, the platform's metadata endpoint) and
:func:`lw_embed.platform.probe.probe`; :func:`render` turns the result into text for a
person. The JSON form (``lw-embed env --json``) is the dict :func:`build` returns.

Capability: none to run; the probes say which capabilities are usable.

Cost: the probes (two forks, a few ms) plus at most the metadata budget (1 s default).

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

#: the ``env --json`` top-level keys, for readers
KEYS = ("effects", "identity", "limits", "pid", "platform", "probes", "reasons", "resource",
        "shutdown_grace", "shutdown_grace_source", "techniques", "version")  # fmt: skip


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
        "stop_timeout": ident.stop_timeout,
    }


def build(cfg: Config, env: Mapping[str, str], *, budget: float = identity.DEFAULT_BUDGET,
          fetch: bool = True, root: str = "/") -> dict[str, Any]:  # fmt: skip
    """Everything ``lw-embed env`` shows, as JSON-ready data with sorted keys."""
    from lw_embed.sources.tracer import TracerOptions, seccomp_rules

    ident = identity.detect(env, root=root, budget=budget, fetch=fetch)
    plat = detect.detect(env, identity=ident)
    if cfg.shutdown.grace > 0:
        grace_source = "config ([shutdown] grace)"
    elif ident.stop_timeout:
        grace_source = "metadata (stopTimeout)"
    else:
        grace_source = f"{plat.name} default"
    t = cfg.tracer
    rules = seccomp_rules(TracerOptions(t.argv_max_bytes, t.argv_max_args, t.trace_connect))
    caps = probe.probe(t.mode, t.seccomp, t.no_new_privs, want_seccomp=bool(rules))
    report: dict[str, Any] = {
        "identity": _identity_dict(ident),
        "limits": list(ident.limits),
        "pid": os.getpid(),
        "platform": plat.name,
        "resource": ident.resource(),
        "shutdown_grace": detect.shutdown_grace(cfg.shutdown.grace, plat),
        "shutdown_grace_source": grace_source,
        "version": __version__,
        **caps.report(),
    }
    return dict(sorted(report.items()))


def _kv(d: Mapping[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}{k:<22} {v}" for k, v in sorted(d.items())]


def render(report: Mapping[str, Any]) -> str:
    """The report for a person: one section per concern, techniques last."""
    ident = report["identity"]
    lines = [
        f"lw-embed {report['version']} on {report['platform']} (pid {report['pid']}); "
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
