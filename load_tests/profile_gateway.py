"""Where a gateway under load spends its time: py-spy samples of one configuration of `make bench`.

Run it with `.venv/bin/python load_tests/profile_gateway.py redis --seconds 10` (bare, memory or redis;
py-spy comes from PyPI: `.venv/bin/pip install py-spy`). It starts the same backend and gateway as
bench_limits.py, drives it with wrk at 32 connections, records the gateway with py-spy for `--seconds`,
and prints the functions by their own share of the samples and the gateway's by inclusive share.
Native code (uvloop's loop, the socket calls) shows up as the Python frame that called it.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_limits as bl
import nginx
import wrk
from procs import Supervisor, free_port, usable_cores, wait_for_port


def summary(raw: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    print(f"{total} samples\n-- own time --")
    for frame, samples in own.most_common(top):
        print(f"{100 * samples / total:5.1f}%  {frame}")
    print("-- inclusive, gateway code --")
    for frame, samples in inclusive.most_common():
        if "gateway/" in frame and top > 0:
            print(f"{100 * samples / total:5.1f}%  {frame}")
            top -= 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["bare", "memory", "redis"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(bl.REPO / ".venv/bin/py-spy")
    if not Path(spy).exists():
        print("profile_gateway: py-spy not found; `.venv/bin/pip install py-spy`", file=sys.stderr)
        return 2
    cores = usable_cores()
    loadgen, target = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="profile-gateway-") as tmp:
        sup = Supervisor(Path(tmp))
        try:
            store = "memory://"
            if args.kind == "redis":
                redis_port = free_port()
                argv = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
                wait_for_port(redis_port, sup.start("redis", argv, loadgen), timeout=10)
                store = f"redis://127.0.0.1:{redis_port}/0"
            backend = free_port()
            nginx.start_nginx(sup, "backend", nginx.backend_conf(backend, 1), backend, loadgen)
            limited = args.kind != "bare"
            port, admin = bl.start_gateway(sup, args.kind, bl.routes(backend, limited, store), target)
            secret = bl.create_key(admin) if limited else "none"
            script = Path(tmp) / "infer.lua"
            script.write_text(wrk.LUA_SCRIPT + f'\nwrk.headers["Authorization"] = "Bearer {secret}"\n')
            found = subprocess.run(["pgrep", "-f", "--", f"--port {port} "], capture_output=True, text=True)
            pid = found.stdout.split()[0]
            url = f"http://127.0.0.1:{port}/v2/models/fraud-detector/infer"
            load = subprocess.Popen(
                wrk.command(url, script, 1, 32, args.seconds + 2, loadgen), stdout=subprocess.PIPE, text=True
            )
            time.sleep(1)
            raw = Path(tmp) / "samples.txt"
            record = [spy, "record", "-p", pid, "-d", str(args.seconds), "-r", "200", "-f", "raw"]
            subprocess.run([*record, "-o", str(raw), "--nonblocking"], capture_output=True, check=True)
            out, _ = load.communicate()
            print(
                next((line for line in out.splitlines() if line.startswith("Requests/sec")), "wrk: no rate")
            )
            summary(raw, args.top)
        finally:
            sup.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
