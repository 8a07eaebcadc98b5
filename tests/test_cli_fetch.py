"""``lazystore fetch`` end to end: real Nix caches, a real HTTP server."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.cli import main
from lazystore.nix.storepath import StorePath
from lazystore.testing import nixcache
from lazystore.testing.httpserver import serve_directory
from tests.support.faultserver import Fault, FaultServer
from tests.support.terminal import run_on_terminal


def nix_hash(path: Path) -> str:
    digest = nixcache.nar_hash(str(path))
    return digest if digest.startswith("sha256:") else f"sha256:{digest}"


def narinfo_hash(cache: nixcache.BinaryCache, path: str) -> str:
    text = cache.narinfo_path(path).read_text()
    return next(line.split(": ", 1)[1] for line in text.splitlines()
                if line.startswith("NarHash: "))


def base_args(cache: nixcache.BinaryCache, url: str, dest: Path, tmp_path: Path) -> list[str]:
    return ["fetch", "--substituter", url, "--trusted-public-key", cache.key.public_key,
            "--dest", str(dest), "--nix-conf", str(tmp_path / "no-nix.conf")]


def named(cache: nixcache.BinaryCache, name: str) -> str:
    return next(p for p in cache.paths if p.endswith(f"-{name}"))


def test_fetch_materialises_the_closure(binary_cache: nixcache.BinaryCache, http_cache: str,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    dest = tmp_path / "out"
    assert main(base_args(binary_cache, http_cache, dest, tmp_path) + [binary_cache.top]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        Path(p).name for p in binary_cache.paths)  # no temporaries left either
    for path in binary_cache.paths:
        assert nix_hash(dest / Path(path).name) == narinfo_hash(binary_cache, path)
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]  # one summary line, no progress bar
    assert err.startswith(f"fetched {len(binary_cache.paths)} paths;") and "\r" not in err


def test_file_and_symlink_store_paths_are_fetched_as_what_they_are(
        roots_cache: nixcache.BinaryCache, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert main(base_args(roots_cache, roots_cache.url, dest, tmp_path) + [roots_cache.top]) == 0
    for path in roots_cache.paths:
        got = dest / Path(path).name
        assert stat.S_IFMT(os.lstat(got).st_mode) == stat.S_IFMT(os.lstat(path).st_mode), path
        assert nix_hash(got) == narinfo_hash(roots_cache, path)


def test_no_closure_fetches_only_the_named_paths(binary_cache: nixcache.BinaryCache,
                                                 tmp_path: Path) -> None:
    dest = tmp_path / "out"
    base = Path(binary_cache.top).name  # base names are accepted too
    assert main(base_args(binary_cache, binary_cache.url, dest, tmp_path)
                + ["--no-closure", base]) == 0
    assert [p.name for p in dest.iterdir()] == [base]


def test_present_paths_are_not_fetched_again(binary_cache: nixcache.BinaryCache,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    with serve_directory(binary_cache.root) as server:
        args = base_args(binary_cache, server.url, dest, tmp_path)  # type: ignore[attr-defined]
        assert main(args + [named(binary_cache, "liba"), "--no-closure"]) == 0
        capsys.readouterr()
        assert main(args + [binary_cache.top]) == 0
        requests = server.requests  # type: ignore[attr-defined]
    nar_requests = [r for r in requests if r.startswith("/nar/")]
    assert len(nar_requests) == len(binary_cache.paths)  # liba's NAR once, not twice
    err = capsys.readouterr().err
    assert f"fetched {len(binary_cache.paths) - 1} paths, 1 already present" in err


def test_failed_paths_get_one_line_each_and_the_rest_stays(
        binary_cache: nixcache.BinaryCache, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    absent = f"/nix/store/{'1' * 32}-absent"
    liba = named(binary_cache, "liba")
    code = main(base_args(binary_cache, binary_cache.url, dest, tmp_path) + [absent, liba])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("lazystore: error:")]
    assert errors == [f"lazystore: error: no substituter has {absent}"]
    assert nix_hash(dest / Path(liba).name) == narinfo_hash(binary_cache, liba)


def test_defaults_come_from_nix_conf(binary_cache: nixcache.BinaryCache,
                                     tmp_path: Path) -> None:
    conf = tmp_path / "nix.conf"
    conf.write_text(f"substituters = {binary_cache.url}\n"
                    f"trusted-public-keys = {binary_cache.key.public_key}\n")
    dest = tmp_path / "out"
    assert main(["fetch", "--nix-conf", str(conf), "--dest", str(dest), binary_cache.top]) == 0
    assert len(list(dest.iterdir())) == len(binary_cache.paths)


@pytest.mark.allow_log('no valid signature by a trusted key')
def test_untrusted_cache_fails_with_one_line(binary_cache: nixcache.BinaryCache,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    args = ["fetch", "--substituter", binary_cache.url, "--dest", str(dest),
            "--nix-conf", str(tmp_path / "none.conf"), "--no-closure", binary_cache.top]
    assert main(args) == 1  # only cache.nixos.org's key is trusted by default
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("lazystore: error:")]
    assert errors == [f"lazystore: error: no substituter has {binary_cache.top}"]
    assert list(dest.iterdir()) == []


def test_invalid_store_path_is_one_clear_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fetch", "--substituter", "file:///nonexistent", "--dest", str(tmp_path),
                 "--nix-conf", str(tmp_path / "none.conf"), "/nix/store/not-a-path"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lazystore: error:") and "\n" not in err


def test_progress_bar_on_a_terminal(binary_cache: nixcache.BinaryCache,
                                    tmp_path: Path) -> None:
    dest = tmp_path / "out"
    args = base_args(binary_cache, binary_cache.url, dest, tmp_path) + [binary_cache.top]
    code, text = run_on_terminal([sys.executable, "-m", "lazystore", *args],
                                 cwd=Path(__file__).parents[1])
    assert code == 0
    total = len(binary_cache.paths)
    assert "\r[" in text and f"{total}/{total} paths" in text and "MiB/s" in text
    assert StorePath.from_basename(Path(binary_cache.top).name).basename in {
        p.name for p in dest.iterdir()}


def test_fetch_start_up_imports_no_other_command() -> None:
    """Start-up counts in the fetch's time: only the fetch command is loaded."""
    code = ("import sys\n"
            "from lazystore.cli import main\n"
            "try:\n    main(['fetch', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('lazystore.cli.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "['lazystore.cli.fetch']"


@contextlib.contextmanager
def _fetch_stalled_mid_nar(
    binary_cache: nixcache.BinaryCache, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``lazystore fetch`` of busybox into tmp_path/out, its NAR stalled after
    4 KiB: yields the process once its first bytes are being unpacked (killed
    on the way out if still running) and DEST."""
    busybox = named(binary_cache, "busybox")
    nar = "/" + next(line.split(": ", 1)[1] for line in
                     binary_cache.narinfo_path(busybox).read_text().splitlines()
                     if line.startswith("URL: "))
    dest = tmp_path / "out"
    with FaultServer(binary_cache.root) as server:
        server.always(nar, Fault.stall(after=4096))
        argv = [sys.executable, "-m", "lazystore", *base_args(binary_cache, server.url,
                                                                  dest, tmp_path),
                "--no-closure", busybox]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while server.count(nar) == 0 and proc.poll() is None:
                assert time.monotonic() < deadline, "the NAR was never requested"
                time.sleep(0.05)
            time.sleep(0.3)  # the first bytes are being unpacked
            yield proc, dest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_mid_download_leaves_nothing_partial(binary_cache: nixcache.BinaryCache,
                                                     tmp_path: Path) -> None:
    with _fetch_stalled_mid_nar(binary_cache, tmp_path) as (proc, dest):
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err
    assert list(dest.iterdir()) == []  # no partial path, no temporary folder


def test_kill9_mid_download_leaves_a_temporary_the_next_run_removes(
    binary_cache: nixcache.BinaryCache, tmp_path: Path
) -> None:
    """A run killed with SIGKILL cannot clean up: its .lazystore-tmp-* folder
    stays, and the next run into the same folder removes it (not the folder of
    a run still going, whose lock it respects)."""
    import fcntl

    with _fetch_stalled_mid_nar(binary_cache, tmp_path) as (proc, dest):
        proc.kill()
        proc.communicate(timeout=60)
    left = [p.name for p in dest.iterdir()]
    assert len(left) == 1 and left[0].startswith(".lazystore-tmp-")
    live = dest / ".lazystore-tmp-live"
    live.mkdir()
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a run that is still going holds it
    try:
        liba = named(binary_cache, "liba")
        with FaultServer(binary_cache.root) as server:
            out = subprocess.run(
                [sys.executable, "-m", "lazystore",
                 *base_args(binary_cache, server.url, dest, tmp_path), "--no-closure", liba],
                capture_output=True, text=True, timeout=120,
            )
        assert out.returncode == 0, out.stderr
        assert sorted(p.name for p in dest.iterdir()) == sorted(
            [".lazystore-tmp-live", os.path.basename(liba)])
    finally:
        os.close(held)


@pytest.mark.root
def test_a_full_dest_disk_is_one_line_and_leaves_nothing_partial(
        binary_cache: nixcache.BinaryCache, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """DEST on a real 512 KiB file system (tmpfs): docs (1 MiB) cannot fit."""
    dest = tmp_path / "small"
    dest.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(dest)], check=True)
    try:
        docs, liba = named(binary_cache, "docs"), named(binary_cache, "liba")
        args = base_args(binary_cache, binary_cache.url, dest, tmp_path) + ["--no-closure"]
        assert main(args + [docs]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("lazystore: error:")]
        assert errors == [f"lazystore: error: cannot write {dest / Path(docs).name}: "
                          "No space left on device"]
        assert list(dest.iterdir()) == []  # no partial path, no temporary
        assert main(args + [liba]) == 0  # and the room it took is free again
        assert nix_hash(dest / Path(liba).name) == narinfo_hash(binary_cache, liba)
    finally:
        subprocess.run(["umount", str(dest)], check=True)
