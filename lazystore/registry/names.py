"""Image names and references of the registry (pure).

A repository name is either a store path — its hash part alone or its whole
basename, lower-case — or, with an expression, ``attr/attr/...`` (attribute
names of the expression's set). References are the tags ``latest`` (nix
image) and ``layered`` (classic image), or a manifest digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazystore.errors import FormatError
from lazystore.nix.storepath import StorePath
from lazystore.registry.errors import DigestInvalid, NameInvalid, TagInvalid

MAX_NAME = 255  # what docker's reference parser accepts
TAGS = ("latest", "layered")
# The distribution spec's repository name grammar.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_HASH = re.compile(r"[0-9a-df-np-sv-z]{32}")  # nix32 alphabet
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Name:
    """A parsed repository name: a store path (*hash_part*, *basename* when the
    name gave one) or the attribute path *attrs*."""

    text: str
    hash_part: str | None = None
    basename: str | None = None
    attrs: tuple[str, ...] = ()

    @property
    def is_store_path(self) -> bool:
        return self.hash_part is not None


def parse_name(text: str) -> Name:
    """The Name of *text*; NameInvalid when it breaks the spec's grammar."""
    if len(text) > MAX_NAME:
        raise NameInvalid(f"repository name of {len(text)} characters (at most {MAX_NAME})")
    components = text.split("/")
    if not all(_COMPONENT.fullmatch(c) for c in components):
        raise NameInvalid(
            f"invalid repository name {text!r}: lower-case [a-z0-9] components "
            "separated by '.', '_', '-' or '/'")
    if len(components) == 1:
        head = components[0]
        if _HASH.fullmatch(head):
            return Name(text, hash_part=head)
        if len(head) > 33 and head[32] == "-" and _HASH.fullmatch(head[:32]):
            try:
                StorePath.from_basename(head)
            except FormatError as exc:
                raise NameInvalid(f"invalid store path name {text!r}: {exc}") from None
            return Name(text, hash_part=head[:32], basename=head)
    return Name(text, attrs=tuple(components))


@dataclass(frozen=True)
class Reference:
    tag: str | None = None
    digest: str | None = None


def parse_reference(text: str) -> Reference:
    """A tag or a ``sha256:<hex>`` digest (TagInvalid / DigestInvalid otherwise)."""
    if ":" in text:
        return Reference(digest=parse_digest(text))
    if not _TAG.fullmatch(text):
        raise TagInvalid(f"invalid tag {text[:200]!r}")
    return Reference(tag=text)


def parse_digest(text: str) -> str:
    """*text* if it is a sha256 digest; DigestInvalid for any other algorithm or form."""
    if _SHA256.fullmatch(text):
        return text
    if _DIGEST.fullmatch(text):
        algorithm = text.split(":", 1)[0]
        raise DigestInvalid(f"unsupported digest algorithm {algorithm[:40]!r} (only sha256)")
    raise DigestInvalid(f"invalid digest {text[:200]!r}")
