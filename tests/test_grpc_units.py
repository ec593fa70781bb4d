"""The gRPC front door's pure parts: the wire-format reader and renamer, statuses, callers, grpc_url."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.grpc import protowire, statuses
from gateway.grpc.caller import GrpcCaller, peer_host
from gateway.grpc.server import GrpcPort
from gateway.grpc.service import GrpcFrontDoor
from gateway.pipeline.errors import Refusal
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.metadata import Metadata
from gateway.routing.config import ConfigError, parse_table
from gateway.routing.table import ServerSettings
from gateway.stats.counters import Outcome

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def request_bytes(
    model: str, version: str, tensor: bytes, request_id: str = "", parameter: str = ""
) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, len(tensor) // 4])
    request.raw_input_contents.append(tensor)
    if parameter:
        request.parameters["sequence_id"].string_param = parameter
    return request.SerializeToString()


@given(names, names, st.binary(max_size=4096), names, names, names, names)
def test_renaming_changes_the_names_and_nothing_else(
    model: str, version: str, tensor: bytes, request_id: str, parameter: str, new_model: str, new_version: str
) -> None:
    data = request_bytes(model, version, tensor, request_id, parameter)
    assert protowire.infer_head(data) == (model, version)
    renamed = service_pb2.ModelInferRequest.FromString(data + protowire.name_fields(new_model, new_version))
    original = service_pb2.ModelInferRequest.FromString(data)
    assert (renamed.model_name, renamed.model_version) == (new_model, new_version)
    original.model_name, original.model_version = new_model, new_version
    assert renamed == original  # tensors, id and parameters as they were


def test_a_response_is_renamed_for_the_caller() -> None:
    response = service_pb2.ModelInferResponse(model_name="fraud_detector", model_version="3", id="r1")
    response.raw_output_contents.append(b"\x00" * 64)
    renamed = service_pb2.ModelInferResponse.FromString(
        response.SerializeToString() + protowire.name_fields("fraud-detector", "2.1.3")
    )
    assert (renamed.model_name, renamed.model_version, renamed.id) == ("fraud-detector", "2.1.3", "r1")
    assert renamed.raw_output_contents == response.raw_output_contents


def test_stream_responses_are_renamed_and_errors_left_as_they_are() -> None:
    names_ = protowire.name_fields("fraud-detector", "2.2.0")
    answer = service_pb2.ModelStreamInferResponse(
        infer_response=service_pb2.ModelInferResponse(model_name="fraud_detector", model_version="4", id="s")
    ).SerializeToString()
    renamed = service_pb2.ModelStreamInferResponse.FromString(protowire.stream_rename(answer, names_))
    assert (renamed.infer_response.model_name, renamed.infer_response.model_version) == (
        "fraud-detector",
        "2.2.0",
    )
    assert renamed.infer_response.id == "s"
    error = service_pb2.ModelStreamInferResponse(error_message="model failed").SerializeToString()
    assert protowire.stream_rename(error, names_) == error
    assert protowire.strings(error, (protowire.STREAM_ERROR_MESSAGE,)) == {1: "model failed"}


def test_the_last_name_wins_as_in_protobuf() -> None:
    data = request_bytes("a", "1", b"x" * 8) + protowire.name_fields("b", "2")
    assert protowire.infer_head(data) == ("b", "2")


@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_read_or_refused_never_crash(data: bytes) -> None:
    try:
        head = protowire.infer_head(data)
    except protowire.WireError:
        return
    assert isinstance(head.model_name, str) and isinstance(head.model_version, str)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x0a\x05ab", "past the end"),  # a name shorter than its length
        (b"\x0a", "inside a varint"),
        (b"\x08\x01", "should be a string"),  # model_name as a varint
        (b"\x0a\x02\xff\xfe", "not UTF-8"),
        (b"\x03", "number 0"),
        (b"\x2b", "wire type 3"),  # field 5 as a group
        (b"\x3a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "longer than 10 bytes"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(data: bytes, problem: str) -> None:
    with pytest.raises(protowire.WireError, match=problem):
        protowire.infer_head(data)


def test_tensor_bytes_are_stepped_over_not_read() -> None:
    # raw_input_contents holding bytes that are no valid message: only their length is read.
    tensor = b"\xff" * 10_000
    assert protowire.infer_head(request_bytes("m", "v", tensor)) == ("m", "v")


def test_overlong_names_are_refused() -> None:
    with pytest.raises(protowire.WireError, match="at most"):
        protowire.infer_head(request_bytes("m" * (protowire.MAX_NAME + 1), "", b""))


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.NOT_FOUND),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (501, grpc.StatusCode.UNIMPLEMENTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, grpc.StatusCode.INTERNAL),
    ],
)
def test_refusals_map_to_the_status_that_says_what_happened(status: int, code: grpc.StatusCode) -> None:
    assert statuses.code_for(Refusal(status, "x").status) is code


def test_backend_statuses_blame_whom_they_should() -> None:
    assert statuses.recorded(grpc.StatusCode.OK) == (200, Outcome.OK)
    assert (
        statuses.recorded(grpc.StatusCode.INVALID_ARGUMENT)[1] is Outcome.CLIENT_ERROR
    )  # never the version's
    assert statuses.recorded(grpc.StatusCode.INTERNAL)[1] is Outcome.SERVER_ERROR
    assert statuses.recorded(grpc.StatusCode.UNKNOWN)[1] is Outcome.SERVER_ERROR
    assert statuses.recorded(grpc.StatusCode.DEADLINE_EXCEEDED)[1] is Outcome.TIMEOUT
    assert statuses.recorded(grpc.StatusCode.UNAVAILABLE)[1] is Outcome.UPSTREAM_ERROR
    assert statuses.recorded(grpc.StatusCode.CANCELLED)[1] is Outcome.ABANDONED


def test_callers_are_read_from_metadata_and_peer() -> None:
    caller = GrpcCaller(
        [("authorization", "Bearer s3"), ("x-user-id", "u1"), ("x-user-id", "u2"), ("trace-bin", b"\x00")],
        "ipv6:[::1]:5000",
    )
    assert caller.header(b"authorization") == b"Bearer s3"
    assert caller.header(b"x-user-id") == b"u1, u2"
    assert caller.header(b"trace-bin") is None
    assert caller.client == "::1"
    assert peer_host("ipv4:10.0.0.7:41000") == "10.0.0.7"
    assert peer_host("unix:/tmp/socket") == "/tmp/socket"


ROUTES = """backends:
  a: {{url: "http://127.0.0.1:8000", grpc_url: {grpc}}}
models:
  m: {{versions: {{v1: {{backend: a, target: m/1}}}}}}
keys: {{required: false}}
"""


@pytest.mark.parametrize(
    ("grpc_url", "address"),
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("grpc://triton:9001", "triton:9001"),
        ('"[::1]:8001"', "[::1]:8001"),
    ],
)
def test_grpc_url_is_read(grpc_url: str, address: str) -> None:
    assert parse_table(ROUTES.format(grpc=grpc_url)).backends["a"].grpc_address == address


def test_a_backend_without_grpc_url_has_no_address() -> None:
    table = parse_table(ROUTES.replace(", grpc_url: {grpc}", "").format())
    assert table.backends["a"].grpc_address == ""


@pytest.mark.parametrize(
    ("grpc_url", "message"),
    [
        ("triton", "grpc_url of backend a needs a port (Triton's gRPC port is 8001 by default): 'triton'"),
        ("grpcs://triton:8001", "grpc_url of backend a uses TLS, which is not supported yet"),
        ("http://triton:8001", "grpc_url of backend a must be grpc://HOST:PORT or HOST:PORT"),
        ("triton:8001/v2", "grpc_url of backend a must be just HOST:PORT"),
        ("triton:http", "grpc_url of backend a has an invalid port: 'triton:http'"),
        ("user:secret@triton:8001", "grpc_url of backend a must not contain a user name or password"),
    ],
)
def test_bad_grpc_urls_are_refused_with_their_place(grpc_url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_table(ROUTES.format(grpc=grpc_url), "routes.yaml")
    [issue] = caught.value.issues
    assert str(issue).startswith("routes.yaml:2:") and message in str(issue)
    assert "secret" not in str(issue)


# -- the exception boundary, in process ------------------------------------------------------------

BOUNDARY_ROUTES = """
backends:
  nowhere: {url: "http://127.0.0.1:9", grpc_url: "127.0.0.1:9"}
models:
  m:
    versions:
      "1": {backend: nowhere, target: m/1}
keys: {required: false}
"""


class Injected(RuntimeError):
    """The fault this test injects."""


@pytest.mark.parametrize("step", ["plan", "stream"])
async def test_a_bug_in_a_step_is_internal_counted_and_harms_no_other_call(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = Pipeline(parse_table(BOUNDARY_ROUTES), asyncio.get_running_loop())

    async def settled(timeout: float) -> None:
        return None

    front = GrpcFrontDoor(pipeline, Metadata(lambda: pipeline.snapshot, settled), 5.0, 5.0)
    port = GrpcPort(front, ServerSettings(), reuse_port=False)
    bound = await port.start("127.0.0.1", 0)

    def boom(*args: object, **kwargs: object) -> None:
        raise Injected("injected fault")

    monkeypatch.setattr(pipeline, "plan", boom)
    request = service_pb2.ModelInferRequest(model_name="m").SerializeToString()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as channel:
            prefix = "/inference.GRPCInferenceService/"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if step == "plan":
                    await channel.unary_unary(prefix + "ModelInfer")(request, timeout=5)
                else:
                    call = channel.stream_stream(prefix + "ModelStreamInfer")(iter([request]), timeout=5)
                    [_ async for _ in call]
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.INTERNAL,
                "internal error",
            )
            assert front.internal_errors == 1
            live = service_pb2.ServerLiveResponse.FromString(
                await channel.unary_unary(prefix + "ServerLive")(b"", timeout=5)
            )
            assert live.live  # the port still serves
    finally:
        await port.stop(0)
