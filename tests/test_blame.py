"""Which backend answers blame the request: the texts Triton answers 500 (or 501) with for a request it
could not read become 400 (415), and nothing else does."""

from __future__ import annotations

import json

import pytest

from gateway.pipeline.blame import MAX_CLASSIFIED_BODY, caller_fault


def error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# Bodies as the Triton of these tests (PyTriton 0.7) answered them, for the requests named.
CALLER_FAULTS = {
    "not JSON": "failed to parse the request JSON buffer: Invalid value. at 0",
    "JSON cut short": "failed to parse the request JSON buffer: Invalid value. at 88",
    "a JSON array": "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'",
    "inputs not a list": "Unable to parse 'inputs': attempt to access JSON non-array as array",
    "input without a name": "Unable to parse 'name': attempt to access non-existing object member 'name'",
    "negative shape": "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as "
    "unsigned-integer",
    "strings as FP32": "Unable to parse 'data': attempt to access JSON non-number as double",
    "shape larger than data": "Unable to parse 'data': Shape does not match true shape of 'data' field",
    "shape smaller than data": "Failed to parse 'data' field: shape does not match true shape",
    "a parameter of the wrong type": "Unable to parse 'binary_data_output': attempt to access JSON "
    "non-boolean as boolean",
}
NOT_THE_CALLERS = [
    "Failed to process the request(s) for model 'fraud_detector_0_0', message: TritonModelException: boom",
    "Failed to parse 'data' field: output buffer unavailable",
    "HTTP end point doesn't support models with decoupled transaction policy",
    "failed to reserve 4096 bytes in output tensor buffer",
]


@pytest.mark.parametrize("message", CALLER_FAULTS.values(), ids=CALLER_FAULTS.keys())
def test_triton_500s_that_blame_the_request_become_400(message: str) -> None:
    assert caller_fault(500, error(message)) == 400


def test_an_unsupported_content_encoding_becomes_415() -> None:
    assert caller_fault(501, error("Unsupported compression type")) == 415


@pytest.mark.parametrize("message", NOT_THE_CALLERS)
def test_other_server_errors_stay_the_versions(message: str) -> None:
    assert caller_fault(500, error(message)) is None
    assert caller_fault(501, error(message)) is None


def test_only_500_and_501_with_a_triton_error_body_are_read() -> None:
    parse = error(CALLER_FAULTS["not JSON"])
    assert caller_fault(502, parse) is None and caller_fault(503, parse) is None
    assert caller_fault(200, parse) is None and caller_fault(400, parse) is None  # a 4xx is already 4xx
    assert caller_fault(500, b"failed to parse the request JSON buffer") is None  # not Triton's JSON
    assert caller_fault(500, b'["failed to parse the request JSON buffer"]') is None
    assert caller_fault(500, json.dumps({"error": 5}).encode()) is None
    padded = json.dumps({"error": CALLER_FAULTS["not JSON"], "pad": "x" * MAX_CLASSIFIED_BODY}).encode()
    assert caller_fault(500, padded) is None  # longer than any Triton error: never held back
