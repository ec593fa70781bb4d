"""Automatic canary analysis end to end: real Triton versions, a real Redis, the gateway deciding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from backends.local import TritonProcess, free_port, start_version
from tests.conftest import TritonFleet
from tests.redis_servers import RedisServer
from tests.support import GatewayProcess, gateway
from tests.test_admin_e2e import admin
from tests.test_backend_health import unpinned
from tests.test_live_reload import Traffic, wait_until


@pytest.fixture(scope="module")
def failing_canary() -> Iterator[TritonProcess]:
    process = start_version("fraud_detector", 7, free_port(), error_rate=0.3)  # 30% of batches fail (500)
    try:
        yield process
    finally:
        process.stop()


def routes(triton: TritonFleet, canary: TritonProcess, store_url: str, steps: str = "[20, 50, 100]") -> str:
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-canary: {{url: "{canary.url}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.9.0: {{backend: triton-canary, target: fraud_detector/7}}
    split: {{2.1.3: 100, 2.9.0: 0}}
    rollout: {{baseline: 2.1.3, canary: 2.9.0, steps: {steps}, max_error_rate_increase: 0.0}}
keys: {{required: false}}
store: {{url: "{store_url}", timeout: 500ms}}
"""


def healthy_routes(triton: TritonFleet, rollout: str, store_url: str = "memory://") -> str:
    """Baseline Triton v3 and an equally good canary, v4, under the given rollout."""
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
    split: {{2.1.3: 100, 2.2.0: 0}}
    {rollout}
keys: {{required: false}}
store: {{url: "{store_url}", timeout: 500ms}}
"""


def rollout(process: GatewayProcess) -> dict[str, object]:
    status, body = admin(process, "GET", "/api/rollouts")
    assert status == 200, body
    return body["rollouts"]["fraud-detector"]  # type: ignore[no-any-return]


def phase(process: GatewayProcess) -> str | None:
    record = rollout(process)["record"]
    return None if record is None else record["state"]["phase"]  # type: ignore[index]


def test_failing_canary_is_rolled_back_and_stays_rolled_back(
    triton: TritonFleet, failing_canary: TritonProcess
) -> None:
    redis = RedisServer(args=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        table = routes(triton, failing_canary, redis.url)
        with gateway(table) as process:
            assert wait_until(lambda: phase(process) == "progressing", 10) is not None
            assert (
                wait_until(lambda: "200 2.9.0" in unpinned(process, 10) or False, 10) is not None
            )  # 20% now

            def rolled_back() -> bool:
                unpinned(process, 20)  # keep traffic flowing while the engine gathers evidence
                return phase(process) == "rolled_back"

            assert wait_until(rolled_back, 60) is not None
            record = rollout(process)["record"]
            last = record["history"][-1]  # type: ignore[index]
            assert (last["action"], last["by"], last["weight"]) == ("rollback", "controller", 0)
            assert "error" in str(last["evidence"]).lower()
            time.sleep(1.5)  # every worker follows the record within a tick
            assert set(unpinned(process, 60)) == {"200 2.1.3"}  # no further traffic to the canary

            process.signal(signal.SIGHUP)  # a reload of the same file changes nothing
            time.sleep(1.5)
            assert phase(process) == "rolled_back"
            assert set(unpinned(process, 20)) == {"200 2.1.3"}
            audit = [(e["who"], e["action"]) for e in admin(process, "GET", "/api/audit")[1]["entries"]]
            assert audit == [("controller", "rollout.start"), ("controller", "rollout.rollback")]

        with gateway(table) as restarted:  # a new gateway process, the same store
            assert phase(restarted) == "rolled_back"
            time.sleep(1.5)
            assert set(unpinned(restarted, 40)) == {"200 2.1.3"}

            # A changed spec is a new rollout.
            restarted.routes_path.write_text(routes(triton, failing_canary, redis.url, steps="[10, 100]"))
            assert wait_until(lambda: phase(restarted) == "progressing", 10) is not None
            assert rollout(restarted)["record"]["state"]["weight"] == 10  # type: ignore[index]
    finally:
        redis.cleanup()


def test_operator_can_pause_and_roll_back_by_hand(triton: TritonFleet, failing_canary: TritonProcess) -> None:
    with gateway(routes(triton, failing_canary, "memory://", steps="[50, 100]")) as process:
        assert wait_until(lambda: phase(process) == "progressing", 10) is not None
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": process.admin_token}
        cli = [sys.executable, "-m", "gateway", "rollout"]
        paused = subprocess.run(
            [*cli, "pause", "fraud-detector", "--admin", process.admin_url],
            capture_output=True,
            text=True,
            env=env,
        )
        assert paused.returncode == 0, paused.stderr
        assert wait_until(lambda: phase(process) == "paused", 5) is not None
        assert admin(process, "POST", "/api/rollouts/fraud-detector/rollback")[0] == 202
        assert wait_until(lambda: phase(process) == "rolled_back", 5) is not None
        history = rollout(process)["record"]["history"]  # type: ignore[index]
        assert [(h["action"], h["by"]) for h in history][-2:] == [("pause", "tester"), ("rollback", "tester")]
        time.sleep(1.5)
        assert Counter(unpinned(process, 10)) == Counter({"200 2.1.3": 10})
        assert admin(process, "POST", "/api/rollouts/fraud-detector/explode")[0] == 404
        audit = [
            e["action"] for e in admin(process, "GET", "/api/audit")[1]["entries"] if e["who"] == "tester"
        ]
        assert audit == ["rollout.pause", "rollout.rollback"]
        status = subprocess.run(
            [*cli, "status", "--admin", process.admin_url], capture_output=True, text=True, env=env
        )
        assert "rolled_back at 0%" in status.stdout, status.stdout + status.stderr
        metrics = lambda: admin(process, "GET", "/metrics")[1]  # noqa: E731
        wanted = 'gateway_rollout_phase{model="fraud-detector",phase="rolled_back"} 1.0'
        assert wait_until(lambda: wanted in metrics(), 5) is not None
        assert 'gateway_rollout_canary_weight{model="fraud-detector"} 0.0' in metrics()


def leader_of(processes: list[GatewayProcess]) -> list[GatewayProcess]:
    leaders = []
    for process in processes:
        for path in (process.directory / "state" / "workers").glob("*.json"):
            try:
                if json.loads(path.read_text())["rollouts"]["leader"]:
                    leaders.append(process)
            except (ValueError, KeyError):
                continue
    return leaders


def test_one_process_decides_and_another_takes_over_when_it_dies(triton: TritonFleet) -> None:
    redis = RedisServer().start()
    spec = "rollout: {baseline: 2.1.3, canary: 2.2.0, steps: [20, 50, 100]}"
    healthy = healthy_routes(triton, spec, redis.url)
    try:
        with gateway(healthy) as first, gateway(healthy) as second:
            assert wait_until(lambda: len(leader_of([first, second])) == 1, 10) is not None
            time.sleep(2)
            assert len(leader_of([first, second])) == 1  # still exactly one, tick after tick
            [leader] = leader_of([first, second])
            follower = second if leader is first else first
            before = rollout(follower)["record"]
            assert leader.process is not None
            leader.process.kill()  # no goodbye: the lease must expire
            leader.process.wait()
            killed_at = time.monotonic()
            assert wait_until(lambda: leader_of([follower]) == [follower], 10) is not None
            assert time.monotonic() - killed_at < 6.0  # lease TTL 3 s plus a tick or two
            after = rollout(follower)["record"]
            starts = [e for e in after["history"] if e["action"] == "start"]  # type: ignore[index]
            assert len(starts) == 1  # carried on from the stored state, not restarted
            assert after["state"]["step"] == before["state"]["step"]  # type: ignore[index]
            assert after["state"]["weight"] == before["state"]["weight"]  # type: ignore[index]
    finally:
        redis.cleanup()


def test_equally_good_canary_is_stepped_up_and_promoted(triton: TritonFleet) -> None:
    steps = "{baseline: 2.1.3, canary: 2.2.0, steps: [50, 100], min_step_duration: 3s, min_step_requests: 50}"
    table = healthy_routes(triton, f"rollout: {steps}")
    with gateway(table) as process:
        traffic = Traffic(process.port).start(threads=4)
        started = time.monotonic()
        try:
            assert wait_until(lambda: phase(process) == "promoted", 120) is not None
        finally:
            traffic.finish()
        took = time.monotonic() - started
        history = rollout(process)["record"]["history"]  # type: ignore[index]
        assert [(e["action"], e["weight"]) for e in history] == [
            ("start", 50),
            ("promote", 100),  # decided at 50%, the last step that still has a baseline to compare with
        ]
        assert traffic.failures == []
        time.sleep(1.5)
        assert Counter(unpinned(process, 10)) == Counter(
            {"200 2.2.0": 10}
        )  # the canary holds the traffic now
        differs = rollout(process)["differs_from_file"]
        assert differs is True  # the file still says 100/0: the admin API shows the live state differs
        print(f"\npromoted after {took:.1f} s and {sum(traffic.answered.values())} requests")
