"""Push an OCI archive to a registry with the OCI distribution API.

For each blob (layers, then config): ``HEAD`` to skip what the registry has,
otherwise ``POST`` an upload session and ``PUT`` the bytes monolithically with
their digest. Then ``PUT`` the manifest under the tag. Blob bytes are checked
against their digest as they stream. Every failure is one ImageError line;
authentication is not supported, so a 401 says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from lazystore.errors import ImageError
from lazystore.image.oci import MEDIA_MANIFEST, Descriptor, OciArchive

log = logging.getLogger(__name__)

_TARGET = re.compile(
    r"(?P<host>[^/]+)/(?P<repo>[a-z0-9]+(?:[._/-]+[a-z0-9]+)*):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
)


@dataclass(frozen=True)
class Target:
    host: str  # HOST[:PORT]
    repository: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> Target:
        match = _TARGET.fullmatch(text)
        if not match:
            raise ImageError(f"invalid push target {text!r}; expected HOST[:PORT]/REPO:TAG")
        return cls(match["host"], match["repo"], match["tag"])

    def base_url(self, plain_http: bool) -> str:
        return f"{'http' if plain_http else 'https'}://{self.host}/v2/{self.repository}"


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    uploaded: int  # blobs sent
    skipped: int  # blobs the registry already had


def push_image(
    archive: Path,
    target: str,
    plain_http: bool = False,
    transport: httpx.BaseTransport | None = None,
    timeout: float = 60.0,
) -> PushResult:
    """Push the image in *archive* to *target* (``HOST[:PORT]/REPO:TAG``)."""
    dest = Target.parse(target)
    with (
        OciArchive(archive) as image,
        httpx.Client(transport=transport, timeout=timeout, follow_redirects=True) as client,
    ):
        pusher = _Pusher(client, dest, dest.base_url(plain_http), image)
        return pusher.run()


class _Pusher:
    def __init__(self, client: httpx.Client, dest: Target, base: str, image: OciArchive) -> None:
        self.client, self.dest, self.base, self.image = client, dest, base, image

    def run(self) -> PushResult:
        uploaded = skipped = 0
        for desc in self.image.blobs():
            if self._has_blob(desc):
                skipped += 1
            else:
                self._upload(desc)
                uploaded += 1
        manifest = self.image.read_blob(self.image.manifest_descriptor)
        self._request(
            "PUT",
            f"{self.base}/manifests/{self.dest.tag}",
            (201,),
            content=manifest,
            headers={"Content-Type": MEDIA_MANIFEST},
        )
        digest = self.image.manifest_descriptor.digest
        log.info(
            "pushed %s to %s/%s:%s (%d blobs uploaded, %d present)",
            digest,
            self.dest.host,
            self.dest.repository,
            self.dest.tag,
            uploaded,
            skipped,
        )
        return PushResult(digest, uploaded, skipped)

    def _has_blob(self, desc: Descriptor) -> bool:
        resp = self._request("HEAD", f"{self.base}/blobs/{desc.digest}", (200, 404))
        return resp.status_code == 200

    def _upload(self, desc: Descriptor) -> None:
        resp = self._request("POST", f"{self.base}/blobs/uploads/", (202,))
        location = resp.headers.get("Location")
        if not location:
            raise ImageError(f"registry {self.dest.host} started an upload without a Location")
        url = httpx.URL(urljoin(str(resp.url), location))
        url = url.copy_merge_params({"digest": desc.digest})
        self._request(
            "PUT",
            str(url),
            (201,),
            content=_BlobBody(self.image, desc),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
        )
        log.debug("uploaded %s (%d bytes)", desc.digest, desc.size)

    def _request(
        self, method: str, url: str, expect: tuple[int, ...], **kwargs: object
    ) -> httpx.Response:
        try:
            resp = self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot reach registry {self.dest.host}: {_reason(exc)}") from None
        except httpx.StreamError as exc:
            raise ImageError(f"registry {self.dest.host}: {method} {httpx.URL(url).path}: "
                             f"{_reason(exc)}") from None
        if resp.status_code in expect:
            return resp
        if resp.status_code == 401:
            raise ImageError(
                f"registry {self.dest.host} requires authentication (401 Unauthorized); "
                "lazystore image push supports only registries without authentication"
            )
        raise ImageError(
            f"registry {self.dest.host}: {method} {httpx.URL(url).path} answered "
            f"{resp.status_code} {resp.reason_phrase}{_registry_message(resp)}"
        )


class _BlobBody:
    """A blob as request content that can be sent again (after a 307/308 redirect,
    httpx iterates the body anew; a generator could only be sent once)."""

    def __init__(self, image: OciArchive, desc: Descriptor) -> None:
        self.image, self.desc = image, desc

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.image.stream_blob(self.desc))


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _registry_message(resp: httpx.Response) -> str:
    """The first error message of a registry's JSON error body, if any."""
    try:
        errors = resp.json().get("errors") or []
        message = errors[0].get("message") or errors[0].get("code")
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""
    return f": {' '.join(str(message).split())}" if message else ""
