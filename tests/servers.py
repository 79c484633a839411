"""Real servers on 127.0.0.1 for the tests: nginx, SeaweedFS (S3), and a web server that
misbehaves on purpose, for the faults a real server cannot be made to produce."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

S3_KEY = "cafuse-test-key"
S3_SECRET = "cafuse-test-secret-do-not-log"


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A port free on 127.0.0.1 (from a range whose +10000 is free too, for SeaweedFS)."""
    for _ in range(200):
        port = random.randrange(low, high)
        if all(_port_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Nginx:
    root: Path
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""  # pytest's temp dirs are 0700
        conf.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {w}/access.log;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location / {{ }}
    }}
}}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(w)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def bytes_sent(self) -> int:
        """Body bytes nginx has sent so far, from its access log."""
        log = self.workdir / "access.log"
        total = 0
        if log.exists():
            for line in log.read_text().splitlines():
                parts = line.split('"')
                if len(parts) > 2:
                    fields = parts[2].split()
                    if len(fields) >= 2 and fields[1].isdigit() and fields[0] == "200":
                        total += int(fields[1])
        return total


@contextlib.contextmanager
def nginx_serving(root: Path, workdir: Path) -> Iterator[Nginx]:
    server = Nginx(root, free_port(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SeaweedFS:
    workdir: Path
    s3_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "cafuse",
                            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self._log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        ports = [free_port() for _ in range(6)]
        self.s3_port = ports[3]
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}",
                f"-volume.port={ports[1]}",
                f"-filer.port={ports[2]}",
                "-s3",
                f"-s3.port={self.s3_port}",
                f"-s3.config={config}",
                "-s3.autoCreateBucket",
                f"-s3.port.iceberg={ports[4]}",
                f"-s3.port.lance={ports[5]}",
                "-volume.max=50",
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        wait_for_port(self.s3_port, timeout=60, proc=self.proc)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        """Until an S3 request gets an answer: the port opens before the filer is ready."""
        probe = [
            os.sys.executable,
            "-c",
            "from cafuse.stores import open_store;"
            "open_store('s3://cafuse-probe/x').put(bytes(32), b'ready')",
        ]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}")
            if subprocess.run(probe, env=self.env(), capture_output=True).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("SeaweedFS S3 not ready after {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- a server that misbehaves


@dataclass
class Faults:
    """What the faulty server does to each request: with probability ``rate`` one of
    ``kinds`` (500, 429, 403, reset, stall, truncate, wrong, huge), decided by a seeded
    generator.
    ``get_only`` answers HEAD with 501, as many static hosts and CDNs do; the first
    ``spare`` requests are served faithfully."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ()
    stall_seconds: float = 30.0
    methods: tuple[str, ...] = ("GET", "HEAD")
    seed: int = 1
    get_only: bool = False
    spare: int = 0
    requests: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def pick(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests.append(path)
            if method == "HEAD" and self.get_only:
                return "501"
            if len(self.requests) <= self.spare:
                return None
            if method in self.methods and self.kinds and self._rng.random() < self.rate:
                fault = self._rng.choice(self.kinds)
                self.faults.append(fault)
                return fault
            return None


class _FaultyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    root: Path
    faults: Faults

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = self.root / self.path.split("?")[0].lstrip("/")
        fault = self.faults.pick(self.command, self.path)
        if fault == "stall":
            time.sleep(self.faults.stall_seconds)
            self.close_connection = True
            return
        if fault == "reset":
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            self.connection.close()
            return
        if fault in ("500", "501", "403"):
            self._reply(int(fault), b"refused\n")
            return
        if fault == "429":
            self._reply(429, b"slow down\n", headers={"Retry-After": "1"})
            return
        if not path.is_file():
            self._reply(404, b"not found\n")
            return
        body = path.read_bytes()
        if fault == "wrong":
            body = bytes(b ^ 0x5A for b in body)
        if fault == "huge":  # claims 100 GiB, sends a little, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(100 << 30))
            self.end_headers()
            self.wfile.write(body[:1000])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "truncate":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(200, b"" if head else body, length=len(body))

    def _reply(
        self,
        code: int,
        body: bytes,
        length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)


@contextlib.contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on loopback answering with ``handler``: its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def faulty_server(root: Path, faults: Faults) -> Iterator[str]:
    handler = type("Handler", (_FaultyHandler,), {"root": root, "faults": faults})
    with serve_http(handler) as url:
        yield url


class DarkListener:
    """Accepts connections and never answers: a store behind a black hole. Counts what
    reached it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.connections = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/store"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


@contextlib.contextmanager
def dark_listener() -> Iterator[DarkListener]:
    dark = DarkListener()
    try:
        yield dark
    finally:
        dark.close()


def nginx_bytes_sent(access_log: Path, name: str) -> int:
    """Body bytes nginx sent for ``name`` (whole and ranged answers), from its access log."""
    total = 0
    for line in access_log.read_text().splitlines():
        parts = line.split('"')
        if len(parts) > 2 and f"/{name} " in parts[1]:
            status, size = parts[2].split()[:2]
            if status in ("200", "206"):
                total += int(size)
    return total
