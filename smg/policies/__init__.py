"""Routing policies: pure selection logic over a read-only load view (see base.py)."""

from smg.policies.base import (
    BackendLoad,
    LoadView,
    NoEligibleWorker,
    Policy,
    RouteRequest,
)
from smg.policies.registry import POLICY_NAMES, make_policy

__all__ = [
    "POLICY_NAMES",
    "BackendLoad",
    "LoadView",
    "NoEligibleWorker",
    "Policy",
    "RouteRequest",
    "make_policy",
]
