"""Policy names to instances, configured from the launch config.

Rust source: model_gateway/src/policies/factory.rs (PolicyConfig -> policy) and
config/validation.rs (value checks). Settings are read from `cfg` by attribute, named
after the flag with `-` as `_` (`--least-load-kv-pressure-weight` ->
`cfg.least_load_kv_pressure_weight`); a missing or None attribute takes the Rust
default, so tests may pass a SimpleNamespace.

A new policy is added by writing its factory and one entry in `_POLICIES`.

`index` is the data-plane process's index: policies with a deterministic start (round
robin) offset it per process, so N processes do not all begin with the same worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from smg.policies.base import Policy
from smg.policies.bucket import BucketPolicy
from smg.policies.cache_aware import CacheAwarePolicy
from smg.policies.consistent_hashing import ConsistentHashingPolicy
from smg.policies.least_load import (
    DEFAULT_KV_PRESSURE_WEIGHT,
    DEFAULT_MAX_WAITING_REQUESTS,
    DEFAULT_MEAN_PREFILL_TOKENS,
    DEFAULT_THROUGHPUT,
    LeastLoadPolicy,
)
from smg.policies.manual import StickyPolicy
from smg.policies.power_of_two import DEFAULT_LOAD_METRIC, PowerOfTwoPolicy
from smg.policies.prefix_hash import PrefixHashPolicy
from smg.policies.random_policy import RandomPolicy
from smg.policies.round_robin import RoundRobinPolicy
from smg.policies.shared import SharedRouting

# Every name Rust 1.13 accepts for --policy / --prefill-policy / --decode-policy.
RUST_POLICY_NAMES = (
    "random",
    "round_robin",
    "passthrough",
    "cache_aware",
    "power_of_two",
    "least_load",
    "manual",
    "consistent_hashing",
    "prefix_hash",
    "bucket",
)

Factory = Callable[[object, random.Random | None, int], Policy]


def _setting(cfg: object, name: str, default: object) -> object:
    value = getattr(cfg, name, None)
    return default if value is None else value


def _number(cfg: object, name: str, default: float) -> float:
    value = _setting(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(cfg: object, name: str, default: int) -> int:
    value = _setting(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _random(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return RandomPolicy(rng)


def _round_robin(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return RoundRobinPolicy(start=index)


def _power_of_two(cfg: object, rng: random.Random | None, index: int) -> Policy:
    metric = _setting(cfg, "power_of_two_load_metric", DEFAULT_LOAD_METRIC)
    if not isinstance(metric, str):
        raise ValueError(f"power_of_two_load_metric must be a string, got {metric!r}")
    # Rust builds power_of_two's scorer with least_load's built-in defaults, not the
    # --least-load-* settings.
    return PowerOfTwoPolicy(metric, rng)


def _least_load(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return LeastLoadPolicy(
        kv_pressure_weight=_number(
            cfg, "least_load_kv_pressure_weight", DEFAULT_KV_PRESSURE_WEIGHT
        ),
        mean_prefill_tokens=_integer(
            cfg, "least_load_mean_prefill_tokens", DEFAULT_MEAN_PREFILL_TOKENS
        ),
        default_throughput=_number(cfg, "least_load_default_throughput", DEFAULT_THROUGHPUT),
        max_waiting_requests=_integer(
            cfg, "least_load_max_waiting_requests", DEFAULT_MAX_WAITING_REQUESTS
        ),
        rng=rng,
    )


def _cache_aware(cfg: object, rng: random.Random | None, index: int) -> Policy:
    # The shared prefix index is attached by make_policy (`shared`); without it the
    # policy keeps a private one.
    return CacheAwarePolicy(
        None,
        cache_threshold=_number(cfg, "cache_threshold", 0.3),
        balance_abs_threshold=_integer(cfg, "balance_abs_threshold", 64),
        balance_rel_threshold=_number(cfg, "balance_rel_threshold", 1.5),
        balance_token_usage_threshold=_number(cfg, "balance_token_usage_threshold", 1.0),
        overload_token_usage_threshold=_number(cfg, "overload_token_usage_threshold", 1.0),
        eviction_interval_secs=_integer(cfg, "eviction_interval_secs", 60),
        rng=rng,
    )


def _bucket(cfg: object, rng: random.Random | None, index: int) -> Policy:
    # 1.13's BucketConfig takes the cache-aware balance pair (its own rule, see bucket.py).
    return BucketPolicy(
        balance_abs_threshold=_integer(cfg, "balance_abs_threshold", 64),
        balance_rel_threshold=_number(cfg, "balance_rel_threshold", 1.5),
        rng=rng,
    )


def _consistent_hashing(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return ConsistentHashingPolicy(rng)


def _prefix_hash(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return PrefixHashPolicy(
        _integer(cfg, "prefix_token_count", 256),
        _number(cfg, "prefix_hash_load_factor", 1.25),
        _integer(cfg, "prefix_hash_balance_abs_threshold", 10),
    )


def _sticky(
    cfg: object,
    rng: random.Random | None,
    index: int,
    inner: Policy | None,
    default_mode: str,
    name: str,
) -> StickyPolicy:
    mode = _setting(cfg, "assignment_mode", default_mode)
    if not isinstance(mode, str):
        raise ValueError(f"assignment_mode must be a string, got {mode!r}")
    return StickyPolicy(
        inner,
        mode,
        None,  # a private table until `use_shared` hands it the shared one
        index,
        _number(cfg, "max_idle_secs", 14400),
        rng,
        name=name,
    )


def _manual(cfg: object, rng: random.Random | None, index: int) -> Policy:
    return _sticky(cfg, rng, index, None, "random", "manual")


# name -> (class, factory): the class answers questions about the policy (needs_backend_loads)
# without building one.
_POLICIES: dict[str, tuple[type[Policy], Factory]] = {
    "random": (RandomPolicy, _random),
    "round_robin": (RoundRobinPolicy, _round_robin),
    "power_of_two": (PowerOfTwoPolicy, _power_of_two),
    "least_load": (LeastLoadPolicy, _least_load),
    "cache_aware": (CacheAwarePolicy, _cache_aware),
    "consistent_hashing": (ConsistentHashingPolicy, _consistent_hashing),
    "prefix_hash": (PrefixHashPolicy, _prefix_hash),
    "manual": (StickyPolicy, _manual),
    "bucket": (BucketPolicy, _bucket),
}

# --policy (and a worker's `policy` label) takes every policy but bucket, which 1.13 offers
# for prefill workers only (--prefill-policy).
POLICY_NAMES: tuple[str, ...] = tuple(name for name in _POLICIES if name != "bucket")
PREFILL_POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def _entry(name: str) -> tuple[type[Policy], Factory]:
    entry = _POLICIES.get(name)
    if entry is None:
        implemented = ", ".join(POLICY_NAMES)
        if name in RUST_POLICY_NAMES:
            raise ValueError(
                f"policy {name!r} is not implemented yet; implemented policies: {implemented}"
            )
        raise ValueError(f"unknown policy {name!r}; implemented policies: {implemented}")
    return entry


def make_policy(
    name: str,
    cfg: object,
    rng: random.Random | None = None,
    *,
    index: int = 0,
    shared: SharedRouting | None = None,
) -> Policy:
    """A new policy instance; `rng` seeds the randomized ones (tests, per-process seeding),
    `index` (the data-plane process's index) offsets the deterministic ones, `shared` is the
    gateway's cross-process routing state (None: each policy keeps its own).

    With --routing-key-override (--sticky-sessions) any policy but manual is wrapped in
    the sticky-key layer (assignment delegate by default: route via the policy, then pin)."""
    policy = _entry(name)[1](cfg, rng, index)
    if name != "manual" and getattr(cfg, "routing_key_override", False):
        policy = _sticky(cfg, rng, index, policy, "delegate", name)
    use_shared = getattr(policy, "use_shared", None)
    if shared is not None and use_shared is not None:
        use_shared(shared)
    return policy


def needs_backend_loads(name: str) -> bool:
    """Whether policy `name` reads the workers' backend loads (the load monitor must poll
    them even with --disable-load-monitoring). ValueError for a name smg does not implement."""
    return _entry(name)[0].needs_backend_loads
