"""Serve config files and the dict form of AppConfig: every YAML in configs/ validates against
Serve's own schema and builds our application."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serving.config import config_from_dict

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_configs_validate_and_build(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder

    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    for app in doc["applications"]:
        assert app["import_path"] == "serving.app:app_builder"
        config_from_dict(app["args"])
        assert app_builder(app["args"]) is not None


def test_dict_config_maps_every_layer() -> None:
    cfg = config_from_dict(
        {
            "api_key": "k",
            "ingress_replicas": 2,
            "ingress_resources": {"node:__internal_head__": 0.01},
            "models": [
                {
                    "model": "m",
                    "served_model_name": "x",
                    "dtype": "float32",
                    "tensor_parallel_size": 2,
                    "max_num_seqs": 8,
                    "num_replicas": 3,
                    "kv_cache_memory_gib": 1.5,
                }
            ],
        }
    )
    m = cfg.models[0]
    assert cfg.server.api_key == "k" and cfg.ingress_replicas == 2
    assert cfg.ingress_resources == {"node:__internal_head__": 0.01}
    assert (m.name, m.num_replicas, m.engine.model.dtype) == ("x", 3, "float32")
    assert m.engine.parallel.tensor_parallel_size == 2 and m.engine.scheduler.max_num_seqs == 8
    assert m.engine.cache.kv_cache_memory_gib == 1.5


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"modles": []})
    with pytest.raises(ValueError, match="unknown model keys"):
        config_from_dict({"models": [{"modle": "x"}]})


def test_llm_deployment_options_follow_the_engine() -> None:
    from serving.app import llm_deployment
    from serving.config import ModelDeployment

    scaled = ModelDeployment(autoscaling_config={"min_replicas": 1, "max_replicas": 2})
    cfg = llm_deployment(scaled, "app")._bound_deployment._deployment_config
    assert cfg.autoscaling_config.target_ongoing_requests == 64  # half of max_num_seqs 128
    assert cfg.max_ongoing_requests == 128 and cfg.graceful_shutdown_timeout_s == 300
    told = ModelDeployment(autoscaling_config={"max_replicas": 3, "target_ongoing_requests": 8})
    cfg = llm_deployment(told, "app")._bound_deployment._deployment_config
    assert cfg.autoscaling_config.target_ongoing_requests == 8


def test_cpu_replicas_share_the_cores_unless_told() -> None:
    from serving.config import ModelDeployment

    cores = os.cpu_count() or 1
    assert ModelDeployment().replica_cpus() == cores
    assert ModelDeployment(num_replicas=2).replica_cpus() == max(1, cores // 2)
    scaled = ModelDeployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert scaled.replica_cpus() == max(1, cores // 4) and scaled.initial_replicas == 1
    told = ModelDeployment(num_replicas=2, cpus_per_replica=3)
    assert told.replica_cpus() == 3 and told.replica_resources() == {"CPU": 3}
    with pytest.raises(ValueError, match="cpus_per_replica"):
        ModelDeployment(cpus_per_replica=0)


def test_one_model_on_one_replica_serves_directly_and_nothing_else_does() -> None:
    import dataclasses

    from model_parallel.config import EngineConfig, ParallelConfig
    from serving.app import build_app, deployment_name
    from serving.config import AppConfig, ModelDeployment

    one = AppConfig()
    assert one.serves_directly
    assert build_app(one)._bound_deployment.name == deployment_name(one.models[0])
    tp2 = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2))
    apart = [
        dataclasses.replace(one, direct_streaming=False),
        AppConfig(models=(ModelDeployment(num_replicas=2),)),
        AppConfig(models=(ModelDeployment(autoscaling_config={"max_replicas": 2}),)),
        AppConfig(models=(ModelDeployment(engine=tp2),)),
        AppConfig(models=tuple(ModelDeployment(served_model_name=n) for n in "ab")),
        AppConfig(ingress_replicas=2),
        AppConfig(ingress_resources={"head": 0.01}),
    ]
    for config in apart:
        assert not config.serves_directly
        assert build_app(config)._bound_deployment.name == "OpenAIIngress"
