"""The decisions of the prefix-affinity router and of the LLM autoscaling policy, as pure
functions (the two-node tests in tests/cluster prove them inside Serve)."""

from __future__ import annotations

import pytest

from serving.autoscaling import KV_USAGE, RUNNING, WAITING, LLMAutoscalingPolicy, desired_replicas
from serving.router import affine_replica, prefix_hashes


def test_prefix_hashes_are_shared_exactly_as_far_as_the_prompts_agree() -> None:
    system = list(range(100, 164))  # 4 blocks of 16
    a = prefix_hashes(system + [1] * 40, 16, 128)
    b = prefix_hashes(system + [2] * 40, 16, 128)
    assert len(a) == len(b) == 6
    assert a[:4] == b[:4] and a[4] != b[4]
    assert prefix_hashes(system + [1] * 40, 16, 3) == a[:3]
    assert prefix_hashes([5] * 15, 16, 128) == []


def test_the_longest_remembered_prefix_wins_among_live_replicas() -> None:
    h = prefix_hashes(list(range(160)), 16, 128)  # 10 blocks
    owner = {h[4]: "A", h[7]: "B", h[9]: "dead"}
    loads = {"A": 0, "B": 0}
    assert affine_replica(h, owner, loads, 4, 8) == "B"  # 'dead' is no candidate any more
    assert affine_replica(h[:6], owner, loads, 4, 8) == "A"
    assert affine_replica(h, {h[2]: "A"}, loads, 4, 8) is None  # a 3-block prefix binds nothing
    assert affine_replica(h, {}, loads, 4, 8) is None


def test_a_busy_replica_loses_its_prefixes_to_balance() -> None:
    h = prefix_hashes(list(range(160)), 16, 128)
    owner = {h[9]: "A"}
    assert affine_replica(h, owner, {"A": 10, "B": 2}, 4, 8) == "A"
    assert affine_replica(h, owner, {"A": 11, "B": 2}, 4, 8) is None
    assert affine_replica(h, owner, {"A": None, "B": 2}, 4, 8) == "A"  # unknown: not refused


def test_autoscaling_demand_counts_requests_kv_usage_and_waiting_queues() -> None:
    idle = {RUNNING: {"a": 1.0}, WAITING: {"a": 0.0}, KV_USAGE: {"a": 0.1}}
    assert desired_replicas(1, 2.0, 16.0, idle, 0.8) == pytest.approx(0.125)
    # Few requests, but long ones: the KV cache is what is full.
    kv_full = {RUNNING: {"a": 4.0, "b": 4.0}, WAITING: {"a": 0.0}, KV_USAGE: {"a": 0.96, "b": 0.96}}
    assert desired_replicas(2, 8.0, 16.0, kv_full, 0.8) == pytest.approx(2.4)
    # Sequences wait inside the engine: demand grows with (running + waiting) / running.
    queued = {RUNNING: {"a": 8.0}, WAITING: {"a": 8.0}, KV_USAGE: {"a": 0.5}}
    assert desired_replicas(1, 16.0, 32.0, queued, 0.8) == pytest.approx(2.0)
    # Replicas that report nothing yet: Serve's request count alone.
    assert desired_replicas(1, 40.0, 16.0, {}, 0.8) == pytest.approx(2.5)


def test_autoscaling_policy_refuses_a_bad_kv_target() -> None:
    with pytest.raises(ValueError, match="target_kv_cache_usage"):
        LLMAutoscalingPolicy(target_kv_cache_usage=1.5)
