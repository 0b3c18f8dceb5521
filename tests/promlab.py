"""A real Prometheus for tests: the Debian `prometheus` binary on loopback, temp config and storage.

    with PromLab(targets=["127.0.0.1:9477"], rule_files=[...]) as prom:
        prom.wait_for_target_up()
        prom.wait_for_scrape()          # a scrape that started after this call
        prom.query('sum(virtio_device_needs_reset_total)')   # -> list of (labels, float)
        prom.query_value('...')         # -> single float (or None when the result is empty)
        prom.rules() / prom.alerts()    # loaded rule groups / active alerts

`PromLab.problem()` says why it cannot run here (binary missing), for skipping.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Sequence


class PromLabError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromLab:
    def __init__(self, targets: Sequence[str], job: str = "agent", scrape_interval: str = "1s",
                 rule_files: Sequence[str | Path] = (), evaluation_interval: str = "1s",
                 scheme: str = "http", insecure_skip_verify: bool = False,
                 binary: str = "prometheus") -> None:
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.evaluation_interval = evaluation_interval
        self.scheme = scheme
        self.insecure_skip_verify = insecure_skip_verify
        self.binary = binary
        self.port: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    @staticmethod
    def problem(binary: str = "prometheus") -> Optional[str]:
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package `prometheus`)"
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "prometheus.log"

    def config_yaml(self) -> str:
        # JSON is YAML: no yaml dependency needed to write the config.
        job: dict = {"job_name": self.job, "scrape_interval": self.scrape_interval,
                     "scrape_timeout": self.scrape_interval, "scheme": self.scheme,
                     "static_configs": [{"targets": self.targets}]}
        if self.insecure_skip_verify:
            job["tls_config"] = {"insecure_skip_verify": True}
        cfg = {"global": {"scrape_interval": self.scrape_interval,
                          "evaluation_interval": self.evaluation_interval},
               "scrape_configs": [job]}
        if self.rule_files:
            cfg["rule_files"] = self.rule_files
        return json.dumps(cfg, indent=2)

    def start(self, timeout_s: float = 30) -> "PromLab":
        problem = self.problem(self.binary)
        if problem:
            raise PromLabError(problem)
        self._tmp = tempfile.TemporaryDirectory(prefix="promlab-")
        tmp = Path(self._tmp.name)
        (tmp / "prometheus.yml").write_text(self.config_yaml())
        for attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            log = open(self.log_path, "wb")
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            try:
                self._wait_ready(timeout_s)
                return self
            except PromLabError:
                self._terminate()
                if "address already in use" not in self.log_path.read_text(errors="replace"):
                    raise
        raise PromLabError(f"prometheus could not bind a port: {self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PromLabError(f"prometheus exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise PromLabError(f"prometheus not ready after {timeout_s}s: {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "PromLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP API -----------------------------------------------------------------------------

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PromLabError(f"{path} {params}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise PromLabError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """Instant query; vector results as (labels, value), a scalar as ({}, value)."""
        data = self.api("query", query=promql)
        if data["resultType"] == "vector":
            return [(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise PromLabError(f"unsupported result type {data['resultType']} for {promql}")

    def query_value(self, promql: str) -> Optional[float]:
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PromLabError(f"{promql}: {len(result)} series, expected one: {result}")
        return result[0][1]

    def targets_health(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for_target_up(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        last: list[dict] = []
        while time.monotonic() < deadline:
            last = self.targets_health()
            if last and all(t["health"] == "up" for t in last):
                return
            time.sleep(0.3)
        raise PromLabError(f"targets not up after {timeout_s}s: "
                           f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in last]}")

    def wait_for_scrape(self, timeout_s: float = 30) -> None:
        """Return once every target has been scraped successfully after this call started."""
        since = time.time()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ts = self.targets_health()
            if ts and all(t["health"] == "up" and _rfc3339(t["lastScrape"]) > since for t in ts):
                return
            time.sleep(0.3)
        raise PromLabError(f"no fresh scrape within {timeout_s}s")

    def wait_for(self, promql: str, predicate, timeout_s: float = 30) -> Optional[float]:
        """Poll a single-value query until predicate(value) holds; returns the value."""
        deadline = time.monotonic() + timeout_s
        v = None
        while time.monotonic() < deadline:
            v = self.query_value(promql)
            if predicate(v):
                return v
            time.sleep(0.5)
        raise PromLabError(f"{promql}: last value {v!r} never satisfied the condition")

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]


def _rfc3339(text: str) -> float:
    from datetime import datetime

    # Prometheus writes nanoseconds; datetime takes microseconds.
    head, _, tail = text.partition(".")
    frac, zone = "", "Z"
    if tail:
        for i, ch in enumerate(tail):
            if not ch.isdigit():
                frac, zone = tail[:i], tail[i:]
                break
        else:
            frac = tail
    else:
        for sep in ("Z", "+", "-"):
            if sep in head[10:]:
                idx = head.rindex(sep)
                head, zone = head[:idx], head[idx:]
                break
    zone = "+00:00" if zone == "Z" else zone
    stamp = head + ("." + frac[:6].ljust(6, "0") if frac else "") + zone
    return datetime.fromisoformat(stamp).timestamp()
