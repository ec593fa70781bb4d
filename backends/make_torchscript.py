"""Generate the TorchScript versions of the example model for the GPU model repository.

    .venv/bin/pip install torch   # CPU wheel is enough; torch is not a project dependency
    .venv/bin/python -m backends.make_torchscript

writes model_repository/fraud_detector/{3,4}/model.pt and checks each file, loaded back, against
`backends.example.expected_outputs`. Triton's PyTorch backend maps the module's positional input and
tuple outputs to INPUT__0, OUTPUT__0 and OUTPUT__1, as config.pbtxt declares them.
"""

# No `from __future__ import annotations`: TorchScript reads the annotations and needs them evaluated.
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from backends.example import MODEL_NAME, SCORE_OUTPUT, VERSION_OUTPUT, expected_outputs

REPOSITORY = Path(__file__).resolve().parent / "model_repository"
VERSIONS = (3, 4)


class FraudDetector(torch.nn.Module):
    """score = sum(row) * v + v and the version v itself, on whatever device the input arrives."""

    version: int

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = float(self.version)
        score = x.sum(dim=1, keepdim=True) * v + v
        # Created on the input's device so the module runs unchanged on KIND_GPU and KIND_CPU instances.
        version = torch.full((x.shape[0], 1), self.version, dtype=torch.int32, device=x.device)
        return score, version


def build(version: int, path: Path) -> None:
    module = torch.jit.script(FraudDetector(version).eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(path))


def check(version: int, path: Path) -> None:
    module = torch.jit.load(str(path), map_location="cpu")
    rng = np.random.default_rng(version)
    for batch in (np.array([[1, 2, 3, 4]], dtype=np.float32), rng.normal(size=(8, 16)).astype(np.float32)):
        score, got_version = module(torch.from_numpy(batch))
        expected = expected_outputs(version, batch)
        np.testing.assert_allclose(score.numpy(), expected[SCORE_OUTPUT], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got_version.numpy(), expected[VERSION_OUTPUT])
        assert score.dtype == torch.float32 and got_version.dtype == torch.int32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=REPOSITORY, help="model repository to write into")
    args = parser.parse_args()
    for version in VERSIONS:
        path = args.repository / MODEL_NAME / str(version) / "model.pt"
        build(version, path)
        check(version, path)
        print(f"{path}: {path.stat().st_size} bytes, matches expected_outputs (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
