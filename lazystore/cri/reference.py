"""``nix:0/<store path>`` references, as nix-snapshotter writes them (pure).

The kubelet only passes references that parse as Docker references and adds
``:latest`` when there is no tag, so ``nix:0`` is a registry host with port 0
and the store path is the repository: ``nix:0/nix/store/<hash>-<name>:latest``.
That normalised form is also the image's name in containerd, so containerd's
CRI resolves the reference by itself (ImageStatus, the kubelet's image GC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazystore.cri.errors import InvalidReference
from lazystore.errors import FormatError
from lazystore.nix.storepath import DEFAULT_STORE_DIR, StorePath

PREFIX = "nix:0"
TAG = "latest"
# A path component of a Docker reference (distribution's reference grammar).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def is_nix(ref: str) -> bool:
    """Whether *ref* is meant for Nix (it may still be invalid): ``nix:…``, a
    registry host no Docker reference can name with anything but a port."""
    return ref.startswith("nix:")


@dataclass(frozen=True)
class NixReference:
    store_path: StorePath
    store_dir: str = DEFAULT_STORE_DIR

    @property
    def path(self) -> str:
        return self.store_path.path(self.store_dir)

    @property
    def image_name(self) -> str:
        """The image's name in containerd (the normalised reference)."""
        return f"{PREFIX}{self.path}:{TAG}"


def parse(ref: str, store_dir: str = DEFAULT_STORE_DIR) -> NixReference:
    """The store path *ref* names; InvalidReference with the reason otherwise."""
    if not ref.startswith(PREFIX + "/"):
        raise InvalidReference(f"reference {ref!r} does not start with {PREFIX}/")
    path = ref[len(PREFIX):]
    if "@" in path:
        raise InvalidReference(f"reference {ref!r}: a nix:0 reference takes no digest")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if tag != TAG:
            raise InvalidReference(f"reference {ref!r}: the only tag of a nix:0 image is {TAG}")
    try:
        store_path = StorePath.parse(path, store_dir)
    except FormatError as exc:
        raise InvalidReference(f"reference {ref!r}: {exc}") from None
    parsed = NixReference(store_path, store_dir)
    if parsed.path != path:
        raise InvalidReference(f"reference {ref!r}: not a store path (trailing '/')")
    for part in parsed.path.strip("/").split("/"):
        if not _COMPONENT.fullmatch(part):
            raise InvalidReference(
                f"reference {ref!r}: {part!r} cannot be part of an image name "
                "(lower-case letters, digits and single separators only)"
            )
    return parsed
