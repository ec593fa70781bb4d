"""config.pbtxt, read with Triton's own protobuf definition (shipped in tritonclient).

Protobuf text format has no schema of its own: only the ModelConfig message says which fields repeat, so
a hand-written parser would guess. The load API of Triton's model repository wants the configuration as
JSON, and the manifest wants the tensors; both come from the parsed message.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from gateway.artifacts.schema import Schema, from_model_config


class ConfigInvalid(ValueError):
    """config.pbtxt is not a valid Triton model configuration; the message says where."""


def parse(text: str) -> dict[str, Any]:
    """The configuration as protobuf JSON with the proto's field names (`data_type`, `max_batch_size`)."""
    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigInvalid(f"config.pbtxt: {exc}") from None
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def load_json(config: dict[str, Any], triton_version: int) -> str:
    """The `config` parameter of a load request: the file's configuration, serving only this version."""
    pinned = {**config, "version_policy": {"specific": {"versions": [triton_version]}}}
    return json.dumps(pinned, sort_keys=True)


def schema(text: str) -> Schema:
    return from_model_config(parse(text))


def serving(config: dict[str, Any]) -> tuple[str, str]:
    """(platform, backend) as the configuration names them; either may be ""."""
    return str(config.get("platform", "")), str(config.get("backend", ""))
