"""Start or join Ray, deploy the app, wait until it answers /health, and shut down cleanly."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import urllib.request

from serving.config import AppConfig

logger = logging.getLogger(__name__)

# Serve settings for every process of a cluster: Serve reads them at import, so they belong in the
# environment of `ray start` (cluster/ray/*.yaml) or of the driver that starts a local instance.
# HAProxy in front, routing straight to the ingress (or direct-streaming) replica's own HTTP server:
# no Python proxy on the data path (measured on the Zen 3, one model replica: 72.2 -> 85.0 tok/s at
# 1 stream, 259.2 -> 305.9 at 32, 0.83x -> 0.98x the engine alone). gRPC between the ingress and
# LLMServer (one piece of Serve's throughput-optimized mode): half the Serve CPU per streamed token,
# measured. The controller's loop every 0.5 s instead of 0.1: it and the GCS it polls took ~1 ms of
# CPU per streamed token at one stream on two cores (0.72 + 0.43 -> 0.26 + 0.17 CPU-s per 1,000).
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


# HAProxy's own listeners (Prometheus 9101, stats 8404 by default) and the fallback proxy HAProxy
# sends requests to while no replica is up (8500, 9500): on a node of a cluster the defaults; a
# local instance takes free ports, so two of them can run on one machine. NOTE: Serve's proxies
# bind with SO_REUSEPORT, so a second instance on 8500 shares it and the kernel splits its
# connections: requests to one app, /health included, were answered by the other.
LOCAL_PORTS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def apply_serve_env() -> None:
    """Before a local Ray instance starts, which then passes it to every worker; a value already
    in the environment wins."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    for key in LOCAL_PORTS:
        os.environ.setdefault(key, str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f} s")


def local_cpus(config: AppConfig) -> int:
    """Logical CPUs for a local instance: CPU tensor-parallel ranks take one bundle each, and may
    share the machine's cores (one more for the ingress side)."""
    ranks = sum(
        m.engine.parallel.tensor_parallel_size * m.num_replicas
        for m in config.models
        if m.engine.parallel.torch_device().type == "cpu"
    )
    return max(os.cpu_count() or 1, ranks + 1)


def check_placement(config: AppConfig, local: bool) -> None:
    """Serve leaves a replica that no node can hold pending forever, and serve.run waits on it
    without a word: refuse such a start. On a joined cluster an autoscaler may still add a node
    that fits, so there it is a warning."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    asked: dict[str, float] = {}
    problems = []
    for m in config.models:
        need = m.replica_resources()
        for k, v in need.items():
            asked[k] = asked.get(k, 0) + v * m.initial_replicas
        if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            problems.append(
                f"a replica of {m.name} needs {need} on one node, and no node has that"
                " (see --cpus-per-replica, --tensor-parallel-size)"
            )
    total = {k: sum(n.get(k, 0) for n in nodes) for k in asked}
    if not problems and any(asked[k] > total[k] for k in asked):
        problems.append(
            f"the replicas to start need {asked} in all, and Ray has {total}"
            " (see --num-replicas, --min-replicas, --cpus-per-replica)"
        )
    if problems and local:
        raise ValueError("; ".join(problems))
    for problem in problems:
        logger.warning("%s: they stay pending until the cluster grows", problem)


def connect(config: AppConfig, address: str | None) -> None:
    """Start a local Ray instance (address None) or join one ('auto' or ray://...).
    NOTE: address None must not be passed on: Ray would join the last cluster `ray start` made."""
    import ray

    if not ray.is_initialized():
        if address is None:
            apply_serve_env()
        ray.init(
            address=address or "local",
            num_cpus=None if address else local_cpus(config),
            include_dashboard=False,
            log_to_driver=False,
        )


def deploy(config: AppConfig, host: str, port: int, address: str | None) -> str:
    from ray import serve

    from serving.app import build_app

    connect(config, address)
    check_placement(config, local=address is None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=config.name, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_healthy(url, 600)
    return url


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: AppConfig, host: str, port: int, address: str | None) -> None:
    """Blocks until Ctrl-C or SIGTERM, then takes everything down (no stray Ray processes)."""
    stop = threading.Event()
    connect(config, address)
    # NOTE: after ray.init, whose own SIGTERM handler would abort the process instead.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(config, host, port, address)
        print(
            f"llmcluster: serving {', '.join(m.name for m in config.models)} at {url}/v1",
            flush=True,
        )
        # NOTE: in slices, not one wait: the handler runs only when the main thread runs Python,
        # and a signal the kernel hands one of Ray's threads (as it often does right after a
        # SIGSTOP/SIGCONT, Ctrl-Z then bg) leaves a main thread asleep on the lock unaware.
        while not stop.wait(1.0):
            pass
    finally:
        print("llmcluster: shutting down", flush=True)
        shutdown()
