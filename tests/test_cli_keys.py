"""`lazystore narinfo verify|sign` and `lazystore key generate`, run as a user
would (subprocess of the installed console script), checked with real Nix."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lazystore.testing import nixcache

LAZYSTORE = Path(sys.executable).parent / "lazystore"
CACHE_NIXOS = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
TEST1_PUBLIC = "test1:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE="
TEST1_SECRET = (
    "test1:jbX9NxZp8WB/coK8k7yLf0gNYmBbIbCrOFwgJgI7OV+0sASf4R5oFQlioSlN3bJ56uvshzr7S9Z75pcv+9hSkQ=="
)
GOOD = [
    "go-nix/narinfo-samples/strNarinfoSample.narinfo",
    "go-nix/narinfo-samples/strNarinfoSample2Multirefs.narinfo",
    "go-nix/big.narinfo",
    "snix/narinfo-samples/nar_hash_hex.narinfo",
    "snix/narinfo-samples/references_out_of_order.narinfo",
    "snix/narinfo-samples/references_missing.narinfo",
]
EDITED = "go-nix/narinfo-samples/strNarinfoSampleUncompressed.narinfo"


def run(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    if not LAZYSTORE.exists():
        pytest.skip(f"{LAZYSTORE} is not installed (run scripts/setup)")
    proc = subprocess.run(
        [str(LAZYSTORE), *map(str, args)], input=stdin, capture_output=True, timeout=120
    )
    out = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )
    assert "Traceback" not in out.stderr
    return out


def test_verify_all_good(conformance: Path) -> None:
    files = [conformance / name for name in GOOD]
    res = run("narinfo", "verify", "--trusted-public-key", CACHE_NIXOS, *files)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.splitlines() == [f"{f}: verified by cache.nixos.org-1" for f in files]


def test_verify_reports_each_failing_file(conformance: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.narinfo"
    garbage.write_text("this is not a narinfo\n")
    missing = tmp_path / "missing.narinfo"
    edited = conformance / EDITED
    good = conformance / GOOD[0]
    res = run(
        "narinfo", "verify", "--trusted-public-key", CACHE_NIXOS, edited, good, garbage, missing
    )
    assert res.returncode == 1
    assert res.stdout.splitlines() == [f"{good}: verified by cache.nixos.org-1"]
    errors = res.stderr.splitlines()
    assert len(errors) == 3
    assert errors[0] == f"{edited}: invalid signature by trusted key cache.nixos.org-1"
    assert errors[1].startswith(f"{garbage}: narinfo line 1 is not 'Key: value'")
    assert errors[2] == f"{missing}: cannot read file {missing}: No such file or directory"


def test_verify_unknown_key_reported(conformance: Path) -> None:
    path = conformance / GOOD[0]
    res = run("narinfo", "verify", "--trusted-public-key", TEST1_PUBLIC, path)
    assert res.returncode == 1
    assert res.stderr == (
        f"{path}: no signature by a trusted key "
        "(signed by cache.nixos.org-1, hydra.other.net-1)\n"
    )


def test_verify_several_keys_and_stdin(conformance: Path) -> None:
    text = (conformance / GOOD[1]).read_bytes()
    res = run(
        "narinfo", "verify", "--trusted-public-key", TEST1_PUBLIC,
        "--trusted-public-key", CACHE_NIXOS, "-", stdin=text,
    )
    assert res.returncode == 0
    assert res.stdout == "-: verified by cache.nixos.org-1\n"


def test_verify_unsigned(tmp_path: Path, conformance: Path) -> None:
    path = tmp_path / "x.narinfo"
    text = (conformance / GOOD[0]).read_text()
    path.write_text("".join(x for x in text.splitlines(True) if not x.startswith("Sig:")))
    res = run("narinfo", "verify", "--trusted-public-key", CACHE_NIXOS, path)
    assert (res.returncode, res.stderr) == (1, f"{path}: no signature\n")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("garbage", "lazystore: error: public key is not 'name:base64': 'garbage'\n"),
        ("k:AAAA", "lazystore: error: public key 'k' has 3 bytes, expected 32\n"),
    ],
)
def test_verify_bad_key_argument(conformance: Path, key: str, message: str) -> None:
    res = run("narinfo", "verify", "--trusted-public-key", key, conformance / GOOD[0])
    assert (res.returncode, res.stdout, res.stderr) == (1, "", message)


def test_verify_needs_a_key(conformance: Path) -> None:
    res = run("narinfo", "verify", conformance / GOOD[0])
    assert res.returncode == 2
    assert "--trusted-public-key" in res.stderr


def test_sign_in_place(conformance: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "test1.sec"
    secret_file.write_text(TEST1_SECRET)
    target = tmp_path / "edited.narinfo"
    original = (conformance / EDITED).read_text()
    target.write_text(original)
    res = run("narinfo", "sign", "--secret-key-file", secret_file, target)
    assert (res.returncode, res.stdout) == (0, f"{target}: signed by test1\n")
    signed = target.read_text()
    added = [x for x in signed.splitlines(True) if x not in original.splitlines(True)]
    assert len(added) == 1 and added[0].startswith("Sig: test1:")
    assert signed.replace(added[0], "") == original
    again = run("narinfo", "sign", "--secret-key-file", secret_file, target)
    assert again.stdout == f"{target}: already signed by test1\n"
    assert target.read_text() == signed
    ok = run("narinfo", "verify", "--trusted-public-key", TEST1_PUBLIC, target)
    assert ok.returncode == 0


def test_sign_errors_lose_nothing(conformance: Path, tmp_path: Path) -> None:
    target = tmp_path / "a.narinfo"
    target.write_text((conformance / EDITED).read_text())
    bad_key = tmp_path / "bad.sec"
    bad_key.write_text(TEST1_PUBLIC)
    res = run("narinfo", "sign", "--secret-key-file", bad_key, target)
    assert res.returncode == 1
    assert res.stderr == "lazystore: error: secret key 'test1' has 32 bytes, expected 64\n"
    assert target.read_text() == (conformance / EDITED).read_text()
    res = run("narinfo", "sign", "--secret-key-file", tmp_path / "nope", target)
    assert res.returncode == 1 and "cannot read secret key file" in res.stderr
    secret_file = tmp_path / "test1.sec"
    secret_file.write_text(TEST1_SECRET)
    broken = tmp_path / "broken.narinfo"
    broken.write_text("StorePath: /nix/store/nope\n")
    res = run("narinfo", "sign", "--secret-key-file", secret_file, broken, target)
    assert res.returncode == 1
    assert res.stderr.startswith(f"{broken}: ") and len(res.stderr.splitlines()) == 1
    assert broken.read_text() == "StorePath: /nix/store/nope\n"
    assert res.stdout == f"{target}: signed by test1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.narinfo", "bad.sec", "test1.sec", "broken.narinfo"]
    )


def test_sign_never_writes_through_a_planted_file(conformance: Path, tmp_path: Path) -> None:
    """Another user of a shared directory cannot make signing write elsewhere:
    the temporary file has a fresh name; mode and the other entries are kept."""
    secret_file = tmp_path / "test1.sec"
    secret_file.write_text(TEST1_SECRET)
    target = tmp_path / "a.narinfo"
    target.write_text((conformance / EDITED).read_text())
    target.chmod(0o640)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for planted in (".a.narinfo.lazystore-tmp", ".a.narinfo.tmp"):
        os.symlink(victim, tmp_path / planted)
    res = run("narinfo", "sign", "--secret-key-file", secret_file, target)
    assert (res.returncode, res.stderr) == (0, "")
    assert victim.read_text() == "keep me"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert "Sig: test1:" in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["test1.sec", "a.narinfo", "victim", ".a.narinfo.lazystore-tmp", ".a.narinfo.tmp"]
    )


def test_sign_refuses_stdin(conformance: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "test1.sec"
    secret_file.write_text(TEST1_SECRET)
    res = subprocess.run(
        [LAZYSTORE, "narinfo", "sign", "--secret-key-file", secret_file, "-"],
        input=(conformance / EDITED).read_text(), capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 1
    assert res.stderr == "-: signs files in place: '-' (stdin) cannot be signed, use ./-\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test1.sec"]


def test_key_generate(tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    res = run("key", "generate", "my-cache-1", sec, pub)
    assert (res.returncode, res.stderr) == (0, "")
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert sec.read_text().startswith("my-cache-1:") and len(sec.read_text()) == 11 + 88
    assert pub.read_text().startswith("my-cache-1:") and len(pub.read_text()) == 11 + 44


def test_key_generate_never_overwrites(tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    pub.write_text("precious")
    res = run("key", "generate", "my-cache-1", sec, pub)
    assert res.returncode == 1
    assert res.stderr == f"lazystore: error: cannot create {pub}: File exists\n"
    assert pub.read_text() == "precious" and not sec.exists()
    res = run("key", "generate", "bad:name", tmp_path / "a", tmp_path / "b")
    assert res.returncode == 1 and res.stderr.startswith("lazystore: error: invalid key name")


def test_generated_key_works_with_nix(
    binary_cache: nixcache.BinaryCache, tmp_path: Path
) -> None:
    """Nix signs with a key from `key generate`; we verify that; Nix verifies ours."""
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    assert run("key", "generate", "lazystore-cli-1", sec, pub).returncode == 0
    copy = tmp_path / "cache"
    shutil.copytree(binary_cache.root, copy)
    narinfos = [copy / binary_cache.narinfo_path(p).name for p in binary_cache.paths]
    for narinfo in narinfos:
        lines = narinfo.read_text().splitlines(True)
        narinfo.write_text("".join(x for x in lines if not x.startswith("Sig:")))
    nixcache.run_nix(
        "nix", "store", "sign", "--store", f"file://{copy}", "--key-file", sec,
        "-r", binary_cache.top,
    )
    res = run("narinfo", "verify", "--trusted-public-key", pub.read_text(), *narinfos)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == len(binary_cache.paths)


def test_nix_verifies_cli_signatures(binary_cache: nixcache.BinaryCache, tmp_path: Path) -> None:
    """`narinfo sign` with a key from `nix-store --generate-binary-cache-key`."""
    copy = tmp_path / "cache"
    shutil.copytree(binary_cache.root, copy)
    narinfos = [copy / binary_cache.narinfo_path(p).name for p in binary_cache.paths]
    for narinfo in narinfos:
        lines = narinfo.read_text().splitlines(True)
        narinfo.write_text("".join(x for x in lines if not x.startswith("Sig:")))
    keys = nixcache.KeyPair.generate(tmp_path / "keys", name="lazystore-nixkey-1")
    res = run("narinfo", "sign", "--secret-key-file", keys.secret_file, *narinfos)
    assert res.returncode == 0, res.stderr

    def nix_verify(public_key: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["nix", "store", "verify", "--no-contents", "--store", f"file://{copy}",
             "--trusted-public-keys", public_key, "-r", binary_cache.top],
            capture_output=True, env=nixcache.nix_env(),
        )

    assert nix_verify(keys.public_key).returncode == 0
    assert nix_verify(TEST1_PUBLIC).returncode != 0


def test_verify_to_a_stdout_that_cannot_be_written(conformance: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [LAZYSTORE, "narinfo", "verify", "--trusted-public-key", CACHE_NIXOS,
             conformance / GOOD[0]],
            stdout=full, stderr=subprocess.PIPE, text=True,
        )
    assert proc.returncode == 1
    assert proc.stderr == "lazystore: error: cannot write to stdout: No space left on device\n"
