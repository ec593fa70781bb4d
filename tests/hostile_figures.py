"""The figures behind tests/test_hostile_clients.py: what each hostile client costs the gateway.

Run it with `.venv/bin/python tests/hostile_figures.py`. It starts one gateway worker (keys required)
in front of the fake backend of the tests (`tests/fault_backend.py`, named as such), plays each hostile
client against it and prints the resident memory the worker grew by and how fast other clients were
answered meanwhile. Loopback only; it stops by itself in about half a minute.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fault_backend import fault_backend  # noqa: E402

from tests.support import free_port, gateway  # noqa: E402
from tests.test_hostile_clients import ROUTES, connect, probe, read_response, rss  # noqa: E402
from tests.test_limits_e2e import create_key  # noqa: E402

MiB = 1 << 20


def main() -> None:
    with fault_backend() as backend, gateway(ROUTES.format(port=backend.port, dead=free_port())) as gw:
        key = create_key(gw, "figures")
        before = rss(gw)
        with connect(gw) as sock:
            sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nx-endless: ")
            started, sent, answer = time.monotonic(), 0, b""
            sock.setblocking(False)
            while time.monotonic() - started < 2 and not answer:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(b"a" * 65536)
                with contextlib.suppress(BlockingIOError):
                    answer += sock.recv(100)
            elapsed = time.monotonic() - started
        print(
            f"endless header: {answer[:12]!r} after {elapsed * 1000:.0f} ms ({sent // 1024} KiB pushed into "
            f"the sockets meanwhile); RSS +{(rss(gw) - before) / MiB:.2f} MiB"
        )

        before = rss(gw)
        head = b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % (32 * MiB)
        started = time.monotonic()
        uploads = [connect(gw) for _ in range(10)]
        for sock in uploads:
            sock.sendall(head + b"x" * 65536)
        statuses = [read_response(sock)[0] for sock in uploads]
        elapsed = time.monotonic() - started
        for sock in uploads:
            sock.close()
        print(
            f"10 unauthenticated 32 MiB uploads: {sorted(set(statuses))} in {elapsed * 1000:.0f} ms; "
            f"RSS +{(rss(gw) - before) / MiB:.2f} MiB"
        )

        before = rss(gw)
        request = (
            b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
            b"content-length: 1024\r\n\r\n%s" % (key.encode(), b"z" * 1024)
        )
        stop, written = threading.Event(), [0]

        def never_reads() -> None:
            with connect(gw) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(0.5)
                while not stop.is_set():
                    try:
                        written[0] += sock.send(request * 64)
                    except TimeoutError:
                        continue
                    except OSError:
                        return

        thread = threading.Thread(target=never_reads, daemon=True)
        thread.start()
        latencies = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            latencies.append(probe(gw))
            time.sleep(0.05)
        stop.set()
        thread.join(5)
        latencies.sort()
        print(
            f"never-reading pipeliner: {written[0] / MiB:.1f} MiB sent before it was paused; probes on "
            f"another connection n={len(latencies)} p50 {latencies[len(latencies) // 2] * 1000:.1f} ms "
            f"max {latencies[-1] * 1000:.1f} ms; RSS +{(rss(gw) - before) / MiB:.2f} MiB"
        )

        before = rss(gw)
        slow = []
        for _ in range(1000):
            sock = connect(gw)
            sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\n")
            slow.append(sock)
        latencies = sorted(probe(gw) for _ in range(20))
        print(
            f"1000 slowloris connections: probes p50 {latencies[10] * 1000:.1f} ms max "
            f"{latencies[-1] * 1000:.1f} ms; RSS +{(rss(gw) - before) / MiB:.2f} MiB with them open"
        )
        for sock in slow:
            sock.close()


if __name__ == "__main__":
    main()
