"""Shadow comparison's pure parts and its budget: decoding, comparing, quantiles, what is skipped."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

from gateway.shadow import comparer as shadow_comparer
from gateway.shadow.compare import DIFF_EDGES, OVER, Comparison, PairStats, compare, quantile
from gateway.shadow.comparer import PRIMARY, SHADOW, Comparer
from gateway.shadow.decode import Undecodable, decode


def json_answer(**outputs: tuple[str, list[int], list[object]]) -> bytes:
    listed = [{"name": n, "datatype": d, "shape": s, "data": v} for n, (d, s, v) in outputs.items()]
    return json.dumps({"model_name": "m", "outputs": listed}).encode()


def binary_answer(scores: np.ndarray, labels: list[bytes]) -> tuple[bytes, int]:
    raw_scores = scores.astype("<f4").tobytes()
    raw_labels = b"".join(struct.pack("<I", len(x)) + x for x in labels)
    head = json.dumps(
        {
            "outputs": [
                {
                    "name": "scores",
                    "datatype": "FP32",
                    "shape": list(scores.shape),
                    "parameters": {"binary_data_size": len(raw_scores)},
                },
                {
                    "name": "label",
                    "datatype": "BYTES",
                    "shape": [len(labels)],
                    "parameters": {"binary_data_size": len(raw_labels)},
                },
            ]
        }
    ).encode()
    return head + raw_scores + raw_labels, len(head)


def test_binary_and_json_answers_decode_to_the_same_tensors() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    body, length = binary_answer(scores, [b"cat", b"dog"])
    from_binary = decode(body, length)
    from_json = decode(
        json_answer(scores=("FP32", [2, 3], scores.ravel().tolist()), label=("BYTES", [2], ["cat", "dog"])),
        None,
    )
    assert compare(from_binary, from_json) == Comparison(True, True, 0.0)
    assert from_binary["label"] == (b"cat", b"dog")


@pytest.mark.parametrize(
    ("body", "length"),
    [
        (b"not json", None),
        (b'{"outputs": 5}', None),
        (b'{"outputs": []}xx', 99),
        (json_answer(x=("BF16", [1], [1])), None),
    ],
)
def test_what_cannot_be_read_is_undecodable(body: bytes, length: int | None) -> None:
    with pytest.raises(Undecodable):
        decode(body, length)


def test_argmax_equality_and_differences() -> None:
    a = {"p": np.array([[0.1, 0.9], [0.6, 0.4]], dtype=np.float32)}
    flipped = {"p": np.array([[0.2, 0.8], [0.3, 0.7]], dtype=np.float32)}
    assert compare(a, flipped) == Comparison(False, False, pytest.approx(0.3, abs=1e-6))
    close = {"p": a["p"] + np.float32(1e-7)}
    assert compare(a, close).equal and compare(a, close).same_argmax
    assert compare(a, {"p": np.zeros((3, 2), dtype=np.float32)}) == Comparison(False, None, None)  # shape
    assert compare(a, {"q": a["p"]}) == Comparison(False, None, None)  # names
    nan = {"v": np.array([np.nan, 1.0])}
    assert compare(nan, {"v": np.array([np.nan, 1.0])}) == Comparison(True, True, 0.0)
    assert compare(nan, {"v": np.array([0.0, 1.0])}).max_abs_diff == float("inf")


def test_quantiles_are_the_bucket_edge_at_or_above_the_nearest_rank() -> None:
    stats = PairStats()
    values = [0.0, 0.0, 0.003, 0.5, 2.0, 7.0, 1e9]
    for v in values:
        stats.add(Comparison(v == 0, None, v), 1.0)
    assert quantile(DIFF_EDGES, stats.diff_counts, 0.25) == 0.0
    median = quantile(DIFF_EDGES, stats.diff_counts, 0.5)
    assert isinstance(median, float) and 0.5 <= median < 0.5 * 10**0.25
    assert quantile(DIFF_EDGES, stats.diff_counts, 1.0) == OVER
    summary = stats.summary()
    assert summary["compared"] == 7 and summary["equal_share"] == 2 / 7
    assert summary["latency_diff_ms"]["mean"] == 1.0 and summary["latency_diff_ms"]["p50"] == 1


def wait_compared(comparer: Comparer, key: str, n: int) -> PairStats:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = comparer.figures().get(key)
        if stats is not None and stats.compared + sum(stats.not_compared.values()) >= n:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"not compared: {comparer.figures()}")


def test_pairs_are_compared_skipped_by_reason_and_release_their_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shadow_comparer, "MAX_ANSWER_BYTES", 200)
    comparer = Comparer()
    small = json_answer(y=("FP32", [1], [1.0]))

    def one(primary: bytes, shadow: bytes, status: int = 200) -> None:
        pair = comparer.pair("m", "1", "2")
        assert pair is not None
        pair.head(PRIMARY, 200, None)
        pair.head(SHADOW, status, None)
        pair.body(PRIMARY, primary)
        pair.body(SHADOW, shadow)
        pair.done(SHADOW, 0.002)
        pair.done(PRIMARY, 0.001)

    one(small, small)
    one(small, small, status=500)
    one(small, b"x" * 300)  # over the per-answer budget
    one(small, b"garbage")
    cancelled = comparer.pair("m", "1", "2")
    assert cancelled is not None
    cancelled.cancel()
    cancelled.done(PRIMARY, 0.1)
    stats = wait_compared(comparer, "m/1/2", 4)
    assert stats.compared == 1 and stats.equal == 1
    assert stats.not_compared == {"status": 1, "undecodable": 1, "too_large": 1, "busy": 0}
    assert stats.summary()["latency_diff_ms"]["p50"] == 1  # shadow 1 ms slower
    assert comparer._held == 0  # every byte held for a comparison was given back


def test_a_full_budget_skips_the_comparison_not_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow_comparer, "MAX_HELD_BYTES", 100)
    comparer = Comparer()
    first, second = comparer.pair("m", "1", "2"), comparer.pair("m", "1", "2")
    assert first is not None and second is not None
    first.head(PRIMARY, 200, None)
    first.body(PRIMARY, b"a" * 80)  # held while its shadow has not answered
    second.head(PRIMARY, 200, None)
    second.head(SHADOW, 200, None)
    second.body(PRIMARY, b"b" * 40)  # would pass the worker's budget
    second.done(PRIMARY, 0.0)
    second.done(SHADOW, 0.0)
    first.failed(SHADOW)
    first.done(PRIMARY, 0.0)
    stats = wait_compared(comparer, "m/1/2", 2)
    assert stats.not_compared["busy"] == 1 and stats.not_compared["status"] == 1
    assert comparer._held == 0


def test_a_spent_cpu_budget_collects_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow_comparer, "CPU_SHARE", 0.0)
    comparer = Comparer()
    assert comparer.pair("m", "1", "2") is None
    assert comparer.figures()["m/1/2"].not_compared["busy"] == 1
