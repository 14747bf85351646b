"""Routing policies: pure selection logic over a read-only load view (see base.py)."""

from smg.policies.base import (
    BackendLoad,
    LoadView,
    NoEligibleWorker,
    Policy,
    RouteRequest,
)
from smg.policies.registry import POLICY_NAMES, make_policy, needs_backend_loads

__all__ = [
    "POLICY_NAMES",
    "BackendLoad",
    "LoadView",
    "NoEligibleWorker",
    "Policy",
    "RouteRequest",
    "make_policy",
    "needs_backend_loads",
]
