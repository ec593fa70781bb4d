"""The gRPC front door end to end: tritonclient.grpc against the gateway, real PyTriton versions behind it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from backends.example import INPUT_NAME, SCORE_OUTPUT, VERSION_OUTPUT, expected_outputs
from backends.local import start_version
from tests.conftest import SLOW_VERSION_DELAY_MS, TritonFleet
from tests.support import GatewayProcess, free_port
from tests.test_admin_e2e import admin
from tests.test_limits_e2e import create_key
from tests.test_live_reload import wait_until
from tests.test_rollout_e2e import phase, rollout

BATCH = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 8.0]], dtype=np.float32)
TRITON_VERSION = {"2.1.3": 3, "2.2.0": 4, "stable": 3, "candidate": 4}
PUBLIC_ID = {"2.1.3": "2.1.3", "2.2.0": "2.2.0", "stable": "2.1.3", "candidate": "2.2.0"}
MAX_MESSAGE = 1024 * 1024  # server: max_body_size in these routes
FIRST_MESSAGE_TIMEOUT = 0.5  # server: header_timeout and body_timeout in these routes, each


def grpc_routes(
    triton: TritonFleet,
    keys: str = "{required: false}",
    split: str = "{2.1.3: 90, 2.2.0: 10}",
    extra: str = "",
) -> str:
    down = free_port()  # nothing listens there
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", grpc_url: "127.0.0.1:{triton.v3.grpc_port}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", grpc_url: "grpc://127.0.0.1:{triton.v4.grpc_port}", timeout: 10s}}
  triton-slow: {{url: "{triton.slow.url}", grpc_url: "127.0.0.1:{triton.slow.grpc_port}", timeout: 1s}}
  triton-down: {{url: "http://127.0.0.1:{down}", grpc_url: "127.0.0.1:{down}", timeout: 2s}}
  http-only: {{url: "{triton.v3.url}"}}
  grpc-down: {{url: "{triton.v3.url}", grpc_url: "127.0.0.1:{down}"}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
      2.3.0-slow: {{backend: triton-slow, target: fraud_detector/5}}
      2.4.0-down: {{backend: triton-down, target: fraud_detector/3}}
      2.5.0-http: {{backend: http-only, target: fraud_detector/3}}
      2.6.0-grpc-down: {{backend: grpc-down, target: fraud_detector/3}}
    aliases: {{stable: 2.1.3, candidate: 2.2.0}}
    split: {split}
    sticky: header:x-user-id
    {extra}
keys: {keys}
server: {{max_body_size: {MAX_MESSAGE}, header_timeout: {FIRST_MESSAGE_TIMEOUT:g}s,
         body_timeout: {FIRST_MESSAGE_TIMEOUT:g}s}}
"""


@pytest.fixture(scope="module")
def gw(triton: TritonFleet) -> Iterator[GatewayProcess]:
    with GatewayProcess(grpc_routes(triton), grpc_port=free_port()) as process:
        yield process


def client_for(process: GatewayProcess) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{process.grpc_port}")


def inputs(batch: np.ndarray[Any, Any] = BATCH) -> list[triton_grpc.InferInput]:
    tensor = triton_grpc.InferInput(INPUT_NAME, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor]


def assert_answered_by(result: triton_grpc.InferResult, triton_version: int) -> None:
    expected = expected_outputs(triton_version, BATCH)
    np.testing.assert_allclose(result.as_numpy(SCORE_OUTPUT), expected[SCORE_OUTPUT])
    np.testing.assert_array_equal(result.as_numpy(VERSION_OUTPUT), expected[VERSION_OUTPUT])


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return grpc.StatusCode[caught.value.status().removeprefix("StatusCode.")], caught.value.message()


def raw_stub(process: GatewayProcess) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}")
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_request(model: str = "fraud-detector", version: str = "", batch: Any = BATCH) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=INPUT_NAME, datatype="FP32")
    tensor.shape.extend(batch.shape)
    request.raw_input_contents.append(np.asarray(batch, dtype=np.float32).tobytes())
    return request


# -- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1.3", "2.2.0", "stable", "candidate"])
def test_infer_by_id_and_alias_answers_with_public_names(gw: GatewayProcess, version: str) -> None:
    result = client_for(gw).infer("fraud-detector", inputs(), model_version=version)
    assert_answered_by(result, TRITON_VERSION[version])
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("fraud-detector", PUBLIC_ID[version])


def test_metadata_pins_and_the_answer_names_its_version_and_request_id(gw: GatewayProcess) -> None:
    channel, stub = raw_stub(gw)
    with channel:
        response, call = stub.ModelInfer.with_call(
            infer_request(),
            metadata=(("x-model-version", "candidate"), ("x-request-id", "req-42")),
            timeout=10,
        )
        metadata = dict(call.trailing_metadata())
    assert (metadata["x-model-version"], metadata["x-request-id"]) == ("2.2.0", "req-42")
    assert (response.model_name, response.model_version) == ("fraud-detector", "2.2.0")
    version_output = [o.name for o in response.outputs].index(VERSION_OUTPUT)
    assert np.frombuffer(response.raw_output_contents[version_output], dtype=np.int32).tolist() == [4, 4]


def test_split_holds_within_two_points_over_2000_async_calls(gw: GatewayProcess) -> None:
    client = client_for(gw)
    seen: Counter[str] = Counter()
    errors: list[Any] = []
    window = threading.Semaphore(64)  # calls in flight at once
    done = threading.Event()
    total = 2000

    def answered(result: triton_grpc.InferResult | None, error: Any) -> None:
        window.release()
        if error is not None:
            errors.append(f"{error.status()} {error.message()}")
        else:
            response = result.get_response()  # type: ignore[union-attr]
            version = np.frombuffer(response.raw_output_contents[1], dtype=np.int32)[0]
            assert TRITON_VERSION[response.model_version] == version  # the name says who really answered
            seen[response.model_version] += 1
        if len(errors) + sum(seen.values()) == total:
            done.set()

    small = inputs(BATCH[:1])
    for _ in range(total):
        window.acquire()
        client.async_infer("fraud-detector", small, answered)
    assert done.wait(60)
    assert errors == []
    assert abs(100 * seen["2.1.3"] / total - 90) <= 2, seen
    assert abs(100 * seen["2.2.0"] / total - 10) <= 2, seen


def test_sticky_metadata_keeps_each_caller_on_one_version(gw: GatewayProcess) -> None:
    client = client_for(gw)
    chosen = set()
    for user in range(30):
        versions = {
            client.infer("fraud-detector", inputs(), headers={"x-user-id": f"user-{user}"})
            .get_response()
            .model_version
            for _ in range(3)
        }
        assert len(versions) == 1, (user, versions)
        chosen |= versions
    assert chosen <= {"2.1.3", "2.2.0"}


def test_stream_routes_by_its_first_request_and_answers_each(gw: GatewayProcess) -> None:
    client = client_for(gw)
    answers: list[Any] = []
    arrived = threading.Condition()

    def callback(result: triton_grpc.InferResult | None, error: Any) -> None:
        with arrived:
            answers.append(error if error is not None else result)
            arrived.notify_all()

    client.start_stream(callback)
    try:
        for index in range(5):
            client.async_stream_infer(
                "fraud-detector", inputs(), model_version="candidate", request_id=f"r{index}"
            )
        with arrived:
            assert arrived.wait_for(lambda: len(answers) == 5, 30), answers
        for index, result in enumerate(answers):
            assert isinstance(result, triton_grpc.InferResult), result
            assert_answered_by(result, 4)
            response = result.get_response()
            assert (response.model_name, response.model_version, response.id) == (
                "fraud-detector",
                "2.2.0",
                f"r{index}",
            )
        client.async_stream_infer("fraud-detector", inputs(), model_version="stable")  # another version
        with arrived:
            assert arrived.wait_for(lambda: len(answers) == 6, 30), answers
    finally:
        client.stop_stream()
    error = answers[5]
    assert isinstance(error, InferenceServerException), error
    assert "INVALID_ARGUMENT" in str(error.status()) and "routed by its first request" in error.message()


# -- the other RPCs --------------------------------------------------------------------------------


def test_metadata_and_config_use_public_names(gw: GatewayProcess) -> None:
    client = client_for(gw)
    pinned = client.get_model_metadata("fraud-detector", "candidate")
    assert (pinned.name, list(pinned.versions)) == ("fraud-detector", ["2.2.0"])
    assert [i.name for i in pinned.inputs] == [INPUT_NAME]
    whole = client.get_model_metadata("fraud-detector")
    assert whole.name == "fraud-detector" and "2.1.3" in whole.versions and "fraud_detector" not in str(whole)
    config = client.get_model_config("fraud-detector", "2.1.3").config
    assert config.name == "fraud-detector" and config.max_batch_size > 0


def test_liveness_readiness_and_health(gw: GatewayProcess) -> None:
    client = client_for(gw)
    assert client.is_server_live()
    assert client.is_model_ready("fraud-detector", "stable")
    assert not client.is_model_ready("fraud-detector", "2.4.0-down")
    assert client.get_server_metadata().name == "model-gateway"
    with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5
        )
    # One version's backend is down, and it takes no traffic: the model is served, the server ready.
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert client.is_server_ready()


def test_repository_and_shared_memory_rpcs_are_refused(gw: GatewayProcess) -> None:
    client = client_for(gw)
    code, message = status_of(lambda: client.get_model_repository_index())
    assert code is grpc.StatusCode.PERMISSION_DENIED and "admin API" in message
    code, _ = status_of(lambda: client.unregister_system_shared_memory())
    assert code is grpc.StatusCode.PERMISSION_DENIED


# -- errors as statuses ----------------------------------------------------------------------------


def test_unknown_model_and_version_are_not_found(gw: GatewayProcess) -> None:
    client = client_for(gw)
    code, message = status_of(lambda: client.infer("no-such-model", inputs()))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, "unknown model 'no-such-model'")
    code, message = status_of(lambda: client.infer("fraud-detector", inputs(), model_version="9.9"))
    assert code is grpc.StatusCode.NOT_FOUND and "2.1.3" in message  # it lists the versions there are


def test_a_backend_that_is_down_is_unavailable(gw: GatewayProcess) -> None:
    client = client_for(gw)
    # Down for the health checks too: not ready, so refused before any call.
    code, message = status_of(lambda: client.infer("fraud-detector", inputs(), model_version="2.4.0-down"))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "backend triton-down is not ready" in message and "connection refused" in message
    # Its HTTP port answers the health checks, its gRPC port is down: the call itself fails.
    code, message = status_of(
        lambda: client.infer("fraud-detector", inputs(), model_version="2.6.0-grpc-down")
    )
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "backend grpc-down" in message and "is unavailable" in message


def test_a_slow_backend_is_deadline_exceeded_within_the_callers_deadline(gw: GatewayProcess) -> None:
    def timeouts() -> int:
        versions = admin(gw, "GET", "/api/versions")[1]["models"]["fraud-detector"]
        return versions["2.3.0-slow"]["total"]["by_outcome"]["timeout"]  # type: ignore[no-any-return]

    before = timeouts()
    client = client_for(gw)
    started = time.monotonic()
    code, _ = status_of(
        lambda: client.infer("fraud-detector", inputs(), model_version="2.3.0-slow", client_timeout=0.5)
    )
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_VERSION_DELAY_MS / 1000  # not held until the backend answered
    # Without a deadline of its own, the caller gets the backend's timeout (1s), and is told so.
    code, message = status_of(lambda: client.infer("fraud-detector", inputs(), model_version="2.3.0-slow"))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "backend triton-slow" in message and "1s" in message
    # Both are the version's timeouts: a version slower than its callers' deadlines is failing them.
    assert wait_until(lambda: timeouts() == before + 2, 10) is not None


def test_a_version_without_grpc_url_is_unimplemented(gw: GatewayProcess) -> None:
    code, message = status_of(
        lambda: client_for(gw).infer("fraud-detector", inputs(), model_version="2.5.0-http")
    )
    assert code is grpc.StatusCode.UNIMPLEMENTED and "no grpc_url" in message and "http-only" in message
    code, message = status_of(lambda: client_for(gw).get_model_config("fraud-detector", "2.5.0-http"))
    assert code is grpc.StatusCode.UNIMPLEMENTED and "ask over HTTP" in message


def test_a_malformed_request_is_invalid_argument(gw: GatewayProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            infer(b"\x0a\xff\x01abc", timeout=5)  # model_name says 255 bytes follow; 3 do
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in caught.value.details()


def test_a_request_the_backend_rejects_is_the_callers_fault_not_the_versions(gw: GatewayProcess) -> None:
    def pinned() -> dict[str, int]:
        versions = admin(gw, "GET", "/api/versions")[1]["models"]["fraud-detector"]
        return versions["2.1.3"]["total"]["by_choice"]["pinned"]  # type: ignore[no-any-return]

    before = pinned()
    flat = triton_grpc.InferInput(INPUT_NAME, [4], "FP32")  # no batch dimension: Triton refuses it
    flat.set_data_from_numpy(np.ones(4, dtype=np.float32))
    code, message = status_of(lambda: client_for(gw).infer("fraud-detector", [flat], model_version="2.1.3"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("version 2.1.3 of model fraud-detector: ") and "shape" in message
    assert wait_until(lambda: pinned()["caller_faults"] == before["caller_faults"] + 1, 10) is not None
    assert pinned()["failures"] == before["failures"]  # never counted against the version


# -- the port's limits -----------------------------------------------------------------------------


def test_a_message_over_the_size_limit_is_refused(gw: GatewayProcess) -> None:
    big = np.zeros((1, MAX_MESSAGE // 4 + 16), dtype=np.float32)
    code, _ = status_of(lambda: client_for(gw).infer("fraud-detector", inputs(big)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client_for(gw).infer("fraud-detector", inputs()).get_response().model_name == "fraud-detector"


def test_oversized_metadata_is_refused(gw: GatewayProcess) -> None:
    code, _ = status_of(
        lambda: client_for(gw).infer("fraud-detector", inputs(), headers={"x-junk": "j" * 20_000})
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED  # over max_header_size (16 KiB)
    assert client_for(gw).infer("fraud-detector", inputs()).get_response().model_name == "fraud-detector"


def test_a_call_that_never_sends_its_request_is_cut_off(gw: GatewayProcess) -> None:
    """A client that opens calls and sends nothing must not hold them (no deadline of its own)."""
    with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        unary = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")  # opened, nothing sent
        never = threading.Event()

        def nothing() -> Iterator[bytes]:
            never.wait(30)
            yield from ()

        silent_unary = unary.future(nothing())
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(nothing()))
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request message within" in caught.value.details()
        assert silent_unary.exception(10).code() is grpc.StatusCode.DEADLINE_EXCEEDED
        never.set()


def test_an_idle_stream_is_closed_but_not_while_an_answer_is_outstanding(triton: TritonFleet) -> None:
    routes = grpc_routes(triton).replace("body_timeout: 0.5s}", "body_timeout: 0.5s, keepalive_timeout: 1s}")
    assert "keepalive_timeout: 1s" in routes
    with GatewayProcess(routes, grpc_port=free_port()) as process:
        channel, stub = raw_stub(process)
        with channel:
            hold = threading.Event()

            def one_then_silence() -> Iterator[Any]:
                yield infer_request(version="2.3.0-slow")  # answered after 2.5s, longer than the idle 1s
                hold.wait(30)

            answers = stub.ModelStreamInfer(one_then_silence())
            first = next(answers)  # not closed while its answer was outstanding
            assert first.error_message == "" and first.infer_response.model_version == "2.3.0-slow"
            with pytest.raises(grpc.RpcError) as caught:
                next(answers)  # then idle: closed
            hold.set()
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent nothing for 1s with no answer outstanding" in caught.value.details()


# -- keys and limits -------------------------------------------------------------------------------


def test_keys_and_limits_are_statuses(triton: TritonFleet) -> None:
    routes = grpc_routes(triton, keys="{required: true}")
    with GatewayProcess(routes, grpc_port=free_port()) as process:
        client = client_for(process)
        code, message = status_of(lambda: client.infer("fraud-detector", inputs()))
        assert code is grpc.StatusCode.UNAUTHENTICATED and "key" in message
        code, _ = status_of(lambda: client.infer("no-such-model", inputs()))  # no key: no hint of what exists
        assert code is grpc.StatusCode.UNAUTHENTICATED
        code, _ = status_of(lambda: client.is_model_ready("fraud-detector"))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        code, _ = status_of(
            lambda: client.infer("fraud-detector", inputs(), headers={"x-api-key": "made-up"})
        )
        assert code is grpc.StatusCode.UNAUTHENTICATED
        other = create_key(process, "team-b", models=["other-model"])
        code, message = status_of(
            lambda: client.infer("fraud-detector", inputs(), headers={"authorization": f"Bearer {other}"})
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED and "fraud-detector" in message

        secret = create_key(process, "team-a", rate="1/s", burst=2)
        assert client.is_model_ready("fraud-detector", headers={"x-api-key": secret})
        channel, stub = raw_stub(process)
        with channel:
            statuses = []
            for _ in range(4):
                try:
                    stub.ModelInfer(infer_request(), metadata=(("x-api-key", secret),), timeout=10)
                    statuses.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    statuses.append(error.code())
                    limited = error
        assert statuses[:2] == [grpc.StatusCode.OK, grpc.StatusCode.OK]
        assert statuses[-1] is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(limited.trailing_metadata())  # type: ignore[attr-defined]
        assert int(trailing["retry-after"]) >= 1
        assert "q=2" in trailing["ratelimit-policy"] and "rate limited" in limited.details()  # type: ignore[attr-defined]

        # In a stream, every request is admitted: those over the limit are answered with an error in it.
        streamer = create_key(process, "team-s", rate="1/s", burst=2)
        answers: list[Any] = []
        arrived = threading.Condition()

        def callback(result: triton_grpc.InferResult | None, error: Any) -> None:
            with arrived:
                answers.append(error if error is not None else result)
                arrived.notify_all()

        client.start_stream(callback, headers={"x-api-key": streamer})
        try:
            for _ in range(4):
                client.async_stream_infer("fraud-detector", inputs(), model_version="stable")
            with arrived:
                assert arrived.wait_for(lambda: len(answers) == 4, 30), answers
        finally:
            client.stop_stream()
        refused = [a for a in answers if isinstance(a, InferenceServerException)]
        assert len(refused) == 2 and all("rate limited" in error.message() for error in refused)
        assert sum(isinstance(a, triton_grpc.InferResult) for a in answers) == 2


def test_the_mirror_copies_grpc_calls_and_never_returns_the_copies(triton: TritonFleet) -> None:
    routes = grpc_routes(triton, split="{2.1.3: 100, 2.2.0: 0}", extra="mirror: {to: 2.2.0, percent: 25}")
    with GatewayProcess(routes, grpc_port=free_port()) as process:
        client = client_for(process)
        answered = Counter(
            client.infer("fraud-detector", inputs()).get_response().model_version for _ in range(40)
        )
        assert answered == Counter({"2.1.3": 40})  # the caller only ever sees the real answer

        def counted() -> dict[str, Any] | None:
            versions = admin(process, "GET", "/api/versions")[1]["models"]["fraud-detector"]
            shadow = versions["2.2.0"]["total"]["by_choice"]["shadow"]
            return versions if shadow["requests"] == 10 else None

        assert wait_until(counted, 10) is not None  # 25% of 40, exactly, answered by the mirror version
        versions = counted()
        assert versions is not None
        assert versions["2.2.0"]["total"]["by_choice"]["shadow"]["failures"] == 0
        assert versions["2.1.3"]["total"]["by_choice"]["split"]["requests"] == 40


# -- a rollout fed by gRPC traffic alone -----------------------------------------------------------


def test_a_rollout_fed_only_by_grpc_rolls_back_a_failing_canary(triton: TritonFleet) -> None:
    canary = start_version("fraud_detector", 7, free_port(), error_rate=0.3)  # 30% of batches fail
    try:
        routes = f"""
backends:
  triton-a: {{url: "{triton.v3.url}", grpc_url: "127.0.0.1:{triton.v3.grpc_port}", timeout: 10s}}
  triton-canary: {{url: "{canary.url}", grpc_url: "127.0.0.1:{canary.grpc_port}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.9.0: {{backend: triton-canary, target: fraud_detector/7}}
    split: {{2.1.3: 100, 2.9.0: 0}}
    rollout: {{baseline: 2.1.3, canary: 2.9.0, steps: [20, 50, 100], max_error_rate_increase: 0.0}}
keys: {{required: false}}
"""
        with GatewayProcess(routes, grpc_port=free_port()) as process:
            client = client_for(process)
            answered: Counter[str] = Counter()

            def traffic(calls: int) -> None:
                for _ in range(calls):
                    try:
                        answered[client.infer("fraud-detector", inputs()).get_response().model_version] += 1
                    except InferenceServerException as error:
                        answered[str(error.status())] += 1

            assert wait_until(lambda: phase(process) == "progressing", 10) is not None

            def rolled_back() -> bool:
                traffic(20)  # the only traffic the gateway sees: gRPC, unpinned
                return phase(process) == "rolled_back"

            assert wait_until(rolled_back, 60) is not None
            assert (
                answered["2.9.0"] > 0 and answered["StatusCode.INTERNAL"] + answered["StatusCode.UNKNOWN"] > 0
            )
            last = rollout(process)["record"]["history"][-1]  # type: ignore[index]
            assert (last["action"], last["by"], last["weight"]) == ("rollback", "controller", 0)
            time.sleep(1.5)  # the worker follows the record within a tick
            answered.clear()
            traffic(30)
            assert answered == Counter({"2.1.3": 30})
    finally:
        canary.stop()


def test_every_worker_serves_the_grpc_port_and_follows_reloads(triton: TritonFleet) -> None:
    with GatewayProcess(grpc_routes(triton), workers=2, grpc_port=free_port()) as process:

        def answers(version: str) -> set[str]:
            seen = set()
            for _ in range(10):  # new connections, spread by the kernel over both workers' sockets
                with grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
                    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                    try:
                        seen.add(stub.ModelInfer(infer_request(version=version), timeout=10).model_version)
                    except grpc.RpcError as error:
                        seen.add(str(error.code()))
            return seen

        assert answers("candidate") == {"2.2.0"}
        assert process.log().count("serving gRPC (KServe v2)") == 2  # both workers bound it
        # A saved edit: triton-b loses its grpc_url; every worker's gRPC port follows.
        edited = process.routes.replace(f'grpc_url: "grpc://127.0.0.1:{triton.v4.grpc_port}", ', "")
        assert edited != process.routes
        process.routes_path.write_text(edited)
        assert wait_until(lambda: answers("candidate") == {"StatusCode.UNIMPLEMENTED"}, 10) is not None
        assert answers("stable") == {"2.1.3"}
        assert process.stop() == 0  # SIGTERM: both ports drain and close, exit 0
