"""
Row keys and ref names for output repositories: pure functions, no I/O.

Rules (spec/S4-repositories.md):

- S4-1: a row key is the task type plus the SHA-256 of a canonical encoding of the *whole*
  inputs value. The encoding is injective over the values it accepts: every value carries a
  type tag and a length, mapping entries are sorted by their own encoded key at every depth,
  so ``1`` and ``"1"``, ``b"x"`` and ``"x"``, ``True`` and ``1`` give different keys, and two
  dicts that differ only in insertion order (at any depth) give the same key.
- S4-6: a ref a repository issues is ``cache://<repository id>/<namespace>/<name>#<tag>``,
  where ``tag`` is an HMAC-SHA-256 (truncated to 128 bits) over the rest, keyed by the
  repository's secret. `RefSigner.parse` accepts exactly that shape, for its own repository id
  and namespace and a matching tag, and raises `ForeignRefError` for everything else, before
  anything touches a file. The blob name it returns is 32 lowercase hex digits, so a path
  derived from it can never hold a separator, ``..`` or NUL.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
from collections.abc import Mapping
from typing import Final, final

import attrs

from .._errors import ForeignRefError
from ._events import Blob
from ._refs import MAX_REF_LENGTH, CacheRef

__all__ = [
    "MAX_NAMESPACE_LENGTH",
    "RefSigner",
    "canonical_encode",
    "check_namespace",
    "child_namespace",
    "input_digest",
    "is_blob_name",
]

#: Namespaces are at most this long (they sit inside a ref, which is at most 1024 chars).
MAX_NAMESPACE_LENGTH: Final = 255

_NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_HEX32: Final = r"[0-9a-f]{32}"
_BLOB_NAME_RE: Final = re.compile(_HEX32)
_REF_RE: Final = re.compile(
    rf"cache://(?P<repo>{_HEX32})/(?P<ns>[A-Za-z0-9_][A-Za-z0-9_.\-]*)/(?P<name>{_HEX32})"
    rf"#(?P<tag>{_HEX32})"
)
_MAX_DEPTH: Final = 256


def _encode(value: object, out: list[bytes], depth: int) -> None:
    # Invariant (S4-1): a type tag, then a length or a fixed-size body, for every value.
    if depth > _MAX_DEPTH:
        raise ValueError(f"inputs are nested deeper than {_MAX_DEPTH} levels")
    if value is None:
        out.append(b"N")
    elif value is True:
        out.append(b"T")
    elif value is False:
        out.append(b"F")
    elif isinstance(value, int):
        text = str(int(value)).encode()
        out.append(b"i" + struct.pack(">I", len(text)) + text)
    elif isinstance(value, float):
        if math.isnan(value):
            out.append(b"fnan")  # every NaN is one key: NaN != NaN must not break lookups
        else:
            out.append(b"f" + struct.pack(">d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"s" + struct.pack(">Q", len(data)) + data)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"b" + struct.pack(">Q", len(data)) + data)
    elif isinstance(value, Blob):
        out.append(b"B")
        _encode(value.mime, out, depth + 1)
        _encode(value.data, out, depth + 1)
    elif isinstance(value, CacheRef):
        out.append(b"R")
        _encode(value.ref, out, depth + 1)
        _encode(value.size, out, depth + 1)
        _encode(value.mime, out, depth + 1)
    elif isinstance(value, list | tuple):
        # Lists and tuples are one type: rows are msgpack, where a tuple comes back a list.
        out.append(b"l" + struct.pack(">Q", len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, Mapping):
        entries = []
        for key, item in value.items():
            key_parts: list[bytes] = []
            _encode(key, key_parts, depth + 1)
            item_parts: list[bytes] = []
            _encode(item, item_parts, depth + 1)
            entries.append((b"".join(key_parts), b"".join(item_parts)))
        entries.sort()
        out.append(b"d" + struct.pack(">Q", len(entries)))
        for key_bytes, item_bytes in entries:
            out.append(key_bytes)
            out.append(item_bytes)
    elif isinstance(value, set | frozenset):
        members = []
        for item in value:
            parts: list[bytes] = []
            _encode(item, parts, depth + 1)
            members.append(b"".join(parts))
        members.sort()
        out.append(b"S" + struct.pack(">Q", len(members)))
        out.extend(members)
    else:
        raise TypeError(f"cannot key inputs holding a {type(value).__name__}")


def canonical_encode(value: object) -> bytes:
    """
    Encode ``value`` canonically (S4-1): equal values give equal bytes, and values of
    different types or shapes never collide.

    Accepts None, bool, int, float, str, bytes-likes, `Blob`, `CacheRef`, lists, tuples
    (encoded as lists), mappings and sets.

    Raises:
        TypeError: ``value`` holds anything else.
        ValueError: ``value`` is nested deeper than 256 levels.
    """
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def input_digest(inputs: object) -> str:
    """Return the SHA-256 (hex) of ``canonical_encode(inputs)``: the row key's digest part."""
    return hashlib.sha256(canonical_encode(inputs)).hexdigest()


def check_namespace(namespace: object) -> str:
    """
    Return ``namespace`` if it is a valid namespace, else raise `ValueError`.

    A namespace is 1-255 characters from ``[A-Za-z0-9_.-]``, not starting with ``.`` or
    ``-`` and never containing ``..``: it cannot be read as a path.
    """
    if not isinstance(namespace, str):
        raise TypeError(f"a namespace must be a str, not {type(namespace).__name__}")
    if (
        len(namespace) > MAX_NAMESPACE_LENGTH
        or not _NAMESPACE_RE.fullmatch(namespace)
        or ".." in namespace
    ):
        raise ValueError(
            f"invalid namespace {namespace[:80]!r}: use 1-{MAX_NAMESPACE_LENGTH} characters "
            "from [A-Za-z0-9_.-], not starting with '.' or '-', without '..'"
        )
    return namespace


def child_namespace(namespace: str, label: str) -> str:
    """
    Derive the namespace of a private area (a run) inside ``namespace``.

    The child is ``<namespace>.<32 hex digits of SHA-256(label)>``, so any label (any run
    id) gives a valid namespace and two labels never share one.
    """
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return check_namespace(f"{namespace}.r{digest}")


def is_blob_name(name: str) -> bool:
    """True if ``name`` is a blob name a repository could have issued (32 hex digits)."""
    return _BLOB_NAME_RE.fullmatch(name) is not None


@final
@attrs.frozen(kw_only=True)
class RefSigner:
    """
    Issues and checks the refs of one repository (S4-6).

    Attributes:
        repository_id: 32 hex digits naming the repository (the folder, for the filesystem).
        secret: the key of the tags; never leaves the repository.
    """

    repository_id: str = attrs.field()
    secret: bytes = attrs.field(repr=False)

    @repository_id.validator
    def _check_id(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if not _BLOB_NAME_RE.fullmatch(value):
            raise ValueError("a repository id is 32 lowercase hex digits")

    @secret.validator
    def _check_secret(self, _attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) < 16:
            raise ValueError("a ref secret needs at least 16 bytes")

    def _tag(self, body: str) -> str:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, namespace: str, name: str) -> str:
        """Return the ref text for blob ``name`` in ``namespace``."""
        if not is_blob_name(name):
            raise ValueError(f"invalid blob name {name!r}")
        body = f"cache://{self.repository_id}/{check_namespace(namespace)}/{name}"
        return f"{body}#{self._tag(body)}"

    def parse(self, ref: object, *, namespace: str) -> str:
        """
        Return the blob name ``ref`` names, if this repository issued it for ``namespace``.

        Raises:
            ForeignRefError: ``ref`` is not a `CacheRef`, or its text is not exactly a ref
                this repository issued for ``namespace`` (another repository or namespace, a
                bad tag, any other shape). The message never echoes more than 80 characters.
        """
        if not isinstance(ref, CacheRef):
            raise ForeignRefError(f"not a CacheRef: {type(ref).__name__}")
        text: object = ref.ref  # a forged instance may hold anything
        if not isinstance(text, str):
            raise ForeignRefError("a CacheRef whose text is not a str")
        shown = text[:80]
        if len(text) > MAX_REF_LENGTH:
            raise ForeignRefError(f"ref {shown!r} is not one this repository issued")
        match = _REF_RE.fullmatch(text)
        if match is None:
            raise ForeignRefError(f"ref {shown!r} is not one this repository issued")
        if match["repo"] != self.repository_id:
            raise ForeignRefError(f"ref {shown!r} belongs to another repository")
        if match["ns"] != namespace:
            raise ForeignRefError(f"ref {shown!r} belongs to another namespace")
        body = text[: match.start("tag") - 1]
        if not hmac.compare_digest(self._tag(body), match["tag"]):
            raise ForeignRefError(f"ref {shown!r} has a bad tag")
        return match["name"]
