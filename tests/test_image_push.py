"""`image push` to a real registry (Debian's docker-registry on 127.0.0.1),
checked with skopeo; clear one-line errors when the registry is down, asks for
authentication or the archive is corrupt."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from lazystore.cli import main
from lazystore.errors import ImageError
from lazystore.image import oci
from lazystore.image.build import BuildResult, build_image
from lazystore.image.push import Target, push_image
from lazystore.testing import registry

pytestmark = pytest.mark.skipif(
    not registry.available(), reason="docker-registry or skopeo not installed"
)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry.Registry]:
    with registry.running(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, sample_closure: str) -> dict[str, BuildResult]:
    tmp = tmp_path_factory.mktemp("images")
    runtime = oci.RuntimeConfig([f"{sample_closure}/bin/prog"])
    return {
        "nix": build_image([sample_closure], tmp / "nix.tar", "sample", runtime),
        "layered": build_image([sample_closure], tmp / "layered.tar", "sample", runtime, 3),
    }


def _skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("kind", ["nix", "layered"])
def test_push_then_skopeo_inspect_and_pull_back(
    tmp_path: Path, reg: registry.Registry, images: dict[str, BuildResult], kind: str
) -> None:
    image = images[kind]
    ref = f"{reg.host}/lazystore/{kind}:v1"
    result = push_image(image.path, ref, plain_http=True)
    assert result.manifest_digest == image.manifest_digest
    info = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Digest"] == image.manifest_digest and info["RepoTags"] == ["v1"]
    pulled = tmp_path / "pulled"
    _skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{pulled}")
    with oci.OciArchive(image.path) as archive:
        manifest = archive.read_blob(archive.manifest_descriptor)
        assert (pulled / "manifest.json").read_bytes() == manifest  # annotations survive
        for desc in archive.blobs():
            data = (pulled / desc.digest.removeprefix("sha256:")).read_bytes()
            assert data == archive.read_blob(desc)


def test_second_push_uploads_nothing_new(
    reg: registry.Registry, images: dict[str, BuildResult]
) -> None:
    path = images["layered"].path
    first = push_image(path, f"{reg.host}/lazystore/again:a", plain_http=True)
    assert first.uploaded + first.skipped == 4  # 3 layers + config
    second = push_image(path, f"{reg.host}/lazystore/again:b", plain_http=True)
    assert (second.uploaded, second.skipped) == (0, 4)
    tags = json.loads(
        _skopeo("list-tags", "--tls-verify=false", f"docker://{reg.host}/lazystore/again")
    )
    assert sorted(tags["Tags"]) == ["a", "b"]


def test_cli_push(
    reg: registry.Registry, images: dict[str, BuildResult], capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{reg.host}/cli/sample:latest"
    assert main(["image", "push", str(images["nix"].path), ref, "--plain-http"]) == 0
    assert images["nix"].manifest_digest in capsys.readouterr().out
    info = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Digest"] == images["nix"].manifest_digest


def test_corrupt_blob_is_not_pushed(
    tmp_path: Path, reg: registry.Registry, images: dict[str, BuildResult]
) -> None:
    bad = tmp_path / "bad.tar"
    with oci.OciArchive(images["layered"].path) as archive:
        layer = archive.layers[0]
        target = oci.blob_name(layer.digest)
    with tarfile.open(images["layered"].path) as old, tarfile.open(bad, "w") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == target:
                data = bytes([data[0] ^ 1]) + data[1:]  # type: ignore[index]
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    ref = f"{reg.host}/lazystore/corrupt:v1"
    with pytest.raises(ImageError, match="does not match its digest"):
        push_image(bad, ref, plain_http=True)
    proc = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "manifest unknown" in proc.stderr  # nothing was pushed


class _AuthRequired(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _deny(self) -> None:
        body = json.dumps(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        )
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body.encode())

    do_GET = do_HEAD = do_POST = do_PUT = _deny  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def auth_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lazystore: error: "), err
    return err


def test_401_gives_one_line_error(
    auth_server: str, images: dict[str, BuildResult], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(
        ["image", "push", str(images["nix"].path), f"{auth_server}/x/y:z", "--plain-http"], capsys
    )
    assert "requires authentication" in err and auth_server in err


def test_registry_down_gives_one_line_error(
    images: dict[str, BuildResult], capsys: pytest.CaptureFixture[str]
) -> None:
    port = registry.free_port()  # nothing listens there
    err = _cli_error(
        ["image", "push", str(images["nix"].path), f"127.0.0.1:{port}/x/y:z", "--plain-http"],
        capsys,
    )
    assert f"cannot reach registry 127.0.0.1:{port}" in err


def test_tls_to_plain_registry_gives_one_line_error(
    reg: registry.Registry, images: dict[str, BuildResult], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(["image", "push", str(images["nix"].path), f"{reg.host}/x/y:z"], capsys)
    assert f"cannot reach registry {reg.host}" in err


@pytest.mark.parametrize("target", ["noslash:tag", "host/repo", "host/Repo:t", "host/r:bad tag"])
def test_bad_targets_are_refused(target: str) -> None:
    with pytest.raises(ImageError, match="invalid push target"):
        Target.parse(target)


def test_missing_archive_gives_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(["image", "push", str(tmp_path / "absent.tar"), "127.0.0.1:1/x:y"], capsys)
    assert "not a readable OCI archive" in err


def test_relative_upload_location_and_registry_errors(images: dict[str, BuildResult]) -> None:
    """Below the real registry: a relative Location is resolved against the
    upload URL, and an unexpected answer quotes the registry's error message."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/r/blobs/uploads/u1?state=s"})
        request.read()
        body = {"errors": [{"code": "DENIED", "message": "quota\nexceeded"}]}
        return httpx.Response(403, json=body)

    with pytest.raises(ImageError) as info:
        push_image(images["nix"].path, "reg.test:5000/r:t", transport=httpx.MockTransport(handler))
    message = str(info.value)
    assert "\n" not in message and "403 Forbidden: quota exceeded" in message
    put = seen[-1]
    assert put.startswith(
        "PUT https://reg.test:5000/v2/r/blobs/uploads/u1?state=s&digest=sha256%3A"
    )


def test_absolute_location_bodies_and_media_types(images: dict[str, BuildResult]) -> None:
    """An absolute Location without a query (another host, as behind a proxy) gets
    ``?digest=``; each blob PUT carries the blob's exact bytes and length; the
    manifest goes last with the OCI manifest media type."""
    archive = images["layered"].path
    with oci.OciArchive(archive) as image:
        blobs = {d.digest: image.read_blob(d) for d in image.blobs()}
        manifest = image.read_blob(image.manifest_descriptor)
    puts: list[tuple[str, dict[str, str], bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            assert str(request.url) == "http://reg.test/v2/r/s/blobs/uploads/"
            return httpx.Response(202, headers={"Location": "http://up.test/u/1"})
        puts.append((str(request.url), dict(request.headers), request.read()))
        return httpx.Response(201)

    result = push_image(archive, "reg.test/r/s:t", plain_http=True,
                        transport=httpx.MockTransport(handler))
    assert result.uploaded == len(blobs) and result.skipped == 0
    for url, headers, body in puts[:-1]:
        digest = httpx.URL(url).params["digest"]
        assert url == f"http://up.test/u/1?digest={digest.replace(':', '%3A')}"
        assert body == blobs[digest] and headers["content-length"] == str(len(body))
    assert sorted(httpx.URL(u).params["digest"] for u, _, _ in puts[:-1]) == sorted(blobs)
    url, headers, body = puts[-1]
    assert url == "http://reg.test/v2/r/s/manifests/t"
    assert headers["content-type"] == oci.MEDIA_MANIFEST and body == manifest


class _RedirectingRegistry(BaseHTTPRequestHandler):
    """Upload PUTs are redirected (307) to a storage URL, which checks the bytes."""

    protocol_version = "HTTP/1.1"
    stored: dict[str, bytes] = {}

    def _answer(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(404)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(202, {"Location": "/v2/r/blobs/uploads/u1"})

    def do_PUT(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        url = httpx.URL(self.path)
        if url.path == "/v2/r/blobs/uploads/u1":
            self._answer(307, {"Location": f"/storage?digest={url.params['digest']}"})
        elif url.path == "/storage":
            digest = url.params["digest"]
            ok = "sha256:" + hashlib.sha256(body).hexdigest() == digest
            if ok:
                self.stored[digest] = body
            self._answer(201 if ok else 400)
        else:
            self._answer(201)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_redirected_blob_upload_resends_the_whole_blob(images: dict[str, BuildResult]) -> None:
    # A real HTTP server: a streamed body must be streamed again after a 307.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RedirectingRegistry)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = push_image(images["layered"].path, f"127.0.0.1:{server.server_address[1]}/r:t",
                            plain_http=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    with oci.OciArchive(images["layered"].path) as image:
        blobs = {d.digest: image.read_blob(d) for d in image.blobs()}
    assert result.uploaded == len(blobs)
    assert _RedirectingRegistry.stored == blobs
