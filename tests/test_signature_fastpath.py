"""The signature fast paths against the general code they shortcut.

Verification checks a whole request of the exact shape a Dispatch signer emits with a few
regular expressions (`_fast_verify`), and otherwise parses the exact header shapes with a
few more before it falls back to the RFC 8941 parser; signing builds the signature base
from parts computed once per URL. Both must agree with the general path
on every input: these tests generate headers around the recognised shapes (and
mutations of them) and compare.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from dispatch_aio._signature import (
    InvalidSignatureError,
    MalformedSignatureError,
    RequestSigner,
    SignatureError,
    _Dictionary,
    _fast_dictionary,
    _fast_verify,
    _InnerList,
    _Item,
    _Parser,
    _sign,
    _signature_base,
    _Token,
    _verify,
    content_digest,
    load_private_key,
    load_public_key,
    sign_request,
    verify_request,
)

# RFC 9421 Appendix B.1.4 test-key-ed25519 (published for testing).
PRIVATE_KEY = load_private_key(base64.b64decode("n4Ni+HpISpVObnQMW0wOhCKROaIKqKtW/2ZYb2p9KcU="))
PUBLIC_KEY = load_public_key("JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=")
URL = "http://127.0.0.1:8000/dispatch.sdk.v1.FunctionService/Run"
CREATED = 1718000000
COMPONENTS = ("@method", "@path", "@authority", "content-type", "content-digest")


def general(text: str, field: str) -> _Dictionary:
    """The general RFC 8941 parser alone."""
    return _Parser(text, field).dictionary()


def typed(value: Any) -> Any:
    """A comparable form that keeps types apart (a token is no string, True is no 1)."""
    if isinstance(value, dict):
        return [(key, typed(v)) for key, v in value.items()]
    if isinstance(value, _InnerList):
        return ("inner", [typed(item) for item in value.items], typed(value.params))
    if isinstance(value, _Item):
        return ("item", typed(value.value), typed(value.params))
    return (type(value).__name__, value)


def result(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """What `fn` returns, or the message of the ValueError it raises."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        return ("ValueError", str(exc))


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        fn(*args, **kwargs)
    except (SignatureError, ValueError) as exc:
        return type(exc), str(exc)
    return ("ok",)


# --- parsing: fast result == general result --------------------------------------------------

# Characters that matter to the grammar, plus ordinary ones.
SPECIAL = ' "\\;=:(),.-_*@?!#~/+\t0123456789aAzZ'


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """`usual` four times in five, else `other`."""
    return st.integers(0, 4).flatmap(lambda n: other if n == 0 else usual)


labels = mostly(
    st.sampled_from(["dispatch", "sig-b26", "*", "a.b_c-d*"]),
    st.one_of(st.sampled_from(["Dispatch", "9x", ""]), st.text("abz09*_.-A ", max_size=6)),
)
component_names = mostly(
    st.one_of(st.sampled_from(COMPONENTS), st.text("az@-!#~[]", max_size=6)),
    st.one_of(
        st.sampled_from(["a\\\\b", 'a\\"b', "a b"]),  # escapes, a space
        st.text('az@-"\\ !#~[]', max_size=6),
    ),
)
param_keys = mostly(
    st.sampled_from(["created", "keyid", "alg", "expires", "nonce", "tag", "*k"]),
    st.text("az*_-A9", max_size=4),
)
param_values = mostly(
    st.one_of(
        st.integers(min_value=0, max_value=10**16).map(str),
        st.integers(min_value=0, max_value=999).map(lambda n: "0" + str(n)),  # leading zero
        st.sampled_from(['"default"', '"ed25519"', '""', '"a\\\\b"', '"a\\"b"', '"a b"']),
        st.text(SPECIAL.replace('"', "").replace("\\", "") + "ek", max_size=8).map(
            lambda t: f'"{t}"'
        ),
    ),
    st.one_of(
        st.integers(min_value=-99, max_value=-1).map(str),
        st.sampled_from(["default", "?1", "?0", ":AAAA:", "1.5"]),
        st.text(SPECIAL + "ek", max_size=8).map(lambda t: f'"{t}"'),
        st.text(SPECIAL, max_size=4),
    ),
)


@st.composite
def inner_list_headers(draw: st.DrawFn) -> str:
    names = draw(st.lists(component_names, max_size=6))
    quoted = [n if draw(st.integers(0, 19)) == 0 else f'"{n}"' for n in names]
    separator = draw(st.sampled_from([" "] * 8 + ["  ", "\t"]))
    params = draw(st.lists(st.tuples(param_keys, param_values), max_size=4))
    text = f"{draw(labels)}=({separator.join(quoted)})"
    return text + "".join(f";{key}={value}" for key, value in params)


@st.composite
def byte_sequence_headers(draw: st.DrawFn) -> str:
    data = base64.b64encode(draw(st.binary(max_size=70))).decode()
    if draw(st.integers(0, 4)) == 0:
        data = draw(st.text("AZaz09+/=:*-", max_size=12))
    return f"{draw(labels)}=:{data}:"


@st.composite
def mutated(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    """Apply a few random edits (insert, delete, replace) to a header value."""
    text = draw(texts)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        position = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from(SPECIAL))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert":
            text = text[:position] + char + text[position:]
        elif edit == "delete":
            text = text[:position] + text[position + 1 :]
        else:
            text = text[:position] + char + text[position + 1 :]
    if draw(st.integers(0, 19)) == 0:
        text += draw(st.sampled_from([", ", ",", " ", ", other=:AAAA:", ";x=1"]))
    return text


header_texts = mutated(st.one_of(inner_list_headers(), byte_sequence_headers()))


@settings(max_examples=1000, deadline=None)
@given(text=header_texts)
def test_fast_parse_equals_general_parse(text: str) -> None:
    fast = _fast_dictionary(text)
    event("fast path" if fast is not None else "general path")
    if fast is None:
        return  # the general parser decides alone
    assert typed(fast) == typed(general(text, "Signature-Input"))


def test_fast_parse_recognises_what_the_signer_emits() -> None:
    headers = sign_request(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"}, b"x", created=1)
    for name in ("Content-Digest", "Signature-Input", "Signature"):
        fast = _fast_dictionary(headers[name])
        assert fast is not None, name
        assert typed(fast) == typed(general(headers[name], name))


@pytest.mark.parametrize(
    "text",
    [
        " dispatch=:AAAA:",  # leading space
        "dispatch=:AAAA: ",
        "dispatch=:AAA:",  # bad padding: the general parser reports it
        "dispatch=:AAAA:;x=1",
        'dispatch=("@method"  "@path")',
        'dispatch=( "@method")',
        'dispatch=("a\\"b")',
        'dispatch=("@method");created=0123456789012345',  # 16 digits
        'dispatch=("@method");created=-1',
        'dispatch=("@method");created=1.5',
        'dispatch=("@method");keyid=default',  # a token
        'dispatch=("@method");flag',
        'dispatch=("@method"), other=("@path")',
        'dispatch=("@method")\n',
    ],
)
def test_fast_parse_declines_other_shapes(text: str) -> None:
    assert _fast_dictionary(text) is None


# --- verification: same outcome with and without the fast path ---------------------------------


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, str], bytes, float]:
    body = draw(st.binary(max_size=64))
    headers = {"Content-Type": "application/proto"}
    components = draw(
        mostly(
            st.one_of(st.just(COMPONENTS), st.permutations(COMPONENTS)),
            st.lists(st.sampled_from([*COMPONENTS, "x-other"]), max_size=6).map(tuple),
        )
    )
    params: dict[str, int | str] = {"created": CREATED, "keyid": "default", "alg": "ed25519"}
    if draw(st.integers(0, 3)) == 0:
        extra = draw(
            st.dictionaries(
                st.sampled_from(["created", "keyid", "alg", "expires", "nonce", "tag"]),
                st.one_of(
                    st.integers(CREATED - 400, CREATED + 20),
                    st.sampled_from(["default", "ed25519", "other"]),
                ),
                max_size=3,
            )
        )
        params.update(extra)
    pairs = [*headers.items(), ("Content-Digest", content_digest(body)), ("X-Other", "v")]
    try:
        sig_input, signature = _sign(
            PRIVATE_KEY, "POST", URL, pairs, components, params, "dispatch"
        )
    except ValueError:
        sig_input, signature = "dispatch=()", "dispatch=:AAAA:"
    signed = {
        **headers,
        "Content-Digest": content_digest(body),
        "Signature-Input": sig_input,
        "Signature": signature,
    }
    # Edit one of the parsed headers, sometimes.
    name = draw(st.sampled_from(["Signature-Input", "Signature", "Content-Digest", None, None]))
    if name is not None:
        signed[name] = draw(mutated(st.just(signed[name])))
    if draw(st.integers(0, 4)) == 0:
        body = body + b"!"
    now = draw(st.sampled_from([CREATED, CREATED + 1, CREATED + 300, CREATED + 400, CREATED - 10]))
    return signed, body, now


@settings(max_examples=500, deadline=None)
@given(request=requests())
def test_verify_outcome_equals_general_path(request: tuple[dict[str, str], bytes, float]) -> None:
    headers, body, now = request
    fast = outcome(verify_request, PUBLIC_KEY, "POST", URL, headers, body, now=now)
    slow = outcome(_verify, PUBLIC_KEY, "POST", URL, headers, body, now=now, parse=general)
    event(f"outcome: {fast[0] if fast == ('ok',) else fast[0].__name__}")
    assert fast == slow


def test_verify_rejections_unchanged_by_fast_path() -> None:
    good = sign_request(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"}, b"x", created=CREATED)
    headers = {"Content-Type": "a/b", **good}
    verify_request(PUBLIC_KEY, "POST", URL, headers, b"x", now=CREATED)
    wrong_key = {**headers, "Signature-Input": good["Signature-Input"].replace("default", "x")}
    with pytest.raises(InvalidSignatureError, match="keyid 'x'"):
        verify_request(PUBLIC_KEY, "POST", URL, wrong_key, b"x", now=CREATED)
    extra = {**headers, "Signature-Input": good["Signature-Input"] + ";tag=1"}
    with pytest.raises(MalformedSignatureError, match="unsupported signature parameter"):
        verify_request(PUBLIC_KEY, "POST", URL, extra, b"x", now=CREATED)


# --- signing: RequestSigner == the general signer ------------------------------------------------

hosts = st.sampled_from(
    ["127.0.0.1:8000", "Example.COM", "example.com:80", "h:443", "user@h:1", "[::1]:9"]
)
paths = st.text("abcXYZ09-._~!$&'()*+,;=:@%/", max_size=20).map(lambda p: "/" + p)


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "HTTP"]),
    host=hosts,
    path=paths,
    query=st.one_of(st.just(""), st.text("a=b&c", max_size=6).map(lambda q: "?" + q)),
    method=st.sampled_from(["POST", "post", "PUT"]),
    content_type=st.text(" abc/;=+-\t", min_size=1, max_size=12),
    key_id=st.text('az09"\\- ', min_size=0, max_size=6),
    label=st.sampled_from(["dispatch", "sig-1", "*x"]),
    body=st.binary(max_size=100),
    created=st.integers(min_value=0, max_value=2**40),
)
def test_request_signer_equals_general_signer(
    scheme: str,
    host: str,
    path: str,
    query: str,
    method: str,
    content_type: str,
    key_id: str,
    label: str,
    body: bytes,
    created: int,
) -> None:
    url = f"{scheme}://{host}{path}{query}"
    headers = {"Content-Type": content_type}
    digest = content_digest(body)
    params = {"created": created, "keyid": key_id, "alg": "ed25519"}
    pairs = [*headers.items(), ("Content-Digest", digest)]
    expected = result(_sign, PRIVATE_KEY, method, url, pairs, COMPONENTS, params, label)
    signer = result(RequestSigner, PRIVATE_KEY, method, url, headers, label=label, key_id=key_id)
    if not isinstance(signer, RequestSigner):
        assert signer == expected  # refused by both, for the same reason
        return
    produced = signer.sign(body, created=created, nonce=False)
    assert (produced["Signature-Input"], produced["Signature"]) == expected
    assert produced["Content-Digest"] == digest
    assert signer.sign(body, created=created, nonce=False) == produced  # reusable
    with_nonce = signer.sign(body, created=created, nonce="n-1")
    params_with_nonce = {**params, "nonce": "n-1"}
    expected = result(_sign, PRIVATE_KEY, method, url, pairs, COMPONENTS, params_with_nonce, label)
    assert (with_nonce["Signature-Input"], with_nonce["Signature"]) == expected


def test_request_signer_fresh_nonce_is_signed_like_any_other() -> None:
    signer = RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"})
    first, second = (signer.sign(b"x", created=CREATED) for _ in range(2))
    assert first["Signature"] != second["Signature"]  # same body, same second
    covered = general(first["Signature-Input"], "Signature-Input")["dispatch"]
    assert isinstance(covered, _InnerList)
    nonce = covered.params["nonce"]
    assert isinstance(nonce, str) and re.fullmatch(r"[A-Za-z0-9_-]{16}", nonce)
    pairs = [("Content-Type", "a/b"), ("Content-Digest", content_digest(b"x"))]
    params: dict[str, int | str] = {
        "created": CREATED,
        "keyid": "default",
        "alg": "ed25519",
        "nonce": nonce,
    }
    expected = _sign(PRIVATE_KEY, "POST", URL, pairs, COMPONENTS, params, "dispatch")
    assert (first["Signature-Input"], first["Signature"]) == expected


def test_request_signer_refuses_what_sign_request_refuses() -> None:
    with pytest.raises(ValueError, match="without a Content-Type header"):
        RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Digest": "x"})
    with pytest.raises(ValueError, match="must be absolute"):
        RequestSigner(PRIVATE_KEY, "POST", "/Run", {"Content-Type": "a/b"})
    with pytest.raises(ValueError, match="printable ASCII"):
        RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"}, key_id="é")
    with pytest.raises(ValueError, match="invalid signature label"):
        RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"}, label="A")
    with pytest.raises(ValueError, match="line break"):
        RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a\nb"})


def test_request_signer_uses_the_clock() -> None:
    signer = RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"})
    headers = {"Content-Type": "a/b", **signer.sign(b"body")}
    verify_request(PUBLIC_KEY, "POST", URL, headers, b"body")
    assert ";created=" in headers["Signature-Input"]
    assert _Token("x") == "x"  # why `typed` keeps types apart


# --- whole-request fast verification: same outcome as the general path ---------------------------

HTTP_MESSAGE_SIGNATURES_ORDER = ("created", "keyid", "expires", "nonce", "alg")  # dispatch-py's


def signed_text(
    input_text: str,
    method: str = "POST",
    url: str = URL,
    content_type: str = "a/b",
    body: bytes = b"x",
) -> dict[str, str]:
    """Headers with this Signature-Input text, signed over what the general parser reads."""
    headers = {"Content-Type": content_type, "Content-Digest": content_digest(body)}
    covered = general(input_text, "Signature-Input")["dispatch"]
    assert isinstance(covered, _InnerList)
    base = _signature_base(method, url, list(headers.items()), covered)
    signature = base64.b64encode(PRIVATE_KEY.sign(base.encode("ascii"))).decode()
    return {**headers, "Signature-Input": input_text, "Signature": f"dispatch=:{signature}:"}


def test_fast_verify_takes_the_shapes_dispatch_signers_emit() -> None:
    # Ours, with and without a nonce, from aiohttp's headers or a plain dict in any case.
    signer = RequestSigner(PRIVATE_KEY, "POST", URL, {"Content-Type": "a/b"})
    for nonce in (True, False, "n-1"):
        signed = {"Content-Type": "a/b", **signer.sign(b"x", created=CREATED, nonce=nonce)}
        for headers in (
            signed,
            {key.lower(): value for key, value in signed.items()},
            CIMultiDictProxy(CIMultiDict(signed)),
        ):
            verified = _fast_verify(PUBLIC_KEY, "POST", URL, headers, b"x", CREATED)
            assert verified is not None
            assert verified == verify_request(PUBLIC_KEY, "POST", URL, headers, b"x", now=CREATED)
    # dispatch-py's: components in the order of a set, its parameters in its own order.
    components = '"content-digest" "@authority" "@method" "content-type" "@path"'
    params = f';created={CREATED};keyid="default";expires={CREATED + 60};nonce="n";alg="ed25519"'
    headers = signed_text(f"dispatch=({components}){params}")
    assert _fast_verify(PUBLIC_KEY, "POST", URL, headers, b"x", CREATED) is not None


@pytest.mark.parametrize(
    "params",
    [
        f';created={CREATED};keyid="default";created={CREATED}',  # repeated: the last one counts
        f';created=0{CREATED};keyid="default"',  # a leading zero, not in the base
        f';created={CREATED};keyid="default";nonce="a\\\\b"',  # an escape, not in the base
        f';created={CREATED};keyid="default" ',  # a trailing space
    ],
)
@pytest.mark.parametrize("separator", [" ", "  "])  # two spaces: the base has one
def test_fast_verify_declines_what_only_the_general_path_accepts(
    params: str, separator: str
) -> None:
    components = separator.join(f'"{name}"' for name in COMPONENTS)
    headers = signed_text(f"dispatch=({components}){params}")
    assert _fast_verify(PUBLIC_KEY, "POST", URL, headers, b"x", CREATED) is None
    verify_request(PUBLIC_KEY, "POST", URL, headers, b"x", now=CREATED)


@st.composite
def fast_shaped_requests(
    draw: st.DrawFn,
) -> tuple[str, str, Mapping[str, str], bytes, float]:
    """Requests in or next to the shape `_fast_verify` takes, edited where it decides."""
    body = draw(st.binary(max_size=32))
    url = draw(
        mostly(
            st.just(URL),
            st.sampled_from(
                [
                    "https://Example.com:443",
                    "http://user@h:80/a?b",
                    "HTTP://H/%7e",
                    "http://[::1/x",  # urlsplit raises ValueError
                    "http://h/\u00e9",
                    "http://h/a\tb",
                ]
            ),
        )
    )
    method = draw(mostly(st.just("POST"), st.sampled_from(["post", "P\u0131ST", "PO\nST", ""])))
    content_type = draw(
        mostly(
            st.just("application/proto"),
            st.sampled_from([" a/b ", "a/b\n", "a\rb", "\u00e9", "", "a, b"]),
        )
    )
    names = draw(mostly(st.just(COMPONENTS), st.permutations(COMPONENTS)))
    if draw(st.integers(0, 9)) == 0:
        names = draw(st.lists(st.sampled_from([*COMPONENTS, "x-other"]), max_size=6))
    param_values: dict[str, str] = {
        "created": str(CREATED),
        "keyid": '"default"',
        "expires": str(CREATED + 10),
        "nonce": '"' + draw(st.sampled_from(["n-1", "", "a b", 'a\\"b', "a;b"])) + '"',
        "alg": '"ed25519"',
    }
    orders = [
        ("created", "keyid", "alg", "nonce"),  # ours
        ("created", "keyid", "alg"),
        ("created", "keyid", "nonce", "alg"),
        HTTP_MESSAGE_SIGNATURES_ORDER,
    ]
    order = draw(st.sampled_from(orders))
    pairs = [(name, param_values[name]) for name in order]
    if draw(st.integers(0, 3)) == 0:  # an edit where the fast path decides
        name = draw(st.sampled_from(sorted(param_values)))
        value = draw(
            st.sampled_from(
                [
                    "0",
                    "01",
                    str(CREATED - 400),
                    str(CREATED + 30),
                    "-1",
                    "1.5",
                    "?1",
                    "default",
                    '"default"',
                    '"ed25519"',
                    '"other"',
                    '""',
                    "1" * 16,
                ]
            )
        )
        position = draw(st.integers(0, len(pairs)))
        if draw(st.booleans()):
            pairs.insert(position, (name, value))  # sometimes a repeat
        else:
            pairs = [(n, value if n == name else v) for n, v in pairs]
    label = draw(mostly(st.just("dispatch"), st.sampled_from(["sig", "*"])))
    input_text = f"{label}=(" + " ".join(f'"{n}"' for n in names) + ")"
    input_text += "".join(f";{n}={v}" for n, v in pairs)
    headers = {"Content-Type": content_type, "Content-Digest": content_digest(body)}
    if draw(st.integers(0, 9)) == 0:
        headers["Content-Digest"] = content_digest(body, "sha-256")
    try:
        covered = general(input_text, "Signature-Input")[label]
        assert isinstance(covered, _InnerList)
        base = _signature_base(method, url, list(headers.items()), covered)
        signature = PRIVATE_KEY.sign(base.encode("ascii"))
    except (SignatureError, ValueError, UnicodeError):
        signature = bytes(64)
    sig_label = draw(mostly(st.just(label), st.just("other")))
    signed = {
        **headers,
        "Signature-Input": input_text,
        "Signature": f"{sig_label}=:{base64.b64encode(signature).decode()}:",
    }
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(sorted(signed)))
        signed[name] = draw(mutated(st.just(signed[name])))
    container = draw(st.sampled_from(["dict", "lower", "multidict"]))
    result_headers: Mapping[str, str]
    if container == "multidict":
        multi = CIMultiDict(signed)
        if draw(st.integers(0, 4)) == 0:  # a repeated header field
            name = draw(st.sampled_from(sorted(signed)))
            multi.add(draw(st.sampled_from([name, name.upper()])), draw(st.sampled_from(["", "x"])))
        result_headers = CIMultiDictProxy(multi)
    elif container == "lower":
        result_headers = {key.lower(): value for key, value in signed.items()}
        if draw(st.integers(0, 4)) == 0:  # one field under two spellings
            result_headers["CONTENT-TYPE"] = content_type
    else:
        result_headers = signed
    if draw(st.integers(0, 5)) == 0:
        body += b"!"
    now = draw(
        mostly(
            st.sampled_from([CREATED, CREATED + 1]),
            st.sampled_from([CREATED - 5, CREATED - 6, CREATED + 305, CREATED + 306, CREATED + 16]),
        )
    )
    return method, url, result_headers, body, now


@settings(max_examples=1000, deadline=None)
@given(request=fast_shaped_requests())
def test_fast_verify_outcome_equals_general_path(
    request: tuple[str, str, Mapping[str, str], bytes, float],
) -> None:
    method, url, headers, body, now = request
    fast = outcome(verify_request, PUBLIC_KEY, method, url, headers, body, now=now)
    slow = outcome(_verify, PUBLIC_KEY, method, url, headers, body, now=now, parse=general)
    try:
        verified = _fast_verify(PUBLIC_KEY, method, url, headers, body, now)
        taken: tuple[Any, ...] | None = None if verified is None else ("ok",)
    except SignatureError as exc:
        taken = type(exc), str(exc)
    event("general path" if taken is None else "fast path")
    event(f"outcome: {fast[0] if fast == ('ok',) else fast[0].__name__}")
    assert fast == slow
    if taken is not None:  # it decided: it verified, or raised as the last two checks do
        assert taken == slow
