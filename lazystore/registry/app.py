"""The distribution API's read side over :class:`Images` (routing and headers).

Routes: ``/v2/``, ``/v2/<name>/manifests/<reference>``,
``/v2/<name>/blobs/<digest>``, ``/v2/<name>/tags/list``; GET and HEAD only.
Registry errors become the spec's JSON error bodies here, in one place.
"""

from __future__ import annotations

import json
import logging
import re

from lazystore.registry.errors import (
    BlobUnknown,
    NotFound,
    RegistryError,
    Unsupported,
)
from lazystore.registry.http import Request, Response
from lazystore.registry.images import Images
from lazystore.registry.names import TAGS, parse_digest, parse_name, parse_reference

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)")
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list")


class RegistryApp:
    def __init__(self, images: Images) -> None:
        self.images = images

    async def __call__(self, request: Request) -> Response:
        try:
            response = await self._route(request)
        except RegistryError as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug: answer 500, keep serving, log it
            log.exception("%s %s failed", request.method, request.target[:200])
            response = error_response(RegistryError(f"internal error: {exc}"))
        response.headers.setdefault(*API_VERSION)
        log.debug("%s %s -> %d", request.method, request.target[:200], response.status)
        return response

    async def _route(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(f"{request.method} is not supported: this registry is read-only")
        target = request.target
        if target in ("/v2", "/v2/"):
            return _json(200, {})
        if m := _ROUTE.fullmatch(target):
            if m["kind"] == "manifests":
                return await self._manifest(m["name"], m["ref"], request)
            return self._blob(m["name"], m["ref"])
        if m := _TAGS.fullmatch(target):
            return await self._tags(m["name"])
        raise NotFound(f"no such API endpoint {target[:200]!r}")

    async def _manifest(self, name_text: str, ref_text: str, request: Request) -> Response:
        name, ref = parse_name(name_text), parse_reference(ref_text)
        accept = request.headers.get("accept", "")
        if ref.digest is not None:
            found = await self.images.by_digest(name, ref.digest)
        else:
            assert ref.tag is not None
            found = await self.images.manifest(name, ref.tag, accept)
        return Response(200, {"Content-Type": found.media_type, **_digest_headers(found.digest)},
                        found.data)

    def _blob(self, name_text: str, digest_text: str) -> Response:
        parse_name(name_text)
        digest = parse_digest(digest_text)
        path = self.images.blob(digest)
        if path is None:
            raise BlobUnknown(f"no blob {digest}")
        headers = {"Content-Type": "application/octet-stream", **_digest_headers(digest),
                   "Cache-Control": "max-age=31536000, immutable"}
        return Response(200, headers, path, path.stat().st_size)

    async def _tags(self, name_text: str) -> Response:
        name = parse_name(name_text)
        await self.images.check(name)
        return _json(200, {"name": name.text, "tags": list(TAGS)})


def _digest_headers(digest: str) -> dict[str, str]:
    return {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


def _json(status: int, document: object) -> Response:
    body = json.dumps(document, sort_keys=True).encode()
    return Response(status, {"Content-Type": "application/json"}, body)


def error_response(exc: RegistryError) -> Response:
    """The spec's error body for *exc*, with its status."""
    return _json(exc.status, {"errors": [{"code": exc.code, "message": str(exc)}]})
