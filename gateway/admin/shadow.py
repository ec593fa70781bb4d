"""Admin route and metrics for shadow comparisons: how a mirrored version's answers compare with the
primary's (gateway/shadow), per version pair, summed over the workers.

`GET /api/shadow` gives shares and quantiles; `/metrics` gives the counts and the two histograms
(largest absolute difference, latency difference) so Prometheus can compute the same over any range.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from gateway.admin.control_plane import ControlPlane
from gateway.shadow.compare import DIFF_EDGES, LATENCY_EDGES_MS, REASONS, merge_all
from gateway.state.records import WorkerSnapshot

LABELS = ["model", "primary", "shadow"]


def add_shadow_routes(app: web.Application, plane: ControlPlane) -> None:
    async def shadow(request: web.Request) -> web.Response:
        return web.json_response(plane.shadow_view())

    app.router.add_get("/api/shadow", shadow, allow_head=False)


def _buckets(edges: tuple[float, ...], counts: list[int], scale: float = 1.0) -> list[tuple[str, float]]:
    out, seen = [], 0
    for edge, count in zip(edges, counts, strict=False):
        seen += count
        out.append((repr(edge * scale), float(seen)))
    out.append(("+Inf", float(sum(counts))))
    return out


def shadow_metrics(workers: list[WorkerSnapshot]) -> Iterator[Metric]:
    compared = CounterMetricFamily(
        "gateway_shadow_compared", "Shadow answers compared with the primary's answer.", labels=LABELS
    )
    equal = CounterMetricFamily(
        "gateway_shadow_equal",
        "Compared shadow answers equal to the primary's within tolerance.",
        labels=LABELS,
    )
    argmax = CounterMetricFamily(
        "gateway_shadow_argmax_compared",
        "Compared answers with a classification-like output (argmax compared).",
        labels=LABELS,
    )
    same = CounterMetricFamily(
        "gateway_shadow_same_argmax",
        "Compared answers whose argmax agrees with the primary's.",
        labels=LABELS,
    )
    skipped = CounterMetricFamily(
        "gateway_shadow_not_compared",
        "Answer pairs not compared: status (either was not 200), undecodable, too_large, busy (budget).",
        labels=[*LABELS, "reason"],
    )
    diff = HistogramMetricFamily(
        "gateway_shadow_max_abs_difference",
        "Largest absolute difference between a shadow answer's elements and the primary's.",
        labels=LABELS,
    )
    latency = HistogramMetricFamily(
        "gateway_shadow_latency_difference_seconds",
        "Shadow answer's backend time minus the primary's (negative: the shadow was faster).",
        labels=LABELS,
    )
    for labels, stats in sorted(merge_all(w.mirrors.comparisons for w in workers).items()):
        values = list(labels)
        compared.add_metric(values, stats.compared)
        equal.add_metric(values, stats.equal)
        argmax.add_metric(values, stats.argmax_compared)
        same.add_metric(values, stats.same_argmax)
        for reason in REASONS:
            skipped.add_metric([*values, reason], stats.not_compared[reason])
        # The sum of differences is not kept (a bucket is enough for quantiles); 0 keeps the format valid.
        diff.add_metric(values, _buckets(DIFF_EDGES, stats.diff_counts), sum_value=0.0)
        latency.add_metric(
            values,
            _buckets(LATENCY_EDGES_MS, stats.latency_counts, 0.001),
            sum_value=stats.latency_sum_ms / 1000,
        )
    yield from (compared, equal, argmax, same, skipped, diff, latency)


SHADOW_OPENAPI_PATHS: dict[str, Any] = {
    "/api/shadow": {
        "get": {
            "operationId": "getShadow",
            "summary": "Shadow comparisons per version pair: equal share, argmax agreement, differences",
            "responses": {
                "200": {
                    "description": "One entry per (model, primary version, shadow version)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ShadowView"}}},
                },
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    }
}
_QUANTILES = {"type": "object", "additionalProperties": {"type": ["number", "string", "null"]}}
SHADOW_OPENAPI_SCHEMAS: dict[str, Any] = {
    "ShadowView": {
        "type": "object",
        "properties": {
            "pairs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "primary": {"type": "string"},
                        "shadow": {"type": "string"},
                        "compared": {"type": "integer"},
                        "equal_share": {"type": ["number", "null"]},
                        "argmax_compared": {"type": "integer"},
                        "same_argmax_share": {"type": ["number", "null"]},
                        "shape_differs": {"type": "integer"},
                        "max_abs_diff": {
                            **_QUANTILES,
                            "description": "p50, p95, p99, max: the smallest bucket edge at or above the "
                            "nearest-rank quantile; 'beyond' above 1e4",
                        },
                        "latency_diff_ms": {
                            **_QUANTILES,
                            "description": "mean, p50, p95 of shadow - primary",
                        },
                        "not_compared": {"type": "object", "additionalProperties": {"type": "integer"}},
                    },
                },
            }
        },
    }
}
