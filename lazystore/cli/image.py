"""CLI: ``image build`` and ``image push``."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from lazystore.errors import ImageError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    parser = sub.add_parser("image", help="OCI images of Nix closures")
    image = parser.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    _register_build(image)
    _register_push(image)


def _register_build(image: argparse._SubParsersAction) -> None:
    p = image.add_parser(
        "build",
        help="write an OCI image archive of the closure of store paths",
        description="Write an OCI image-layout archive of the closure of STOREPATHs (local "
        "store). By default one layer of empty placeholders annotated for nix snapshotters; "
        "with --layered N, a classic image with the real contents in at most N layers.",
    )
    p.add_argument("paths", nargs="+", metavar="STOREPATH")
    p.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    p.add_argument("--name", required=True, help="image name, NAME[:TAG]")
    p.add_argument("--entrypoint", help="entrypoint: a shell-quoted command line or a JSON array")
    p.add_argument("--cmd", help="default arguments: a shell-quoted command line or a JSON array")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment (repeatable)"
    )
    p.add_argument("--workdir", help="working directory")
    p.add_argument(
        "--layered", type=int, metavar="N", help="classic image, real contents in <= N layers"
    )
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="an access profile (lazystore profile save): the files it read "
                   "are fetched ahead, in its order, when the image is pulled through the "
                   "lazystore snapshotter (as many as a label of 4 KiB names)")
    p.set_defaults(func=_build)


def _register_push(image: argparse._SubParsersAction) -> None:
    p = image.add_parser(
        "push",
        help="push an image archive to a registry",
        description="Push an OCI image archive to a registry (OCI distribution API).",
    )
    p.add_argument("archive", type=Path)
    p.add_argument("target", metavar="HOST[:PORT]/REPO:TAG")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    p.set_defaults(func=_push)


def _split(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    try:
        if text.lstrip().startswith("["):
            words = json.loads(text)
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ValueError("expected a JSON array of strings")
            return words
        return shlex.split(text)
    except ValueError as exc:
        raise ImageError(f"{option}: {exc}") from None


def _build(args: argparse.Namespace) -> int:
    from lazystore.image.build import build_image
    from lazystore.image.oci import RuntimeConfig

    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise ImageError(f"--env {item!r}: expected K=V")
    runtime = RuntimeConfig(
        _split(args.entrypoint, "--entrypoint"),
        _split(args.cmd, "--cmd"),
        list(args.env),
        args.workdir,
    )
    from lazystore import profile
    from lazystore.cli.daemon import read_profile

    reads = [] if args.profile is None else profile.parse(read_profile(args.profile)).reads
    ahead = [profile.ahead_entry(r.path, r.file) for r in reads]
    result = build_image(args.paths, args.output, args.name, runtime, args.layered, ahead)
    print(
        f"{result.path}: {result.name.full} {result.manifest_digest} "
        f"({len(result.store_paths)} store paths, {len(result.layers)} layers)"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from lazystore.image.push import push_image

    result = push_image(args.archive, args.target, plain_http=args.plain_http)
    print(
        f"{args.target}@{result.manifest_digest} ({result.uploaded} blobs uploaded, "
        f"{result.skipped} already present)"
    )
    return 0
