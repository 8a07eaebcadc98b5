"""End to end through `lazystore registry`: real containerd + runc pull images
by store path from it — nix images lazily on the lazystore snapshotter over a
real daemon, layered images on containerd's stock overlayfs — and skopeo reads
it. The binary caches are real-Nix ones on 127.0.0.1 HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lazystore.testing import lazyregistry, nixcache
from lazystore.testing.containerd import Containerd, have_containerd, snapshotter_process
from lazystore.testing.daemon import Daemon, fuse_missing
from lazystore.testing.httpserver import serve_directory
from tests.test_registry_expression import ATTRS_NIX, attrs_cache

SN = "lazystore"
pytestmark = [pytest.mark.root, pytest.mark.slow]


@dataclass
class Stack:
    base: Path
    daemon: Daemon
    ctd: Containerd
    reg: lazyregistry.LazyRegistry
    one: str  # the sample closure's top (prog)
    two: str  # a closure sharing most of it (prog-two)

    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    def materialized(self) -> set[str]:
        return set(self.status()["paths_materialized"])

    def ref(self, top: str, tag: str) -> str:
        return f"{self.reg.host}/{Path(top).name[:32]}:{tag}"

    def pull(self, ref: str, *options: str) -> None:
        self.ctd.ctr("image", "pull", "--plain-http", *options, ref, timeout=300)

    def run(self, ref: str, *argv: str, snapshotter: str = SN) -> str:
        proc = self.ctd.ctr("run", "--snapshotter", snapshotter, "--rm", ref,
                            f"c{time.monotonic_ns()}", *argv, check=False, timeout=180)
        assert proc.returncode == 0, f"ctr run: {proc.stderr}\n{self.logs()}"
        return proc.stdout

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                 for p in (self.base / "snapshotter.log", self.daemon.log, self.reg.log_file)
                 if p.exists()]
        return "\n".join([*parts, "--- containerd", self.ctd.log_tail()])


@pytest.fixture(scope="module")
def stack(binary_cache: nixcache.BinaryCache, http_cache: str, test_key: nixcache.KeyPair,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    why = fuse_missing()
    if why or not have_containerd():
        pytest.skip(why or "needs containerd, ctr and runc")
    two = nixcache.build(tag="two")
    cache_two = nixcache.make_cache(two, tmp_path_factory.mktemp("cache-two"), test_key)
    cache_attrs = tmp_path_factory.mktemp("cache-attrs")
    attrs_cache(cache_attrs, test_key)
    base = Path(tempfile.mkdtemp(prefix="lzr-", dir="/tmp"))  # short unix socket paths
    os.chmod(base, 0o755)
    try:
        with serve_directory(cache_two.root) as server_two, \
                serve_directory(cache_attrs) as server_attrs:
            urls = [http_cache, server_two.url, server_attrs.url]  # type: ignore[attr-defined]
            daemon = Daemon(base, urls, test_key.public_key, "--allow-other")
            daemon.start()
            try:
                with snapshotter_process(base / "sn", base / "sn.sock", daemon.sock, daemon.mnt,
                                         log_file=base / "snapshotter.log"), \
                        Containerd(base / "ctd", {SN: str(base / "sn.sock")}) as ctd, \
                        lazyregistry.running(base / "reg", urls, test_key.public_key,
                                             "--expression", str(ATTRS_NIX)) as reg:
                    yield Stack(base, daemon, ctd, reg, binary_cache.top, two)
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _bases(top: str) -> set[str]:
    return {Path(p).name for p in nixcache.closure(top)}


def _named(bases: set[str], name: str) -> str:
    return next(b for b in bases if b[33:] == name)


def test_pull_of_latest_fetches_no_nar_and_run_fetches_only_touched_paths(stack: Stack) -> None:
    before = stack.status()
    stack.pull(stack.ref(stack.one, "latest"), "--snapshotter", SN)
    after_pull = stack.status()
    assert after_pull["bytes_downloaded"] == before["bytes_downloaded"]
    assert after_pull["paths_materialized"] == before["paths_materialized"]
    assert stack.run(stack.ref(stack.one, "latest"), f"{stack.one}/bin/prog") == \
        "hello from liba\n"
    bases = _bases(stack.one)
    fetched = stack.materialized() - set(before["paths_materialized"])
    assert fetched == {Path(stack.one).name, _named(bases, "busybox"), _named(bases, "liba")}


def test_a_second_image_sharing_the_closure_fetches_only_what_is_new(stack: Stack) -> None:
    if _named(_bases(stack.one), "liba") not in stack.materialized():  # when run alone
        test_pull_of_latest_fetches_no_nar_and_run_fetches_only_touched_paths(stack)
    before = stack.materialized()
    stack.pull(stack.ref(stack.two, "latest"), "--snapshotter", SN)
    assert stack.materialized() == before
    out = stack.run(stack.ref(stack.two, "latest"), f"{stack.two}/bin/prog")
    assert out == "extra two\nhello from liba\n"
    assert stack.materialized() - before == _bases(stack.two) - _bases(stack.one)


def test_layered_runs_on_the_stock_overlayfs_snapshotter(stack: Stack) -> None:
    before = stack.status()
    ref = stack.ref(stack.one, "layered")
    stack.pull(ref)  # containerd's default snapshotter: overlayfs
    assert stack.run(ref, f"{stack.one}/bin/prog", snapshotter="overlayfs") == \
        "hello from liba\n"
    after = stack.status()
    assert (after["bytes_downloaded"], after["views"]) == \
        (before["bytes_downloaded"], before["views"])  # no lazystore on that path


def test_an_image_of_attributes_runs_their_programs_from_bin(stack: Stack) -> None:
    ref = f"{stack.reg.host}/busybox/hello/greet:latest"
    stack.pull(ref, "--snapshotter", SN)
    assert stack.run(ref, "sh", "-c", "hello && greet") == \
        "hello from the registry\ngreetings\n"


@pytest.mark.parametrize("tag", ["latest", "layered"])
def test_skopeo_inspects_and_copies_the_images(stack: Stack, tag: str, tmp_path: Path) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    src = f"docker://{stack.ref(stack.one, tag)}"
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", src],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    manifest = json.loads(inspect.stdout)
    dest = tmp_path / "copy"
    copy = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", src, f"oci:{dest}:x"],
                          capture_output=True, text=True, timeout=300)
    assert copy.returncode == 0, copy.stderr
    for desc in manifest["layers"]:
        assert (dest / "blobs/sha256" / desc["digest"][7:]).stat().st_size == desc["size"]
