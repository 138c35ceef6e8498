"""HTTP Message Signatures (RFC 9421, Ed25519) and Content-Digest (RFC 9530), Dispatch profile.

A signed Run request carries ``Content-Digest: sha-512=:<b64>:``, ``Signature-Input`` and
``Signature`` headers. The single signature (label ``dispatch``) covers ``"@method" "@path"
"@authority" "content-type" "content-digest"`` with the parameters
``created=<unix seconds>;keyid="default";alg="ed25519";nonce="<random>"``.

Ed25519 signatures are deterministic, so the random ``nonce`` is what makes each signature
unique: the same request body sent again in the same second (a retry) gets a new signature,
and an endpoint can refuse any signature it has already accepted (`ReplayGuard`).

Verification failures come in two kinds, matching the endpoint's HTTP answers:

* ``MalformedSignatureError`` (401 ``unauthenticated``): a header, parameter or covered
  component is missing, unsupported or not valid structured-field syntax (RFC 8941).
* ``InvalidSignatureError`` (403 ``permission_denied``): the request is well formed but does not
  check out: wrong key id, algorithm or signature, body digest mismatch, stale or expired.

The Ed25519 arithmetic is `cryptography`'s, imported only when a key is loaded: a process
that never signs nor verifies (an app with its scheduler in process) does without its
7 to 8 MB. `new_private_key_pem` makes a key without it, to be loaded when first used.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import os
import re
import time
from binascii import b2a_base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha512
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "InvalidSignatureError",
    "MalformedSignatureError",
    "ReplayGuard",
    "RequestSigner",
    "SignatureError",
    "content_digest",
    "load_private_key",
    "load_public_key",
    "new_private_key_pem",
    "private_key_to_pem",
    "public_key_to_base64",
    "sign_request",
    "verify_headers",
    "verify_request",
]

_REQUIRED_COMPONENTS = ("@method", "@path", "@authority", "content-type", "content-digest")
_ALLOWED_PARAMS = frozenset({"alg", "created", "expires", "keyid", "nonce"})
_CLOCK_SKEW = 5  # seconds a signer's clock may run ahead; also grace after expiry
_MAX_AGE = 300  # seconds a signature stays acceptable after `created`
_DIGEST_MISMATCH = "digest of the request body does not match the Content-Digest header"
_SIGNATURE_MISMATCH = "request signature does not match the request and verification key"
_NONCE_BYTES = 12  # 16 characters of URL-safe base64, as secrets.token_urlsafe(12) gives
_URLSAFE = bytes.maketrans(b"+/", b"-_")
# Preference order; the constructors themselves, cheaper to call than hashlib.new(name).
_DIGESTS = MappingProxyType({"sha-512": hashlib.sha512, "sha-256": hashlib.sha256})

_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*")
_BARE = re.compile(  # RFC 8941 bare items; the group name says which kind matched
    r"(?P<dec>-?[0-9]{1,12}\.[0-9]{1,3})|(?P<int>-?[0-9]{1,15})"
    r'|"(?P<str>(?:[ !#-\[\]-~]|\\["\\])*)"'
    r"|:(?P<bin>[A-Za-z0-9+/=]*):|\?(?P<bool>[01])|(?P<tok>[A-Za-z*][-!#$%&'*+.^_`|~:/A-Za-z0-9]*)"
)
_T = TypeVar("_T")


class SignatureError(Exception):
    """Base class of request signature failures."""


class MalformedSignatureError(SignatureError):
    """A signature header, parameter or covered component is missing or malformed (HTTP 401)."""


class InvalidSignatureError(SignatureError):
    """The signature is well formed but wrong, stale or does not match the request (HTTP 403)."""


# --- RFC 8941 structured fields: the subset HTTP signatures need ------------------------------


class _Token(str):
    """An sf-token, kept distinct from an sf-string (``keyid=default`` is not ``"default"``)."""

    __slots__ = ()


_Bare = int | float | str | bytes | bool


@dataclass(frozen=True)
class _Item:
    value: _Bare
    params: dict[str, _Bare]


@dataclass(frozen=True)
class _InnerList:
    items: list[_Item]
    params: dict[str, _Bare]


class _Parser:
    """Parser for an RFC 8941 dictionary (section 4.2), failing with MalformedSignatureError."""

    def __init__(self, text: str, field: str) -> None:
        self._s = text
        self._i = 0
        self._field = field

    def _fail(self, what: str) -> MalformedSignatureError:
        where = f"at character {self._i}"
        return MalformedSignatureError(f"malformed {self._field} header: {what} {where}")

    def _peek(self) -> str:
        return self._s[self._i] if self._i < len(self._s) else ""

    def _skip(self, chars: str) -> None:
        while self._i < len(self._s) and self._s[self._i] in chars:
            self._i += 1

    def dictionary(self) -> dict[str, _Item | _InnerList]:
        members: dict[str, _Item | _InnerList] = {}
        self._skip(" ")
        while self._i < len(self._s):
            key = self._key()
            if self._peek() == "=":
                self._i += 1
                members[key] = self._inner_list() if self._peek() == "(" else self._item()
            else:
                members[key] = _Item(True, self._params())
            self._skip(" \t")
            if self._i == len(self._s):
                break
            if self._peek() != ",":
                raise self._fail("expected ',' between members")
            self._i += 1
            self._skip(" \t")
            if self._i == len(self._s):
                raise self._fail("trailing ','")
        return members

    def _inner_list(self) -> _InnerList:
        self._i += 1
        items: list[_Item] = []
        while True:
            self._skip(" ")
            if self._peek() == ")":
                self._i += 1
                return _InnerList(items, self._params())
            if not self._peek():
                raise self._fail("unterminated inner list")
            items.append(self._item())
            if self._peek() and self._peek() not in " )":
                raise self._fail("expected ' ' or ')' in inner list")

    def _item(self) -> _Item:
        return _Item(self._bare(), self._params())  # arguments evaluate left to right

    def _params(self) -> dict[str, _Bare]:
        params: dict[str, _Bare] = {}
        while self._peek() == ";":
            self._i += 1
            self._skip(" ")
            key = self._key()
            value: _Bare = True
            if self._peek() == "=":
                self._i += 1
                value = self._bare()
            params[key] = value
        return params

    def _key(self) -> str:
        m = _KEY.match(self._s, self._i)
        if m is None:
            raise self._fail("expected a lowercase key")
        self._i = m.end()
        return m.group()

    def _bare(self) -> _Bare:
        m = _BARE.match(self._s, self._i)
        if m is None or m.lastgroup is None:
            what = {'"': "string", ":": "byte sequence"}.get(self._peek(), "item")
            raise self._fail(f"invalid or unterminated {what}")
        self._i, kind, text = m.end(), m.lastgroup, m.group(m.lastgroup)
        if kind == "bin":
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:
                raise self._fail("invalid base64 in byte sequence") from None
        if kind == "str":
            return re.sub(r"\\(.)", r"\1", text)
        if kind == "tok":
            return _Token(text)
        return text == "1" if kind == "bool" else float(text) if kind == "dec" else int(text)


def _ser_bare(value: _Bare) -> str:
    kind = type(value)  # exact types first: the common cases, cheaply (bool is no int)
    if kind is str:
        text = cast(str, value)
        if '"' in text or "\\" in text:
            text = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if kind is int:
        return str(value)
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    if isinstance(value, _Token):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ser_params(params: Mapping[str, _Bare]) -> str:
    return "".join(f";{k}" if v is True else f";{k}={_ser_bare(v)}" for k, v in params.items())


def _ser_inner_list(value: _InnerList) -> str:
    inner = " ".join(_ser_bare(i.value) + _ser_params(i.params) for i in value.items)
    return f"({inner}){_ser_params(value.params)}"


# --- Fast path: the exact shapes a Dispatch signer emits -------------------------------------
#
# The fast parser accepts only a strict subset of the RFC 8941 grammar (one member, single
# spaces between items, no escapes, no negative or decimal numbers, no tokens, no booleans)
# and returns exactly what `_Parser` returns for that text; for anything else it returns
# None and the general parser decides. tests/test_signature_fastpath.py checks both agree.

_Dictionary = dict[str, _Item | _InnerList]
_Parse = Callable[[str, str], _Dictionary]  # (header value, header name) -> members


_FAST_BYTES = re.compile(r"([a-z*][a-z0-9_.*-]*)=:([A-Za-z0-9+/]*={0,2}):")
_FAST_INNER = re.compile(r'([a-z*][a-z0-9_.*-]*)=\(("[!#-\[\]-~]*"(?: "[!#-\[\]-~]*")*)\)')
_FAST_COMPONENT = re.compile(r'"([!#-\[\]-~]*)"')
_FAST_PARAM = re.compile(r';([a-z*][a-z0-9_.*-]*)=(?:([0-9]{1,15})|"([ !#-\[\]-~]*)")')


def _fast_dictionary(text: str) -> _Dictionary | None:
    """Parse a one-member dictionary of a shape Dispatch signers emit, or return None.

    Recognised: ``label=:<base64>:`` (Signature, Content-Digest) and ``label=("a" "b"
    ...);key=<digits>;key="string"...`` (Signature-Input).
    """
    if (m := _FAST_BYTES.fullmatch(text)) is not None:
        try:
            value = base64.b64decode(m[2], validate=True)
        except ValueError:
            return None  # the general parser reports it
        return {m[1]: _Item(value, {})}
    if (m := _FAST_INNER.match(text)) is None:
        return None
    items = [_Item(name, {}) for name in _FAST_COMPONENT.findall(m[2])]
    params: dict[str, _Bare] = {}
    i, end = m.end(), len(text)
    while i < end:
        if (p := _FAST_PARAM.match(text, i)) is None:
            return None
        digits = p[2]
        params[p[1]] = int(digits) if digits is not None else p[3]
        i = p.end()
    return {m[1]: _InnerList(items, params)}


def _parse_dictionary(text: str, field: str) -> _Dictionary:
    """Parse a header value with the fast path when it applies, else the general parser."""
    fast = _fast_dictionary(text)
    return fast if fast is not None else _Parser(text, field).dictionary()


# --- Fast verification: a whole request in the profile's exact shape ----------------------------
#
# `_fast_verify` proves, with a few regular expressions, that every shape check of `_verify`
# passes, and then that the values do; it answers None as soon as anything differs (another
# shape, or any failure but the last two value checks) and `_verify` decides alone. Within the
# shape, serializing the parsed inner list gives back its text unchanged (no escapes, no
# leading zeros, no repeated parameter, single spaces), so the ``@signature-params`` line is
# the Signature-Input value itself, past the label.

_FAST_OURS = re.compile(  # what RequestSigner emits: no parameter list to take apart
    r'([a-z*][a-z0-9_.*-]*)=(\("@method" "@path" "@authority" "content-type" "content-digest"\)'
    r';created=(0|[1-9][0-9]{0,14});keyid="default";alg="ed25519"(?:;nonce="[ !#-\[\]-~]*")?)'
)
_FAST_INPUT = re.compile(  # other orders (dispatch-py's components come from a set)
    r'([a-z*][a-z0-9_.*-]*)=(\(("[a-z@-]+"(?: "[a-z@-]+"){4})\)'
    r'((?:;(?:created|expires)=(?:0|[1-9][0-9]{0,14})|;(?:keyid|alg|nonce)="[ !#-\[\]-~]*")+))'
)
_FAST_INPUT_PARAM = re.compile(r';([a-z]+)=(?:"([ !#-\[\]-~]*)"|([0-9]+))')
_FAST_SHA512 = re.compile(r"sha-512=:([A-Za-z0-9+/]*={0,2}):")
_COMPONENT_SET = frozenset(_REQUIRED_COMPONENTS)
_DEFAULT_PORTS = MappingProxyType({"http": ":80", "https": ":443"})


def _fast_verify(
    key: Ed25519PublicKey,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    current: float,
) -> Verified | None:
    """Verify a request of the shape Dispatch signers emit, or return None to let `_verify` decide.

    Args:
        key: The verification key.
        method: The HTTP method.
        url: The absolute request URL as the server saw it.
        headers: The request headers.
        body: The request body.
        current: The current Unix time.

    Returns:
        The verified signature, or None when `_verify` must decide.

    Raises:
        InvalidSignatureError: Only as `_verify` would: the body digest or the signature does not
            match, and every other check passed.
    """
    if type(headers) is CIMultiDictProxy or type(headers) is CIMultiDict:
        # Its case-insensitive lookups find what `_index` would, without copying every header.
        inputs = headers.getall("signature-input", ())
        signatures = headers.getall("signature", ())
        digests = headers.getall("content-digest", ())
        types = headers.getall("content-type", ())
    else:
        index = _index(headers.items())
        inputs = index.get("signature-input", ())
        signatures = index.get("signature", ())
        digests = index.get("content-digest", ())
        types = index.get("content-type", ())
    if len(inputs) != 1 or len(signatures) != 1 or len(digests) != 1 or len(types) != 1:
        return None
    names: list[str] | None = None  # None: in the profile's order
    expires: object = None
    if (m := _FAST_OURS.fullmatch(inputs[0])) is not None:
        label, signature_params, created_text = m.groups()
        created: object = int(created_text)
    elif (m := _FAST_INPUT.fullmatch(inputs[0])) is not None:
        label, signature_params, components, tail = m.groups()
        names = components[1:-1].split('" "')
        found = _FAST_INPUT_PARAM.findall(tail)
        params = {name: int(digits) if digits else text for name, text, digits in found}
        created, expires = params.get("created"), params.get("expires")
        if (
            set(names) != _COMPONENT_SET
            or len(params) != len(found)  # repeated: first position, last value; not its text
            or params.get("keyid") != "default"
            or params.get("alg") not in (None, "ed25519")
        ):
            return None
    else:
        return None
    if (
        type(created) is not int
        or created > current + _CLOCK_SKEW
        or created + _MAX_AGE < current - _CLOCK_SKEW
        or (type(expires) is int and expires < current - _CLOCK_SKEW)
        or (signature := _FAST_BYTES.fullmatch(signatures[0])) is None
        or signature[1] != label
        or (digest := _FAST_SHA512.fullmatch(digests[0])) is None
    ):
        return None
    try:
        # Decoded as the general parser decodes; padding errors are its to report.
        signature_bytes = base64.b64decode(signature[2], validate=True)
        claimed = base64.b64decode(digest[1], validate=True)
        parts = urlsplit(url)
    except ValueError:
        return None
    path = parts.path or "/"
    authority = parts.netloc.rpartition("@")[2].lower()
    if (default_port := _DEFAULT_PORTS.get(parts.scheme.lower())) is not None:
        authority = authority.removesuffix(default_port)
    if names is None:
        head = (
            f'"@method": {method.upper()}\n"@path": {path}\n"@authority": {authority}\n'
            f'"content-type": {types[0].strip()}\n"content-digest": {digests[0]}'
        )
    else:
        lines = {
            "@method": method.upper(),
            "@path": path,
            "@authority": authority,
            "content-type": types[0].strip(),
            "content-digest": digests[0],
        }
        head = "\n".join(f'"{name}": {lines[name]}' for name in names)
    base = f'{head}\n"@signature-params": {signature_params}'
    # Exactly the five separators: no component value holds a line break.
    if base.count("\n") != 5 or "\r" in base or not base.isascii():
        return None
    if not hmac.compare_digest(claimed, sha512(body).digest()):
        raise InvalidSignatureError(_DIGEST_MISMATCH)
    _check(key, signature_bytes, base)
    return Verified(signature_bytes, created)


def _check(key: Ed25519PublicKey, signature: bytes, base: str) -> None:
    """Check an Ed25519 signature of a signature base."""
    from cryptography.exceptions import InvalidSignature  # loaded with the key already

    try:
        key.verify(signature, base.encode("ascii"))
    except InvalidSignature:
        raise InvalidSignatureError(_SIGNATURE_MISMATCH) from None


# --- Signature base (RFC 9421 section 2.5) ------------------------------------------------------

_Headers = Sequence[tuple[str, str]]
_Index = dict[str, list[str]]  # lowercase header name -> values, in order


def _index(headers: Iterable[tuple[str, str]]) -> _Index:
    index: _Index = {}
    for key, value in headers:
        index.setdefault(key.lower(), []).append(value)
    return index


def _header_values(headers: _Headers, name: str) -> list[str]:
    name = name.lower()
    return [value for key, value in headers if key.lower() == name]


def _parse_header(index: _Index, name: str, parse: _Parse) -> _Dictionary:
    values = index.get(name.lower())
    if not values:
        raise MalformedSignatureError(
            f"the request has no {name} header; requests must be signed (RFC 9421)"
        )
    return parse(", ".join(values), name)


def _derived(name: str, method: str, url: str, parts: SplitResult) -> str:
    if name == "@method":
        return method.upper()
    if name == "@scheme":
        return parts.scheme.lower()
    if name == "@authority":
        # Without userinfo or a default port, as the Go SDK signs it.
        host = parts.netloc.rpartition("@")[2].lower()
        default_port = {"http": ":80", "https": ":443"}.get(parts.scheme.lower())
        return host.removesuffix(default_port) if default_port else host
    if name == "@target-uri":
        return url.partition("#")[0]
    path = parts.path or "/"
    if name == "@path":
        return path
    if name == "@query":
        return "?" + parts.query
    if name == "@request-target":
        return path + ("?" + parts.query if parts.query else "")
    raise MalformedSignatureError(f"the signature covers unsupported component {name!r}")


def _signature_base(method: str, url: str, headers: _Headers, covered: _InnerList) -> str:
    """Build the signature base for the covered components and parameters in ``covered``."""
    return _base_lines(method, url, _index(headers), covered, final=True)


def _base_lines(method: str, url: str, index: _Index, covered: _InnerList, *, final: bool) -> str:
    """Join the component lines; with `final`, add the ``@signature-params`` line."""
    lines: list[str] = []
    seen: set[str] = set()
    parts: SplitResult | None = None  # split on first use: a bad URL fails only if used
    for item in covered.items:
        name = item.value
        if not isinstance(name, str) or isinstance(name, _Token):
            raise MalformedSignatureError(
                f"covered component {_ser_bare(name)} must be a quoted string"
            )
        if item.params:
            raise MalformedSignatureError(f"component parameters are not supported ({name!r})")
        if name in seen or name != name.lower() or name == "@signature-params":
            raise MalformedSignatureError(f"invalid or repeated covered component {name!r}")
        seen.add(name)
        if name.startswith("@"):
            if parts is None:
                parts = urlsplit(url)
            value = _derived(name, method, url, parts)
        else:
            values = index.get(name)
            if not values:
                raise MalformedSignatureError(
                    f"the signature covers the {name!r} header but the request has none"
                )
            value = ", ".join(v.strip() for v in values)
        if "\n" in value or "\r" in value:
            raise MalformedSignatureError(f"component {name!r} contains a line break")
        lines.append(f"{_ser_bare(name)}: {value}")
    if final:
        lines.append(f'"@signature-params": {_ser_inner_list(covered)}')
    base = "\n".join(lines)
    if not base.isascii():
        raise MalformedSignatureError("covered component values must be ASCII")
    return base


def _sign(
    key: Ed25519PrivateKey,
    method: str,
    url: str,
    headers: _Headers,
    components: Sequence[str],
    params: Mapping[str, _Bare],
    label: str,
) -> tuple[str, str]:
    """Sign ``components`` with ``params``; return the Signature-Input and Signature values."""
    if not _KEY.fullmatch(label):
        raise ValueError(f"invalid signature label {label!r}: use lowercase letters, digits, _-.*")
    covered = _InnerList([_Item(c, {}) for c in components], dict(params))
    try:
        base = _signature_base(method, url, headers, covered)
    except MalformedSignatureError as exc:
        raise ValueError(f"cannot sign the request: {exc}") from None
    signature = key.sign(base.encode("ascii"))
    return f"{label}={_ser_inner_list(covered)}", f"{label}={_ser_bare(signature)}"


def content_digest(body: bytes, algorithm: str = "sha-512") -> str:
    """Compute an RFC 9530 ``Content-Digest`` header value.

    Args:
        body: The message body.
        algorithm: ``"sha-512"`` (default) or ``"sha-256"``.

    Returns:
        The header value, e.g. ``"sha-512=:<base64>:"``.

    Raises:
        ValueError: If ``algorithm`` is not supported.
    """
    if algorithm not in _DIGESTS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}; use 'sha-512' or 'sha-256'")
    return f"{algorithm}={_ser_bare(_DIGESTS[algorithm](body).digest())}"


class RequestSigner:
    """Signs requests to one URL the way the Dispatch scheduler does.

    Everything in the signature base but the body digest and the creation time is
    computed once, so that signing a request costs little more than the Ed25519
    signature. `sign_request` signs through it.

    Args:
        key: The Ed25519 signing key.
        method: The HTTP method.
        url: The absolute request URL (its host and path are signed).
        headers: The request headers; must include ``Content-Type`` (a signed component).
            Other headers are not signed; a ``Content-Digest`` is ignored (each request
            gets its own).
        label: The signature label.
        key_id: The ``keyid`` parameter.

    Raises:
        ValueError: If ``headers`` has no Content-Type, or the URL, label or key id is unusable.
    """

    __slots__ = ("_head", "_input_head", "_key", "_label", "_params_head", "_params_tail")

    def __init__(
        self,
        key: Ed25519PrivateKey,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        label: str = "dispatch",
        key_id: str = "default",
    ) -> None:
        pairs = [(k, v) for k, v in headers.items() if k.lower() != "content-digest"]
        if not _header_values(pairs, "content-type"):
            raise ValueError("cannot sign a request without a Content-Type header (it is signed)")
        if not urlsplit(url).netloc:
            raise ValueError(
                f"cannot sign request URL {url!r}: it must be absolute (scheme://host/…)"
            )
        if not key_id.isascii() or not key_id.isprintable():
            raise ValueError(f"key id {key_id!r} must be printable ASCII")
        if not _KEY.fullmatch(label):
            raise ValueError(
                f"invalid signature label {label!r}: use lowercase letters, digits, _-.*"
            )
        # The profile's components end with content-digest, the only per-request value.
        fixed = _InnerList([_Item(c, {}) for c in _REQUIRED_COMPONENTS[:-1]], {})
        try:
            head = _base_lines(method, url, _index(pairs), fixed, final=False)
        except MalformedSignatureError as exc:
            raise ValueError(f"cannot sign the request: {exc}") from None
        self._key = key
        self._label = label
        self._head = f'{head}\n"content-digest": '
        components = _InnerList([_Item(c, {}) for c in _REQUIRED_COMPONENTS], {})
        self._params_head = f"{_ser_inner_list(components)};created="
        self._params_tail = f";keyid={_ser_bare(key_id)};alg={_ser_bare('ed25519')}"
        self._input_head = f"{label}={self._params_head}"

    def sign(
        self, body: bytes, *, created: int | None = None, nonce: str | bool = True
    ) -> dict[str, str]:
        """Sign a request with this body.

        Args:
            body: The request body, digested into ``Content-Digest``.
            created: Signature creation time in Unix seconds (default: now).
            nonce: The ``nonce`` parameter: True (the default) for a new random one, so
                that no two signatures are alike; False for none; or its value.

        Returns:
            The headers to add: ``Content-Digest``, ``Signature-Input`` and ``Signature``.
        """
        # content_digest(body) and base64, inlined: this runs for every request.
        digest = b2a_base64(sha512(body).digest(), newline=False).decode("ascii")
        when = int(time.time()) if created is None else created
        if nonce is True:
            fresh = b2a_base64(os.urandom(_NONCE_BYTES), newline=False).translate(_URLSAFE)
            tail = f'{when}{self._params_tail};nonce="{fresh.decode("ascii")}"'
        elif nonce is False:
            tail = f"{when}{self._params_tail}"
        else:
            tail = f"{when}{self._params_tail};nonce={_ser_bare(nonce)}"
        base = f'{self._head}sha-512=:{digest}:\n"@signature-params": {self._params_head}{tail}'
        signature = b2a_base64(self._key.sign(base.encode("ascii")), newline=False)
        return {
            "Content-Digest": f"sha-512=:{digest}:",
            "Signature-Input": self._input_head + tail,
            "Signature": f"{self._label}=:{signature.decode('ascii')}:",
        }


def sign_request(
    key: Ed25519PrivateKey,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    created: int | None = None,
    nonce: str | bool = True,
    label: str = "dispatch",
    key_id: str = "default",
) -> dict[str, str]:
    """Sign a request the way the Dispatch scheduler does.

    To sign many requests to one URL, make a `RequestSigner` once instead.

    Args:
        key: The Ed25519 signing key.
        method: The HTTP method.
        url: The absolute request URL (its host and path are signed).
        headers: The request headers; must include ``Content-Type`` (a signed component).
        body: The request body, digested into ``Content-Digest``.
        created: Signature creation time in Unix seconds (default: now).
        nonce: The ``nonce`` parameter: True (the default) for a new random one, False
            for none, or its value.
        label: The signature label.
        key_id: The ``keyid`` parameter.

    Returns:
        The headers to add: ``Content-Digest``, ``Signature-Input`` and ``Signature``.

    Raises:
        ValueError: If ``headers`` has no Content-Type, or the URL, label or key id is unusable.
    """
    signer = RequestSigner(key, method, url, headers, label=label, key_id=key_id)
    return signer.sign(body, created=created, nonce=nonce)


def verify_request(
    key: Ed25519PublicKey,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
) -> Verified:
    """Verify a request signed per the Dispatch profile (see the module docstring).

    Args:
        key: The verification key.
        method: The HTTP method.
        url: The absolute request URL as the server saw it.
        headers: The request headers; a multidict's repeated fields are joined with ``", "``.
        body: The request body.
        now: The current Unix time (default: the system clock).

    Returns:
        The verified signature, for a `ReplayGuard`.

    Raises:
        MalformedSignatureError: A signature header, parameter or component is missing or malformed.
        InvalidSignatureError: The signature or digest does not match, or is stale or expired.
    """
    current = time.time() if now is None else now
    verified = _fast_verify(key, method, url, headers, body, current)
    return (
        verified if verified is not None else _verify(key, method, url, headers, body, now=current)
    )


def verify_headers(
    key: Ed25519PublicKey,
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
) -> None:
    """Verify a request's signature before its body is read.

    Everything `verify_request` checks but the body's digest: the signature covers the
    ``Content-Digest`` header, so a request that passes was made by the key's holder,
    who is then trusted with a large body. `verify_request` must still check the body.

    Raises:
        MalformedSignatureError: As `verify_request`.
        InvalidSignatureError: As `verify_request`, the digest aside.
    """
    _verify(key, method, url, headers, None, now=time.time() if now is None else now)


def _verify(
    key: Ed25519PublicKey,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    now: float | None = None,
    required_components: Sequence[str] = _REQUIRED_COMPONENTS,
    key_id: str = "default",
    parse: _Parse = _parse_dictionary,
) -> Verified:
    """Verify with configurable requirements; every shape check precedes every value check."""
    index = _index(headers.items())
    inputs = _parse_header(index, "Signature-Input", parse)
    signatures = _parse_header(index, "Signature", parse)
    if len(inputs) != 1 or len(signatures) != 1:
        raise MalformedSignatureError(
            f"expected exactly one signature, found {len(inputs)} in Signature-Input "
            f"({', '.join(inputs)}) and {len(signatures)} in Signature ({', '.join(signatures)})"
        )
    ((label, covered),) = inputs.items()
    sig_item = signatures.get(label)
    if not isinstance(covered, _InnerList):
        raise MalformedSignatureError(
            f'Signature-Input {label!r} must be an inner list ("@method" …)'
        )
    if not isinstance(sig_item, _Item) or not isinstance(sig_item.value, bytes):
        raise MalformedSignatureError(f"Signature must hold a byte sequence labelled {label!r}")
    params = covered.params
    if unknown := sorted(set(params) - _ALLOWED_PARAMS):
        raise MalformedSignatureError(
            f"unsupported signature parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_ALLOWED_PARAMS))}"
        )
    created, expires = _param(params, "created", int), _param(params, "expires", int)
    keyid, alg = _param(params, "keyid", str), _param(params, "alg", str)
    _param(params, "nonce", str)
    if created is None or keyid is None:
        raise MalformedSignatureError("the signature must have 'created' and 'keyid' parameters")
    claimed, actual = _digests(index, body, parse)
    base = _base_lines(method, url, index, covered, final=True)
    names = [item.value for item in covered.items]
    if missing := [c for c in required_components if c not in names]:
        raise MalformedSignatureError(
            f"the signature does not cover required component(s) {' '.join(missing)}"
        )

    if keyid != key_id:
        raise InvalidSignatureError(f"unknown signature keyid {keyid!r}; expected {key_id!r}")
    if alg is not None and alg != "ed25519":
        raise InvalidSignatureError(f"unexpected signature alg {alg!r}; expected 'ed25519'")
    current = time.time() if now is None else now
    if created > current + _CLOCK_SKEW:
        raise InvalidSignatureError(
            f"signature created {created - current:.0f} s in the future "
            f"(allowed clock skew {_CLOCK_SKEW} s); check the signer's clock"
        )
    if created + _MAX_AGE < current - _CLOCK_SKEW:
        raise InvalidSignatureError(
            f"signature is too old: created {current - created:.0f} s ago (max {_MAX_AGE} s)"
        )
    if expires is not None and expires < current - _CLOCK_SKEW:
        raise InvalidSignatureError(f"signature expired {current - expires:.0f} s ago")
    if actual is not None and not hmac.compare_digest(claimed, actual):
        raise InvalidSignatureError(_DIGEST_MISMATCH)
    _check(key, sig_item.value, base)
    return Verified(sig_item.value, created)


@dataclass(frozen=True, slots=True)
class Verified:
    """A signature that checked out."""

    signature: bytes
    """The signature bytes."""
    created: int
    """Its ``created`` parameter, in Unix seconds."""


class ReplayGuard:
    """Refuses a signature already accepted, in bounded memory.

    A signature stays acceptable for ``max_age`` seconds after its ``created`` time, so a
    captured request could be sent again within that window: the guard remembers every
    accepted signature until it leaves the window. When it holds ``capacity`` signatures,
    it forgets the oldest and from then on refuses every signature created no later than
    that one: those it can no longer tell apart from replays. A signer that signs each
    request anew (as the Dispatch scheduler does) never sends such old signatures.

    Args:
        capacity: Signatures remembered at most.
        max_age: Seconds a signature is acceptable after ``created`` (clock skew included).
    """

    def __init__(self, capacity: int = 200_000, max_age: float = _MAX_AGE + _CLOCK_SKEW) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity!r}")
        self._capacity = capacity
        self._max_age = max_age
        self._seen: set[bytes] = set()
        self._by_age: list[tuple[int, bytes]] = []  # heap of (created, signature)
        self._floor = -1  # signatures created at or before this are refused

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, verified: Verified, *, now: float | None = None) -> None:
        """Remember a verified signature, or refuse it if it was seen before.

        Args:
            verified: What `verify_request` returned.
            now: The current Unix time (default: the system clock).

        Raises:
            InvalidSignatureError: The signature was already accepted, or is too old to be
                told apart from a replay.
        """
        current = time.time() if now is None else now
        while self._by_age and self._by_age[0][0] + self._max_age < current:
            self._seen.discard(heapq.heappop(self._by_age)[1])
        signature = verified.signature
        if signature in self._seen:
            raise InvalidSignatureError(
                "this signed request was already received: a replayed request is never run "
                "twice; a signer must sign each request anew"
            )
        if verified.created <= self._floor:
            raise InvalidSignatureError(
                f"signature created at {verified.created} is older than the oldest one this "
                "endpoint still remembers, so it cannot be told apart from a replay; sign the "
                "request anew"
            )
        if len(self._by_age) >= self._capacity:
            created, forgotten = heapq.heappop(self._by_age)
            self._seen.discard(forgotten)
            self._floor = max(self._floor, created)
        self._seen.add(signature)
        heapq.heappush(self._by_age, (verified.created, signature))


def _param(params: Mapping[str, _Bare], name: str, kind: type[_T]) -> _T | None:
    value = params.get(name)
    if value is not None and type(value) is not kind:  # exact: bool is no int, token no str
        what = "an integer" if kind is int else "a quoted string"
        raise MalformedSignatureError(f"signature parameter {name!r} must be {what}")
    return value


def _digests(index: _Index, body: bytes | None, parse: _Parse) -> tuple[bytes, bytes | None]:
    """Return (claimed, actual) digests using the preferred algorithm present.

    Without a body (not read yet), the actual digest is None.
    """
    members = _parse_header(index, "Content-Digest", parse)
    for algorithm, hash_function in _DIGESTS.items():
        if (member := members.get(algorithm)) is not None:
            if not isinstance(member, _Item) or not isinstance(member.value, bytes):
                raise MalformedSignatureError(f"Content-Digest {algorithm} must be a byte sequence")
            return member.value, None if body is None else hash_function(body).digest()
    raise MalformedSignatureError(
        f"Content-Digest has no sha-512 or sha-256 member (found: {', '.join(members) or 'none'})"
    )


# --- Keys -----------------------------------------------------------------------------------


def _load_key(value: str | bytes, private: bool) -> Ed25519PrivateKey | Ed25519PublicKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    kind, sizes = ("private", (32, 64)) if private else ("public", (32,))
    if isinstance(value, bytes) and len(value) == 32:
        raw = value
    else:
        try:
            text = value.decode("ascii") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise ValueError(f"{kind} key bytes are neither 32 raw bytes nor ASCII") from None
        text = text.strip().replace("\\n", "\n")  # env vars often carry PEM with literal "\n"
        if "-----BEGIN" in text:
            if ("PRIVATE KEY" in text) != private:
                other = "public" if private else "private"
                raise ValueError(f"got a {other} key where the {kind} key was expected")
            try:
                data = text.encode("ascii")
                key = (
                    serialization.load_pem_private_key(data, password=None)
                    if private
                    else serialization.load_pem_public_key(data)
                )
            except (ValueError, TypeError, UnsupportedAlgorithm):
                fmt = "unencrypted PKCS#8" if private else "SubjectPublicKeyInfo"
                raise ValueError(f"not a valid PEM {kind} key (expected {fmt})") from None
            if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
                raise ValueError(f"PEM {kind} key is {type(key).__name__}, not Ed25519")
            return key
        try:
            raw = base64.b64decode(text, validate=True)
            problem = "" if len(raw) in sizes else f"base64 of {len(raw)} bytes"
        except ValueError:
            problem = "not valid base64"
        if problem:
            raise ValueError(
                f"not a PEM Ed25519 {kind} key nor base64 of 32 bytes ({problem}); expected "
                f"'-----BEGIN {kind.upper()} KEY-----…' or standard base64 of the raw 32 bytes"
            )
    if not private:
        return Ed25519PublicKey.from_public_bytes(raw)
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if len(raw) == 64 and raw[32:] != key.public_key().public_bytes_raw():
        raise ValueError("64-byte private key: its second half is not the matching public key")
    return key


def load_public_key(value: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    r"""Load an Ed25519 verification key.

    Args:
        value: PEM SubjectPublicKeyInfo (literal ``\n`` sequences allowed), standard base64 of
            the raw 32-byte key, 32 raw bytes, or a key object.

    Returns:
        The public key.

    Raises:
        ValueError: If the value is not an Ed25519 public key in one of those forms.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(value, Ed25519PublicKey):
        return value
    return cast("Ed25519PublicKey", _load_key(value, private=False))


def load_private_key(value: str | bytes | Ed25519PrivateKey) -> Ed25519PrivateKey:
    r"""Load an Ed25519 signing key.

    Args:
        value: Unencrypted PEM PKCS#8 (literal ``\n`` sequences allowed), standard base64 of
            the raw 32-byte seed (or of the 64-byte seed+public form), 32 raw bytes, or a key.

    Returns:
        The private key.

    Raises:
        ValueError: If the value is not an Ed25519 private key in one of those forms. The
            message never contains key material.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(value, Ed25519PrivateKey):
        return value
    return cast("Ed25519PrivateKey", _load_key(value, private=True))


def public_key_to_base64(key: Ed25519PublicKey) -> str:
    """Return the standard base64 of the raw 32-byte public key."""
    return base64.b64encode(key.public_bytes_raw()).decode("ascii")


def new_private_key_pem() -> str:
    """Make a new Ed25519 signing key, as unencrypted PEM PKCS#8, without `cryptography`.

    An Ed25519 private key is 32 random bytes; its PKCS#8 form (RFC 8410) is a fixed
    16-byte prefix and those bytes. `load_private_key` reads it when it is first needed.
    """
    der = _PKCS8_ED25519 + os.urandom(32)
    body = base64.b64encode(der).decode("ascii")
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"


_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")


def private_key_to_pem(key: Ed25519PrivateKey) -> str:
    """Return the key as unencrypted PEM PKCS#8 (``-----BEGIN PRIVATE KEY-----``)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
