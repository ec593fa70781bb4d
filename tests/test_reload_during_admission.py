"""A reload while a request waits on the store: the request finishes on the snapshot it started with.

End to end: a gateway process with its limits in a real Redis, frozen with SIGSTOP so that the request's
admission round trip waits; meanwhile routes.yaml is rewritten without the version (or the model) the
request pins. When Redis is thawed the request must get a definite answer, from the old snapshot's
version or a 404, and never hang. The backend is the fake one (`fault_backend`, named as such): its
`echo` model says which Triton model answered.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import pytest
from fault_backend import FaultBackend, fault_backend

from tests.redis_servers import RedisServer
from tests.support import gateway
from tests.test_live_reload import wait_until

ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
{second}
    split: {{"1": 100}}
{other}
keys:
  required: false
  default_limit: {{rate: 10000/s, burst: 10000}}
store: {{url: "{redis}", timeout: 3s}}
"""
SECOND = '      "2": {backend: fake, target: echo/2}'
OTHER = """  other:
    versions:
      "1": {backend: fake, target: echo/7}"""


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("path", "removed"),
    [("/v2/models/echo/versions/2/infer", "version"), ("/v2/models/other/infer", "model")],
)
def test_reload_removing_the_target_during_admission_gives_a_definite_answer(
    backend: FaultBackend, redis: RedisServer, path: str, removed: str
) -> None:
    before = ROUTES.format(port=backend.port, redis=redis.url, second=SECOND, other=OTHER)
    after = ROUTES.format(
        port=backend.port,
        redis=redis.url,
        second=SECOND if removed == "model" else "",
        other=OTHER if removed == "version" else "",
    )
    with gateway(before) as process:
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        conn.request("POST", path, b"{}")  # a warm-up: Redis answers, the store connection is up
        assert conn.getresponse().read() and True
        answers: list[object] = []

        def pinned_request() -> None:
            client = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            try:
                client.request("POST", path, b'{"inputs": []}')
                response = client.getresponse()
                answers.append((response.status, response.read()))
            except Exception as exc:  # a hang shows up as a timeout here
                answers.append(exc)

        redis.freeze()
        try:
            waiting = threading.Thread(target=pinned_request)
            waiting.start()
            time.sleep(0.3)  # the request is in its admission round trip now
            process.routes_path.write_text(after)
            reloaded = wait_until(lambda: process.log().count("reloaded") >= 1 or None, 5)
            assert reloaded, process.log()[-2000:]
        finally:
            redis.thaw()
        waiting.join(12)
        assert not waiting.is_alive(), "the request hung"
        [answer] = answers
        assert isinstance(answer, tuple), f"no answer: {answer!r}"
        status, body = answer
        if status == 200:  # the old snapshot's version answered
            triton = "2" if removed == "version" else "7"
            assert json.loads(body)["path"] == f"/v2/models/echo/versions/{triton}/infer"
        else:
            assert status == 404, body
        # And the new table serves: the removed target is a 404 now.
        conn.request("POST", path, b"{}")
        response = conn.getresponse()
        assert response.status == 404
        assert "error" in json.loads(response.read())
