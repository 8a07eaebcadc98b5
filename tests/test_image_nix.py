"""The nix image: one layer of placeholders for exactly the closure, annotated
as nix-snapshotter expects; closures from real Nix; the `image build` CLI."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from lazystore.cli import main
from lazystore.errors import ImageError
from lazystore.image import nix
from lazystore.image.build import build_image
from lazystore.image.closure import PathInfo, is_store_path, local_closure, parse_dump_db
from lazystore.image.oci import OciArchive, RuntimeConfig
from lazystore.testing import nixcache


def _layer_members(archive: Path, index: int = 0) -> list[tarfile.TarInfo]:
    with OciArchive(archive) as image:
        blob = image.read_blob(image.layers[index])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return tar.getmembers()


def test_placeholders_are_exactly_the_closure(tmp_path: Path, sample_closure: str) -> None:
    out = tmp_path / "nix.tar"
    build_image([sample_closure], out, "sample", RuntimeConfig())
    closure = sorted(nixcache.closure(sample_closure))
    members = _layer_members(out)
    assert [m.name for m in members] == ["nix", "nix/store"] + [p.lstrip("/") for p in closure]
    for member in members:
        assert member.isdir(), member.name  # every sample path is a directory
        assert (member.uid, member.gid, member.mtime) == (0, 0, 1)
    with OciArchive(out) as image:
        (layer,) = image.layers
        expected = {"containerd.io/snapshot/nix-layer": "true"}
        expected |= {f"containerd.io/snapshot/nix-store-path.{i}": p for i, p in enumerate(closure)}
        assert layer.annotations == expected
        assert nix.store_paths_of(layer.annotations) == closure


def test_file_and_symlink_store_paths_get_empty_file_placeholders(
    tmp_path: Path, sample_closure: str
) -> None:
    (tmp_path / "afile").write_text("file store path\n")
    (tmp_path / "alink").symlink_to("afile")
    file_path = nixcache.run_nix("nix-store", "--add", tmp_path / "afile").decode().strip()
    link_path = nixcache.run_nix("nix-store", "--add", tmp_path / "alink").decode().strip()
    out = tmp_path / "nix.tar"
    build_image([sample_closure, file_path, link_path], out, "mixed", RuntimeConfig())
    members = {m.name: m for m in _layer_members(out)}
    for path in (file_path, link_path):
        member = members[path.lstrip("/")]
        assert member.isfile() and member.size == 0
    assert members[sample_closure.lstrip("/")].isdir()
    assert len(members) == 2 + len(nixcache.closure(sample_closure)) + 2


def test_annotations_round_trip_in_index_order() -> None:
    paths = [f"/nix/store/{'a' * 32}-p{i}" for i in range(12)]
    found = nix.annotations(paths)
    assert found["containerd.io/snapshot/nix-store-path.11"] == paths[11]
    assert nix.store_paths_of(dict(reversed(list(found.items())))) == paths
    assert nix.store_paths_of({"containerd.io/snapshot/nix-store-path.0": paths[0]}) == []


def test_placeholder_entries_kinds() -> None:
    d, f = f"/nix/store/{'b' * 32}-dir", f"/nix/store/{'c' * 32}-file"
    entries = list(nix.placeholder_entries({f: False, d: True}))
    assert [(e.name, e.kind, e.size) for e in entries] == [
        ("nix", "dir", 0),
        ("nix/store", "dir", 0),
        (d[1:], "dir", 0),
        (f[1:], "file", 0),
    ]


DUMP = """\
/nix/store/ac91p52hs60hi0y2v34jchkzqbwvfsz5-busybox
9b103e1823793ce1d80b7919f0cc11bb9d4f7b45044b238dba1b0bf9efdedc90
1984272
/nix/store/s5acs6zgprvf0046y963h954xrsa7vjg-busybox.drv
0
/nix/store/fprfv7jn480jqs0aaw76ps3grwj202ng-prog
e2c2fcd67e35d6abf2dee35919f35142475c732a716d48954261c3842c9a4209
752

2
/nix/store/fprfv7jn480jqs0aaw76ps3grwj202ng-prog
/nix/store/ac91p52hs60hi0y2v34jchkzqbwvfsz5-busybox
"""


def test_parse_dump_db() -> None:
    busybox, prog = parse_dump_db(DUMP)
    assert busybox == PathInfo("/nix/store/ac91p52hs60hi0y2v34jchkzqbwvfsz5-busybox", 1984272, ())
    assert prog.nar_size == 752
    assert prog.references == (busybox.path,)  # the self-reference is dropped


@pytest.mark.parametrize(
    "text", [DUMP[:-60], DUMP.replace("1984272", "big"), DUMP.replace("-busybox\n9b", "-bu/sy\n9b")]
)
def test_parse_dump_db_rejects_malformed(text: str) -> None:
    with pytest.raises(ImageError, match="dump-db"):
        parse_dump_db(text)


@pytest.mark.parametrize(
    ("path", "valid"),
    [
        (f"/nix/store/{'a' * 32}-x", True),
        (f"/nix/store/{'a' * 32}-.x", False),
        (f"/nix/store/{'e' * 32}-x", False),  # 'e' is not in nix32
        (f"/nix/store/{'a' * 31}-x", False),
        (f"/nix/store/{'a' * 32}-x/bin", False),
        (f"/nix/other/{'a' * 32}-x", False),
    ],
)
def test_is_store_path(path: str, valid: bool) -> None:
    assert is_store_path(path) is valid


def test_local_closure_matches_nix(sample_closure: str) -> None:
    infos = local_closure([sample_closure])
    assert [i.path for i in infos] == sorted(nixcache.closure(sample_closure))
    by_path = {i.path: i for i in infos}
    assert set(by_path[sample_closure].references) == set(nixcache.references(sample_closure))
    assert all(i.nar_size > 0 for i in infos)


def test_cli_build_follows_result_symlink(
    tmp_path: Path, sample_closure: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "result").symlink_to(sample_closure)
    out = tmp_path / "img.tar"
    argv = [
        "image",
        "build",
        str(tmp_path / "result"),
        "-o",
        str(out),
        "--name",
        "demo:v1",
        "--entrypoint",
        f"{sample_closure}/bin/prog",
        "--cmd",
        '["a b", "c"]',
        "--env",
        "A=1",
        "--env",
        "B=x=y",
    ]
    assert main(argv) == 0
    assert "docker.io/library/demo:v1" in capsys.readouterr().out
    with OciArchive(out) as image:
        assert image.config["config"] == {
            "Entrypoint": [f"{sample_closure}/bin/prog"],
            "Cmd": ["a b", "c"],
            "Env": ["A=1", "B=x=y"],
        }
        assert json.loads(image.read_blob(image.manifest_descriptor))["layers"][0]["annotations"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/tmp", "--name", "x"], "not a store path"),
        ([f"/nix/store/{'a' * 32}-absent", "--name", "x"], "not in the local Nix store"),
        (["{closure}", "--name", "Bad Name"], "invalid image name"),
        (["{closure}", "--name", "x", "--env", "NOEQUALS"], "expected K=V"),
        (["{closure}", "--name", "x", "--layered", "0"], "at least 1 layer"),
        (["{closure}", "--name", "x", "--cmd", "'unclosed"], "--cmd"),
        (["{closure}", "--name", "x", "--entrypoint", '["a", 1]'], "--entrypoint"),
    ],
)
def test_cli_build_errors_are_one_line(
    tmp_path: Path,
    sample_closure: str,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    out = tmp_path / "img.tar"
    out.write_bytes(b"previous")
    argv = [a.replace("{closure}", sample_closure) for a in argv]
    assert main(["image", "build", *argv, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lazystore: error: ") and message in err
    assert out.read_bytes() == b"previous"  # nothing lost
    assert list(tmp_path.iterdir()) == [out]  # no temporaries left


def test_cli_build_unwritable_output_is_one_line(
    tmp_path: Path, sample_closure: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for out in (tmp_path / "missing" / "img.tar", tmp_path):
        assert main(["image", "build", sample_closure, "-o", str(out), "--name", "x"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lazystore: error: "), err
    assert list(tmp_path.iterdir()) == []  # no temporaries left


@pytest.mark.allow_log(r"the profile names 1 store paths outside the closure, ignored: "
                       r"0+1-elsewhere",
                       r"the profile's store paths do not fit in a label: the first 1 of 2")
def test_a_profile_is_an_annotation_of_the_closures_paths_that_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    closure = [f"/nix/store/{'a' * 32}-one", f"/nix/store/{'b' * 32}-two"]
    one, two = (p.rsplit("/", 1)[1] for p in closure)
    assert nix.profile_paths(closure, [two, one, two]) == [two, one]
    assert nix.annotations(closure, [two, one])[
        "containerd.io/snapshot/lazystore-profile"] == f"{two} {one}"
    monkeypatch.setattr(nix, "PROFILE_BYTES", len(two) + 1)
    assert nix.profile_paths(closure, [two, "0" * 31 + "1-elsewhere", one]) == [two]


@pytest.mark.allow_log(r"the profile names 1 store paths outside the closure, ignored: "
                       r"0+1-elsewhere$")
def test_a_profiles_files_are_entries_of_the_closures_paths() -> None:
    closure = [f"/nix/store/{'a' * 32}-one", f"/nix/store/{'b' * 32}-two"]
    one, two = (p.rsplit("/", 1)[1] for p in closure)
    elsewhere = "0" * 31 + "1-elsewhere"
    assert nix.profile_paths(closure, [f"{two}/bin/x", f"{elsewhere}/lib/y", one,
                                       f"{elsewhere}/z", f"{two}/bin/x"]) == [f"{two}/bin/x", one]


def test_cli_build_with_a_profile_annotates_its_files_in_order(
        tmp_path: Path, sample_closure: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lazystore import profile

    closure = nixcache.closure(sample_closure)
    liba = next(Path(p).name for p in closure if p.endswith("-liba"))
    rec = profile.Recorder()
    rec.read(Path(sample_closure).name, "bin/prog", 10, now=0.0)
    rec.read(liba, "lib/data", 16, now=0.5)
    (tmp_path / "profile.json").write_bytes(profile.dumps(rec.document()))
    out = tmp_path / "img.tar"
    assert main(["image", "build", sample_closure, "-o", str(out), "--name", "p:1",
                 "--profile", str(tmp_path / "profile.json")]) == 0
    with OciArchive(out) as image:
        (layer,) = image.layers
    assert layer.annotations["containerd.io/snapshot/lazystore-profile"] == (
        f"{Path(sample_closure).name}/bin/prog {liba}/lib/data")
