"""Writes deploy/grafana/model-gateway.json, the Grafana dashboard over the gateway's metrics.

The JSON is checked in (import it in Grafana: Dashboards > New > Import); this script is how it is
made, so a change is a reviewable edit of the panel list below. Run: python deploy/grafana/generate.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

M = 'model="$model"'
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Requests/s by version",
        "reqps",
        [(f"sum by (version) (rate(gateway_requests_total{{{M}}}[1m]))", "{{version}}")],
    ),
    (
        "Error rate by version (the version's faults only)",
        "percentunit",
        [
            (
                f"sum by (version) (rate(gateway_upstream_errors_total{{{M}}}[1m])) / "
                f"sum by (version) (rate(gateway_requests_total{{{M}}}[1m]))",
                "{{version}}",
            )
        ],
    ),
    (
        "Latency p50 / p95 / p99 by version",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (version, le) "
                f"(rate(gateway_request_duration_seconds_bucket{{{M}}}[1m])))",
                f"{{{{version}}}} p{round(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    ("Canary weight (%)", "percent", [(f"gateway_rollout_canary_weight{{{M}}}", "canary weight")]),
    ("Rollout phase", "none", [(f"gateway_rollout_phase{{{M}}} == 1", "{{phase}}")]),
    (
        "Answers by how the version was chosen (only split is rollout evidence)",
        "reqps",
        [
            (
                f"sum by (version, choice) (rate(gateway_routed_answers_total{{{M}}}[1m]))",
                "{{version}} {{choice}}",
            )
        ],
    ),
    (
        "Shadow: share of answers equal to the primary's",
        "percentunit",
        [
            (
                f"sum by (primary, shadow) (rate(gateway_shadow_equal_total{{{M}}}[5m])) / "
                f"sum by (primary, shadow) (rate(gateway_shadow_compared_total{{{M}}}[5m]))",
                "{{primary}} vs {{shadow}}",
            ),
            (
                f"sum by (primary, shadow) (rate(gateway_shadow_same_argmax_total{{{M}}}[5m])) / "
                f"sum by (primary, shadow) (rate(gateway_shadow_argmax_compared_total{{{M}}}[5m]))",
                "{{primary}} vs {{shadow}} same argmax",
            ),
        ],
    ),
    (
        "Shadow: largest absolute difference, p95",
        "none",
        [
            (
                "histogram_quantile(0.95, sum by (primary, shadow, le) "
                f"(rate(gateway_shadow_max_abs_difference_bucket{{{M}}}[5m])))",
                "{{primary}} vs {{shadow}}",
            )
        ],
    ),
    (
        "Shadow: latency difference (shadow - primary), p50",
        "s",
        [
            (
                "histogram_quantile(0.5, sum by (primary, shadow, le) "
                f"(rate(gateway_shadow_latency_difference_seconds_bucket{{{M}}}[5m])))",
                "{{primary}} vs {{shadow}}",
            )
        ],
    ),
    ("Version ready", "none", [(f"min by (version) (gateway_version_ready{{{M}}})", "{{version}}")]),
    (
        "Admission by outcome",
        "reqps",
        [(f"sum by (outcome) (rate(gateway_admission_total{{{M}}}[1m]))", "{{outcome}}")],
    ),
    (
        "Store reachable (1) and requests decided without it",
        "none",
        [
            ("min by (instance) (gateway_store_up)", "store up {{instance}}"),
            ("sum by (mode) (rate(gateway_store_fallback_total[5m]))", "{{mode}} /s"),
        ],
    ),
    (
        "routes.yaml: last reload loaded (1) and workers in sync",
        "none",
        [
            ("min by (instance) (gateway_config_last_reload_success)", "reload ok {{instance}}"),
            ("min by (instance) (gateway_config_in_sync)", "in sync {{instance}}"),
        ],
    ),
    (
        "Workers and restarts",
        "none",
        [
            ("sum by (instance) (gateway_workers)", "workers {{instance}}"),
            ("sum by (instance) (increase(gateway_worker_restarts_total[15m]))", "restarts/15m {{instance}}"),
        ],
    ),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "Model gateway",
        "uid": "model-gateway",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "tags": ["model-gateway"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    "name": "model",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(gateway_requests_total, model)", "refId": "model"},
                    "definition": "label_values(gateway_requests_total, model)",
                    "refresh": 2,
                },
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    path = Path(__file__).with_name("model-gateway.json")
    path.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {path}")
