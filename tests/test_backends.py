"""The local Triton backends: real Triton (PyTriton on the CPU) answering tritonclient, with fault knobs.

All servers start once, in parallel, for the whole module: one start costs about four seconds.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from backends.example import INPUT_NAME, MODEL_NAME, SCORE_OUTPUT, VERSION_OUTPUT, Array, expected_outputs
from backends.knobs import Knobs, KnobsSource, write_knobs
from backends.local import TritonProcess, VersionSpec, free_port, port_is_free, start_versions, stop_all
from backends.up import RoutesError, local_backends

BATCH = np.array([[1, 2, 3, 4], [0.5, -1.25, 2, 8], [0, 0, 0, 0]], dtype=np.float32)


class Servers:
    def __init__(self, procs: list[TritonProcess], knobs: Path, spare_knobs: Path) -> None:
        self.by_version = {3: procs[0], 4: procs[1]}
        self.knobs = knobs  # version 4's knobs file
        self.spare, self.spare_knobs = procs[2], spare_knobs  # a version the tests hang, then stop
        self.crash = procs[3]  # a version the tests kill


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("knobs")
    knobs, spare_knobs = directory / "v4.json", directory / "spare.json"
    procs = start_versions(
        [
            VersionSpec.one(MODEL_NAME, 3, free_port()),
            VersionSpec.one(MODEL_NAME, 4, free_port(), knobs_file=knobs),
            VersionSpec.one(MODEL_NAME, 3, free_port(), knobs_file=spare_knobs),
            VersionSpec.one(MODEL_NAME, 5, free_port()),
        ]
    )
    yield Servers(procs, knobs, spare_knobs)
    stop_all(procs)


def infer(
    proc: TritonProcess, version: int, batch: Array, *, binary: bool = True, timeout: float = 60.0
) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(
        proc.url.removeprefix("http://"), connection_timeout=timeout, network_timeout=timeout
    )
    try:
        tensor = httpclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary) for n in (SCORE_OUTPUT, VERSION_OUTPUT)
        ]
        return client.infer(MODEL_NAME, [tensor], model_version=str(version), outputs=outputs)
    finally:
        client.close()


def test_expected_outputs_formula() -> None:
    out = expected_outputs(3, np.array([[1, 2, 3, 4]], dtype=np.float32))
    assert out[SCORE_OUTPUT].tolist() == [[33.0]]
    assert out[VERSION_OUTPUT].tolist() == [[3]]
    assert (out[SCORE_OUTPUT].dtype, out[VERSION_OUTPUT].dtype) == (np.dtype(np.float32), np.dtype(np.int32))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("version", [3, 4])
def test_versions_answer_as_expected(servers: Servers, version: int, binary: bool) -> None:
    result = infer(servers.by_version[version], version, BATCH, binary=binary)
    expected = expected_outputs(version, BATCH)
    np.testing.assert_allclose(result.as_numpy(SCORE_OUTPUT), expected[SCORE_OUTPUT], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy(VERSION_OUTPUT), expected[VERSION_OUTPUT])
    assert result.get_response()["model_version"] == str(version)


def test_a_process_hosts_only_its_version(servers: Servers) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(servers.by_version[3], 4, BATCH)
    assert caught.value.status() == "404"


def test_injected_errors_are_http_500(servers: Servers) -> None:
    v4 = servers.by_version[4]
    write_knobs(servers.knobs, Knobs(error_rate=1.0))
    try:
        with pytest.raises(InferenceServerException) as caught:
            infer(v4, 4, BATCH)
        assert caught.value.status() == "500"
        assert "injected error" in (caught.value.message() or "")
    finally:
        write_knobs(servers.knobs, Knobs())
    assert infer(v4, 4, BATCH).as_numpy(VERSION_OUTPUT)[0, 0] == 4


def test_delay_from_knobs_file(servers: Servers) -> None:
    v4 = servers.by_version[4]
    write_knobs(servers.knobs, Knobs(delay_ms=400))
    try:
        started = time.monotonic()
        infer(v4, 4, BATCH)
        # Only a lower bound: the sleep guarantees it, while an upper bound would depend on the machine.
        assert time.monotonic() - started >= 0.4
    finally:
        write_knobs(servers.knobs, Knobs())


def test_hang_can_be_released_and_stopped(servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    spare = servers.spare
    write_knobs(servers.spare_knobs, Knobs(hang=True))
    with pytest.raises(Exception, match="timed out"):
        infer(spare, 3, BATCH, timeout=1.0)
    write_knobs(servers.spare_knobs, Knobs())  # releases the hung request too
    assert infer(spare, 3, BATCH).as_numpy(VERSION_OUTPUT)[0, 0] == 3

    write_knobs(servers.spare_knobs, Knobs(hang=True))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hung = pool.submit(infer, spare, 3, BATCH, timeout=30.0)
        time.sleep(0.5)
        # A version with a request in flight still stops gracefully (no SIGKILL needed), tritonserver and
        # stubs included.
        spare.stop()
        with pytest.raises(Exception):  # noqa: B017 - an error status or a closed connection, both fine
            hung.result()
    assert "did not stop" not in caplog.text
    assert "left processes" not in caplog.text
    assert spare.leftovers() == []
    assert port_is_free(spare.http_port)


def test_kill_leaves_nothing_behind(servers: Servers) -> None:
    proc = servers.crash
    assert proc.alive()
    proc.kill()
    assert proc.leftovers() == []
    assert proc.alive() is False
    assert port_is_free(proc.http_port)


def test_knobs_file_changes_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "knobs.json"
    source = KnobsSource(Knobs(delay_ms=5), path)
    assert source.current() == Knobs(delay_ms=5)  # no file yet: the command-line values
    write_knobs(path, Knobs(error_rate=0.5))
    assert source.current() == Knobs(error_rate=0.5)
    path.write_text('{"hang": true}')  # keys left out keep the command-line values
    assert source.current() == Knobs(delay_ms=5, hang=True)
    path.write_text("{not json")  # a broken edit keeps the last good knobs
    assert source.current() == Knobs(delay_ms=5, hang=True)
    with pytest.raises(ValueError):
        Knobs(error_rate=1.5)


def test_routes_to_local_backends() -> None:
    routes = {
        "backends": {
            "a": {"url": "http://127.0.0.1:8010"},
            "b": {"url": "http://localhost:8020"},
            "remote": {"url": "http://triton:8000"},
        },
        "models": {
            "fraud-detector": {
                "versions": {
                    "2.1.3": {"backend": "a", "target": "fraud_detector/3"},
                    "2.2.0": {"backend": "b", "target": "fraud_detector/4"},
                    "9.9": {"backend": "remote", "target": "fraud_detector/9"},
                }
            }
        },
    }
    backends = local_backends(routes)
    assert [(b.name, b.port, b.targets) for b in backends] == [
        ("a", 8010, (("fraud_detector", 3),)),
        ("b", 8020, (("fraud_detector", 4),)),
    ]
    routes["models"]["fraud-detector"]["versions"]["2.2.0"]["backend"] = "a"  # type: ignore[index]
    with pytest.raises(RoutesError, match="one version of a model name"):
        local_backends(routes)
