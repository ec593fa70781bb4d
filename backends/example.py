"""The example model, "fraud_detector", whose answer reveals which Triton version computed it.

It is pure numpy so that tests can compute the expected answer themselves, and so that the TorchScript
version for GPU deployments (`make_torchscript.py`) can be checked against it. The tensor names follow the
libtorch convention (`INPUT__0`, `OUTPUT__0`) on purpose: the same client code then works against the
PyTriton model on the CPU and the TorchScript model on a GPU Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

MODEL_NAME = "fraud_detector"
INPUT_NAME = "INPUT__0"
SCORE_OUTPUT = "OUTPUT__0"
VERSION_OUTPUT = "OUTPUT__1"
# The same limit as backends/model_repository/fraud_detector/config.pbtxt, so both deployments accept the
# same requests.
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's name, numpy dtype and per-sample shape (the batch dimension is implied)."""

    name: str
    dtype: type[np.generic]
    shape: tuple[int, ...]


INPUTS = (TensorSpec(INPUT_NAME, np.float32, (-1,)),)
OUTPUTS = (TensorSpec(SCORE_OUTPUT, np.float32, (1,)), TensorSpec(VERSION_OUTPUT, np.int32, (1,)))


def expected_outputs(version: int, batch: Array) -> dict[str, Array]:
    """What version `version` answers for `batch` ([batch, n] FP32): score = sum(row) * v + v, and v.

    Version 3 on [[1, 2, 3, 4]] gives OUTPUT__0 [[33.0]] and OUTPUT__1 [[3]].
    """
    rows = np.asarray(batch, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"{INPUT_NAME} must be [batch, n], got shape {list(rows.shape)}")
    v = np.float32(version)
    score = rows.sum(axis=1, dtype=np.float32, keepdims=True) * v + v
    return {
        SCORE_OUTPUT: score.astype(np.float32),
        VERSION_OUTPUT: np.full((rows.shape[0], 1), version, dtype=np.int32),
    }


# Models that `backends.local` can serve, by Triton model name.
MODELS = {MODEL_NAME: expected_outputs}
