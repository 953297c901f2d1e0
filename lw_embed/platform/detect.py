"""Which platform we run on, from the environment alone (no network).

Interface: environment variables set by the platform (``K_SERVICE``, ``CLOUD_RUN_JOB``,
``AWS_EXECUTION_ENV``, ``ECS_CONTAINER_METADATA_URI_V4``, ``KUBERNETES_SERVICE_HOST``).

Capability: none. Cost: a few dict lookups. Failure modes: none; an unknown platform is
``"container"`` or ``"host"`` with the generic grace period.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: grace between SIGTERM and SIGKILL when we do not know the platform (docker stop's)
DEFAULT_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class Platform:
    name: str  # cloudrun | fargate | ecs | kubernetes | container | host
    grace: float  # seconds the platform gives between SIGTERM and SIGKILL


def detect(env: Mapping[str, str] | None = None) -> Platform:
    env = os.environ if env is None else env
    if env.get("K_SERVICE") or env.get("CLOUD_RUN_JOB"):
        return Platform("cloudrun", 10.0)
    if env.get("AWS_EXECUTION_ENV") == "AWS_ECS_FARGATE":
        return Platform("fargate", 30.0)
    if env.get("ECS_CONTAINER_METADATA_URI_V4") or env.get("AWS_EXECUTION_ENV", "").startswith(
        "AWS_ECS"
    ):
        return Platform("ecs", 30.0)
    if env.get("KUBERNETES_SERVICE_HOST"):
        return Platform("kubernetes", 30.0)
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return Platform("container", DEFAULT_GRACE)
    return Platform("host", DEFAULT_GRACE)


def shutdown_grace(configured: float, plat: Platform) -> float:
    """The whole SIGTERM-to-SIGKILL budget: config when set, else the platform's."""
    return configured if configured > 0 else plat.grace
