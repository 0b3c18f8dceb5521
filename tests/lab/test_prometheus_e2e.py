"""End to end: a real Prometheus scrapes the real agent (BPF on KVM) while lab VMs fault and recover.

The truth is what the lab guests measured themselves (TSC): how many NEEDS_RESET episodes each
saw, and how long each took from its first read showing 0x40 to its DRIVER_OK write. The chain
checked: guest truth == agent episode log (per episode, within a tolerance) and PromQL over the
scraped series == the same counts; the histogram buckets == the agent's logged durations;
`promtool check metrics` passes on the agent's real output.

Other VMs on the host (parallel sessions) are told apart by name: per-device series are
filtered by `vm`; the label-less histograms are compared with *all* recovered episodes of the
agent's log, which names every VM.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from agent.demo import AgentProcess, format_table, match_episodes
from agent.export.metrics import BUCKETS
from tests.promlab import PromLab

# agent vs guest recovery time: the host sees the same accesses the guest timed, so they agree
# to within the cost of the guest's own rdtsc/logging around them ...
ABS_TOL_S = 0.0005
REL_TOL = 0.02
# ... unless the vCPU thread was preempted between the guest's rdtsc and its access (2 shared
# cores): then the host sees the access later than the guest's timestamp says. Most episodes
# must agree tightly; none may be off by more than a scheduling delay.
MIN_TIGHT_FRACTION = 0.75
SCHED_TOL_S = 0.010
STUCK_AFTER_S = 1.0
STUCK_ATTEMPTS = 4


def specs():
    from lab.harness import GuestSpec

    def named(name, **kw):
        return name, GuestSpec(extra_args=("-name", name), **kw)

    return [
        named("e2e-modern", transport="modern", scenario="recover", repeat=2, delay_ms=2),
        named("e2e-modern-2dev", transport="modern", scenario="recover", devices=2, delay_ms=15),
        named("e2e-mmio", transport="mmio", scenario="recover", delay_ms=40),
        # lives > 2 scrape intervals: its per-device series must be scraped while it runs
        named("e2e-slow", transport="modern", scenario="recover", repeat=3, delay_ms=700),
    ]


@pytest.fixture
def agent(bpf, kvm):
    problem = PromLab.problem()
    if problem:
        from conftest import missing

        missing(problem)
    with AgentProcess(stuck_after_s=STUCK_AFTER_S) as a:
        yield a


def test_prometheus_sees_what_the_guests_measured(agent):
    from lab.harness import GuestSpec, LabVM

    results = {}
    with PromLab([agent.target], scrape_interval="1s") as prom:
        prom.wait_for_target_up()
        for name, spec in specs():
            with LabVM.start(spec) as vm:
                results[name] = vm.wait(60).raise_for_error()
        # The stuck guest must be seen stuck by Prometheus while it holds (the agent's 1 s, then
        # a scrape). A host too busy for that within the hold gets another guest that holds
        # three times as long; the earlier one is then just another VM on the host.
        stuck_name, hold_ms = None, 3000
        for attempt in range(1, STUCK_ATTEMPTS + 1):
            name = f"e2e-stuck-{attempt}"
            stuck_vm = LabVM.start(GuestSpec(transport="modern", scenario="stuck",
                                             hold_ms=hold_ms, extra_args=("-name", name)))
            try:
                seen = False
                while not seen and stuck_vm.proc.poll() is None:
                    seen = prom.query_value(f'max(virtio_device_stuck{{vm="{name}"}})') == 1
                    time.sleep(0.2)
                result = stuck_vm.wait(120).raise_for_error()
            finally:
                stuck_vm.kill()
            if seen:
                stuck_name, results[name] = name, result
                break
            print(f"{name}: not seen stuck within its {hold_ms} ms hold; again")
            hold_ms *= 3
        assert stuck_name is not None, f"no stuck guest seen stuck in {STUCK_ATTEMPTS} attempts"
        # every guest episode ended in the agent's log (the stuck one: its final line)
        from tests.lab.scrape import wait_until

        wait_until("every guest episode's final line in the log", lambda: all(
            len([r for r in agent.records() if r["vm"] == n and r["outcome"] != "stuck"])
            >= len(res.episodes) for n, res in results.items()))
        prom.wait_for_scrape()
        prom.wait_for_scrape()
        text = agent.metrics_text()
        records = agent.records()

        # -- guest truth vs agent episode log, per episode ------------------------------------
        rows = []
        for name, _ in specs():
            rows += match_episodes(name, results[name], records)
        stuck_rows = match_episodes(stuck_name, results[stuck_name], records)
        table = "\n".join(map(str, rows + stuck_rows))
        expected_recovered = sum(len(r.episodes) for n, r in results.items() if n != stuck_name)
        assert len(rows) == expected_recovered >= 4, table
        print("\n" + format_table(rows + stuck_rows))
        for row in rows:
            assert row.guest_s is not None, f"guest did not recover: {row}"
            assert row.outcome == "recovered", table
            assert abs(row.agent_s - row.guest_s) <= SCHED_TOL_S, table
        tight = [r for r in rows if abs(r.agent_s - r.guest_s) <= ABS_TOL_S + REL_TOL * r.guest_s]
        assert len(tight) >= MIN_TIGHT_FRACTION * len(rows), table
        assert [r.outcome for r in stuck_rows] == ["abandoned"], table
        stuck_logged = [r["outcome"] for r in records if r["vm"] == stuck_name]
        assert stuck_logged == ["stuck", "abandoned"], stuck_logged

        # -- PromQL per VM ---------------------------------------------------------------------
        # A VM's device series exist while it runs (they go when it exits), so a scrape sees
        # the counts up to its last scrape: never more than the guest's, and the VMs that
        # live long enough (the stuck one, e2e-slow) are seen.
        def per_vm(metric):
            return {m["vm"]: v for m, v in prom.query(
                f'sum by (vm) (max_over_time({metric}{{vm=~"{"|".join(results)}"}}[10m]))')}

        guest_faults = {n: sum(e.needs_reset_ns is not None for e in r.episodes)
                        for n, r in results.items()}
        guest_recoveries = {n: sum(e.driver_ok_ns is not None for e in r.episodes)
                            for n, r in results.items()}
        seen_faults = per_vm("virtio_device_needs_reset_total")
        seen_recoveries = per_vm("virtio_device_recoveries_total")
        for vm, v in seen_faults.items():
            assert v <= guest_faults[vm], (vm, seen_faults, guest_faults)
        for vm, v in seen_recoveries.items():
            assert v <= guest_recoveries[vm], (vm, seen_recoveries, guest_recoveries)
        assert seen_faults[stuck_name] == 1
        assert seen_faults["e2e-slow"] >= 2 and seen_recoveries["e2e-slow"] >= 1, seen_faults
        assert prom.query_value(
            f'max_over_time(virtio_device_stuck{{vm="{stuck_name}"}}[10m])') == 1

        # -- label-less series: the guests' episodes plus those of any other VM on the host ---
        mine = {n for n in results}
        foreign = [r for r in records if r["vm"] not in mine]
        foreign_recovered = sum(r["outcome"] == "recovered" for r in foreign)
        foreign_abandoned = sum(r["outcome"] == "abandoned" for r in foreign)
        assert prom.query_value('virtio_episodes_ended_total{outcome="recovered"}') == \
            sum(guest_recoveries.values()) + foreign_recovered
        assert prom.query_value('virtio_episodes_ended_total{outcome="abandoned"}') == \
            1 + foreign_abandoned
        recovered = [r["recovery_seconds"] for r in records if r["outcome"] == "recovered"]
        assert len(recovered) == sum(guest_recoveries.values()) + foreign_recovered
        assert prom.query_value("sum(virtio_recovery_duration_seconds_count)") == len(recovered)
        assert prom.query_value("sum(virtio_recovery_duration_seconds_sum)") == \
            pytest.approx(sum(recovered), rel=1e-6)
        buckets = {float(m["le"]): v for m, v in prom.query(
            "sum by (le) (virtio_recovery_duration_seconds_bucket)")}
        for le in BUCKETS:
            assert buckets[float(le)] == sum(1 for s in recovered if s <= le), le
        assert buckets[float("inf")] == len(recovered)
        if not foreign:  # CI: nothing else runs VMs; the histogram is the guests' own
            # the agent's recovery time = the notify phase (config interrupt -> the guest's
            # read) + what the guest timed (read -> DRIVER_OK)
            guest_times = [row.guest_s + (row.agent_notify_s or 0.0) for row in rows]
            assert prom.query_value("sum(virtio_recovery_duration_seconds_sum)") == \
                pytest.approx(sum(guest_times), abs=len(rows) * SCHED_TOL_S)

        # -- the guests' own durations land in the same buckets (away from bucket edges) ------
        for row in tight:
            g = row.guest_s + (row.agent_notify_s or 0.0)   # no notify phase: starts at the read
            margin = ABS_TOL_S + REL_TOL * g
            for le in BUCKETS:
                if abs(g - le) > margin:
                    assert (row.agent_total_s <= le) == (g <= le), (row, le)

        median = prom.query_value("histogram_quantile(0.5, sum by (le) "
                                  "(virtio_recovery_duration_seconds_bucket))")
        assert median is not None and 0 < median <= max(recovered)

        # self-metrics
        assert prom.query_value('virtio_agent_hook_attached{hook="mmio"}') == 1
        assert prom.query_value('sum(virtio_agent_events_total{kind="access"})') > 0
        assert prom.query_value('sum(virtio_agent_events_lost_total)') is not None

    # -- the exposition itself -----------------------------------------------------------------
    from conftest import require_tool

    promtool = require_tool("promtool", "Debian package prometheus")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert agent.stop() == 0, agent.stderr_tail()
    assert not agent.errors_logged(), agent.errors_logged()[:3]


def test_bpf_run_time_is_exported_while_kernel_stats_are_on(agent):
    """virtio_agent_bpf_run_* appear with kernel.bpf_stats_enabled=1 (restored afterwards)."""
    from lab.harness import GuestSpec, run as run_vm
    from prometheus_client.parser import text_string_to_metric_families

    knob = "/proc/sys/kernel/bpf_stats_enabled"
    with open(knob) as f:
        before = f.read().strip()

    def samples(name):
        return [s for fam in text_string_to_metric_families(agent.metrics_text())
                for s in fam.samples if s.name == name]

    if before != "1":
        assert samples("virtio_agent_bpf_run_count_total") == []  # absent, not zero
    try:
        with open(knob, "w") as f:
            f.write("1")
        run_vm(GuestSpec(transport="modern", scenario="init", extra_args=("-name", "e2e-stats")))
        counts = {s.labels["prog"]: s.value for s in samples("virtio_agent_bpf_run_count_total")}
        times = {s.labels["prog"]: s.value for s in samples("virtio_agent_bpf_run_time_seconds_total")}
    finally:
        with open(knob, "w") as f:
            f.write(before)
    assert counts and set(counts) == set(times)
    assert sum(counts.values()) > 0 and sum(times.values()) > 0
    busiest = max(counts, key=counts.get)
    print(f"busiest BPF program {busiest}: {counts[busiest]:.0f} runs, "
          f"{times[busiest] / counts[busiest] * 1e9:.0f} ns/run")


def test_run_over_tls_and_sigint(bpf, tmp_path):
    """`run --tls-cert/--tls-key`: /healthz and /metrics over HTTPS; SIGINT exits 0."""
    import signal

    from conftest import require_tool

    openssl = require_tool("openssl", "Debian package openssl")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    a = AgentProcess(extra_args=["--tls-cert", str(cert), "--tls-key", str(key)],
                     tls_ca=str(cert))
    try:
        a.start()
        assert a.url.startswith("https://")
        assert "virtio_agent_build_info" in a.metrics_text()
        a.proc.send_signal(signal.SIGINT)
        assert a.proc.wait(timeout=20) == 0, a.stderr_tail()
    finally:
        a.close()


def test_run_with_web_config_tls_client_certs_and_basic_auth(bpf, tmp_path):
    """`run --web-config`: the real agent behind TLS, client certificates (if given, verified)
    and basic auth, checked with curl; /healthz stays open for probes."""
    import json

    import bcrypt

    from tests.unit.tlsfiles import Pki, curl

    pki, other = Pki(tmp_path), Pki(tmp_path, name="other-ca")
    server_cert, server_key = pki.issue("server", server=True)
    client_cert, client_key = pki.issue("prometheus")
    stranger_cert, stranger_key = other.issue("stranger")
    web = tmp_path / "web.yml"
    web.write_text(json.dumps({
        "tls_server_config": {"cert_file": server_cert, "key_file": server_key,
                              "client_auth_type": "VerifyClientCertIfGiven",
                              "client_ca_file": pki.ca_cert},
        "basic_auth_users": {"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()},
    }))
    a = AgentProcess(extra_args=["--web-config", str(web)], tls_ca=pki.ca_cert)
    try:
        a.start()  # polls /healthz over TLS without credentials
        url, tls = a.url + "/metrics", ["--cacert", pki.ca_cert]
        assert curl(url, *tls).status == 401
        assert curl(url, *tls, "-u", "prometheus:wrong").status == 401
        ok = curl(url, *tls, "--cert", client_cert, "--key", client_key,
                  "-u", "prometheus:s3cret")
        assert ok.status == 200 and b"virtio_agent_build_info" in ok.body
        stranger = curl(url, *tls, "--cert", stranger_cert, "--key", stranger_key,
                        "-u", "prometheus:s3cret")
        assert stranger.status == 0 and stranger.rc != 0
        assert a.stop() == 0, a.stderr_tail()
    finally:
        a.close()
