"""CLI: ``narinfo verify``, ``narinfo sign`` and ``key generate``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lazystore.cli import Stdout
from lazystore.errors import LazystoreError, SignatureError
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, SecretKey, sign_narinfo, verify_narinfo
from lazystore.nix.storepath import DEFAULT_STORE_DIR


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``narinfo`` and ``key`` with their sub-commands to *sub*."""
    narinfo = sub.add_parser("narinfo", help="verify or sign .narinfo files")
    narinfo_sub = narinfo.add_subparsers(dest="narinfo_command", metavar="COMMAND", required=True)
    verify = narinfo_sub.add_parser(
        "verify", help="check every FILE carries a valid signature by a trusted key"
    )
    verify.add_argument(
        "--trusted-public-key", action="append", required=True, metavar="KEY",
        help="a trusted key, 'name:base64' (repeatable)",
    )
    verify.add_argument("files", nargs="+", metavar="FILE", help="narinfo file, or - for stdin")
    verify.set_defaults(func=cmd_verify)
    sign = narinfo_sub.add_parser("sign", help="add a signature to each FILE in place")
    sign.add_argument("--secret-key-file", required=True, type=Path, metavar="F")
    sign.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sign.set_defaults(func=cmd_sign)
    for parser in (verify, sign):
        parser.add_argument("--store-dir", default=DEFAULT_STORE_DIR, help="(default %(default)s)")

    key = sub.add_parser("key", help="manage signing keys")
    key_sub = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    generate = key_sub.add_parser("generate", help="write a new ed25519 key pair in Nix's format")
    generate.add_argument("name", help="key name, e.g. cache.example.org-1")
    generate.add_argument("secret_file", type=Path, metavar="SECRET_FILE")
    generate.add_argument("public_file", type=Path, metavar="PUBLIC_FILE")
    generate.set_defaults(func=cmd_generate)


def cmd_verify(args: argparse.Namespace) -> int:
    keys = [PublicKey.parse(text) for text in args.trusted_public_key]

    def verify_one(name: str) -> str:
        info = NarInfo.parse(_read_text(name), args.store_dir)
        signer = verify_narinfo(info, keys, args.store_dir)
        if signer is None:
            raise SignatureError(_why_unverified(info, keys))
        return f"verified by {signer}"

    return _for_each(args.files, verify_one)


def cmd_sign(args: argparse.Namespace) -> int:
    secret = SecretKey.parse(_read_text(str(args.secret_key_file), "secret key file"))

    def sign_one(name: str) -> str:
        if name == "-":
            raise LazystoreError("signs files in place: '-' (stdin) cannot be signed, use ./-")
        text = _read_text(name)
        info = NarInfo.parse(text, args.store_dir)
        before = list(info.sigs)
        sign_narinfo(info, secret, args.store_dir)
        if info.sigs == before:
            return f"already signed by {secret.name}"
        _replace(Path(name), add_sig_line(text, info.sigs[-1]))
        return f"signed by {secret.name}"

    return _for_each([str(f) for f in args.files], sign_one)


def cmd_generate(args: argparse.Namespace) -> int:
    secret = SecretKey.generate(args.name)
    _create(args.secret_file, str(secret), 0o600)
    try:
        _create(args.public_file, str(secret.public_key), 0o644)
    except LazystoreError:
        args.secret_file.unlink()
        raise
    return 0


def _for_each(names: list[str], action: Callable[[str], str]) -> int:
    """Run *action* on every file: one line per file, exit 1 if any failed."""
    failed = 0
    for name in names:
        try:
            outcome = action(name)
        except LazystoreError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
        else:
            Stdout().line(f"{name}: {outcome}")
    return 1 if failed else 0


def _why_unverified(info: NarInfo, keys: list[PublicKey]) -> str:
    names = {sig.partition(":")[0] for sig in info.sigs}
    trusted = sorted(names & {k.name for k in keys})
    if trusted:
        return f"invalid signature by trusted key {', '.join(trusted)}"
    if not info.sigs:
        return "no signature"
    return f"no signature by a trusted key (signed by {', '.join(sorted(names))})"


def add_sig_line(text: str, sig: str) -> str:
    """Insert ``Sig: <sig>`` after the last Sig line (else at the end), keeping the rest."""
    lines = text.rstrip("\n").split("\n")
    sig_lines = [i for i, line in enumerate(lines) if line.startswith("Sig:")]
    at = sig_lines[-1] + 1 if sig_lines else len(lines)
    lines.insert(at, f"Sig: {sig}")
    return "\n".join(lines) + "\n"


def _read_text(name: str, what: str = "file") -> str:
    try:
        if name == "-":
            return sys.stdin.read()
        return Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LazystoreError(f"cannot read {what} {name}: {_reason(exc)}") from None


def _replace(path: Path, text: str) -> None:
    """Write *text* to *path* atomically: a new temporary file of a fresh name
    (never one planted in the directory) beside it, then a rename."""
    tmp: str | None = None
    try:
        mode = path.stat().st_mode & 0o7777
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise LazystoreError(f"cannot write {path}: {_reason(exc)}") from None


def _create(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise LazystoreError(f"cannot create {path}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise LazystoreError(f"cannot write {path}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
