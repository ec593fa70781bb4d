"""KServe v2 inference answers as tensors: the JSON form and the binary tensor extension.

An answer is a JSON object with `outputs` (name, datatype, shape, data). With the binary extension
(Triton's `binary_data_output`, what `tritonclient.http` asks for with `binary_data=True`) the JSON
head is the first `Inference-Header-Content-Length` bytes and each output with a
`parameters.binary_data_size` takes that many bytes of what follows, in order, little-endian, row
major; BYTES elements are each a 4-byte little-endian length and the bytes
(github.com/triton-inference-server/server docs/protocol/extension_binary_data.md).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

# Triton's datatypes with a numpy equivalent; BF16 has none and is compared as raw 16-bit patterns.
DTYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}

Tensor = npt.NDArray[Any] | tuple[bytes, ...]


class Undecodable(ValueError):
    """The answer is not a KServe v2 inference answer this module can read."""


def decode(body: bytes, header_length: int | None) -> dict[str, Tensor]:
    """Output name -> its tensor (numpy array, or a tuple of bytes for BYTES)."""
    head = body if header_length is None else body[:header_length]
    if header_length is not None and not 0 < header_length <= len(body):
        raise Undecodable(f"Inference-Header-Content-Length {header_length} outside the body's {len(body)}")
    try:
        answer = json.loads(head)
        outputs = answer["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Undecodable(f"not a KServe v2 answer: {exc}") from None
    if not isinstance(outputs, list):
        raise Undecodable("outputs is not a list")
    offset = 0 if header_length is None else header_length
    tensors: dict[str, Tensor] = {}
    for output in outputs:
        try:
            name, datatype, shape = (
                str(output["name"]),
                str(output["datatype"]),
                [int(d) for d in output["shape"]],
            )
            size = (output.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                raw = body[offset : offset + int(size)]
                if len(raw) != int(size):
                    raise Undecodable(f"output {name} is cut short")
                offset += int(size)
                tensors[name] = _from_bytes(raw, datatype, shape)
            else:
                tensors[name] = _from_json(output["data"], datatype, shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise Undecodable(
                f"output {output.get('name') if isinstance(output, dict) else '?'}: {exc}"
            ) from None
    return tensors


def _from_bytes(raw: bytes, datatype: str, shape: list[int]) -> Tensor:
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(raw):
            (length,) = struct.unpack_from("<I", raw, at)
            items.append(raw[at + 4 : at + 4 + length])
            at += 4 + length
        return tuple(items)
    if datatype not in DTYPES:
        raise ValueError(f"unknown datatype {datatype}")
    return np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(shape)


def _from_json(data: Any, datatype: str, shape: list[int]) -> Tensor:
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel()
        return tuple(str(x).encode() if not isinstance(x, bytes) else x for x in flat)
    if datatype not in DTYPES or datatype == "BF16":
        raise ValueError(f"datatype {datatype} cannot be read from JSON")
    return np.asarray(data, dtype=DTYPES[datatype]).reshape(shape)
