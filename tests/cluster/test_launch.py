"""What a local instance's environment gets before Ray starts."""

from __future__ import annotations

import os

import pytest

from cluster.launch import LOCAL_PORTS, SERVE_ENV, apply_serve_env


def test_a_local_instance_takes_free_ports_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*SERVE_ENV, *LOCAL_PORTS):
        monkeypatch.delenv(key, raising=False)  # restored after the test, whatever it sets
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    apply_serve_env()
    ports = {key: os.environ[key] for key in LOCAL_PORTS}
    assert ports.pop("RAY_SERVE_HAPROXY_STATS_PORT") == "18404"  # a value already set wins
    # Not Serve's fixed defaults, which a second instance on the machine would share.
    assert not {"9101", "8500", "9500"} & set(ports.values())
    assert len(set(ports.values())) == len(ports)
    assert all(os.environ[key] == value for key, value in SERVE_ENV.items())
