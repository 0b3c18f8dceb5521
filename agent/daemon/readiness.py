"""What the HTTP server answers before the Agent exists (the BPF programs take seconds to
compile) and after: `/healthz` says "starting", `/metrics` serves virtio_agent_build_info and
virtio_agent_ready 0, then the Agent's health and metrics once it is attached."""
from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from agent.daemon.loop import Agent

STARTING = "starting: compiling and attaching BPF programs"


class Readiness(Collector):
    """health() for /healthz, ready() for virtio_agent_ready, and the Agent's collector once
    `agent` is set (a Collector itself: register it in the registry)."""

    def __init__(self) -> None:
        self.agent: Optional[Agent] = None

    def health(self) -> tuple[bool, str]:
        agent = self.agent
        if agent is None:
            return False, STARTING
        return agent.health()

    def ready(self) -> bool:
        return self.health()[0]

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        agent = self.agent
        return agent.collector.collect() if agent is not None else []
