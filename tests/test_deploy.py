"""deploy/: Prometheus alert rules, the Grafana dashboard and the Kubernetes manifests, checked.

promtool (Debian's prometheus package) checks the rules; every metric the rules and the dashboard name
must be one the gateway's /metrics serves; the manifests are validated against the Kubernetes schemas
(kubernetes-validate, offline), the ConfigMap's routes.yaml with the gateway's own loader and the pod's
command line with the gateway's own parser.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.cli.main import build_parser
from gateway.routing import config
from tests.test_admin_unit import Admin, api  # noqa: F401  (the admin API fixture)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "model-gateway.json"
K8S_VERSION = "1.29.0"
METRIC = re.compile(r"\bgateway_[a-z_]+\b")


def manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def of_kind(kind: str) -> dict[str, Any]:
    return next(doc for doc in manifests() if doc["kind"] == kind)


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_each_alert_fires_on_what_should_trigger_it() -> None:
    tests = RULES.with_name("alerts_test.yml")
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def named_metrics() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [var["definition"] for var in dashboard["templating"]["list"] if "definition" in var]
    return {name for expr in exprs for name in METRIC.findall(expr)}


async def test_every_metric_the_rules_and_dashboard_name_is_served(api: Admin) -> None:  # noqa: F811
    status, text = await api.call("GET", "/metrics")
    assert status == 200
    served = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            served |= (
                {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
            )
    named = named_metrics()
    assert len(named) >= 15
    assert named - served == set(), f"named but not served: {sorted(named - served)}"


def test_the_checked_in_dashboard_is_what_the_generator_writes() -> None:
    from deploy.grafana.generate import dashboard

    assert json.loads(DASHBOARD.read_text()) == dashboard()


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_are_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_pod_runs_a_command_the_gateway_accepts_with_a_routes_file_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert container["command"] == ["gateway"]
    assert (args.host, args.port, args.admin_host, args.admin_port) == ("0.0.0.0", 8080, "0.0.0.0", 8081)
    # The grace period covers the preStop pause and the whole drain.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + args.shutdown_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routes")
    assert args.config == f"{mount['mountPath']}/routes.yaml"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert env["GATEWAY_ADMIN_TOKEN"] == of_kind("Secret")["metadata"]["name"]
    routes = tmp_path / "routes.yaml"
    routes.write_text(of_kind("ConfigMap")["data"]["routes.yaml"])
    monkeypatch.setenv("REDIS_URL", of_kind("Secret")["stringData"]["REDIS_URL"])
    table = config.load_table(routes)
    assert table.store.url.startswith("redis://") and table.keys.required
    services = [
        doc
        for doc in manifests()
        if doc["kind"] == "Service" and doc["metadata"]["name"].startswith("model-gateway")
    ]
    ports = {p["name"]: p["port"] for s in services for p in s["spec"]["ports"]}
    assert {k: ports[k] for k in ("http", "grpc", "admin")} == {"http": 8080, "grpc": 8001, "admin": 8081}
