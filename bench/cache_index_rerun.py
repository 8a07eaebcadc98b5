"""How long a rerun of ``lazystore cache index`` takes over a cache it indexed.

A file:// binary cache of --paths synthetic store paths (each a directory of
--files files of 10-3000 random bytes, uncompressed NARs, signed narinfos) is
written to a temporary folder and indexed once; then the rerun, which skips
every path, is timed --runs times (wall clock of the whole command, as a user
sees it). With ``--other CHECKOUT`` the same reruns of that checkout's
package (PYTHONPATH) are interleaved with this one's: an A/B on the same load.

    .venv/bin/python bench/cache_index_rerun.py --paths 2000 --files 20 --other /work/main
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lazystore.nix import base32
from lazystore.nix.hashes import Hash
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey, sign_narinfo
from lazystore.testing.nartree import TreeDir, TreeFile, pack


def make_cache(dest: Path, paths: int, files: int, secret: SecretKey) -> None:
    (dest / "nar").mkdir(parents=True)
    (dest / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n")
    rng = random.Random(1)
    for i in range(paths):
        tree = TreeDir({b"share": TreeDir({
            f"f{j:05d}".encode(): TreeFile(rng.randbytes(rng.randint(10, 3000)))
            for j in range(files)})})
        nar_bytes = pack(tree)
        digest = Hash("sha256", hashlib.sha256(nar_bytes).digest())
        hash_part = base32.encode(hashlib.sha256(b"path %d" % i).digest()[:20])
        url = f"nar/{base32.encode(digest.digest)}.nar"
        (dest / url).write_bytes(nar_bytes)
        info = NarInfo(f"/nix/store/{hash_part}-synthetic-{i}", url, digest, len(nar_bytes),
                       compression="none", file_hash=digest, file_size=len(nar_bytes))
        sign_narinfo(info, secret)
        (dest / f"{hash_part}.narinfo").write_text(info.to_text())


def rerun(cache: Path, key: Path, checkout: str | None) -> float:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = checkout
    argv = [sys.executable, "-m", "lazystore", "cache", "index", str(cache),
            "--secret-key-file", str(key), "--jobs", "2"]
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/")
    took = time.monotonic() - start
    if out.returncode != 0 or "indexed 0 paths" not in out.stderr:
        sys.exit(f"the rerun did not skip every path: {out.stderr.strip()}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=2000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--other", metavar="CHECKOUT", help="interleave that checkout's reruns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lazystore-rerun-") as tmp:
        cache, key = Path(tmp) / "cache", Path(tmp) / "key.sec"
        secret = SecretKey.generate("bench-1")
        key.write_text(str(secret))
        make_cache(cache, args.paths, args.files, secret)
        subprocess.run([sys.executable, "-m", "lazystore", "cache", "index", str(cache),
                        "--secret-key-file", str(key), "--jobs", "2"],
                       check=True, capture_output=True)
        size = sum(p.stat().st_size for p in cache.glob("*.lzindex")) // args.paths
        print(f"{args.paths} paths of {args.files} files (indexes of {size} bytes), "
              f"load {os.getloadavg()[0]:.1f}")
        for _ in range(args.runs):
            print(f"  this checkout: {rerun(cache, key, None):.2f} s", flush=True)
            if args.other:
                print(f"  {args.other}: {rerun(cache, key, args.other):.2f} s", flush=True)
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
