"""`lazystore nar ...` as a user runs it, compared with Nix's own commands."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from lazystore.cli import main
from lazystore.testing import nixcache
from tests.test_nar_nix import make_tree


def lazystore(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess:
    """The real command, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "lazystore", *map(str, args)], input=input, capture_output=True
    )


Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """``lazystore.cli.main`` in this process (much faster than a process each)."""

    def run(*args: str | Path, input: bytes = b"") -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(input)))
        capsysbinary.readouterr()
        code = main([str(a) for a in args])
        out, err = capsysbinary.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def nix(*args: str | Path, input: bytes | None = None) -> bytes:
    return nixcache.run_nix(*args, input=input)


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("lazystore: error:") and err.count("\n") == 1, err
    assert text in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, nix: None) -> Path:
    return make_tree(tmp_path_factory.mktemp("cli-nar") / "tree")


@pytest.fixture(scope="module")
def nar_file(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-nar-file") / "tree.nar"
    path.write_bytes(nix("nix-store", "--dump", tree))
    return path


def test_pack_equals_nix_store_dump(tree: Path, nar_file: Path) -> None:
    proc = lazystore("nar", "pack", tree)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == nar_file.read_bytes()


def test_unpack_from_file_and_stdin(nar_file: Path, tmp_path: Path) -> None:
    data = nar_file.read_bytes()
    assert lazystore("nar", "unpack", nar_file, tmp_path / "a").returncode == 0
    assert lazystore("nar", "unpack", "-", tmp_path / "b", input=data).returncode == 0
    for out in ("a", "b"):
        assert nix("nix-store", "--dump", tmp_path / out) == data


def test_unpack_refuses_an_existing_destination(nar_file: Path, tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")
    proc = cli("nar", "unpack", nar_file, tmp_path / "dest")
    assert_one_line_error(proc, "already exists")
    assert os.listdir(tmp_path / "dest") == ["keep"]


def test_unpack_of_a_truncated_nar_leaves_nothing(nar_file: Path, tmp_path: Path) -> None:
    data = nar_file.read_bytes()
    proc = lazystore("nar", "unpack", "-", tmp_path / "dest", input=data[: len(data) // 2])
    assert_one_line_error(proc, "truncated")
    assert list(tmp_path.iterdir()) == []


def test_trailing_bytes_after_the_nar_are_ignored_as_nix_does(
    tree: Path, nar_file: Path, tmp_path: Path
) -> None:
    """nix-store --restore and nix nar ls/cat stop at the end of the NAR; so do
    unpack, ls and cat. hash refuses: the NAR's hash or the file's would be a guess."""
    data = nar_file.read_bytes()
    padded = tmp_path / "padded.nar"
    padded.write_bytes(data + b"\0" * 64 + b"not a NAR\n")
    restored = tmp_path / "by-nix"
    nix("nix-store", "--restore", restored, input=padded.read_bytes())
    assert nix("nix-store", "--dump", restored) == data
    proc = lazystore("nar", "unpack", "-", tmp_path / "a", input=padded.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert lazystore("nar", "unpack", padded, tmp_path / "b").returncode == 0
    for out in ("a", "b"):
        assert nix("nix-store", "--dump", tmp_path / out) == data
    ls = lazystore("nar", "ls", "-lR", padded, "/")
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout == nix("nix", "nar", "ls", "-lR", padded, "/")
    cat = lazystore("nar", "cat", padded, "/bin/prog")
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == (tree / "bin" / "prog").read_bytes()
    assert_one_line_error(lazystore("nar", "hash", padded), "trailing data")


LS_CASES = [
    (), ("-R",), ("-l",), ("-lR",), ("-d",), ("--json",),
    ("-R", "bin"), ("-l", "/bin/prog"), ("-l", "/bin/tool"), ("-d", "/many"),
    ("--json", "/bin"), ("--json", "/bin/prog"), ("-R", "/a/b/c"),
]


@pytest.mark.parametrize("args", LS_CASES, ids=[" ".join(a) or "plain" for a in LS_CASES])
def test_ls_matches_nix_nar_ls(nar_file: Path, args: tuple[str, ...], cli: Cli) -> None:
    options = [a for a in args if a.startswith("-")]
    path = [a for a in args if not a.startswith("-")] or ["/"]
    ours = cli("nar", "ls", *options, nar_file, *path)
    assert ours.returncode == 0, ours.stderr
    # Nix 2.8 wants an absolute path inside the NAR.
    nix_path = "/" + path[0].lstrip("/")
    assert ours.stdout == nix("nix", "nar", "ls", *options, nar_file, nix_path)


def test_ls_json_recursive_is_the_ls_document(
    binary_cache: nixcache.BinaryCache, tmp_path: Path
, cli: Cli) -> None:
    listings = sorted(binary_cache.root.glob("*.ls"))
    assert listings
    for ls_file in listings:
        fields = dict(
            line.split(": ", 1) for line in ls_file.with_suffix(".narinfo").read_text().splitlines()
        )
        compressed = (binary_cache.root / fields["URL"]).read_bytes()
        nar_path = tmp_path / "x.nar"
        nar_path.write_bytes(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)).read())
        proc = cli("nar", "ls", "--json", "-R", nar_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ls_file.read_bytes()


def test_ls_of_a_missing_path(nar_file: Path, cli: Cli) -> None:
    assert_one_line_error(cli("nar", "ls", nar_file, "/nope"), "does not exist")


def test_cat_prints_a_file(tree: Path, nar_file: Path, cli: Cli) -> None:
    for inside in ("bin/prog", "/big.bin", "/a/b/c/d/e/f/g/h/leaf", "empty-file"):
        proc = cli("nar", "cat", nar_file, inside)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (tree / inside.lstrip("/")).read_bytes()


def test_cat_of_a_root_file(tree: Path, tmp_path: Path, cli: Cli) -> None:
    single = tmp_path / "single.nar"
    single.write_bytes(nix("nix-store", "--dump", tree / "bin" / "prog"))
    assert cli("nar", "cat", single, "/").stdout == (tree / "bin" / "prog").read_bytes()


def test_cat_refuses_what_is_not_a_regular_file(nar_file: Path, cli: Cli) -> None:
    assert_one_line_error(cli("nar", "cat", nar_file, "/bin"), "not a regular file")
    assert_one_line_error(cli("nar", "cat", nar_file, "/bin/tool"), "not a regular file")
    assert_one_line_error(cli("nar", "cat", nar_file, "/nope"), "does not exist")


def test_hash_matches_nix_hash_path(tree: Path, nar_file: Path, cli: Cli) -> None:
    proc = cli("nar", "hash", nar_file)
    assert proc.returncode == 0, proc.stderr
    by_nix = nix("nix", "hash", "path", "--type", "sha256", "--base32", tree).decode().strip()
    assert proc.stdout.decode() == f"sha256:{by_nix.removeprefix('sha256:')}\n"


def test_bad_input_gives_one_line_errors(tmp_path: Path, cli: Cli) -> None:
    junk = tmp_path / "junk.nar"
    junk.write_bytes(b"this is not a NAR at all, not even close")
    assert_one_line_error(cli("nar", "hash", junk), "bad magic")
    assert_one_line_error(cli("nar", "ls", junk), "bad magic")
    assert_one_line_error(cli("nar", "cat", junk, "/x"), "bad magic")
    assert_one_line_error(cli("nar", "ls", tmp_path / "missing.nar"), "cannot open")
    assert_one_line_error(cli("nar", "pack", tmp_path / "missing"), "cannot dump")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(cli("nar", "pack", tmp_path), "not a regular file, directory")


HEAVY_MODULES = ("trio", "httpx", "grpc", "pyfuse3", "lazystore.substituter", "lazystore.fs",
                 "lazystore.daemon")
# What a command that makes no HTTP request and runs no event loop must not load.
NO_HTTP_MODULES = ("trio", "httpx", "grpc", "pyfuse3", "lazystore.fs", "lazystore.daemon",
                   "lazystore.substituter.client", "lazystore.substituter.transport")


def loaded_after(argv: list[str], modules: tuple[str, ...]) -> tuple[int, list[str]]:
    """The exit status of ``lazystore ARGV`` run in a fresh interpreter, and
    which of *modules* (or their submodules) it imported."""
    script = (
        "import sys\n"
        "from lazystore.cli import main\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"heavy = sorted(m for m in sys.modules if any(m.startswith(h + '.') or m == h"
        f" for h in {modules!r}))\n"
        "sys.stderr.write('\\nloaded: ' + repr(heavy))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          text=True, errors="replace", check=False)
    return proc.returncode, ast.literal_eval(proc.stderr.rpartition("\nloaded: ")[2])


@pytest.mark.parametrize(
    "argv",
    [("nar", "hash", "{nar}"), ("nar", "ls", "{nar}"), ("key", "--help"), ("narinfo", "--help")],
    ids=lambda a: " ".join(a),
)
def test_format_commands_do_not_import_the_daemon_stack(
    nar_file: Path, argv: tuple[str, ...]
) -> None:
    """`lazystore nar ...`, `key ...` and `narinfo ...` start without importing the
    event loop, HTTP, gRPC or FUSE modules the other commands need."""
    code, heavy = loaded_after([a.format(nar=nar_file) for a in argv], HEAVY_MODULES)
    assert code == 0 and heavy == []


@pytest.mark.parametrize(
    "argv",
    [("cache", "index", "--help"), ("status", "--control-socket", "{missing}"),
     ("prefetch", "--help"), ("evict", "--help"), ("profile", "--help"),
     ("install-systemd", "--help")],
    ids=lambda a: a[0],
)
def test_commands_that_make_no_http_request_do_not_import_http_or_the_event_loop(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """Start-up is part of every such command's time (httpx alone was ~30 ms)."""
    code, heavy = loaded_after([a.format(missing=tmp_path / "missing.sock") for a in argv],
                               NO_HTTP_MODULES)
    assert code == (1 if argv[0] == "status" else 0) and heavy == []


@pytest.mark.parametrize(
    "argv",
    [("pack", "{tree}"), ("cat", "{nar}", "/bin/prog"), ("ls", "-R", "{nar}"),
     ("ls", "--json", "-R", "{nar}"), ("hash", "{nar}")],
    ids=lambda a: " ".join(a),
)
def test_a_stdout_that_cannot_be_written_is_a_one_line_error(
    tree: Path, nar_file: Path, argv: tuple[str, ...]
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    args = [a.format(tree=tree, nar=nar_file) for a in argv]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "lazystore", "nar", *args], stdout=full, stderr=subprocess.PIPE
        )
    proc.stdout = b""
    assert_one_line_error(proc, "cannot write to stdout: No space left on device")
