"""Memory stays bounded whatever the NAR size: a 64 MiB NAR that compresses to
almost nothing is fetched with a heap peak (tracemalloc: Python objects and
zstandard's buffers) well below its size; the peak does not grow with the NAR."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import zstandard

from lazystore.cli.fetch import unpack_into
from lazystore.nix import nar
from lazystore.nix.hashes import Hash
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey, sign_narinfo
from lazystore.nix.storepath import StorePath
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig

SIZE = 64 << 20
BLOCK = 1 << 20


def _events() -> Iterator[nar.Event]:
    yield nar.FileStart(None, False, SIZE)
    zeros = bytes(BLOCK)
    for _ in range(SIZE // BLOCK):
        yield nar.FileData(zeros)
    yield nar.FileEnd()


def _write_cache(root: Path, key: SecretKey, path: StorePath) -> None:
    (root / "nar").mkdir(parents=True)
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 40\n")
    digest, size = hashlib.sha256(), 0
    with (root / "nar" / "big.nar.zst").open("wb") as out, \
            zstandard.ZstdCompressor().stream_writer(out) as packed:
        for piece in nar.serialize(_events()):
            digest.update(piece)
            size += len(piece)
            packed.write(piece)
    info = NarInfo(store_path=path.path(), url="nar/big.nar.zst", compression="zstd",
                   nar_hash=Hash("sha256", digest.digest()), nar_size=size)
    sign_narinfo(info, key)
    (root / f"{path.hash_part}.narinfo").write_text(info.to_text())


async def test_fetch_memory_is_bounded_by_chunks_not_nar_size(tmp_path: Path) -> None:
    key = SecretKey.generate("memory-test-1")
    path = StorePath("1" * 32, "big")
    _write_cache(tmp_path / "cache", key, path)
    assert (tmp_path / "cache" / "nar" / "big.nar.zst").stat().st_size < SIZE // 1000
    config = SubstituterConfig(urls=[f"file://{tmp_path / 'cache'}"],
                               trusted_public_keys=[str(key.public_key)], netrc_file=None)
    tracemalloc.start()
    try:
        async with Substituters(config) as subs:
            tracemalloc.reset_peak()
            await subs.fetch(path, unpack_into(tmp_path / path.basename, tmp_path))
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / path.basename).stat().st_size == SIZE
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB for a {SIZE >> 20} MiB NAR"
