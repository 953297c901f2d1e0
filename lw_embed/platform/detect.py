"""Which platform we run on, and the grace it gives between SIGTERM and SIGKILL.

Interface: environment variables set by the platform (``K_SERVICE``, ``CLOUD_RUN_JOB``,
``AWS_EXECUTION_ENV``, ``ECS_CONTAINER_METADATA_URI_V4``, ``KUBERNETES_SERVICE_HOST``), the
files ``/.dockerenv`` and ``/run/.containerenv``; optionally an
:class:`lw_embed.platform.identity.Identity` that was detected with the metadata
endpoints (its platform wins: the ECS task document's ``LaunchType`` tells Fargate from
EC2). The shutdown grace is ``[shutdown] grace`` when set, else the platform's default
(:func:`shutdown`): the ECS v4 metadata carries no ``stopTimeout``, and the cores decide
the grace before any metadata could answer, so metadata never changes it.

Capability: none. Cost: a few dict lookups and two ``stat``; no network here.

Failure modes: none; an unknown platform is ``"container"`` or ``"host"`` with the generic
grace period.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lw_embed.platform.identity import Identity

#: grace between SIGTERM and SIGKILL when we do not know the platform (docker stop's)
DEFAULT_GRACE = 10.0

#: the grace each platform gives by default: Cloud Run 10 s; ECS/Fargate the container's
#: ``stopTimeout`` (30 s unless the task definition says otherwise, at most 120 s on
#: Fargate); Kubernetes ``terminationGracePeriodSeconds`` (30 s by default)
PLATFORM_GRACE = {
    "cloudrun": 10.0,
    "fargate": 30.0,
    "ecs": 30.0,
    "kubernetes": 30.0,
    "container": DEFAULT_GRACE,
    "host": DEFAULT_GRACE,
}


@dataclass(frozen=True, slots=True)
class Platform:
    name: str  # cloudrun | fargate | ecs | kubernetes | container | host
    grace: float  # seconds the platform gives between SIGTERM and SIGKILL


def platform_name(env: Mapping[str, str], root: str = "/") -> str:
    """The platform from the environment alone (``root``: where ``/.dockerenv`` is looked for)."""
    if env.get("K_SERVICE") or env.get("CLOUD_RUN_JOB"):
        return "cloudrun"
    if env.get("AWS_EXECUTION_ENV") == "AWS_ECS_FARGATE":
        return "fargate"
    if env.get("ECS_CONTAINER_METADATA_URI_V4") or env.get("AWS_EXECUTION_ENV", "").startswith(
        "AWS_ECS"
    ):
        return "ecs"
    if env.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    if os.path.exists(os.path.join(root, ".dockerenv")) or os.path.exists(
        os.path.join(root, "run/.containerenv")
    ):
        return "container"
    return "host"


def detect(env: Mapping[str, str] | None = None, identity: Identity | None = None) -> Platform:
    """The platform and its default grace; ``identity`` (when given) refines the name."""
    if identity is not None:
        name = identity.platform
        return Platform(name, PLATFORM_GRACE.get(name, DEFAULT_GRACE))
    name = platform_name(os.environ if env is None else env)
    return Platform(name, PLATFORM_GRACE[name])


def shutdown(configured: float, env: Mapping[str, str]) -> tuple[float, str]:
    """The grace ``lw-embed run`` and ``sidecar`` use, and where it came from."""
    if configured > 0:
        return configured, "config ([shutdown] grace)"
    plat = detect(env)
    return plat.grace, f"{plat.name} default"
