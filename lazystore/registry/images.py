"""Images made on request from the closures the binary caches describe.

``latest`` is the nix image of a closure: its narinfos (signed, trusted) and
the kind of each path's root (from the cache's ``.ls`` listing, else from the
path's NAR, fetched once) are all it needs, so answering costs a closure walk.
``layered`` is the classic image: its layers are built once per group of store
paths (NARs fetched and verified by the substituter client, unpacked under the
cache dir's ``tmp``, written as a deterministic tar) and kept in the blob store.

Manifests are remembered per (store path, tag) and by digest; concurrent
requests for an image not made yet share one making (single flight).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cachetools
import trio

from lazystore.errors import UnpackError
from lazystore.flight import Flights
from lazystore.image import build, layered, oci
from lazystore.image.closure import PathInfo, path_info
from lazystore.nix import fsio
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.storepath import StorePath
from lazystore.nurseries import first_error
from lazystore.registry import manifest as media
from lazystore.registry.blobs import BlobStore
from lazystore.registry.errors import (
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    Unavailable,
)
from lazystore.registry.expression import Expression, bin_entries
from lazystore.registry.names import TAGS, Name
from lazystore.substituter.client import Substituters
from lazystore.substituter.errors import NotAvailableError, SubstituterError

log = logging.getLogger(__name__)

RUNTIME = oci.RuntimeConfig()  # as `lazystore image build` without options
ATTRS_RUNTIME = oci.RuntimeConfig(env=["PATH=/bin"])  # images of attributes: their bin/
MEMO_SIZE = 10_000
T = TypeVar("T")


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return oci.digest_of(self.data)


@dataclass(frozen=True)
class Closure:
    """What an image is made of: its store paths' records, sorted by path."""

    key: str  # names the closure: a store path's basename, or attributes
    infos: list[PathInfo]
    top: list[str]  # the store paths asked for
    programs: list[str] | None = None  # attributes' outputs, whose bin/ the image links

    @property
    def runtime(self) -> oci.RuntimeConfig:
        return RUNTIME if self.programs is None else ATTRS_RUNTIME


class Images:
    def __init__(self, subs: Substituters, store: BlobStore, max_layers: int = 100,
                 expression: Expression | None = None, fetch_limit: int = 4) -> None:
        self.subs = subs
        self.expression = expression
        self.store = store
        self.max_layers = max_layers
        self._store_dir = subs.config.store_dir
        self._manifests: cachetools.LRUCache[tuple[str, str, str], bytes] = \
            cachetools.LRUCache(MEMO_SIZE)
        self._by_digest: cachetools.LRUCache[str, Manifest] = cachetools.LRUCache(MEMO_SIZE)
        self._is_dir: dict[str, bool] = {}
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._flights: Flights | None = None  # images, layers, root kinds being made
        self._fetch_limit = trio.CapacityLimiter(fetch_limit)
        self.closure_walks = 0  # how many closures were walked (for tests and benches)
        self.layers_built = 0

    async def __aenter__(self) -> Images:
        """Makings run in this object's nursery: a client that goes away does
        not cancel one that others wait for (lazystore.flight)."""
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._flights = Flights(self._nursery,
                                lambda key: Unavailable(f"making {key[0]} was cancelled"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self._stack.aclose()

    async def _single(self, key: tuple[str, object], fn: Callable[[], Awaitable[T]]) -> T:
        assert self._flights is not None, "Images used outside its context"
        return await self._flights.run(key, fn)  # type: ignore[no-any-return]

    # -- the API the HTTP side uses ------------------------------------------------

    async def manifest(self, name: Name, tag: str, accept: str = "") -> Manifest:
        if tag not in TAGS:
            raise ManifestUnknown(f"unknown tag {tag!r} (this registry has {', '.join(TAGS)})")
        version = "" if name.is_store_path or self.expression is None \
            else self.expression.version()
        key = (name.text, tag, version)
        data = self._manifests.get(key)
        if data is None:
            data = await self._single(("image", key), lambda: self._make(name, tag))
            self._manifests[key] = data
        return self._variant(data, accept)

    async def by_digest(self, name: Name, digest: str) -> Manifest:
        """The manifest of *name* with this digest (of either media type)."""
        found = self._by_digest.get(digest)
        if found is None:
            for tag in TAGS:
                for accept in ("", media.DOCKER_MANIFEST):
                    await self.manifest(name, tag, accept)
            found = self._by_digest.get(digest)
        if found is None:
            raise ManifestUnknown(f"{name.text} has no manifest {digest}")
        return found

    def blob(self, digest: str) -> Path | None:
        return self.store.path(digest)

    def _variant(self, data: bytes, accept: str) -> Manifest:
        found = Manifest(data, oci.MEDIA_MANIFEST)
        if media.wants_docker(accept):
            found = Manifest(media.as_docker(data), media.DOCKER_MANIFEST)
        self._by_digest[found.digest] = found
        return found

    # -- closures ------------------------------------------------------------------

    async def check(self, name: Name) -> None:
        """NameUnknown unless *name* is an image this registry can make."""
        if name.is_store_path:
            await self._narinfo(name)
        else:
            await self.closure(name)

    async def closure(self, name: Name) -> Closure:
        """The closure *name* stands for (NameUnknown when no trusted cache has it)."""
        if not name.is_store_path:
            return await self._attrs_closure(name)
        top = await self._narinfo(name)
        return await self.closure_of([top.store_path], top.path.basename)

    async def _attrs_closure(self, name: Name) -> Closure:
        if self.expression is None:
            raise NameUnknown(f"{name.text!r} is not a store path (hash or hash-name) and "
                              "this registry has no --expression")
        version, outputs = await self.expression.outputs(name.attrs)
        programs = list(dict.fromkeys(p for paths in outputs for p in paths))
        closure = await self.closure_of(programs, f"{name.text}@{version[:12]}")
        return Closure(closure.key, closure.infos, programs, programs)

    async def closure_of(self, paths: Sequence[str], key: str) -> Closure:
        self.closure_walks += 1
        store_paths = [StorePath.parse(p, self._store_dir) for p in paths]
        try:
            infos = await self.subs.closure(store_paths)
        except NotAvailableError as exc:
            raise NameUnknown(f"{exc} (images name only paths of the configured binary "
                              "caches)") from None
        except SubstituterError as exc:
            raise Unavailable(str(exc)) from None
        records = sorted((path_info(i, self._store_dir) for i in infos), key=lambda r: r.path)
        return Closure(key, records, list(paths))

    async def _narinfo(self, name: Name) -> NarInfo:
        assert name.hash_part is not None
        try:
            info = await self.subs.query_hash(name.hash_part)
        except SubstituterError as exc:
            raise Unavailable(str(exc)) from None
        if info is None:
            raise NameUnknown(f"no configured binary cache has a trusted (signed) narinfo "
                              f"for {name.text}")
        if name.basename is not None and info.path.basename != name.basename:
            raise NameUnknown(f"no store path {name.basename}: its hash is "
                              f"{info.path.basename}")
        return info

    # -- making images -------------------------------------------------------------

    async def _make(self, name: Name, tag: str) -> bytes:
        started = trio.current_time()
        closure = await self.closure(name)
        try:
            if tag == "latest":
                image = await self._nix_image(closure)
            else:
                image = await self._layered_image(closure)
        except RegistryError:
            raise
        except SubstituterError as exc:
            raise Unavailable(str(exc)) from None
        await trio.to_thread.run_sync(self.store.put_bytes, image.config)
        log.info("made %s:%s (%d store paths, %d layers) in %.3f s: %s", closure.key, tag,
                 len(closure.infos), len(image.groups), trio.current_time() - started,
                 image.manifest_digest)
        return image.manifest

    async def _nix_image(self, closure: Closure) -> build.Image:
        """The placeholder layer of the closure (and the bin/ layer of attributes)."""
        is_dir: dict[str, bool] = {}

        async def kind(path: str) -> None:
            is_dir[path] = await self.is_dir(path)

        await _all([lambda p=info.path: kind(p) for info in closure.infos])
        return await trio.to_thread.run_sync(self._write_nix_image, closure, is_dir)

    def _write_nix_image(self, closure: Closure, is_dir: dict[str, bool]) -> build.Image:
        tmp = self.store.make_tmp()
        try:
            paths = [i.path for i in closure.infos]
            layer, notes = build.nix_layer(paths, is_dir, tmp / "layer")
            layer = oci.Layer(self.store.put_file(layer.path, layer.digest), layer.digest,
                              layer.size, layer.diff_id)
            return self._image(closure, [(layer, notes)], [paths])
        finally:
            fsio.remove_tree(tmp)

    def _image(self, closure: Closure, written: list[tuple[oci.Layer, dict[str, str]]],
               groups: list[list[str]]) -> build.Image:
        """The image of layers *written* and, for attributes, their bin/ layer on top."""
        if closure.programs is not None:
            written = [*written, (self._bin_layer(closure.programs), {})]
            groups = [*groups, ["bin"]]
        return build.image_of(closure.runtime, written, groups)

    def _bin_layer(self, programs: list[str]) -> oci.Layer:
        tmp = self.store.make_tmp()
        try:
            layer = oci.write_layer(bin_entries(programs), tmp / "bin")
            path = self.store.put_file(layer.path, layer.digest)
            return oci.Layer(path, layer.digest, layer.size, layer.diff_id)
        finally:
            fsio.remove_tree(tmp)

    async def is_dir(self, path: str) -> bool:
        """Whether store path *path* is a directory: its listing's root, else its NAR."""
        if path not in self._is_dir:
            self._is_dir[path] = await self._single(("kind", path),
                                                    lambda: self._root_kind(path))
        return self._is_dir[path]

    async def _root_kind(self, path: str) -> bool:
        sp = StorePath.parse(path, self._store_dir)
        try:
            doc = await self.subs.listing(sp)
        except SubstituterError as exc:
            log.info("no usable listing of %s (%s); reading its NAR", path, exc)
            doc = None
        root = (doc or {}).get("root") or {}
        if root.get("type") in ("directory", "regular", "symlink"):
            return bool(root["type"] == "directory")
        tmp = self.store.make_tmp()
        try:
            await self._fetch_into(sp, tmp / sp.basename)
            return stat.S_ISDIR((tmp / sp.basename).lstat().st_mode)
        finally:
            await trio.to_thread.run_sync(fsio.remove_tree, tmp)

    async def _layered_image(self, closure: Closure) -> build.Image:
        groups = layered.group_layers(closure.infos, self.max_layers)
        written: list[oci.Layer | None] = [None] * len(groups)

        async def one(n: int, group: list[str]) -> None:
            written[n] = await self.layer(group)

        await _all([lambda n=n, g=g: one(n, g) for n, g in enumerate(groups)])
        layers: list[tuple[oci.Layer, dict[str, str]]] = \
            [(layer, {}) for layer in written if layer is not None]
        return await trio.to_thread.run_sync(self._image, closure, layers, groups)

    async def layer(self, group: list[str]) -> oci.Layer:
        """The classic layer of the store paths *group*, built once per cache dir."""
        found = self.store.layer(group)
        if found is not None:
            return found
        return await self._single(("layer", tuple(sorted(group))),
                                  lambda: self._build_layer(group))

    async def _build_layer(self, group: list[str]) -> oci.Layer:
        found = self.store.layer(group)
        if found is not None:
            return found
        tmp = self.store.make_tmp()
        try:
            roots = await self._fetch_trees(group, tmp)
            layer = await trio.to_thread.run_sync(
                build.content_layer, group, roots.__getitem__, tmp / "layer")
            self.layers_built += 1
            return await trio.to_thread.run_sync(self.store.put_layer, group, layer)
        finally:
            await trio.to_thread.run_sync(fsio.remove_tree, tmp)

    async def _fetch_trees(self, group: list[str], tmp: Path) -> dict[str, Path]:
        roots = {p: tmp / "trees" / Path(p).name for p in group}
        (tmp / "trees").mkdir()

        async def fetch(path: str) -> None:
            await self._fetch_into(StorePath.parse(path, self._store_dir), roots[path])

        await _all([lambda p=path: fetch(p) for path in group])
        return roots

    async def _fetch_into(self, path: StorePath, dest: Path) -> None:
        """The verified tree of *path* at *dest*, a private temporary: unpacked
        there directly (an attempt that fails removes what it wrote)."""
        async with self._fetch_limit:
            try:
                await self.subs.fetch(path, lambda _: fsio.NarUnpacker(dest))
            except UnpackError as exc:
                raise Unavailable(f"cannot unpack {path.basename}: {exc}") from None


async def _all(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run *jobs* concurrently; the first real error is raised as itself."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
