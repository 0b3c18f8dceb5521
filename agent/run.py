"""Capture virtio status-register traffic and interrupt injections of every KVM guest on this
host, follow each device's status state machine, and serve Prometheus metrics on /metrics
(readiness on /healthz). Finished, stuck and abandoned DEVICE_NEEDS_RESET episodes are also
written to stdout, one JSON line each.

Every option can also be set by the environment variable shown in its help; a flag wins over
its variable. Needs root, tracefs and BCC: `virtio-recovery-agent doctor` checks them all.
SIGTERM or SIGINT detaches every hook and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Optional

# The parts of `run` (agent/daemon/); Agent, DEFAULTS, ENV and the hook helpers are
# re-exported for the tests and tools that import them from here
from agent.daemon.logs import setup_logging
from agent.daemon.loop import Agent
from agent.daemon.options import DEFAULTS, ENV, add_arguments  # noqa: F401
from agent.daemon.readiness import Readiness
from agent.daemon.startup import (  # noqa: F401
    StartupError, build_agent, core_hooks, enabled_hooks, privilege_problem,
)

log = logging.getLogger("agent.run")


def main(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from agent.export.server import MetricsServer

    setup_logging(args.log_format, args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("run: --tls-cert and --tls-key go together (one is missing)", file=sys.stderr)
        return 2
    for path in (args.tls_cert, args.tls_key):
        if path and not os.access(path, os.R_OK):
            print(f"run: cannot read TLS file {path}", file=sys.stderr)
            return 2
    if args.web_config and args.tls_cert:
        print("run: --web-config and --tls-cert/--tls-key both given: put cert_file/key_file "
              "in the web-config's tls_server_config", file=sys.stderr)
        return 2
    problem = privilege_problem()
    if problem:
        log.error("run: %s", problem)     # one log line (JSON by default), like a failed start
        return 1

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from agent.export.metrics import AgentStatusCollector

    readiness = Readiness()
    health = readiness.health
    registry = CollectorRegistry()
    registry.register(AgentStatusCollector(readiness.ready))
    registry.register(readiness)
    try:
        server = MetricsServer(registry, args.listen, health_fn=health,
                               tls_cert=args.tls_cert or None, tls_key=args.tls_key or None,
                               web_config=args.web_config or None)
    except (OSError, ValueError) as exc:
        print(f"run: cannot serve metrics on {args.listen}: {exc}", file=sys.stderr)
        return 1
    server.start()
    log.info("serving metrics on %s/metrics", server.url)
    agent: Optional[Agent] = None
    try:
        try:
            agent = build_agent(args)
        except StartupError as exc:
            log.error("%s", exc, extra={"fields": exc.fields})
            return 1
        except Exception as exc:
            log.debug("capture start failed", exc_info=True)
            log.error("cannot start: %s: %s; run `virtio-recovery-agent doctor`",
                      type(exc).__name__, exc)
            return 1
        readiness.agent = agent
        ok, message = agent.health()
        (log.info if ok else log.error)("ready: %s" % message if ok else "not ready: %s" % message)
        agent.run(stop)
        return 0
    finally:
        if agent is not None:
            try:
                agent.save_state()
            except Exception:
                log.exception("saving the state at shutdown failed")
            agent.close()
            try:
                agent.capture.close()
            except Exception:
                log.exception("detaching hooks failed")
            if agent.state_file is not None:
                agent.state_file.close()
        server.close()
        log.info("stopped")

