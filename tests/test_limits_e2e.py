"""API keys and rate limits end to end: 2 gateway workers, a real redis-server, real Triton."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import TritonFleet
from tests.redis_servers import RedisClusterNodes, RedisServer, cli
from tests.support import GatewayProcess, gateway
from tests.test_admin_e2e import admin
from tests.test_live_reload import BODY, wait_until
from tests.windows import over_admission

INFER = "/v2/models/fraud-detector/versions/2.1.3/infer"


def routes(
    triton: TritonFleet,
    store_url: str,
    on_error: str = "fail_closed",
    model_limit: str = "",
    store_timeout: str = "500ms",
) -> str:
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
{model_limit}
  other-model:
    versions:
      "1": {{backend: triton-a, target: fraud_detector/3}}
keys: {{required: true}}
store: {{url: "{store_url}", on_error: {on_error}, timeout: {store_timeout}}}
"""


def create_key(process: GatewayProcess, name: str, **settings: object) -> str:
    status, body = admin(process, "POST", "/api/keys", {"name": name, **settings})
    assert status == 201, body
    return str(body["secret"])


def call(
    port: int, secret: str | None, path: str = INFER, header: str = "Authorization"
) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {}
    if secret is not None:
        headers[header] = f"Bearer {secret}" if header == "Authorization" else secret
    conn.request("POST", path, BODY, headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}


@dataclass
class Hammer:
    """Requests as fast as a few threads can send them, each on its own connection, for `seconds`."""

    port: int
    secret: str
    seconds: float
    threads: int = 6
    reconnect_every: int = 0  # >0: a new connection after this many requests, to reach every worker
    statuses: Counter[int] = field(default_factory=Counter)
    slow_refusals: list[float] = field(default_factory=list)  # 503s that took over 100 ms
    admitted: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered) of each 200
    first: float = 0.0
    last: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, during: object = None) -> Hammer:
        stop_at = time.monotonic() + self.seconds
        workers = [threading.Thread(target=self._loop, args=(stop_at,)) for _ in range(self.threads)]
        self.first = time.monotonic()
        for worker in workers:
            worker.start()
        if callable(during):
            during()
        for worker in workers:
            worker.join(self.seconds + 30)
        return self

    def _loop(self, stop_at: float) -> None:
        headers = {"Authorization": f"Bearer {self.secret}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = 0
        while (now := time.monotonic()) < stop_at:
            sent += 1
            if self.reconnect_every and sent % self.reconnect_every == 0:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("POST", INFER, BODY, headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            answered = time.monotonic()
            took = answered - now
            with self.lock:
                if response.status == 200:
                    self.admitted.append((now, answered))
                self.statuses[response.status] += 1
                self.last = max(self.last, now)
                if response.status == 503 and took > 0.1:
                    self.slow_refusals.append(took)
        conn.close()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def test_keys_missing_wrong_model_revoked_expired_and_limit_headers(
    triton: TritonFleet, redis: RedisServer
) -> None:
    with gateway(routes(triton, redis.url), workers=2) as process:
        secret = create_key(process, "team-a", models=["fraud-detector"], rate="50/s", burst=10)
        assert call(process.port, None)[0] == 401
        assert call(process.port, "gwk_made-up")[0] == 401
        status, headers = call(process.port, secret)
        assert status == 200
        assert headers["ratelimit-policy"] == '"key";q=10;w=1'
        assert headers["ratelimit"].startswith('"key";r=')
        assert call(process.port, secret, header="X-API-Key")[0] == 200
        assert call(process.port, secret, path="/v2/models/other-model/infer")[0] == 403

        # Revocation: every worker refuses the key within a second (fresh connections reach both).
        assert all(call(process.port, secret)[0] == 200 for _ in range(6))
        assert admin(process, "DELETE", "/api/keys/team-a")[0] == 200
        revoked_at = time.monotonic()
        took = wait_until(lambda: all(call(process.port, secret)[0] == 401 for _ in range(10)), 5)
        assert took is not None and time.monotonic() - revoked_at < 1.0, took

        short = create_key(process, "short-lived", expires_in="1")
        assert call(process.port, short)[0] == 200
        assert wait_until(lambda: call(process.port, short)[0] == 401, 5) is not None

        audit = admin(process, "GET", "/api/audit")[1]["entries"]
        assert ("tester", "keys.revoke") in {(e["who"], e["action"]) for e in audit}
        assert secret not in json.dumps(audit)
        assert secret not in process.log()


def expect_exact(hammer: Hammer, rate: float, burst: int) -> None:
    admitted = hammer.statuses[200]
    elapsed = hammer.last - hammer.first
    expected = rate * elapsed + burst
    offered = sum(hammer.statuses.values()) / elapsed
    assert offered >= 1.3 * rate, (offered, hammer.statuses)  # hammered well above the limit
    assert set(hammer.statuses) <= {200, 429}, hammer.statuses
    assert abs(admitted - expected) <= 0.01 * expected, (admitted, expected, hammer.statuses)


def test_rate_limit_is_exact_across_two_workers(triton: TritonFleet, redis: RedisServer) -> None:
    with gateway(routes(triton, redis.url), workers=2) as process:
        # Burst 100: a load generator stalled up to 0.5 s (a busy CI machine) loses no tokens.
        secret = create_key(process, "hammered", rate="200/s", burst=100)
        expect_exact(Hammer(process.port, secret, seconds=10).run(), 200, 100)


def test_no_window_admits_more_than_the_limit_across_two_workers(
    triton: TritonFleet, redis: RedisServer
) -> None:
    """With leases in use (burst 400 over 2 workers: leases of 12 tokens), every window [a, b] of
    the run admits at most floor((b - a) x rate) + burst, also while one worker is killed mid-run
    holding a lease and restarted by the supervisor (tests/windows.py)."""
    rate, burst = 400, 400
    with gateway(routes(triton, redis.url), workers=2) as process:
        secret = create_key(process, "windowed", rate=f"{rate}/s", burst=burst)
        before = _script_calls(redis)

        def kill_one_worker() -> None:
            time.sleep(2.5)
            assert process.process is not None
            children = subprocess.run(
                ["pgrep", "-P", str(process.process.pid)], capture_output=True, text=True
            ).stdout.split()
            assert len(children) == 2, children
            os.kill(int(children[0]), signal.SIGKILL)  # no graceful stop: its leases are just gone

        hammer = Hammer(process.port, secret, seconds=6, reconnect_every=20).run(during=kill_one_worker)
        calls = _script_calls(redis) - before
    assert sum(hammer.statuses.values()) / 6 >= 1.3 * rate, hammer.statuses  # hammered above the limit
    assert over_admission(hammer.admitted, rate, burst) == 0
    assert hammer.statuses[200] >= 0.8 * rate * 6, hammer.statuses  # and not far under it either
    # Leases, not a call per request: a check per request would make one script call for every request,
    # admitted or refused; refills, keep-alives and give-backs stay far below that (about 0.08 here).
    assert calls < sum(hammer.statuses.values()) / 4, (calls, hammer.statuses)


def _script_calls(server: RedisServer) -> int:
    stats = cli(server.port, "INFO", "commandstats")
    return sum(
        int(line.split("calls=")[1].split(",")[0])
        for line in stats.splitlines()
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:"))
    )


def test_rate_limit_is_exact_on_a_redis_cluster(triton: TritonFleet) -> None:
    cluster = RedisClusterNodes().start()
    try:
        with gateway(routes(triton, cluster.url), workers=2) as process:
            secret = create_key(process, "clustered", rate="200/s", burst=100)
            expect_exact(Hammer(process.port, secret, seconds=10).run(), 200, 100)
    finally:
        cluster.cleanup()


# Persistent, as production Redis is: the keys must still be there after the restart.
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


def test_redis_down_fail_closed_answers_503_fast_then_recovers(triton: TritonFleet) -> None:
    server = RedisServer(args=PERSISTENT).start()
    try:
        # The default 80 ms store timeout: the 503s must come out within 100 ms.
        with gateway(routes(triton, server.url, store_timeout="80ms"), workers=2) as process:
            secret = create_key(process, "steady", rate="100/s", burst=50)
            hammer = Hammer(process.port, secret, seconds=4, threads=3)
            hammer.run(during=lambda: (time.sleep(1.0), server.stop()))
            assert hammer.statuses[503] > 0
            assert hammer.slow_refusals == [], hammer.slow_refusals[:5]  # every 503 within 100 ms
            server.start()
            # No gateway restart: exact limiting resumes once Redis is back.
            assert wait_until(lambda: call(process.port, secret)[0] == 200, 10) is not None
            expect_exact(Hammer(process.port, secret, seconds=3).run(), 100, 50)
            store = admin(process, "GET", "/api/store")[1]
            assert any(w.get("fail_closed", 0) > 0 for w in store.values())
    finally:
        server.cleanup()


def test_redis_down_fail_open_serves_each_worker_its_share(triton: TritonFleet) -> None:
    server = RedisServer(args=PERSISTENT).start()
    try:
        with gateway(routes(triton, server.url, on_error="fail_open"), workers=2) as process:
            secret = create_key(process, "open", rate="100/s", burst=10)
            for _ in range(10):  # both workers have now seen (and cached) the key
                assert call(process.port, secret)[0] == 200
            time.sleep(2.5)  # heartbeats: each worker learns there are 2 processes
            server.stop()
            assert wait_until(lambda: call(process.port, secret)[0] in (200, 429), 5) is not None
            # Connections are spread over the workers by the kernel, one hash per connection: reconnect
            # often, or all of them may land on one worker and see only its share.
            hammer = Hammer(process.port, secret, seconds=5, reconnect_every=5).run()
            assert set(hammer.statuses) <= {200, 429}, hammer.statuses
            rate = hammer.statuses[200] / (hammer.last - hammer.first)
            assert 70 <= rate <= 130, (rate, hammer.statuses)  # 2 workers x 50/s, give or take bursts
    finally:
        server.cleanup()


def test_anonymous_callers_are_limited_by_address_and_counted_in_metrics(triton: TritonFleet) -> None:
    table = routes(triton, "memory://").replace(
        "keys: {required: true}", "keys: {required: false, default_limit: {rate: 1/s, burst: 3}}"
    )
    with gateway(table) as process:
        answers = [call(process.port, None) for _ in range(5)]
        assert [status for status, _ in answers] == [200, 200, 200, 429, 429]
        limited = answers[3][1]
        assert limited["retry-after"] == "1"
        assert limited["ratelimit-policy"] == '"client";q=3;w=3'
        assert limited["ratelimit"] == '"client";r=0;t=3'
        secret = create_key(process, "metered")  # no limit of its own: the default applies to it too
        assert call(process.port, secret)[0] == 200

        def counted() -> bool:
            text = admin(process, "GET", "/metrics")[1]
            return (
                'gateway_admission_total{key="",model="fraud-detector",outcome="limited"} 2.0' in text
                and 'gateway_admission_total{key="metered",model="fraud-detector",outcome="admitted"} 1.0'
                in text
            )

        assert wait_until(counted, 5) is not None
        assert secret not in admin(process, "GET", "/metrics")[1]


def test_memory_store_refuses_several_workers_when_it_would_hold_shared_state(triton: TritonFleet) -> None:
    process = GatewayProcess(routes(triton, "memory://"), workers=2)
    with pytest.raises(RuntimeError) as refused:
        process.start()
    assert "would not be shared between the workers" in str(refused.value)
    assert "Redis" in str(refused.value)
