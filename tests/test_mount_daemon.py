"""The daemon for real: `lazystore mount` as a subprocess, a real FUSE mount,
a real HTTP binary cache written by Nix, real programs reading through it."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import LAZYSTORE, Daemon, fuse_missing, is_mounted
from lazystore.testing.daemon import lazystore_mount as support_mount
from lazystore.testing.httpserver import serve_directory

pytestmark = pytest.mark.root


def _need_fuse() -> None:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)


@contextmanager
def lazystore_mount(root: Path, url: str, key: str, *extra: str) -> Iterator[Daemon]:
    _need_fuse()
    with support_mount(root, url, key, *extra) as daemon:
        yield daemon


@contextmanager
def served_copy(cache: nixcache.BinaryCache, dest: Path) -> Iterator[object]:
    """A private copy of *cache* behind its own HTTP server (so tests can count
    requests and break files without disturbing others)."""
    shutil.copytree(cache.root, dest)
    with serve_directory(dest) as server:
        yield server


def nar_requests(server: object) -> list[str]:
    return [r for r in server.requests if r.startswith("/nar/")]  # type: ignore[attr-defined]


def by_name(paths: list[str], name: str) -> str:
    return next(os.path.basename(p) for p in paths if p.endswith(f"-{name}"))


def test_program_runs_from_the_mount_and_unread_path_is_not_fetched(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    with lazystore_mount(tmp_path, http_cache, binary_cache.key.public_key) as d:
        prog = f"{binary_cache.top}/bin/prog"
        script = f"mount --bind {d.mnt} /nix/store && exec {prog}"
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], capture_output=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"hello from liba\n"
        fetched = d.status()["paths_materialized"]
        paths = binary_cache.paths
        assert by_name(paths, "docs") not in fetched
        for name in ("prog", "busybox", "liba"):
            assert by_name(paths, name) in fetched
        text = subprocess.run(
            [LAZYSTORE, "status", "--control-socket", str(d.sock)],
            capture_output=True, text=True, check=True,
        ).stdout
        assert by_name(paths, "liba") in text and by_name(paths, "docs") not in text


def test_listing_and_stat_download_no_nar_reading_does(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    with served_copy(binary_cache, tmp_path / "www") as server, lazystore_mount(
        tmp_path, server.url, binary_cache.key.public_key  # type: ignore[attr-defined]
    ) as d:
        docs = d.mnt / by_name(binary_cache.paths, "docs")
        assert sorted(os.listdir(docs / "share/doc")) == ["README", "manual.txt"]
        st = os.stat(docs / "share/doc/manual.txt")
        assert st.st_size == 1 << 20 and st.st_mode & 0o777 == 0o444 and st.st_uid == 0
        assert st.st_mtime == 1
        assert nar_requests(server) == []
        assert any(r.endswith(".ls") for r in server.requests)  # type: ignore[attr-defined]
        assert (docs / "share/doc/README").read_bytes() == b"never read at start\n"
        assert len(nar_requests(server)) == 1
        with pytest.raises(OSError) as info:
            (docs / "new").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        before = len(server.requests)  # type: ignore[attr-defined]
        for name in ("not-a-store-path", ".hidden", "e" * 32 + "-bad-hash", "x" * 300):
            with pytest.raises(OSError) as info:
                os.stat(d.mnt / name)
            assert info.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
        assert len(server.requests) == before  # type: ignore[attr-defined]  # no network
        assert docs.name in os.listdir(d.mnt)  # the root lists the paths known


def test_hundred_concurrent_readers_one_download(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    docs = by_name(binary_cache.paths, "docs")
    expected = Path(f"/nix/store/{docs}/share/doc/manual.txt").read_bytes()
    with served_copy(binary_cache, tmp_path / "www") as server, lazystore_mount(
        tmp_path, server.url, binary_cache.key.public_key  # type: ignore[attr-defined]
    ) as d:
        target = d.mnt / docs / "share/doc/manual.txt"
        results: list[bytes | BaseException] = []
        barrier = threading.Barrier(100)

        def reader() -> None:
            barrier.wait()
            try:
                results.append(target.read_bytes())
            except OSError as exc:
                results.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 100
        assert all(r == expected for r in results)
        assert len(nar_requests(server)) == 1


class Proxy:
    """A TCP forwarder to a server that can be taken down and brought back,
    dropping every open connection (a real outage, keep-alive included)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        self.up = False
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def close(self) -> None:
        self.down()
        self.listener.close()


@pytest.mark.parametrize("failure", ["corrupt NAR", "server down"])
def test_fetch_failure_is_eio_in_bounded_time_then_recovers(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, failure: str
) -> None:
    liba = by_name(binary_cache.paths, "liba")
    with served_copy(binary_cache, tmp_path / "www") as server:
        narinfo = (tmp_path / "www" / f"{liba[:32]}.narinfo").read_text()
        url = next(ln.split(": ", 1)[1] for ln in narinfo.splitlines() if ln.startswith("URL: "))
        nar = tmp_path / "www" / url
        good = nar.read_bytes()
        proxy = Proxy(server.server_address[1])  # type: ignore[attr-defined]
        try:
            with lazystore_mount(
                tmp_path, f"http://127.0.0.1:{proxy.port}", binary_cache.key.public_key,
                "--attempts", "2", "--connect-timeout", "2", "--stall-timeout", "5",
            ) as d:
                data = d.mnt / liba / "lib/data"
                assert os.stat(data).st_size == 16  # metadata from the listing
                if failure == "corrupt NAR":
                    nar.write_bytes(good[:-64] + bytes(64))
                else:
                    proxy.down()
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    data.read_bytes()
                assert info.value.errno == errno.EIO
                assert time.monotonic() - start < 60
                assert liba not in d.status()["paths_materialized"]
                nar.write_bytes(good)
                proxy.up = True
                assert data.read_bytes() == b"hello from liba\n"
                assert liba in d.status()["paths_materialized"]
        finally:
            proxy.close()


def _du(path: Path) -> int:
    total = os.lstat(path).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_quota_evicts_oldest_keeps_open_refetches(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    paths = binary_cache.paths
    liba, docs, busybox = (by_name(paths, n) for n in ("liba", "docs", "busybox"))
    key = binary_cache.key.public_key
    with lazystore_mount(tmp_path, http_cache, key) as d:  # sizes on the cache's filesystem
        d.call("prefetch", paths=[liba, docs, busybox])
        sizes = {b: _du(d.cache / "store" / b) for b in (liba, docs, busybox)}
        d.call("evict", paths=[])
    limit = sizes[docs] + sizes[busybox] - 1  # docs and busybox never fit together
    with lazystore_mount(tmp_path, http_cache, key, "--cache-size", str(limit)) as d:
        files = {liba: "lib/data", docs: "share/doc/manual.txt", busybox: "bin/busybox"}
        expected = {b: (Path("/nix/store") / b / f).read_bytes() for b, f in files.items()}

        def read(base: str) -> None:
            assert (d.mnt / base / files[base]).read_bytes() == expected[base]

        read(liba)
        time.sleep(0.05)
        read(docs)
        time.sleep(0.05)
        read(busybox)  # over the limit: liba, then docs (the oldest) go
        st = d.status()
        assert st["paths_materialized"] == [busybox]
        assert st["cache_bytes"] <= limit
        df = os.statvfs(d.mnt)  # df: the quota, and what the cache holds of it
        assert df.f_blocks == limit // df.f_frsize
        assert (df.f_blocks - df.f_bfree) * df.f_frsize >= st["cache_bytes"]
        with open(d.mnt / busybox / files[busybox], "rb") as held:  # an open file
            read(docs)  # over the limit again, but busybox is in use
            assert sorted(d.status()["paths_materialized"]) == sorted([busybox, docs])
            assert held.read() == expected[busybox]
        time.sleep(0.05)
        read(liba)  # busybox is closed now and the oldest: it goes
        assert busybox not in d.status()["paths_materialized"]
        read(busybox)  # evicted, read again: fetched again, right bytes
        # liba, docs, busybox, docs again, liba again, busybox again (this daemon)
        assert d.status()["nars_fetched"] == 6


def test_view_as_overlay_lowerdir(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    key = binary_cache.key.public_key
    paths = [p for p in binary_cache.paths if not p.endswith("-docs")]
    with lazystore_mount(tmp_path, http_cache, key) as d:
        view = d.call("view_create", id="ctr1", paths=paths)
        lower = Path(view["path"])  # type: ignore[index]
        assert lower == d.mnt / ".views/ctr1"
        upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
        for p in (upper, work, merged):
            p.mkdir()
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       check=True, capture_output=True)
        try:
            store = merged / "nix/store"
            assert sorted(os.listdir(store)) == sorted(os.path.basename(p) for p in paths)
            liba = by_name(paths, "liba")
            assert (store / liba / "lib/data").read_bytes() == b"hello from liba\n"
            assert os.stat(store / liba / "lib/data").st_ino != 0
            (merged / "etc").mkdir()
            (merged / "etc/hostname").write_text("container\n")
            (store / liba / "lib/data").write_text("changed\n")  # copy-up into upper
            assert (upper / "etc/hostname").read_text() == "container\n"
            assert (upper / "nix/store" / liba / "lib/data").read_text() == "changed\n"
            assert (d.mnt / liba / "lib/data").read_bytes() == b"hello from liba\n"
        finally:
            subprocess.run(["umount", str(merged)], check=False)
        d.call("view_remove", id="ctr1")
        assert d.status()["views"] == []
        assert not (d.mnt / ".views/ctr1").exists()
        liba = by_name(paths, "liba")
        d.call("view_create", id="ctr1", paths=[liba])  # same id, other paths
        assert os.listdir(d.mnt / ".views/ctr1/nix/store") == [liba]


def test_second_daemon_refuses_and_sigterm_unmounts(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    key = binary_cache.key.public_key
    with lazystore_mount(tmp_path, http_cache, key) as d:
        other = Daemon(tmp_path, http_cache, key)
        other.sock = tmp_path / "other.sock"
        argv = [a if a != str(d.sock) else str(other.sock) for a in other.argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert "another lazystore daemon is serving" in out.stderr
        assert is_mounted(d.mnt)
        # another mountpoint, but the live daemon's control socket: refused, no mount left
        argv = [a if a != str(d.mnt) else str(tmp_path / "mnt2") for a in d.argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert "another lazystore daemon is listening" in out.stderr
        assert not is_mounted(tmp_path / "mnt2")
        assert d.stop() == 0
        assert not is_mounted(d.mnt)
        assert not d.sock.exists()


def test_prefetch_closure_and_evict_from_the_cli(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with lazystore_mount(tmp_path, http_cache, binary_cache.key.public_key) as d:
        ctl = ["--control-socket", str(d.sock)]
        out = subprocess.run([LAZYSTORE, "prefetch", binary_cache.top, "--closure", *ctl],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        everything = sorted(os.path.basename(p) for p in binary_cache.paths)
        assert d.status()["paths_materialized"] == everything
        assert all((d.cache / "store" / b).is_dir() for b in everything)
        out = subprocess.run([LAZYSTORE, "evict", *ctl], capture_output=True, text=True,
                             timeout=60, check=True)
        evicted = out.stdout.split()
        assert sorted(evicted) == everything
        assert d.status()["paths_materialized"] == [] and d.status()["cache_bytes"] == 0
        liba = by_name(binary_cache.paths, "liba")
        assert (d.mnt / liba / "lib/data").read_bytes() == b"hello from liba\n"
        bad = subprocess.run([LAZYSTORE, "prefetch", "/nix/store/not-a-path", *ctl],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_ready_is_notified_once_mounted_and_listening(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    _need_fuse()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        with open(d.log, "ab") as log:
            d.proc = subprocess.Popen(d.argv, stdout=log, stderr=log, env=env)
        # sd_notify: newline-separated assignments (READY=1 with a STATUS= line)
        assert b"READY=1" in notify.recv(4096).split(b"\n")
        # no waiting: by READY=1 the mount is up and the control socket answers
        assert is_mounted(d.mnt) and d.status()["mount_point"] == str(d.mnt)
    finally:
        d.stop()
        notify.close()


def test_bad_cache_dir_is_one_line_and_mounts_nothing(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    (tmp_path / "file").write_text("not a directory")
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key)
    argv = [a if a != str(d.cache) else str(tmp_path / "file" / "cache") for a in d.argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [errors[0]] and "cannot use the cache directory" in errors[0]
    assert "Traceback" not in out.stderr
    assert not is_mounted(d.mnt)


def test_more_open_files_than_the_inherited_soft_limit(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """Every file open through the mount holds a daemon descriptor; a daemon
    started with systemd's soft limit (1024, here 64) must not answer EIO
    (its EMFILE) once that many files are open: it lifts the limit."""
    _need_fuse()
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    # --no-binds: opens below a bind of the fetched path would not reach the daemon
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, "--no-binds")
    d.argv = ["prlimit", "--nofile=64:4096", "--", *d.argv]
    try:
        d.start()
        data = d.mnt / by_name(binary_cache.paths, "liba") / "lib/data"
        files = []
        try:
            for _ in range(200):
                files.append(open(data, "rb"))  # noqa: SIM115
            assert all(f.read() == b"hello from liba\n" for f in files)
            assert d.status()["open_files"] == 200
        finally:
            for f in files:
                f.close()
    finally:
        d.stop()
