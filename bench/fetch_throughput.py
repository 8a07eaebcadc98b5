"""Closure fetch throughput: ``lazystore fetch`` against real Nix (``nix copy``).

Builds (once, with Nix, from files on this machine) a closure of about 130 MB
of NAR: ``--blobs`` paths of ``--blob-mb`` MiB each (60 % bytes from
/dev/urandom, 40 % repeated licence text) and 40 small paths. It is copied,
signed, into zstd and xz binary caches under bench/.cache (gitignored), each
served over HTTP on 127.0.0.1 by a separate ``python -m http.server`` process.
Then, ``--runs`` times each, into a fresh empty place:

* lazystore: ``lazystore fetch TOP --substituter URL --dest DIR`` (closure),
  timed as a command (Python start-up and imports included);
* the same closure walk and fetch by ``Substituters`` in a fresh process,
  timed from the first request (what the daemon pays);
* Nix: ``nix copy --from URL --to local?root=DIR TOP`` (signatures checked).

Prints the best time of each, the ratio lazystore/Nix and ``uptime`` (the
machine is shared). Run from the checkout as::

    .venv/bin/python bench/fetch_throughput.py [--runs 3] [--compression zstd xz]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lazystore import nixtool  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "fetch"
LAZYSTORE = ROOT / ".venv" / "bin" / "lazystore"

CLOSURE_NIX = r"""
{ salt, blobs, blobMB ? "20", smalls }:
let
  mb = builtins.fromJSON blobMB;
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
    SALT = salt;
  };
  licence = "/usr/share/common-licenses/GPL-3";
  blob = i: mk "fetchbench-blob-${toString i}" ''
    mkdir -p $out/share
    head -c ${toString (mb * 1048576 * 6 / 10)} /dev/urandom > $out/share/random
    n=0; while [ $n -lt 400 ]; do cat ${licence}; n=$((n+1)); done \
      | head -c ${toString (mb * 1048576 * 4 / 10)} > $out/share/text
  '';
  small = i: mk "fetchbench-small-${toString i}" ''
    mkdir -p $out/lib $out/share/doc
    head -c ${toString (1000 + i * 700)} ${licence} > $out/share/doc/README
    head -c ${toString (4096 + i * 300)} /dev/urandom > $out/lib/data.bin
    ln -s ../share/doc/README $out/lib/readme
  '';
  deps = builtins.genList blob (builtins.fromJSON blobs)
    ++ builtins.genList small (builtins.fromJSON smalls);
in mk "fetchbench-top" ''
  mkdir -p $out/nix-support
  for p in ${toString deps}; do echo "$p" >> $out/nix-support/depends; done
''
"""


def build_closure(blobs: int, blob_mb: int) -> str:
    CACHE.mkdir(parents=True, exist_ok=True)
    expr = CACHE / "closure.nix"
    expr.write_text(CLOSURE_NIX)
    return nixcache.build(expr, salt="1", blobs=str(blobs), blobMB=str(blob_mb), smalls="40")


def make_cache(top: str, compression: str, key: nixcache.KeyPair) -> Path:
    root = CACHE / f"cache-{top.split('/')[-1][:12]}-{compression}"
    if not (root / "nix-cache-info").exists():
        shutil.rmtree(root, ignore_errors=True)
        nixcache.make_cache(top, root, key, compression=compression, listing=False)
    return root


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real cache's server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops SYNs of parallel clients (1 s stalls)


def serve(root: Path) -> None:
    """Serve *root* on 127.0.0.1 (port printed on stdout) until killed."""
    server = _Listener(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


class Server:
    """The HTTP server in its own process (no GIL shared with the client)."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"port (\d+)", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"the HTTP server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def run_lazystore(url: str, key: str, top: str, work: Path) -> float:
    """Wall time of the ``lazystore fetch`` command (interpreter start-up included)."""
    dest = work / "lazystore"
    argv = [str(LAZYSTORE), "fetch", top, "--substituter", url, "--trusted-public-key", key,
            "--dest", str(dest), "--nix-conf", "/dev/null"]
    return timed(argv, os.environ)


def run_library(url: str, key: str, top: str, work: Path) -> float:
    """Closure walk + fetch by ``Substituters`` in a child process, start-up excluded."""
    argv = [sys.executable, __file__, "--library", url, key, top, str(work / "lib")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"library run failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def library_fetch(url: str, key: str, top: str, dest: Path) -> None:
    """What ``lazystore fetch`` does, timed from the first request; prints seconds."""
    import trio

    from lazystore.cli.fetch import unpack_into
    from lazystore.nix.narinfo import NarInfo
    from lazystore.nix.storepath import StorePath
    from lazystore.substituter.client import Substituters
    from lazystore.substituter.config import SubstituterConfig

    config = SubstituterConfig(urls=[url], trusted_public_keys=[key], netrc_file=None)
    tmp = dest / ".tmp"
    tmp.mkdir(parents=True)

    async def fetch_all() -> None:
        async with Substituters(config) as subs:
            infos = await subs.closure([StorePath.parse(top)])
            limiter = trio.CapacityLimiter(config.max_parallel_fetches)

            async def one(info: NarInfo) -> None:  # as looked up: not asked again
                async with limiter:
                    await subs.fetch(info, unpack_into(dest / info.path.basename, tmp))

            async with trio.open_nursery() as nursery:
                for info in infos:
                    nursery.start_soon(one, info)

    start = time.perf_counter()
    trio.run(fetch_all)
    print(f"{time.perf_counter() - start:.3f}")


def run_nix(url: str, key: str, top: str, work: Path) -> float:
    env = nixtool.nix_env({"trusted-public-keys": key, "require-sigs": "true"})
    argv = ["nix", "copy", "--from", url, "--to", f"local?root={work / 'nix'}", top]
    return timed(argv, env)


def timed(argv: list[str], env: dict[str, str] | os._Environ[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def remove(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--library"]:
        library_fetch(*sys.argv[2:5], Path(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--blobs", type=int, default=6)
    parser.add_argument("--blob-mb", type=int, default=20)
    parser.add_argument("--compression", nargs="+", default=["zstd", "xz"])
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default /tmp)")
    args = parser.parse_args()

    top = build_closure(args.blobs, args.blob_mb)
    paths = nixcache.closure(top)
    nar_bytes = sum(int(nixcache.run_nix("nix-store", "-q", "--size", p)) for p in paths)
    key = nixcache.KeyPair.generate(CACHE / "key")
    print(f"closure: {len(paths)} paths, {nar_bytes / 1e6:.1f} MB of NAR ({top})")
    for compression in args.compression:
        root = make_cache(top, compression, key)
        packed = sum(f.stat().st_size for f in (root / "nar").iterdir())
        server = Server(root)
        runners = {"lazystore": run_lazystore, "library": run_library, "nix": run_nix}
        best = dict.fromkeys(runners, float("inf"))
        try:
            for _ in range(args.runs):
                for name, run in runners.items():
                    work = Path(tempfile.mkdtemp(prefix="fetchbench-", dir=args.dir))
                    try:
                        best[name] = min(best[name], run(server.url, key.public_key, top, work))
                    finally:
                        remove(work)
        finally:
            server.close()
        nix = best["nix"]
        print(f"{compression:5} ({packed / 1e6:.1f} MB compressed, best of {args.runs}): "
              f"nix copy {nix:.2f} s ({nar_bytes / 1e6 / nix:.0f} MB/s)")
        for name, label in (("lazystore", "lazystore fetch (command)"),
                            ("library", "Substituters (no start-up)")):
            took = best[name]
            print(f"      {label}: {took:.2f} s ({nar_bytes / 1e6 / took:.0f} MB/s), "
                  f"ratio to nix {took / nix:.2f}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
