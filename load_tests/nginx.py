"""nginx configurations for the benchmark: a fixed-response fake Triton backend, and a weighted proxy.

Each instance gets its own prefix directory (config, pid, logs, temp paths), so nothing touches the
system's nginx and any number of instances can run side by side.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

from procs import Child, Supervisor, wait_for_port

MODEL = "fraud_detector"
VERSIONS = ("3", "4")  # Triton's numeric versions behind the gateway's "2.1.3" and "2.2.0"
PUBLIC_MODEL = "fraud-detector"
SPLIT = {"3": 90, "4": 10}  # percent, as in the gateway's routes file


def infer_response(version: str) -> str:
    """A KServe v2 response that differs per version, so a caller can tell which version answered."""
    body = {
        "model_name": MODEL,
        "model_version": version,
        "outputs": [
            {"name": "OUTPUT__0", "datatype": "FP32", "shape": [1, 1], "data": [float(version) * 11]}
        ],
    }
    return json.dumps(body, separators=(",", ":"))


def _main_block(workers: int, server: str) -> str:
    # keepalive_requests is raised on every side because nginx's default of 1000 would make wrk and
    # the proxies reconnect every few milliseconds at these rates, measuring connection setup
    # instead of request handling.
    return f"""
worker_processes {workers};
pid nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 4096; accept_mutex off; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
{server}
}}
"""


def backend_conf(port: int, workers: int) -> str:
    """A stand-in for Triton: fixed inference answers per version, plus the health and metadata
    endpoints a gateway may probe before it sends traffic."""
    locations = []
    for version in VERSIONS:
        base = f"/v2/models/{MODEL}/versions/{version}"
        meta = json.dumps({"name": MODEL, "versions": [version], "platform": "bench"}, separators=(",", ":"))
        locations.append(
            f"""        location = {base}/infer {{ return 200 '{infer_response(version)}'; }}
        location = {base}/ready {{ return 200 ''; }}
        location = {base} {{ return 200 '{meta}'; }}"""
        )
    server = f"""    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        default_type application/json;
        location = /v2/health/live {{ return 200 ''; }}
        location = /v2/health/ready {{ return 200 ''; }}
        location = /v2 {{ return 200 '{{"name":"bench-backend","version":"0","extensions":[]}}'; }}
        location = /v2/models/{MODEL}/ready {{ return 200 ''; }}
{chr(10).join(locations)}
        location / {{ return 404 '{{"error":"unknown path"}}'; }}
    }}"""
    return _main_block(workers, server)


def proxy_conf(port: int, backend_port: int) -> str:
    """The C reference for the gateway's data plane: same public path, same 90/10 split, pooled
    keep-alive upstream. One worker, because the gateway is measured with one worker too."""
    split = "\n".join(f"        {pct}% {v};" for v, pct in list(SPLIT.items())[:-1])
    last = list(SPLIT)[-1]
    # $request_id is random per request, which makes this a weighted random split like the gateway's.
    server = f"""    split_clients "${{request_id}}" $bench_version {{
{split}
        * {last};
    }}
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v2/models/{PUBLIC_MODEL}/infer {{
            proxy_pass http://bench_backend/v2/models/{MODEL}/versions/$bench_version/infer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return _main_block(1, server)


def nginx_binary() -> str:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx not found; run load_tests/ensure_tools.sh")
    return found


@dataclass
class NginxServer:
    name: str
    port: int
    child: Child


def start_nginx(supervisor: Supervisor, name: str, conf: str, port: int, core: int | None) -> NginxServer:
    prefix = supervisor.workdir / name
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    # Started as root, nginx runs its workers as "nobody", who must be able to reach the temp paths
    # (used for bodies larger than the in-memory buffers) through the private 0700 work directory.
    for directory in (supervisor.workdir, prefix):
        directory.chmod(0o711)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    binary = nginx_binary()
    # -e: without it nginx first opens its compiled-in /var/log/nginx/error.log, which a non-root
    # user cannot write. "daemon off" keeps the master as our direct child, so we can stop it.
    argv = [binary, "-p", f"{prefix}/", "-c", str(conf_path), "-e", str(prefix / "logs/error.log")]
    child = supervisor.start(name, [*argv, "-g", "daemon off;"], core)
    wait_for_port(port, child, timeout=10)
    return NginxServer(name, port, child)
