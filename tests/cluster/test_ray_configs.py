"""Every `ray up` config validates against Ray's own cluster schema (after Ray fills in its
defaults, as `ray up` does), none exposes the endpoint or Ray's control plane by default, and every
node runs Serve with the settings a local instance gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.launch import SERVE_ENV

ROOT = Path(__file__).parents[2]
CLUSTER_CONFIGS = sorted((ROOT / "cluster" / "ray").glob("*.yaml"))
SERVE_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=[p.name for p in CLUSTER_CONFIGS])
def test_cluster_config_validates_against_rays_schema(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    # Ray's wheel ships no defaults for fake_multinode, so that file spells out every field.
    fake = config["provider"]["type"] == "fake_multinode"
    validate_config(config if fake else prepare_config(config))


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=[p.name for p in CLUSTER_CONFIGS])
def test_ray_starts_with_token_auth_serve_env_and_a_loopback_dashboard(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd
        assert all(f"{k}={v}" in cmd for k, v in SERVE_ENV.items())
        if "--head" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_configs_listen_on_loopback(path: Path) -> None:
    assert yaml.safe_load(path.read_text())["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_ingress_replicas_sit_beside_the_head_nodes_haproxy(path: Path) -> None:
    """HAProxy connects to an ingress replica on the port it binds on the loopback (host above):
    an app that is not one replica on this machine pins its ingress to the head node."""
    from serving.config import config_from_dict

    for app in yaml.safe_load(path.read_text())["applications"]:
        config = config_from_dict(app["args"])
        if not config.serves_directly:
            assert (config.ingress_resources or {}).get("node:__internal_head__", 0) > 0
