"""Backend answers that blame the request: Triton's 5xx for a request it could not parse.

Triton answers the errors of its own JSON reader with the code of an internal error: a body that is not
JSON, a field of the wrong type or missing, `data` that does not fill `shape` all come back as 500
(src/http_server.cc in triton-inference-server/server: `TRITONJSON_STATUSRETURN` creates
`TRITONSERVER_ERROR_INTERNAL`, which `HttpCodeFromError` turns into 500), and an unknown
`Content-Encoding` as 501. Passed on as they are, they tell the caller the server failed, and counted
against the version they let any caller fail a canary on purpose or by accident. So an answer that
matches one of these texts goes to the client as 400 (415 for the encoding, RFC 9110 section 15.5.16)
with Triton's own message, and is the caller's fault in the counters.

The texts were read in Triton's source and checked against the Triton the tests start (2.5x, through
PyTriton); docs/operations.md lists them. Triton's own 4xx (unknown input or output name, wrong
datatype, wrong shape or batch size, byte size mismatch...) need no mapping: a 4xx is always the caller's.
A model that raises on a bad input answers a plain 500 and stays the version's failure: the gateway
cannot tell that from a broken model.
"""

from __future__ import annotations

import json

# Longest Triton error body the gateway holds back to classify: its messages are a few hundred bytes.
MAX_CLASSIFIED_BODY = 8192
CLASSIFIED_STATUSES = frozenset((500, 501))

# Beginnings of the "error" texts of Triton's 500 answers that come from reading the request.
REQUEST_PARSE_ERRORS: tuple[str, ...] = (
    "failed to parse the request JSON buffer",  # not JSON at all, or cut short
    "Unable to parse '",  # a field of the request: inputs, name, datatype, shape, data, parameters...
    "Unable to parse JSON bytes array",  # BYTES data that is not strings
    "Shape does not match true shape of 'data' field",  # more data than the shape holds
    "shape does not match true shape of 'data' field",  # the same, for BYTES
    "Failed to parse 'data' field: shape does not match true shape",  # less data than the shape
    "Tensor size is too large to be processed",  # a BYTES element over 2^63 bytes
    "parameter key '",  # a request parameter that cannot be read
)
UNSUPPORTED_ENCODING = "Unsupported compression type"  # 501 for a Content-Encoding Triton lacks


def caller_fault(status: int, body: bytes) -> int | None:
    """The status to answer instead when a backend's answer blames the request; None when it does not."""
    if status not in CLASSIFIED_STATUSES or len(body) > MAX_CLASSIFIED_BODY:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    message = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(message, str):
        return None
    if status == 500 and message.startswith(REQUEST_PARSE_ERRORS):
        return 400
    if status == 501 and message == UNSUPPORTED_ENCODING:
        return 415
    return None
