"""How failures of the LLMServer call become HTTP statuses (the overload and dead-replica paths,
which the e2e suite does not provoke)."""

from __future__ import annotations

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from model_parallel.engine import EngineDeadError
from serving.streams import to_openai_error


def test_full_queue_is_503_with_retry_after() -> None:
    err = to_openai_error(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    assert err.status == 503 and err.headers == {"Retry-After": "1"}


def test_engine_refusal_is_400_and_dead_engine_503() -> None:
    assert to_openai_error(ValueError("the prompt is empty")).status == 400
    dead = to_openai_error(EngineDeadError("engine failure"))
    assert dead.status == 503 and dead.headers
    assert to_openai_error(RayActorError()).status == 503
    assert to_openai_error(KeyError("bug")).status == 500
