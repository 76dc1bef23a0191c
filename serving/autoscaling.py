"""LLMAutoscalingPolicy: Serve's autoscaling policy for LLMServer, on what limits an engine.

Serve's default counts requests in flight against `target_ongoing_requests`. An LLM replica can be
full well below that count: long sequences fill its KV cache, and then requests wait inside the
engine while the request count looks fine. So the policy also reads each replica's engine
(LLMServer.record_autoscaling_stats) and asks for as many replicas as the most demanding of:
- requests in flight (Serve's own signal) over `target_ongoing_requests`;
- KV-cache usage summed over replicas, over `target_kv_cache_usage` (a replica at 95% of its
  cache with a target of 0.8 counts as 1.19 replicas of demand);
- while sequences wait in the engines: the replicas now, times (running + waiting) / running.
Serve applies min/max replicas, the up/down delays and the scaling factors around it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

# The names LLMServer.record_autoscaling_stats reports.
RUNNING, WAITING, KV_USAGE = "num_running", "num_waiting", "kv_cache_usage"


def desired_replicas(
    current: int,
    ongoing: float,
    target_ongoing: float,
    metrics: dict[str, dict[Any, float]],
    target_kv_cache_usage: float,
) -> float:
    """The demand in replicas, from the look-back averages of every running replica."""
    demand = ongoing / target_ongoing
    demand = max(demand, sum(metrics.get(KV_USAGE, {}).values()) / target_kv_cache_usage)
    running = sum(metrics.get(RUNNING, {}).values())
    waiting = sum(metrics.get(WAITING, {}).values())
    if waiting > 0:
        demand = max(demand, current * (running + waiting) / max(running, 1.0))
    return demand


class LLMAutoscalingPolicy:
    """Called by Serve's controller each control-loop tick with the deployment's context."""

    def __init__(self, target_kv_cache_usage: float = 0.8):
        if not 0.0 < target_kv_cache_usage <= 1.0:
            raise ValueError(
                f"target_kv_cache_usage must be in (0, 1], got {target_kv_cache_usage}"
            )
        self.target_kv_cache_usage = target_kv_cache_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, ctx.policy_state
        demand = desired_replicas(
            ctx.current_num_replicas,
            ctx.total_num_requests,
            ctx.config.get_target_ongoing_requests(),
            ctx.aggregated_metrics or {},
            self.target_kv_cache_usage,
        )
        return demand, ctx.policy_state
