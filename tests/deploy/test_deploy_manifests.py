"""Kubernetes manifests: yamllint, kustomize builds, schema validation, and the DaemonSet's contract."""
from __future__ import annotations

import os
import re
import sys
import subprocess

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from deploy_support import DASHBOARDS, DEPLOY, METRICS_DOC, RULES_FILE, ROOT, need_tool

# Oldest Kubernetes the manifests target (CAP_BPF/CAP_PERFMON need kernel 5.8, not a new API) and
# the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# Capabilities the agent may ask for (docs/deploy.md explains each).
ALLOWED_CAPS = {"BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH"}


def _load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _kustomize(path) -> list[dict]:
    kubectl = need_tool("kubectl", "kubectl has kustomize built in; `kubectl kustomize` renders deploy/")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return _load_all(result.stdout)


def _base_files() -> list:
    return sorted((DEPLOY / "base").glob("*.yaml"))


def _raw_objects() -> list[dict]:
    objs = []
    for path in [p for p in _base_files() if p.name != "kustomization.yaml"]:
        objs += _load_all(path.read_text())
    objs += _load_all((DASHBOARDS / "grafana-dashboards-configmap.yaml").read_text())
    return objs


def _by_kind(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_yamllint_clean():
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / "yamllint.yaml"))
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DASHBOARDS.rglob("*.yaml"))
    assert len(files) >= 10
    problems = []
    for path in files:
        for p in linter.run(path.read_text(), conf, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{p.line}:{p.column} {p.rule} {p.message}")
    assert problems == []


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in _base_files() if p.name != "kustomization.yaml"}
    assert on_disk <= listed, f"manifests not in deploy/base/kustomization.yaml: {on_disk - listed}"
    assert "../../dashboards" in listed


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(version):
    validated = 0
    for obj in _raw_objects():
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        validated += 1
    assert validated == 5  # Namespace, ServiceAccount, DaemonSet, Service, ConfigMap


def test_validator_rejects_a_misspelt_field():
    daemonset = _by_kind(_raw_objects(), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[-1], strict=True)


OVERLAYS = ["deploy", "deploy/base"] + sorted(f"deploy/overlays/{p.name}" for p in (DEPLOY / "overlays").iterdir()
                                               if (p / "kustomization.yaml").is_file())


def test_every_overlay_is_built_here():
    assert {"deploy/overlays/privileged", "deploy/overlays/lsm-unconfined", "deploy/overlays/no-usr-src"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_build_validates(overlay):
    objs = _kustomize(ROOT / overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["Namespace", "ServiceAccount", "DaemonSet", "Service", "ServiceMonitor",
                            "PrometheusRule", "ConfigMap"])
    for obj in objs:
        assert obj["metadata"].get("namespace", "virtio-recovery") == "virtio-recovery"
        if obj["kind"] not in CRD_KINDS:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    image = _by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"\S+/virtio-recovery-agent:\S+", image), image


def test_privileged_overlay_is_the_only_privileged_one():
    base = _by_kind(_kustomize(DEPLOY), "DaemonSet")["spec"]["template"]["spec"]
    privileged = _by_kind(_kustomize(DEPLOY / "overlays" / "privileged"), "DaemonSet")["spec"]["template"]["spec"]
    assert base["containers"][0]["securityContext"]["privileged"] is False
    assert privileged["containers"][0]["securityContext"]["privileged"] is True
    assert {"tracefs", "debugfs"} <= {v["name"] for v in privileged["volumes"]}


# The labels a Prometheus Operator selects ServiceMonitors and PrometheusRules by.
SELECTION_LABELS = {"release"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_and_prometheusrule_carry_the_same_selection_labels(overlay):
    """A Prometheus that loads the rules also scrapes the agent (kube-prometheus-stack selects both by
    `release`): the labels are set once, in deploy/base/kustomization.yaml, for both objects."""
    objs = _kustomize(ROOT / overlay)
    monitor = _by_kind(objs, "ServiceMonitor")["metadata"]["labels"]
    rule = _by_kind(objs, "PrometheusRule")["metadata"]["labels"]
    assert SELECTION_LABELS <= set(monitor)
    assert monitor == rule


def test_selection_labels_are_set_in_one_place():
    for obj in _raw_objects():
        if obj["kind"] in CRD_KINDS:
            assert not SELECTION_LABELS & set(obj["metadata"].get("labels", {})), \
                f"{obj['kind']} sets a selection label itself; it belongs in deploy/base/kustomization.yaml"
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    patches = [p for p in kustomization.get("patches", []) if p.get("target", {}).get("group") == "monitoring.coreos.com"]
    assert len(patches) == 1
    assert re.fullmatch(patches[0]["target"]["kind"], "ServiceMonitor")
    assert re.fullmatch(patches[0]["target"]["kind"], "PrometheusRule")


def test_selection_label_changed_in_an_overlay_reaches_both(tmp_path):
    """What docs/deploy.md tells a kube-prometheus-stack user to do for another release name."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "base", overlay)],
        "patches": [{"target": {"group": "monitoring.coreos.com"},
                     "patch": "- op: replace\n  path: /metadata/labels/release\n  value: monitoring\n"}]}))
    # kustomize loads bases outside the kustomization's directory only when told to
    kubectl = need_tool("kubectl", "kustomize")
    result = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    objs = _load_all(result.stdout)
    for kind in CRD_KINDS:
        assert _by_kind(objs, kind)["metadata"]["labels"]["release"] == "monitoring"


def test_lsm_unconfined_overlay_lifts_selinux_and_apparmor_only():
    base = _agent_container(_kustomize(DEPLOY / "base"))
    objs = _kustomize(DEPLOY / "overlays" / "lsm-unconfined")
    template = _by_kind(objs, "DaemonSet")["spec"]["template"]
    container = _agent_container(objs)
    assert container["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert template["metadata"]["annotations"] == {
        f"container.apparmor.security.beta.kubernetes.io/{container['name']}": "unconfined"}
    lifted = dict(container["securityContext"])
    del lifted["seLinuxOptions"]
    assert lifted == base["securityContext"], "the overlay must change only the LSM confinement"


def test_no_usr_src_overlay_drops_only_that_mount():
    base = _by_kind(_kustomize(DEPLOY / "base"), "DaemonSet")["spec"]["template"]["spec"]
    spec = _by_kind(_kustomize(DEPLOY / "overlays" / "no-usr-src"), "DaemonSet")["spec"]["template"]["spec"]
    assert "/usr/src" not in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {v["name"] for v in base["volumes"]} - {v["name"] for v in spec["volumes"]} == {"usr-src"}
    assert len(spec["containers"][0]["volumeMounts"]) == len(base["containers"][0]["volumeMounts"]) - 1


def test_daemonset_priority_and_termination_message():
    spec = _by_kind(_raw_objects(), "DaemonSet")["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    # `run` exits 1 with one line saying why: kubectl describe pod shows it.
    assert spec["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_service_keeps_not_ready_agents_as_targets():
    """While BCC compiles (or after capture died) /metrics says virtio_agent_ready 0: the target must stay."""
    assert _by_kind(_raw_objects(), "Service")["spec"]["publishNotReadyAddresses"] is True


def _agent_container(objs: list[dict]) -> dict:
    return _by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def test_daemonset_runs_on_kvm_hosts_with_host_pid():
    spec = _by_kind(_raw_objects(), "DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert spec.get("hostNetwork", False) is False
    assert spec["automountServiceAccountToken"] is False
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert {"kubevirt.io/schedulable", "virtio-recovery-agent/kvm-host"} <= keys
    assert {t["effect"] for t in spec["tolerations"]} >= {"NoSchedule", "NoExecute"}


def test_daemonset_capabilities_are_minimal_and_explained():
    sc = _agent_container(_raw_objects())["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    assert set(added) <= ALLOWED_CAPS and {"BPF", "PERFMON"} <= set(added)
    # Each added capability carries a comment just above it saying why.
    lines = (DEPLOY / "base" / "daemonset.yaml").read_text().splitlines()
    for cap in added:
        idx = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*- {cap}\s*", line))
        assert lines[idx - 1].strip().startswith("#"), f"capability {cap} has no comment explaining it"


def test_daemonset_mounts_what_bcc_needs_read_only():
    objs = _raw_objects()
    container = _agent_container(objs)
    volumes = {v["name"]: v for v in _by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for host_path in ("/sys/kernel/tracing", "/lib/modules", "/usr/src"):
        mount = mounts[host_path]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["hostPath"]["path"] == host_path
    # Kernel headers may be missing on a node: no type check, so the pod still starts (and says why
    # it cannot compile, or uses CONFIG_IKHEADERS); never created by the kubelet for a read-only mount.
    for host_path in ("/lib/modules", "/usr/src"):
        assert volumes[mounts[host_path]["name"]]["hostPath"]["type"] == ""
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if mount.get("readOnly") and "hostPath" in volume:
            assert volume["hostPath"].get("type", "") not in ("DirectoryOrCreate", "FileOrCreate"), mount
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_daemonset_keeps_the_state_file_on_the_host_where_the_agent_writes_it():
    """The agent's default --state-file lies in a writable hostPath mount (the root fs is
    read-only), so a restarted container goes on with the old one's open episodes."""
    import os

    from agent.run import DEFAULTS

    objs = _raw_objects()
    container = _agent_container(objs)
    assert not any(e["name"] == "VRA_STATE_FILE" for e in container.get("env", []))
    assert "--state-file" not in " ".join(container.get("args", []))
    volumes = {v["name"]: v for v in _by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    state_dir = os.path.dirname(DEFAULTS["state_file"])
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}[state_dir]
    assert not mount.get("readOnly", False)
    assert volumes[mount["name"]]["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}


def test_daemonset_resources_probes_and_port_match_the_agent():
    container = _agent_container(_raw_objects())
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert f":{port['containerPort']}" in METRICS_DOC.read_text()  # the agent's default listen port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["args"] == ["run"]


def test_service_and_servicemonitor_select_the_agent_pods():
    objs = _raw_objects()
    pod_labels = _by_kind(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    service = _by_kind(objs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    svc_port = service["spec"]["ports"][0]
    assert svc_port["targetPort"] == "metrics"
    monitor = _by_kind(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == svc_port["name"]
    # The VirtioAgentDown alert selects job="<Service name>", the operator's default job label.
    assert f'job="{service["metadata"]["name"]}"' in RULES_FILE.read_text()


# Fields of the Prometheus Operator CRDs (monitoring.coreos.com/v1) that these manifests may use;
# the CRD schemas are not available offline, so the shape is checked here.
SERVICEMONITOR_SPEC = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}
ENDPOINT_FIELDS = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                   "metricRelabelings"}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                   "uppercase", "keepequal", "dropequal"}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def test_servicemonitor_shape():
    monitor = _by_kind(_raw_objects(), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICEMONITOR_SPEC
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= ENDPOINT_FIELDS
        for key in ("interval", "scrapeTimeout"):
            assert DURATION.match(endpoint[key]), endpoint[key]
        for relabel in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
            assert set(relabel) <= RELABEL_FIELDS
            assert relabel.get("action", "replace") in RELABEL_ACTIONS
            re.compile(relabel.get("regex", "(.*)"))
            if relabel.get("action", "replace") == "replace":
                assert all(s.startswith("__meta_kubernetes_") for s in relabel["sourceLabels"])


def test_prometheusrule_embeds_the_plain_rules_file():
    rule = _by_kind(_raw_objects(), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
    result = subprocess.run([sys.executable, str(DEPLOY / "render.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
