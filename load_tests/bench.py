"""Data-plane benchmark: the gateway against nginx doing the same job, and the backend alone.

Run it with `make bench`, or `.venv/bin/python load_tests/bench.py --rounds 5 --duration 5`.

Three targets are measured with wrk in one run, in interleaved rounds (round 1 of A, B, C, then
round 2, ...), so a slow drift of the machine touches all of them alike:

  A. direct   the backend alone: nginx answering the KServe v2 infer path with a fixed JSON response,
              standing in for a Triton server that costs nothing;
  B. nginx    nginx, 1 worker, proxying to that backend with the gateway's 90/10 weighted split over
              pooled keep-alive upstream connections: what a C proxy does with the same job;
  C. gateway  `gateway serve --workers 1` with a routes file that sends the same model to the same
              backend with the same split.

Each round runs a throughput test (32 connections by default) and a latency test (1 connection).
The numbers to read are the ratios: gateway / nginx throughput, and the p50 each proxy adds over the
direct backend at 1 connection; absolute numbers depend on the machine.

CPU placement. On a small machine, where the processes run decides what is measured. By default:
  - wrk runs on the first core;
  - the target under test (the direct backend for A, the proxy for B and C) runs alone on the second
    core, so every target gets the same thing: exactly one core, with nothing else on it;
  - the backend behind the proxies (a separate nginx instance, same config as A) shares wrk's core,
    or gets a third core if there is one. On 2 cores it has to share with something, and sharing with
    the load generator keeps the target's core clean. It is far cheaper per request than either proxy,
    and the printed per-core CPU check flags rounds where that shared core was the limit instead.
The latency runs (1 connection) instead put wrk, the target and the backend together on the first
core: with one request in flight nothing runs in parallel, and on a VM a wake-up on the other core
costs tens of microseconds, which would be counted as latency added by the proxy (a proxy adds two
such hops). `--latency-placement split` keeps the throughput placement for them.
`--no-pin` leaves placement to the scheduler (and gives the backend 2 workers by default).

Every measurement also records the CPU used by the target, the backend, wrk, and by programs outside
the benchmark; a sample that outside programs disturbed is measured again (within --retry-budget),
and what stays disturbed is named in the report. See load_tests/README.md for how to read it all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType

import nginx
import report
import targets as tg
import wrk
from procs import Supervisor, background_load, cpu_meter, descendants, set_affinity, usable_cores
from targets import Sample, Target

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Placement:
    loadgen: int | None
    target: int | None
    backend: int | None
    latency: int | None  # the one core of the 1-connection runs; None: same placement as throughput

    def describe(self) -> list[str]:
        if self.target is None:
            return ["not pinned (--no-pin or a single core): the scheduler places wrk, targets and backend"]
        shared = " (shared with wrk)" if self.backend == self.loadgen else ""
        lines = [
            f"throughput: wrk on core {self.loadgen}; target under test alone on core {self.target}; "
            f"backend behind the proxies on core {self.backend}{shared}"
        ]
        if self.latency is None:
            lines.append("latency: same placement as throughput (--latency-placement split)")
        else:
            lines.append(
                f"latency: wrk, target and backend all on core {self.latency} (one request in flight "
                "needs no second core; cross-core wake-ups would be counted as proxy latency)"
            )
        return lines


def choose_placement(no_pin: bool, latency_placement: str) -> Placement:
    cores = usable_cores()
    if no_pin or len(cores) < 2:
        return Placement(None, None, None, None)
    latency = cores[0] if latency_placement == "one-core" else None
    return Placement(cores[0], cores[1], cores[2] if len(cores) > 2 else cores[0], latency)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per target (default 5)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of unrecorded load per target first (default 1)"
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads for the throughput runs (default 1)")
    p.add_argument("--connections", type=int, default=32, help="connections for throughput runs (default 32)")
    p.add_argument(
        "--latency-connections", type=int, default=1, help="connections for latency runs (default 1)"
    )
    p.add_argument(
        "--targets",
        default="direct,nginx,gateway,gateway_nostats",
        help="comma-separated subset of direct,nginx,gateway,gateway_nostats (default all)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    p.add_argument(
        "--latency-placement",
        choices=["one-core", "split"],
        default="one-core",
        help="1-connection runs: everything on one core (default), or placed like the throughput runs",
    )
    p.add_argument(
        "--backend-workers", type=int, help="nginx workers of the backend (default 1 pinned, 2 with --no-pin)"
    )
    p.add_argument("--gateway", type=Path, default=REPO / ".venv/bin/gateway", help="the gateway executable")
    p.add_argument(
        "--retry-budget",
        type=int,
        default=20,
        help="extra seconds allowed for measuring again samples that other programs disturbed (default 20)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - {"direct", "nginx", "gateway", "gateway_nostats"}
    if unknown or not args.targets:
        p.error(f"--targets: unknown {sorted(unknown)}; choose from direct,nginx,gateway,gateway_nostats")
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.latency_connections < 1:
        p.error("--rounds, --duration and the connection counts must be at least 1")
    if args.backend_workers is None:
        args.backend_workers = 2 if args.no_pin else 1
    return args


def _first_line(argv: list[str], need_success: bool = False) -> str:
    """A tool's version line (nginx prints it on stderr; `wrk -v` exits 1 after printing it)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout + out.stderr).strip().splitlines()
    if not lines or (need_success and out.returncode != 0):
        return "unknown"
    return lines[0].split(" Copyright")[0]


def header(args: argparse.Namespace, placement: Placement) -> dict[str, object]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cores_online": os.cpu_count(),
            "cores_usable": usable_cores(),
            "background_load_cores": round(background_load(), 3),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nginx": _first_line([nginx.nginx_binary(), "-v"]),
            "wrk": _first_line([wrk.wrk_binary(), "-v"]),
            "gateway_git": _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"], True),
        },
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "retry_budget_s": args.retry_budget,
            "throughput": {"threads": args.threads, "connections": args.connections},
            "latency": {"threads": 1, "connections": args.latency_connections},
            "backend_workers": args.backend_workers,
            "request": {"method": "POST", "body": wrk.INFER_BODY, "content_type": "application/json"},
        },
        "placement": {**asdict(placement), "description": placement.describe()},
    }


def print_header(head: dict[str, object], args: argparse.Namespace) -> None:
    machine, placement = head["machine"], head["placement"]
    assert isinstance(machine, dict) and isinstance(placement, dict)
    print("Data-plane benchmark: gateway vs nginx proxy vs direct backend (load_tests/bench.py)")
    print(
        f"  machine:   {machine['cores_online']} cores online, usable {machine['cores_usable']}; "
        f"{machine['platform']}"
    )
    print(f"  tools:     {machine['nginx']}; {machine['wrk']}")
    load = float(machine["background_load_cores"])
    busy = "  !! the machine is busy; results will be disturbed" if load > report.OTHERS_DISTURB else ""
    print(f"  before:    other programs used {100 * load:.0f}% of a core (1 s sample){busy}")
    for i, line in enumerate(placement["description"]):
        print(f"  {'placement:' if i == 0 else '':<10} {line}")
    print(
        f"  load:      {args.rounds} interleaved rounds x {args.duration:g}s, throughput -t{args.threads} "
        f"-c{args.connections}, latency -t1 -c{args.latency_connections}, warmup {args.warmup:g}s"
    )
    print(f"  request:   POST {tg.PUBLIC_PATH} (direct: {tg.DIRECT_PATH}), {len(wrk.INFER_BODY)} byte JSON")


def progress_line(sample: Sample, target: Target, rounds: int) -> str:
    w, cpu = sample.wrk, sample.cpu
    return (
        f"  round {sample.round}/{rounds}  {target.label:<26} {sample.mode:<10} {w.rps:>9,.0f} req/s"
        f"  p50 {w.p50_us:>6,.0f} us  p99 {w.p99_us:>6,.0f} us"
        f"  CPU% target {100 * cpu.target:>3.0f} others {100 * cpu.others:>3.0f}"
        + (f"  (best of {sample.discarded + 1})" if sample.discarded else "")
    )


class Bench:
    def __init__(self, args: argparse.Namespace, sup: Supervisor) -> None:
        self.args = args
        self.sup = sup
        self.placement = choose_placement(args.no_pin, args.latency_placement)
        self.script = wrk.write_script(sup.workdir)
        self.backend_pids: list[int] = []
        self.targets: dict[str, Target] = {}
        self.retry_budget = args.retry_budget

    def start_targets(self) -> None:
        args, sup, place = self.args, self.sup, self.placement
        backend = tg.start_backend(sup, "backend", args.backend_workers, place.backend)
        self.backend_pids = [backend.child.pid, *descendants(backend.child.pid)]
        if "direct" in args.targets:
            # A second instance of the same backend, placed like the proxies, so that A is measured
            # under the same conditions as B and C instead of sharing wrk's core.
            direct = tg.start_backend(sup, "backend-direct", args.backend_workers, place.target)
            self.targets["direct"] = Target(
                "direct",
                "A direct backend (nginx)",
                direct.port,
                tg.DIRECT_PATH,
                direct.child,
                expect_split=False,
            )
        if "nginx" in args.targets:
            proxy = tg.start_nginx_proxy(sup, backend.port, place.target)
            self.targets["nginx"] = Target("nginx", "B nginx proxy, 1 worker", proxy.port, child=proxy.child)
        if "gateway" in args.targets:
            gateway = Target("gateway", "C gateway, 1 worker")
            tg.start_gateway(sup, gateway, args.gateway, backend.port, place.target)
            self.targets["gateway"] = gateway
        if "gateway_nostats" in args.targets:
            # The same gateway with per-request statistics off: the difference is what metrics cost.
            bare = Target("gateway_nostats", "D gateway, stats off")
            tg.start_gateway(sup, bare, args.gateway, backend.port, place.target, ("--no-stats",))
            self.targets["gateway_nostats"] = bare
        for target in self.targets.values():
            self.check(target)

    def check(self, target: Target) -> None:
        if not target.unavailable:
            try:
                tg.verify(target)
            except (ValueError, OSError) as exc:
                if not target.key.startswith("gateway"):
                    raise RuntimeError(f"{target.label} answers wrongly (a benchmark bug): {exc}") from exc
                target.unavailable = f"{target.url} answers wrongly: {exc}"
        if target.unavailable:
            print(f"\n!! {target.label} WILL NOT BE MEASURED: {target.unavailable}\n", file=sys.stderr)
            return
        split = target.verification.get("split_percent_observed")
        shown = f"; split over {tg.SPLIT_SAMPLE} requests, % per version {split}" if split else ""
        print(f"  check:     {target.label}: v2 answer OK{shown}")

    def measure(self, target: Target, rnd: int, mode: str, duration: int) -> Sample:
        args, place = self.args, self.placement
        latency = mode == "latency"
        threads, conns = (1, args.latency_connections) if latency else (args.threads, args.connections)
        pids = target.pids()
        one_core = latency and place.latency is not None
        wrk_core = place.latency if one_core else place.loadgen
        argv = wrk.command(target.url, self.script, threads, conns, duration, wrk_core)
        try:
            if one_core and place.latency is not None:
                set_affinity(pids + self.backend_pids, place.latency)
            with cpu_meter(pids, self.backend_pids) as cpu:
                result = wrk.run(argv, timeout_s=duration + 60)
        finally:
            if one_core and place.target is not None and place.backend is not None:
                set_affinity(pids, place.target)
                set_affinity(self.backend_pids, place.backend)
        if result.errors:
            print(
                f"!! {target.label} round {rnd} {mode}: {result.non_2xx:,} non-2xx responses, socket "
                f"errors {result.socket_errors} -- these requests FAILED",
                file=sys.stderr,
            )
        return Sample(rnd, mode, result, cpu)

    def measure_undisturbed(self, target: Target, rnd: int, mode: str) -> Sample:
        """Measures again, within the retry budget, while programs outside the benchmark take CPU;
        keeps the least disturbed measurement. Choosing by outside load, never by the result, does
        not bias the numbers toward what we hope to see."""
        best = self.measure(target, rnd, mode, self.args.duration)
        # A sample with failed requests is always kept: discarding it would hide the failures.
        # One more run per sample at most: a disturbance that outlasts it is a long one, and the
        # budget is better spent on other samples.
        while (
            not best.wrk.errors
            and best.discarded < 1
            and best.cpu.others > report.OTHERS_DISTURB
            and self.retry_budget >= self.args.duration
        ):
            self.retry_budget -= self.args.duration
            took = f"{100 * best.cpu.others:.0f}% of a core"
            print(f"  ({target.label} {mode}: programs outside the benchmark took {took}; measuring again)")
            again = self.measure(target, rnd, mode, self.args.duration)
            keep = again if again.wrk.errors else min(best, again, key=lambda s: s.cpu.others)
            best = replace(keep, discarded=best.discarded + 1)
        return best

    def run(self) -> int:
        args = self.args
        head = header(args, self.placement)
        print_header(head, args)
        self.start_targets()
        live = [t for t in self.targets.values() if not t.unavailable]
        for target in live if args.warmup > 0 else []:
            if self.measure(target, 0, "warmup", args.warmup).wrk.errors:
                print(f"!! {target.label}: errors during warmup", file=sys.stderr)
        modes = {
            "throughput": f"Throughput: {args.connections} connections, {args.threads} wrk thread(s)",
            "latency": f"Latency: {args.latency_connections} connection(s)",
        }
        for rnd in range(1, args.rounds + 1):
            for target in live:
                for mode in modes:
                    sample = self.measure_undisturbed(target, rnd, mode)
                    target.samples.append(sample)
                    print(progress_line(sample, target, args.rounds), flush=True)
        return self.finish(head, modes, live)

    def finish(self, head: dict[str, object], modes: dict[str, str], live: list[Target]) -> int:
        problems = report.print_results(self.targets, modes, self.placement.loadgen)
        notes = [n for t in live for n in report.notes(t, self.placement.loadgen)]
        problems += [
            f"{t.label} was not measured: {t.unavailable}" for t in self.targets.values() if t.unavailable
        ]
        for note in notes:
            print(f"\nnote: {note}")
        if self.args.json:
            doc = report.to_json(self.targets, head, problems)
            doc["notes"] = notes
            self.args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\nJSON written to {self.args.json}")
        for problem in problems:
            print(f"\n!! {problem}", file=sys.stderr)
        return 1 if problems else 0


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turns SIGTERM and SIGHUP into SystemExit, so the cleanup in `finally` also runs for them."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        nginx.nginx_binary()
        wrk.wrk_binary()
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, signals_raise():
        sup = Supervisor(Path(tmp))
        try:
            return Bench(args, sup).run()
        except KeyboardInterrupt:
            print("\nbench: interrupted; stopping everything it started", file=sys.stderr)
            return 130
        except SystemExit:
            print("\nbench: terminated by a signal; stopping everything it started", file=sys.stderr)
            raise
        except (RuntimeError, wrk.WrkError, OSError) as exc:
            print(f"\nbench: FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            sup.stop_all()


if __name__ == "__main__":
    sys.exit(main())
