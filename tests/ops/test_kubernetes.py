"""The Kubernetes manifests, checked offline: every overlay renders with kubectl's kustomize, every
built-in object is valid for the Kubernetes API (kubernetes-validate, strict), every custom
resource for its CRD (ServiceMonitor, PodMonitor, ScaledObject; deploy/kubernetes/validate), and
the invariants that tie them to the server hold: probes on real routes, the ports and settings
the server reads, secrets it reads, a grace period longer than the drain."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import ENV_PREFIX, Settings
from tests.support.harness import ROOT

pytestmark = pytest.mark.ops

KUBE = ROOT / "deploy/kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.31.0"
CUSTOM_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
ENV_NOT_SETTINGS = {"MODELSCOPE_CACHE", "HF_HOME"}  # read by the model hubs, not by Settings


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: get it from https://kubernetes.io/docs/tasks/tools/ "
            "(its built-in kustomize renders the overlays)"
        )
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_there_are_the_three_overlays():
    assert OVERLAYS == ["cpu", "gpu", "with-postgres-and-redis"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_object_is_valid_for_the_kubernetes_api(overlay):
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def check_custom(docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    validator = KUBE / "validate"
    if not (validator / "node_modules").is_dir() or shutil.which("node") is None:
        pytest.skip("run `make node` (Node.js and npm) to check custom resources")
    return subprocess.run(
        ["node", "validate.mjs"],
        cwd=validator,
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_custom_resource_is_valid_for_its_crd(overlay):
    custom = [d for d in rendered(overlay) if d["apiVersion"].startswith(CUSTOM_GROUPS)]
    if overlay == "cpu":  # the optional PodMonitor component, which no overlay uses
        custom += list(
            yaml.safe_load_all((KUBE / "components/podmonitor/podmonitor.yaml").read_text())
        )
    if custom:
        checked = check_custom(custom)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_crd_check_catches_a_wrong_custom_resource():
    broken = json.loads(json.dumps([d for d in rendered("cpu") if d["kind"] == "ScaledObject"]))
    broken[0]["spec"]["minReplicaCount"] = "two"
    checked = check_custom(broken)
    assert checked.returncode == 1 and "minReplicaCount" in checked.stdout


def server_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The environment the server container gets from its ConfigMaps and Secrets, as Kubernetes
    merges ``envFrom`` (a later source wins)."""
    (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "voxaffect"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == ref["name"]]
        for doc in found:
            env.update(doc.get("data") or {})
            env.update(doc.get("stringData") or {})
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_agree_with_the_server(overlay):
    docs = rendered(overlay)
    (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "voxaffect"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = server_env(docs)
    fields = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    # every setting the manifests give is one the server reads
    assert set(env) - fields - ENV_NOT_SETTINGS == set()
    secret_keys = {
        k for d in of_kind(docs, "Secret") for k in {**d.get("data", {}), **d.get("stringData", {})}
    }
    assert {k for k in secret_keys if k.startswith(ENV_PREFIX)} <= fields
    # and the server accepts them together (secrets the operator adds are checked alike below)
    plain = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    settings = Settings.from_sources(environ={**plain, **_decoded(docs)})
    # probes point at real routes, on the port the server listens on
    routes = set(
        re.findall(r'@bp\.get\("(/[a-z]+)"\)', (ROOT / "server/edges/http_api.py").read_text())
    )
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == settings.port and settings.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] == "http", probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # a pod that drains is given longer than its drain
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s + 10
    assert settings.json_logs
    # the Service and the Ingress reach that port, with the WebSocket paths
    (service,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "voxaffect"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (ingress,) = of_kind(docs, "Ingress")
    paths = {p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert {"/socket.io/", "/telephony/"} <= paths
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    # the autoscaler and the scrapers read gauges the server exports
    metrics = (ROOT / "server/sinks/metrics.py").read_text()
    for scaled in of_kind(docs, "ScaledObject"):
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        for name in re.findall(r"voxaffect_([a-z_]+)", query):
            assert f'p + "{name}"' in metrics, name
    for monitor in of_kind(docs, "ServiceMonitor") + of_kind(docs, "PodMonitor"):
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        assert endpoints[0]["path"] == "/metrics" and endpoints[0]["port"] == "http"


def _decoded(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    import base64

    out: dict[str, str] = {}
    for secret in of_kind(docs, "Secret"):
        for k, v in (secret.get("data") or {}).items():
            out[k] = base64.b64decode(v).decode()
        out.update(secret.get("stringData") or {})
    return {k: v for k, v in out.items() if k.startswith(ENV_PREFIX)}


def test_the_readme_secret_command_names_settings_the_server_reads():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes") :]
    section = section[: section.index("\n## ", 4)]
    named = set(re.findall(r"--from-literal=(VOXAFFECT_[A-Z_]+)=", section))
    fields = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    assert named and named <= fields
    assert {"VOXAFFECT_API_TOKENS", "VOXAFFECT_DB", "VOXAFFECT_MESSAGE_QUEUE"} <= named


def test_the_dashboards_configmap_holds_the_dashboards_grafana_provisions():
    docs = rendered("cpu")
    (dashboards,) = [d for d in of_kind(docs, "ConfigMap") if "dashboards" in d["metadata"]["name"]]
    files = sorted(p.name for p in (ROOT / "grafana/dashboards").glob("*.json"))
    assert sorted(dashboards["data"]) == files
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name in files:
        assert json.loads(dashboards["data"][name]) == json.loads(
            (ROOT / "grafana/dashboards" / name).read_text()
        )


def test_the_gpu_overlay_asks_for_a_gpu_node():
    (deployment,) = [d for d in of_kind(rendered("gpu"), "Deployment")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"
    assert server_env(rendered("gpu"))["VOXAFFECT_DEVICE"] == "cuda"
