"""Just enough of protobuf's wire format to route a ModelInferRequest without decoding its tensors.

A message is a sequence of fields, each a varint key (field number << 3 | wire type) and a value; a
length-delimited value (strings, sub-messages, `raw_input_contents`) is a varint length and that many
bytes, so a reader can step over a tensor of any size by its length alone, without copying it
(https://protobuf.dev/programming-guides/encoding/).

Renaming relies on the encoding's merge rule: when a singular scalar field appears more than once,
the last value wins, and repeated occurrences of a singular sub-message field are merged
(protobuf.dev, encoding, "Last One Wins"). So the gateway renames a request or a response by appending
`model_name` and `model_version` after the original bytes; every conforming parser (Triton's C++,
tritonclient's Python) reads the appended values, and the tensors are never looked at.

Field numbers are those of grpc_service.proto (KServe v2, as Triton ships it):
ModelInferRequest and ModelInferResponse: model_name = 1, model_version = 2;
ModelStreamInferResponse: error_message = 1, infer_response = 2.
"""

from __future__ import annotations

from typing import NamedTuple

MODEL_NAME = 1
MODEL_VERSION = 2
STREAM_ERROR_MESSAGE = 1
STREAM_INFER_RESPONSE = 2

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
MAX_NAME = 1024  # bytes of a model name or version the gateway reads; longer is not a name anyone routes by


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message (the caller's fault: INVALID_ARGUMENT)."""


class InferHead(NamedTuple):
    """What routing reads of a ModelInferRequest."""

    model_name: str
    model_version: str


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise WireError("the message ends inside a varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("a varint is longer than 10 bytes")


def _skip(data: bytes | memoryview, pos: int, wire_type: int) -> int:
    """The position after a value of `wire_type` that starts at `pos`."""
    if wire_type == _VARINT:
        return _varint(data, pos)[1]
    if wire_type == _I64:
        end = pos + 8
    elif wire_type == _I32:
        end = pos + 4
    elif wire_type == _LEN:
        length, pos = _varint(data, pos)
        end = pos + length
    else:  # groups are proto2 only; grpc_service.proto has none
        raise WireError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise WireError("a field runs past the end of the message")
    return end


def strings(data: bytes, numbers: tuple[int, ...]) -> dict[int, str]:
    """The last value of each of the top-level string fields `numbers`, stepping over everything else.

    Every top-level field's framing is checked (a truncated or garbled message is a `WireError`), but
    nested messages and tensor bytes are only stepped over, never read.
    """
    found: dict[int, str] = {}
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("a field has number 0")
        if number in numbers:
            if wire_type != _LEN:
                raise WireError(f"field {number} should be a string, not wire type {wire_type}")
            length, start = _varint(view, pos)
            pos = start + length
            if pos > end:
                raise WireError("a field runs past the end of the message")
            if length > MAX_NAME:
                raise WireError(f"field {number} is {length} bytes long; names are at most {MAX_NAME}")
            try:
                found[number] = bytes(view[start:pos]).decode()
            except UnicodeDecodeError:
                raise WireError(f"field {number} is not UTF-8") from None
        else:
            pos = _skip(view, pos, wire_type)
    return found


def infer_head(data: bytes) -> InferHead:
    """model_name and model_version of a ModelInferRequest (or ModelInferResponse)."""
    found = strings(data, (MODEL_NAME, MODEL_VERSION))
    return InferHead(found.get(MODEL_NAME, ""), found.get(MODEL_VERSION, ""))


def has_field(data: bytes, number: int) -> bool:
    """Whether a top-level field `number` is present."""
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(view, pos)
        if key >> 3 == number:
            return True
        pos = _skip(view, pos, key & 7)
    return False


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def string_field(number: int, value: bytes) -> bytes:
    """One length-delimited field, encoded (an empty value is written too: it must override)."""
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(value)) + value


def name_fields(model_name: str, model_version: str) -> bytes:
    """model_name and model_version as fields 1 and 2, to append to a message (see the module doc)."""
    return string_field(MODEL_NAME, model_name.encode()) + string_field(MODEL_VERSION, model_version.encode())


def stream_rename(data: bytes, names: bytes) -> bytes:
    """A ModelStreamInferResponse with its infer_response renamed by `names` (from `name_fields`).

    Appended as one more infer_response field, which merges into the first; a response that carries only
    an error_message is left as it is (adding an infer_response would turn it into an answer).
    """
    if not has_field(data, STREAM_INFER_RESPONSE):
        return data
    return data + string_field(STREAM_INFER_RESPONSE, names)
