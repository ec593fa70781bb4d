"""fraud_detector on Triton's Python backend: score = sum(row) * scale + offset, and the version number.

The weights (scale, offset) are this version's `weights.npy`; with scale = offset = the version number
it answers exactly as `backends.example.expected_outputs`. Triton runs this file in its Python backend
stub, which provides `triton_python_backend_utils`.

Fault knobs for demonstrations: when FRAUD_DETECTOR_KNOBS names a JSON file like backends/knobs.py
writes ({"error_rate": 0.5, "delay_ms": 20}), that share of requests fails and each is delayed. The
file is read again when it changes (its stat is compared per batch); without the variable nothing is
read. Kept here rather than imported: an archive holds only its own files.
"""

import json
import os
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.version = int(args["model_version"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        weights = np.load(os.path.join(folder, "weights.npy"))
        self.scale, self.offset = np.float32(weights[0]), np.float32(weights[1])
        self.knobs_path = os.environ.get("FRAUD_DETECTOR_KNOBS")
        self.knobs_stamp = None
        self.error_rate, self.delay_ms = 0.0, 0.0

    def _knobs(self):
        try:
            st = os.stat(self.knobs_path)
        except OSError:
            self.knobs_stamp, self.error_rate, self.delay_ms = None, 0.0, 0.0
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.knobs_stamp:
            self.knobs_stamp = stamp
            try:
                with open(self.knobs_path) as f:
                    knobs = json.load(f)
                self.error_rate = min(max(float(knobs.get("error_rate", 0.0)), 0.0), 1.0)
                self.delay_ms = max(float(knobs.get("delay_ms", 0.0)), 0.0)
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # keep the last good knobs, as backends/knobs.py does

    def execute(self, requests):
        if self.knobs_path:
            self._knobs()
            if self.delay_ms:
                time.sleep(self.delay_ms / 1000)
        responses = []
        for request in requests:
            if self.knobs_path and random.random() < self.error_rate:
                error = pb_utils.TritonError("injected fault (FRAUD_DETECTOR_KNOBS error_rate)")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            rows = pb_utils.get_input_tensor_by_name(request, "INPUT__0").as_numpy().astype(np.float32)
            score = rows.sum(axis=1, keepdims=True, dtype=np.float32) * self.scale + self.offset
            version = np.full((rows.shape[0], 1), self.version, dtype=np.int32)
            outputs = [
                pb_utils.Tensor("OUTPUT__0", score.astype(np.float32)),
                pb_utils.Tensor("OUTPUT__1", version),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
