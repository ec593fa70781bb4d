"""A version's tensor schema (input and output names, datatypes, shapes) and whether two are compatible.

Shapes are in the KServe v2 form that Triton's metadata endpoint reports: the batch dimension included
(as -1 when the model batches), -1 for every dimension the model accepts at any size. The same form is
derived from config.pbtxt for a manifest, so an archive's schema and a live version's compare directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.typed_json import Fields, RecordError

DYNAMIC = -1


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str  # v2 names: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]  # -1 where any size is accepted

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def read(cls, f: Fields) -> Tensor:
        return cls(f.text("name"), f.text("datatype"), f.integers("shape"))


@dataclass(frozen=True, slots=True)
class Schema:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def read(cls, f: Fields) -> Schema:
        return cls(
            tuple(Tensor.read(t) for t in f.entries("inputs")),
            tuple(Tensor.read(t) for t in f.entries("outputs")),
        )


def from_metadata(payload: object) -> Schema:
    """The schema in a Triton v2 model metadata answer; RecordError if it does not have one."""
    f = Fields(payload, "model metadata")
    return Schema.read(f)


def _dims(values: Sequence[Any], where: str) -> tuple[int, ...]:
    # Protobuf's JSON writes int64 as strings ("-1"); config.pbtxt parsed any other way gives ints.
    dims = []
    for value in values:
        try:
            dims.append(int(value))
        except (TypeError, ValueError):
            raise RecordError(f"{where}: dims must be whole numbers, got {value!r}") from None
    return tuple(dims)


def from_model_config(config: Mapping[str, Any]) -> Schema:
    """The schema Triton will report for a model configuration (protobuf JSON field names)."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0

    def tensors(key: str) -> tuple[Tensor, ...]:
        found = []
        for i, item in enumerate(config.get(key, [])):
            where = f"config.pbtxt {key}[{i}]"
            name = item.get("name")
            datatype = str(item.get("data_type", "TYPE_INVALID")).removeprefix("TYPE_")
            if not isinstance(name, str) or not name:
                raise RecordError(f"{where}: has no name")
            if datatype == "STRING":
                datatype = "BYTES"  # Triton's v2 name for its string type
            shape = _dims(item.get("dims", []), where)
            found.append(Tensor(name, datatype, ((DYNAMIC,) if batched else ()) + shape))
        return tuple(found)

    return Schema(tensors("input"), tensors("output"))


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _accepts_all(wider: Sequence[int], narrower: Sequence[int]) -> int | None:
    """The first dimension (1-based) where `wider` fails to accept every shape `narrower` does."""
    for i, (w, n) in enumerate(zip(wider, narrower, strict=True), start=1):
        if w != DYNAMIC and w != n:
            return i
    return None


def differences(baseline: Schema, candidate: Schema, base_name: str, name: str) -> list[str]:
    """Why `candidate` cannot take `baseline`'s traffic, one sentence per tensor; [] when it can.

    Callers send what the baseline accepts and read what it returns: the candidate must accept every
    input shape the baseline does (a dynamic dimension stays dynamic, a fixed one may become dynamic),
    require no input the baseline lacks, and return every output with a shape callers already handle.
    """
    problems: list[str] = []
    inputs = {t.name: t for t in candidate.inputs}
    for tensor in baseline.inputs:
        other = inputs.get(tensor.name)
        if other is None:
            problems.append(f"input {tensor.name}: {name} has no such input ({base_name} has one)")
            continue
        if other.datatype != tensor.datatype:
            problems.append(
                f"input {tensor.name}: {name} takes {other.datatype}, {base_name} takes {tensor.datatype}"
            )
        if len(other.shape) != len(tensor.shape):
            problems.append(
                f"input {tensor.name}: {name} takes shape {_shape(other.shape)}, {base_name} takes "
                f"{_shape(tensor.shape)} (a different number of dimensions)"
            )
        elif (dim := _accepts_all(other.shape, tensor.shape)) is not None:
            problems.append(
                f"input {tensor.name}: {name} takes shape {_shape(other.shape)}, {base_name} takes "
                f"{_shape(tensor.shape)}; dimension {dim} must be {other.shape[dim - 1]} for {name}, "
                "so requests that work today would fail"
            )
    known = {t.name for t in baseline.inputs}
    for extra in candidate.inputs:
        if extra.name not in known:
            problems.append(f"input {extra.name}: {name} requires it, {base_name} has no such input")
    outputs = {t.name: t for t in candidate.outputs}
    for tensor in baseline.outputs:
        other = outputs.get(tensor.name)
        if other is None:
            problems.append(f"output {tensor.name}: {name} does not return it ({base_name} does)")
            continue
        if other.datatype != tensor.datatype:
            problems.append(
                f"output {tensor.name}: {name} returns {other.datatype}, "
                f"{base_name} returns {tensor.datatype}"
            )
        if len(other.shape) != len(tensor.shape) or _accepts_all(tensor.shape, other.shape) is not None:
            problems.append(
                f"output {tensor.name}: {name} returns shape {_shape(other.shape)}, {base_name} returns "
                f"{_shape(tensor.shape)}"
            )
    return problems
