"""RFC 9421 request signatures: published vectors, the Dispatch profile's rejections, keys."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from dispatch_aio._signature import (
    InvalidSignatureError,
    MalformedSignatureError,
    SignatureError,
    _InnerList,
    _Parser,
    _sign,
    _signature_base,
    _verify,
    content_digest,
    load_private_key,
    load_public_key,
    new_private_key_pem,
    private_key_to_pem,
    public_key_to_base64,
    sign_request,
    verify_headers,
    verify_request,
)

# RFC 9421 Appendix B.1.4 test-key-ed25519 (published for testing; also dispatch-py's test key).
PRIVATE_PEM_BODY = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF"
PRIVATE_PEM = f"-----BEGIN PRIVATE KEY-----\n{PRIVATE_PEM_BODY}\n-----END PRIVATE KEY-----\n"
PUBLIC_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n"
    "-----END PUBLIC KEY-----\n"
)
PUBLIC_B64 = "JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs="
SEED_HEX = "9f8362f87a484a954e6e740c5b4c0e84229139a20aa8ab56ff66586f6a7d29c5"

PRIVATE_KEY = load_private_key(PRIVATE_PEM)
PUBLIC_KEY = load_public_key(PUBLIC_B64)

HELLO = b'{"hello": "world"}'
HELLO_SHA512 = (
    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyea"
    "ldVLvRwEmTHWXvJwew==:"
)
HELLO_SHA256 = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"

# RFC 9421 Appendix B.2.6.
B26_URL = "http://example.com/foo?param=Value&Pet=dog"
B26_HEADERS = {
    "Host": "example.com",
    "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "Content-Type": "application/json",
    "Content-Digest": HELLO_SHA512,
    "Content-Length": "18",
}
B26_COMPONENTS = ("date", "@method", "@path", "@authority", "content-type", "content-length")
B26_CREATED = 1618884473
B26_INPUT = (
    'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"'
)
B26_SIGNATURE = (
    "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w"
    "6vuQv5lIp5WPpBKRCw==:"
)

# The Dispatch vector: RunRequest{function:"greet", input: StringValue "World"}.
RUN_BODY = bytes.fromhex(
    "0a056772656574123a0a2f747970652e676f6f676c65617069732e636f6d2f676f6f676c652e"
    "70726f746f6275662e537472696e6756616c756512070a05576f726c64"
)
RUN_URL = "http://127.0.0.1:8000/dispatch.sdk.v1.FunctionService/Run"
CREATED = 1718000000
RUN_SIGNED = {
    "Content-Digest": "sha-512=:XmQewOzpNpVgMSU4MtcKALboER6w+gGuGzBrb4wmXhwKG9mBwi2X/"
    "pHBmbarFZhbDr6ZM5qO0lhrliOpwQQeng==:",
    "Signature-Input": 'dispatch=("@method" "@path" "@authority" "content-type" '
    '"content-digest");created=1718000000;keyid="default";alg="ed25519"',
    "Signature": "dispatch=:3hZUVwuCek3DciZX2vsVJzyzOSzULUgKeLPOV6l1VLCZLB8/d7NSE+XCFXhmMSUE067tk"
    "Iki9Bdbiq+Qjxr1BA==:",
}
DISPATCH_COMPONENTS = ("@method", "@path", "@authority", "content-type", "content-digest")
DISPATCH_PARAMS: dict[str, int | str] = {"created": CREATED, "keyid": "default", "alg": "ed25519"}


def run_headers() -> dict[str, str]:
    return {"Content-Type": "application/proto", **RUN_SIGNED}


def custom_signed(
    components: tuple[str, ...] = DISPATCH_COMPONENTS,
    params: dict[str, int | str] | None = None,
    extra: dict[str, str] | None = None,
    body: bytes = RUN_BODY,
) -> dict[str, str]:
    """Headers of a request properly signed with arbitrary components and parameters."""
    headers = {
        "Content-Type": "application/proto",
        "Content-Digest": content_digest(body),
        **(extra or {}),
    }
    sig_input, signature = _sign(
        PRIVATE_KEY,
        "POST",
        RUN_URL,
        list(headers.items()),
        components,
        DISPATCH_PARAMS if params is None else params,
        "dispatch",
    )
    return {**headers, "Signature-Input": sig_input, "Signature": signature}


# --- vectors ----------------------------------------------------------------------------------


def test_rfc9421_b26_vector_verifies() -> None:
    headers = {**B26_HEADERS, "Signature-Input": B26_INPUT, "Signature": B26_SIGNATURE}
    _verify(
        PUBLIC_KEY,
        "POST",
        B26_URL,
        headers,
        HELLO,
        now=B26_CREATED + 1,
        required_components=B26_COMPONENTS,
        key_id="test-key-ed25519",
    )
    # Under the Dispatch profile it lacks required components and the right key id.
    with pytest.raises(MalformedSignatureError, match="content-digest"):
        verify_request(PUBLIC_KEY, "POST", B26_URL, headers, HELLO, now=B26_CREATED + 1)


def test_rfc9421_b26_signature_base_and_signer() -> None:
    covered = _Parser(B26_INPUT, "Signature-Input").dictionary()["sig-b26"]
    assert isinstance(covered, _InnerList)
    base = _signature_base("POST", B26_URL, list(B26_HEADERS.items()), covered)
    assert base == (
        '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
        '"@method": POST\n'
        '"@path": /foo\n'
        '"@authority": example.com\n'
        '"content-type": application/json\n'
        '"content-length": 18\n'
        '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
        '"content-length");created=1618884473;keyid="test-key-ed25519"'
    )
    params: dict[str, int | str] = {"created": B26_CREATED, "keyid": "test-key-ed25519"}
    produced = _sign(
        PRIVATE_KEY, "POST", B26_URL, list(B26_HEADERS.items()), B26_COMPONENTS, params, "sig-b26"
    )
    assert produced == (B26_INPUT, B26_SIGNATURE)


def test_dispatch_vector_reproduced_and_verified() -> None:
    headers = {"Content-Type": "application/proto"}
    signed = sign_request(
        PRIVATE_KEY, "POST", RUN_URL, headers, RUN_BODY, created=CREATED, nonce=False
    )
    assert signed == RUN_SIGNED
    verify_request(PUBLIC_KEY, "POST", RUN_URL, run_headers(), RUN_BODY, now=CREATED + 2)


def test_dispatch_signature_base_lines() -> None:
    covered = _Parser(RUN_SIGNED["Signature-Input"], "Signature-Input").dictionary()["dispatch"]
    assert isinstance(covered, _InnerList)
    base = _signature_base("POST", RUN_URL, list(run_headers().items()), covered)
    assert base.split("\n")[:4] == [
        '"@method": POST',
        '"@path": /dispatch.sdk.v1.FunctionService/Run',
        '"@authority": 127.0.0.1:8000',
        '"content-type": application/proto',
    ]
    assert base.split("\n")[4] == '"content-digest": ' + RUN_SIGNED["Content-Digest"]
    assert base.endswith('"@signature-params": ' + RUN_SIGNED["Signature-Input"][9:])


def test_digest_vectors() -> None:
    assert content_digest(HELLO) == HELLO_SHA512
    assert content_digest(HELLO, "sha-512") == HELLO_SHA512
    assert content_digest(HELLO, "sha-256") == HELLO_SHA256
    with pytest.raises(ValueError, match="unsupported digest algorithm 'md5'"):
        content_digest(HELLO, "md5")


# --- accepted variations ----------------------------------------------------------------------


def test_headers_case_insensitive_and_multidict() -> None:
    lowered = {k.lower(): v for k, v in run_headers().items()}
    verify_request(PUBLIC_KEY, "post", RUN_URL, lowered, RUN_BODY, now=CREATED)
    proxy = CIMultiDictProxy(CIMultiDict(run_headers()))
    verify_request(PUBLIC_KEY, "POST", RUN_URL, proxy, RUN_BODY, now=CREATED)


def test_repeated_header_values_joined() -> None:
    signed = custom_signed(
        (*DISPATCH_COMPONENTS, "x-trace"),
        extra={"X-Trace": "a, b"},
    )
    repeated = CIMultiDict(signed)
    del repeated["X-Trace"]
    repeated.add("X-Trace", " a ")
    repeated.add("x-trace", "b")
    verify_request(PUBLIC_KEY, "POST", RUN_URL, repeated, RUN_BODY, now=CREATED)
    repeated.add("X-Trace", "c")
    with pytest.raises(InvalidSignatureError):
        verify_request(PUBLIC_KEY, "POST", RUN_URL, repeated, RUN_BODY, now=CREATED)


def test_default_port_omitted_from_authority() -> None:
    headers = {"Content-Type": "application/proto"}
    signed = sign_request(PRIVATE_KEY, "POST", "https://Example.COM:443/x", headers, b"", created=1)
    verify_request(PUBLIC_KEY, "POST", "https://example.com/x", {**headers, **signed}, b"", now=1)
    with pytest.raises(InvalidSignatureError):
        verify_request(
            PUBLIC_KEY, "POST", "https://example.com:8443/x", {**headers, **signed}, b"", now=1
        )


def test_sha256_digest_accepted_and_sha512_preferred() -> None:
    sha256_only = custom_signed(extra={"Content-Digest": content_digest(RUN_BODY, "sha-256")})
    verify_request(PUBLIC_KEY, "POST", RUN_URL, sha256_only, RUN_BODY, now=CREATED)

    # With both present the sha-512 member decides, even when the sha-256 one is correct.
    wrong512 = "sha-512=:" + base64.b64encode(bytes(64)).decode() + ":"
    both = custom_signed(extra={"Content-Digest": f"{sha256_only['Content-Digest']}, {wrong512}"})
    with pytest.raises(InvalidSignatureError, match="digest of the request body does not match"):
        verify_request(PUBLIC_KEY, "POST", RUN_URL, both, RUN_BODY, now=CREATED)


def test_freshness_boundaries_accepted() -> None:
    for now in (CREATED - 5, CREATED + 305):
        verify_request(PUBLIC_KEY, "POST", RUN_URL, run_headers(), RUN_BODY, now=now)
    params: dict[str, int | str] = {**DISPATCH_PARAMS, "expires": CREATED + 10, "nonce": "n1"}
    signed = custom_signed(params=params)
    verify_request(PUBLIC_KEY, "POST", RUN_URL, signed, RUN_BODY, now=CREATED + 15)


# --- rejections -------------------------------------------------------------------------------

Request = tuple[str, str, dict[str, str], bytes, float]


def base_request() -> Request:
    return "POST", RUN_URL, run_headers(), RUN_BODY, CREATED + 1


def with_headers(**changes: str | None) -> Callable[[], Request]:
    def build() -> Request:
        method, url, headers, body, now = base_request()
        for name, value in changes.items():
            name = name.replace("_", "-")
            if value is None:
                del headers[name]
            else:
                headers[name] = value
        return method, url, headers, body, now

    return build


def signed_with(
    components: tuple[str, ...] = DISPATCH_COMPONENTS, **params: int | str
) -> Callable[[], Request]:
    def build() -> Request:
        signed = custom_signed(components, params={**DISPATCH_PARAMS, **params})
        return "POST", RUN_URL, signed, RUN_BODY, CREATED + 1

    return build


def without_param(name: str) -> Callable[[], Request]:
    def build() -> Request:
        params = {k: v for k, v in DISPATCH_PARAMS.items() if k != name}
        return "POST", RUN_URL, custom_signed(params=params), RUN_BODY, CREATED + 1

    return build


def changed(
    method: str = "POST", url: str = RUN_URL, body: bytes = RUN_BODY, now: float = CREATED + 1
) -> Callable[[], Request]:
    return lambda: (method, url, run_headers(), body, now)


def rebodied() -> Request:
    body = RUN_BODY + b"x"
    headers = {**run_headers(), "Content-Digest": content_digest(body)}
    return "POST", RUN_URL, headers, body, CREATED + 1


def two_labels() -> Request:
    method, url, headers, body, now = base_request()
    other_input = headers["Signature-Input"].replace("dispatch=", "other=")
    other_sig = headers["Signature"].replace("dispatch=", "other=")
    headers["Signature-Input"] += ", " + other_input
    headers["Signature"] += ", " + other_sig
    return method, url, headers, body, now


INPUT = RUN_SIGNED["Signature-Input"]
SIG = RUN_SIGNED["Signature"]
MAL, INV = MalformedSignatureError, InvalidSignatureError

REJECTIONS: dict[str, tuple[Callable[[], Request], type[SignatureError], str]] = {
    "changed body": (changed(body=RUN_BODY[:-1] + b"!"), INV, "digest of the request body"),
    "changed body and digest": (rebodied, INV, "signature does not match"),
    "changed path": (changed(url=RUN_URL + "x"), INV, "signature does not match"),
    "changed method": (changed(method="PUT"), INV, "signature does not match"),
    "changed authority": (
        changed(url=RUN_URL.replace("127.0.0.1", "localhost")),
        INV,
        "signature does not match",
    ),
    "changed content-type": (
        with_headers(Content_Type="application/json"),
        INV,
        "signature does not match",
    ),
    "missing Signature": (with_headers(Signature=None), MAL, "no Signature header"),
    "missing Signature-Input": (
        with_headers(Signature_Input=None),
        MAL,
        "no Signature-Input header",
    ),
    "missing Content-Digest": (with_headers(Content_Digest=None), MAL, "no Content-Digest header"),
    "missing Content-Type": (with_headers(Content_Type=None), MAL, "'content-type' header"),
    "component not covered": (
        signed_with(("@method", "@path", "@authority", "content-digest")),
        MAL,
        "does not cover required component.*content-type",
    ),
    "created too old": (changed(now=CREATED + 306), INV, "too old"),
    "created in the future": (changed(now=CREATED - 6), INV, "in the future"),
    "expired": (signed_with(expires=CREATED - 10), INV, "expired"),
    "missing created": (without_param("created"), MAL, "'created'"),
    "missing keyid": (without_param("keyid"), MAL, "'keyid'"),
    "wrong keyid": (signed_with(keyid="other"), INV, "keyid 'other'"),
    "wrong alg": (signed_with(alg="rsa-pss-sha512"), INV, "alg 'rsa-pss-sha512'"),
    "unknown parameter": (signed_with(tag="x"), MAL, "unsupported signature parameter.*tag"),
    "created not an integer": (signed_with(created="1718000000"), MAL, "'created' must be"),
    "keyid a token": (
        with_headers(Signature_Input=INPUT.replace('"default"', "default")),
        MAL,
        "'keyid' must be a quoted string",
    ),
    "garbage Signature-Input": (with_headers(Signature_Input="!!!"), MAL, "malformed Signature-In"),
    "unterminated inner list": (
        with_headers(Signature_Input='dispatch=("@method" "@path"'),
        MAL,
        "unterminated inner list",
    ),
    "unterminated string": (
        with_headers(Signature_Input='dispatch=("@method'),
        MAL,
        "unterminated string",
    ),
    "trailing comma": (with_headers(Signature=SIG + ","), MAL, "trailing ','"),
    "non-base64 character": (
        with_headers(Signature="dispatch=:not*base64:"),
        MAL,
        "invalid or unterminated byte sequence",
    ),
    "bad base64 padding": (with_headers(Signature="dispatch=:AAA:"), MAL, "invalid base64"),
    "invalid string escape": (
        with_headers(Signature_Input='dispatch=("@method\\n")'),
        MAL,
        "invalid or unterminated string",
    ),
    "unterminated byte sequence": (
        with_headers(Signature="dispatch=:AAAA"),
        MAL,
        "unterminated byte sequence",
    ),
    "signature not bytes": (with_headers(Signature='dispatch="abc"'), MAL, "byte sequence"),
    "input not an inner list": (
        with_headers(Signature_Input='dispatch="@method";created=1'),
        MAL,
        "inner list",
    ),
    "component a token": (
        with_headers(Signature_Input=INPUT.replace('"@path"', "path")),
        MAL,
        "must be a quoted string",
    ),
    "component parameters": (
        with_headers(Signature_Input=INPUT.replace('"content-type"', '"content-type";sf')),
        MAL,
        "component parameters",
    ),
    "duplicate component": (
        with_headers(Signature_Input=INPUT.replace('"@path"', '"@path" "@path"')),
        MAL,
        "repeated",
    ),
    "unknown derived component": (
        with_headers(Signature_Input=INPUT.replace('"@path"', '"@path" "@status"')),
        MAL,
        "unsupported component '@status'",
    ),
    "label mismatch": (
        with_headers(Signature=SIG.replace("dispatch=", "other=")),
        MAL,
        "labelled 'dispatch'",
    ),
    "two signatures": (two_labels, MAL, "exactly one signature"),
    "digest with unknown algorithm only": (
        with_headers(Content_Digest="md5=:AAAA:"),
        MAL,
        "no sha-512 or sha-256 member",
    ),
    "garbage digest": (with_headers(Content_Digest="sha-512"), MAL, "byte sequence"),
}


@pytest.mark.parametrize("case", list(REJECTIONS), ids=list(REJECTIONS))
def test_rejections(case: str) -> None:
    build, error, message = REJECTIONS[case]
    method, url, headers, body, now = build()
    with pytest.raises(error, match=message) as info:
        verify_request(PUBLIC_KEY, method, url, headers, body, now=now)
    assert type(info.value) is error


def test_wrong_key_rejected() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(InvalidSignatureError, match="signature does not match"):
        verify_request(other, "POST", RUN_URL, run_headers(), RUN_BODY, now=CREATED)


def test_headers_are_verified_before_the_body_is_read() -> None:
    headers = run_headers()
    verify_headers(PUBLIC_KEY, "POST", RUN_URL, headers, now=CREATED)
    # Whatever body follows: its digest is checked once it is read.
    with pytest.raises(InvalidSignatureError, match="digest"):
        verify_request(PUBLIC_KEY, "POST", RUN_URL, headers, RUN_BODY + b"x", now=CREATED)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(InvalidSignatureError, match="signature does not match"):
        verify_headers(other, "POST", RUN_URL, headers, now=CREATED)
    with pytest.raises(InvalidSignatureError, match="too old"):
        verify_headers(PUBLIC_KEY, "POST", RUN_URL, headers, now=CREATED + 3600)
    unsigned = {k: v for k, v in headers.items() if k.lower() != "signature"}
    with pytest.raises(MalformedSignatureError):
        verify_headers(PUBLIC_KEY, "POST", RUN_URL, unsigned, now=CREATED)


def test_sign_request_errors() -> None:
    with pytest.raises(ValueError, match="without a Content-Type header"):
        sign_request(PRIVATE_KEY, "POST", RUN_URL, {}, b"")
    headers = {"content-type": "application/proto"}
    with pytest.raises(ValueError, match="invalid signature label"):
        sign_request(PRIVATE_KEY, "POST", RUN_URL, headers, b"", label="Bad Label")
    with pytest.raises(ValueError, match="must be absolute"):
        sign_request(PRIVATE_KEY, "POST", "/relative", headers, b"")


# --- keys -------------------------------------------------------------------------------------


def test_load_public_key_forms() -> None:
    for value in (
        PUBLIC_PEM,
        PUBLIC_PEM.replace("\n", "\\n"),
        PUBLIC_B64,
        f"  {PUBLIC_B64}\n",
        PUBLIC_B64.encode(),
        base64.b64decode(PUBLIC_B64),
        PUBLIC_KEY,
    ):
        assert public_key_to_base64(load_public_key(value)) == PUBLIC_B64


def test_a_key_made_without_cryptography_signs_what_its_public_key_verifies() -> None:
    pem = new_private_key_pem()
    key = load_private_key(pem)
    assert private_key_to_pem(key) == pem  # the very form cryptography writes
    assert new_private_key_pem() != pem
    headers = {"Content-Type": "application/proto"}
    headers |= sign_request(key, "POST", RUN_URL, headers, RUN_BODY)
    verify_request(key.public_key(), "POST", RUN_URL, headers, RUN_BODY)


def test_load_private_key_forms() -> None:
    seed = bytes.fromhex(SEED_HEX)
    go_form = base64.b64encode(seed + base64.b64decode(PUBLIC_B64)).decode()
    for value in (
        PRIVATE_PEM,
        PRIVATE_PEM.replace("\n", "\\n"),
        base64.b64encode(seed).decode(),
        go_form,
        seed,
        PRIVATE_KEY,
    ):
        key = load_private_key(value)
        assert public_key_to_base64(key.public_key()) == PUBLIC_B64
    assert PRIVATE_PEM_BODY in private_key_to_pem(PRIVATE_KEY)
    assert private_key_to_pem(load_private_key(private_key_to_pem(PRIVATE_KEY))) == (
        private_key_to_pem(PRIVATE_KEY)
    )


def x25519_public_pem() -> str:
    return (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", r"nor base64 of 32 bytes \(base64 of 0 bytes\)"),
        ("not a key", r"nor base64 of 32 bytes \(not valid base64\)"),
        (base64.b64encode(bytes(31)).decode(), r"\(base64 of 31 bytes\)"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "not a valid PEM"),
        (b"\xff" * 40, "neither 32 raw bytes nor ASCII"),
        ("x25519", "X25519PublicKey, not Ed25519"),
    ],
)
def test_load_public_key_errors(value: str | bytes, message: str) -> None:
    if value == "x25519":
        value = x25519_public_pem()
    with pytest.raises(ValueError, match=message):
        load_public_key(value)


def test_private_key_material_never_echoed() -> None:
    with pytest.raises(ValueError, match="got a private key") as info:
        load_public_key(PRIVATE_PEM)
    assert PRIVATE_PEM_BODY not in str(info.value)
    broken = PRIVATE_PEM.replace("MC4C", "XXXX")
    with pytest.raises(ValueError, match="not a valid PEM private key") as info:
        load_private_key(broken)
    assert "XXXX" not in str(info.value)
    seed_b64 = base64.b64encode(bytes.fromhex(SEED_HEX)[:31]).decode()
    with pytest.raises(ValueError, match=r"nor base64 of 32 bytes \(base64 of 31 bytes\)") as info:
        load_private_key(seed_b64)
    assert seed_b64 not in str(info.value)
    mismatched = base64.b64encode(bytes.fromhex(SEED_HEX) + bytes(32)).decode()
    with pytest.raises(ValueError, match="not the matching public key"):
        load_private_key(mismatched)


def test_private_key_errors() -> None:
    pem = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="PEM private key is X25519PrivateKey"):
        load_private_key(pem)
    encrypted = PRIVATE_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(
        ValueError, match=r"not a valid PEM private key \(expected unencrypted PKCS#8\)"
    ):
        load_private_key(encrypted)


# --- properties -------------------------------------------------------------------------------

PATH_CHARS = st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%/"
)


@given(
    body=st.binary(max_size=2048),
    path=st.text(PATH_CHARS, max_size=40).map(lambda p: "/" + p),
    query=st.text(PATH_CHARS, max_size=20),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    flip=st.integers(min_value=0),
)
def test_sign_verify_round_trip(body: bytes, path: str, query: str, method: str, flip: int) -> None:
    url = f"https://host.example:9443{path}" + (f"?{query}" if query else "")
    headers = {"Content-Type": "application/proto"}
    signed = {**headers, **sign_request(PRIVATE_KEY, method, url, headers, body, created=CREATED)}
    verify_request(PUBLIC_KEY, method, url, signed, body, now=CREATED)
    if body:
        tampered = bytearray(body)
        tampered[flip % len(body)] ^= 0x01
        with pytest.raises(InvalidSignatureError, match="digest"):
            verify_request(PUBLIC_KEY, method, url, signed, bytes(tampered), now=CREATED)
