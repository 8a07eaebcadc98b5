"""Real caching proxies for tests and benchmarks: nginx and Squid run on
127.0.0.1 with the configurations shipped in deploy/ (rendered for a private
directory and an ephemeral port), their own pid file, logs and cache.

    with nginx(workdir, upstream="127.0.0.1:8080") as proxy:
        ... proxy.url ..., proxy.cache_files(), proxy.access_log()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "lazystore-cache.conf"
SQUID_REVERSE_CONF = DEPLOY / "squid" / "lazystore-reverse.conf"
SQUID_FORWARD_CONF = DEPLOY / "squid" / "lazystore-forward.conf"
SQUID_USER = "proxy"  # Debian's cache_effective_user


def missing(program: str) -> str | None:
    """Why *program* (nginx, squid) cannot be run here, or None when it can."""
    if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
        return f"{program} is not installed (scripts/setup installs it)"
    if program == "squid" and os.geteuid() != 0:
        return "squid's test instance runs as root (it drops to the proxy user)"
    return None


def _binary(program: str) -> str:
    return shutil.which(program) or f"/usr/sbin/{program}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(template: Path, **values: str) -> str:
    """*template* with each ``@KEY@`` replaced; every placeholder must be given."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if "@" in "".join(line.split("#", 1)[0] for line in text.splitlines()):
        raise ValueError(f"{template.name}: a placeholder is left unreplaced")
    return text


@dataclass
class Proxy:
    """A running proxy: its URL (reverse) or proxy address (forward)."""

    url: str
    workdir: Path
    cache_dir: Path
    log_dir: Path

    def cache_files(self) -> list[Path]:
        return sorted(p for p in self.cache_dir.rglob("*") if p.is_file()
                      and not p.name.startswith("swap.state"))

    def access_log(self) -> list[str]:
        path = self.log_dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def error_log(self) -> str:
        for name in ("error.log", "cache.log"):
            if (self.log_dir / name).exists():
                return (self.log_dir / name).read_text()
        return ""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited ({proc.returncode}): "
                                 f"{log.read_text()[-3000:] if log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"proxy did not listen on {port}: "
                         f"{log.read_text()[-3000:] if log.exists() else ''}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Workers as root: the test's directories (pytest's tmp_path) are root's alone.
NGINX_MAIN = """\
daemon off;
user root;
worker_processes {workers};
pid {work}/nginx.pid;
error_log {logs}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format lazystore '$request_uri $status $upstream_cache_status '
                         '$body_bytes_sent enc=$sent_http_content_encoding';
    log_format lazystore_static '$request_uri $status $body_bytes_sent '
                                'range=$http_range enc=$sent_http_content_encoding';
    access_log {logs}/access.log lazystore;
    client_body_temp_path {work}/client_temp;
    proxy_temp_path {work}/proxy_temp;
    fastcgi_temp_path {work}/fastcgi_temp;
    uwsgi_temp_path {work}/uwsgi_temp;
    scgi_temp_path {work}/scgi_temp;
    {extra}
    include {work}/{server};
}}
"""

# A binary cache folder served as static files (nginx honours Range on them).
NGINX_STATIC = """server {{
    listen {listen};
    root {root};
    access_log {logs}/access.log lazystore_static;
}}
"""


@contextmanager
def nginx(workdir: Path, upstream: str, extra: str = "", workers: int = 1,
          port: int | None = None) -> Iterator[Proxy]:
    """deploy/nginx/lazystore-cache.conf in front of *upstream* (host:port).

    *extra* goes into the http block (another server, ``gzip on`` ...)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cache, logs = workdir / "cache", workdir / "logs"
    logs.mkdir(exist_ok=True)
    port = port or free_port()
    (workdir / "lazystore-cache.conf").write_text(render(
        NGINX_CONF, LISTEN=f"127.0.0.1:{port}", UPSTREAM=upstream, CACHE_DIR=str(cache)))
    with _nginx(workdir, "lazystore-cache.conf", port, extra, workers) as proxy:
        yield proxy


@contextmanager
def nginx_static(workdir: Path, root: Path, extra: str = "") -> Iterator[Proxy]:
    """nginx serving the folder *root* (a binary cache) as it is, Range
    honoured; access log lines ``<uri> <status> <body bytes> range=<Range
    asked> enc=<Content-Encoding>`` (*extra*: into the http block, e.g. ``gzip on``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    (workdir / "static.conf").write_text(NGINX_STATIC.format(
        listen=f"127.0.0.1:{port}", root=root, logs=logs))
    with _nginx(workdir, "static.conf", port, extra) as proxy:
        yield proxy


@contextmanager
def _nginx(workdir: Path, server: str, port: int, extra: str = "", workers: int = 1
           ) -> Iterator[Proxy]:
    """nginx running *workdir*/*server* on *port*, always stopped."""
    cache, logs = workdir / "cache", workdir / "logs"
    main = workdir / "nginx.conf"
    main.write_text(NGINX_MAIN.format(work=workdir, logs=logs, extra=extra, workers=workers,
                                      server=server))
    argv = [_binary("nginx"), "-c", str(main), "-p", str(workdir), "-e", str(logs / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    if check.returncode != 0:
        raise AssertionError(f"nginx -t: {check.stderr}")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, logs / "error.log")
        yield Proxy(f"http://127.0.0.1:{port}", workdir, cache, logs)
    finally:
        _stop(proc, signal.SIGQUIT)  # graceful: workers finish, then exit


SQUID_MAIN = """\
pid_filename {work}/squid.pid
cache_log {logs}/cache.log
cache_store_log none
coredump_dir {work}
cache_effective_user {user}
shutdown_lifetime 1 seconds
pinger_enable off
icp_port 0
htcp_port 0
dns_nameservers 127.0.0.1
logformat lazystore %ru %>Hs %Ss %<st
access_log stdio:{logs}/access.log lazystore
include {work}/lazystore.conf
{extra}
"""


@contextmanager
def squid(forward: bool = False, upstream: tuple[str, int] | None = None,
          extra: str = "") -> Iterator[Proxy]:
    """deploy/squid/lazystore-{reverse,forward}.conf on an ephemeral port
    (*extra*: directives after it, which override its own).

    Squid drops to the ``proxy`` user, so its directory is a fresh one under
    the system temporary directory (pytest's tmp_path is root's alone)."""
    work = Path(tempfile.mkdtemp(prefix="lazystore-squid-"))
    try:
        cache, logs = work / "cache", work / "logs"
        cache.mkdir()
        logs.mkdir()
        port = free_port()
        if forward:
            text = render(SQUID_FORWARD_CONF, LISTEN=f"127.0.0.1:{port}", CACHE_DIR=str(cache))
        else:
            assert upstream is not None
            text = render(SQUID_REVERSE_CONF, LISTEN=f"127.0.0.1:{port}",
                          UPSTREAM_HOST=upstream[0], UPSTREAM_PORT=str(upstream[1]),
                          CACHE_DIR=str(cache))
        (work / "lazystore.conf").write_text(text)
        main = work / "squid.conf"
        main.write_text(SQUID_MAIN.format(work=work, logs=logs, user=SQUID_USER, extra=extra))
        shutil.chown(work, SQUID_USER)
        for path in (cache, logs):
            shutil.chown(path, SQUID_USER, SQUID_USER)
        init = subprocess.run([_binary("squid"), "-N", "-z", "-f", str(main)],
                              capture_output=True, text=True, timeout=60)
        if init.returncode != 0:
            raise AssertionError(f"squid -z: {init.stderr}{(logs / 'cache.log').read_text()}")
        proc = subprocess.Popen([_binary("squid"), "-N", "-f", str(main)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port, proc, logs / "cache.log")
            yield Proxy(f"http://127.0.0.1:{port}", work, cache, logs)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
