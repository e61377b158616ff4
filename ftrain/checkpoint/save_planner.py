"""The save planner of every checkpoint: DCP's default planner with its plans cached between saves."""

from __future__ import annotations

import itertools
import os

from torch.distributed.checkpoint import DefaultSavePlanner

_CACHE_KEYS = itertools.count()


def new_cache_key() -> str:
    """A plan cache of its own for one manager. Never id(manager): a manager created after another was freed may
    get its id, and its first save would then find the old manager's cached plans on one rank and not on another
    (a KeyError inside DCP)."""
    return f"ftrain-{os.getpid()}-{next(_CACHE_KEYS)}"


class CachedPlanSavePlanner(DefaultSavePlanner):
    """DCP's default planner with plan caching: when no rank's local plan changed since the previous save
    (the usual case: same model, same optimizer), the ranks skip exchanging and re-validating plans.

    DCP keeps the cache per planner class; ``cache_key`` (``new_cache_key()``) gives each manager a cache of its
    own, so that two managers in one process (different states) never answer each other's plans.
    """

    def __init__(self, cache_key: str) -> None:
        super().__init__(enable_plan_caching=True)
        self._cached_plans_key = cache_key
