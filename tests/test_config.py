import os
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from dispatch_aio._config import (
    API_KEY,
    API_URL,
    ENDPOINT_ADDR,
    ENDPOINT_URL,
    INSECURE,
    VERIFICATION_KEY,
    Config,
    mask_secret,
)
from dispatch_aio.errors import ConfigurationError

KEY = "sk_live_0123456789abcdef"


class RecordingEnv(Mapping[str, str]):
    """An environment that records which variables were read."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.reads.append(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        self.reads.append("<iter>")
        return iter(self._values)

    def __len__(self) -> int:
        self.reads.append("<len>")
        return len(self._values)


def _error(call: object) -> ConfigurationError:
    assert callable(call)
    with pytest.raises(ConfigurationError) as info:
        call()
    return info.value


# --- defaults and precedence ------------------------------------------------------------


def test_defaults() -> None:
    config = Config(env={})
    assert config.api_url() == "https://api.dispatch.run"
    assert config.endpoint_addr() == ("127.0.0.1", 8000)
    assert config.verification_key() is None
    assert config.insecure() is False


def test_values_from_env() -> None:
    config = Config(
        env={
            API_KEY: KEY,
            API_URL: "http://127.0.0.1:4450/",
            ENDPOINT_URL: "https://app.example.com/dispatch/",
            ENDPOINT_ADDR: "0.0.0.0:9000",
            VERIFICATION_KEY: "MCowBQYDK2VwAyEA",
            INSECURE: "yes",
        }
    )
    assert config.api_key() == KEY
    assert config.api_url() == "http://127.0.0.1:4450"
    assert config.endpoint_url() == "https://app.example.com/dispatch"
    assert config.endpoint_addr() == ("0.0.0.0", 9000)
    assert config.verification_key() == "MCowBQYDK2VwAyEA"
    assert config.insecure() is True


def test_explicit_beats_env() -> None:
    env = {
        API_KEY: "env-key-000000000",
        API_URL: "https://env.example.com",
        ENDPOINT_URL: "https://env.example.com",
        ENDPOINT_ADDR: "10.0.0.1:1",
        VERIFICATION_KEY: "env-verification-key",
        INSECURE: "1",
    }
    config = Config(
        api_key=KEY,
        api_url="https://api.example.com",
        endpoint_url="bridge://session-1",
        endpoint_addr="localhost:8080",
        verification_key="explicit-key",
        insecure=False,
        env=env,
    )
    assert config.api_key() == KEY
    assert config.api_url() == "https://api.example.com"
    assert config.endpoint_url() == "bridge://session-1"
    assert config.endpoint_addr() == ("localhost", 8080)
    assert config.verification_key() == "explicit-key"
    assert config.insecure() is False


def test_explicit_values_are_checked_too() -> None:
    exc = _error(Config(api_url="ftp://x", env={}).api_url)
    assert exc.variable == "api_url="
    assert "api_url=" in str(exc)
    assert "'ftp://x'" in str(exc)


def test_surrounding_whitespace_is_ignored() -> None:
    config = Config(env={API_KEY: f" {KEY}\n", ENDPOINT_ADDR: " 127.0.0.1:1 "})
    assert config.api_key() == KEY
    assert config.endpoint_addr() == ("127.0.0.1", 1)


def test_nothing_is_read_at_construction() -> None:
    env = RecordingEnv({API_KEY: KEY})
    config = Config(env=env)
    assert env.reads == []
    assert config.api_key() == KEY
    assert env.reads == [API_KEY]


def test_os_environ_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY, raising=False)
    config = Config()
    with pytest.raises(ConfigurationError):
        config.api_key()
    monkeypatch.setenv(API_KEY, KEY)
    assert config.api_key() == KEY
    monkeypatch.setenv(API_KEY, KEY + "x")
    assert config.api_key() == KEY + "x"


def test_import_and_construction_do_not_read_env() -> None:
    # A fresh interpreter, so that the imports really happen under the bad environment.
    code = (
        "import dispatch_aio._config as c, dispatch_aio.errors as e\n"
        "config = c.Config()\n"
        "try:\n"
        "    config.api_url()\n"
        "except e.ConfigurationError as exc:\n"
        "    print(exc.variable)\n"
    )
    env = {**os.environ, API_URL: "ftp://bad", INSECURE: "maybe", ENDPOINT_ADDR: "x"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == API_URL


# --- API key ----------------------------------------------------------------------------


def test_missing_api_key_says_what_to_do() -> None:
    exc = _error(Config(env={}).api_key)
    assert exc.variable == API_KEY
    assert exc.value is None
    assert "set DISPATCH_API_KEY, or pass api_key= to Dispatch()" in str(exc)


def test_owner_is_named_in_messages() -> None:
    exc = _error(Config(env={}, owner="Client()").api_key)
    assert "pass api_key= to Client()" in str(exc)


@pytest.mark.parametrize("bad", [f"{KEY[:6]} {KEY[6:]}", f"{KEY}é", f"{KEY}\x00"])
def test_invalid_api_key_is_masked(bad: str) -> None:
    exc = _error(Config(env={API_KEY: bad}).api_key)
    assert exc.variable == API_KEY
    assert exc.value == "sk_***"
    assert "sk_***" in str(exc)
    assert KEY[3:8] not in str(exc)
    assert KEY[3:8] not in repr(exc.args)


def test_empty_api_key_is_an_error() -> None:
    exc = _error(Config(env={API_KEY: "  "}).api_key)
    assert exc.variable == API_KEY
    assert "empty" in str(exc)
    exc = _error(Config(api_key="", env={API_KEY: KEY}).api_key)
    assert exc.variable == "api_key="


def test_mask_secret() -> None:
    assert mask_secret(KEY) == "sk_***"
    assert mask_secret("short") == "***"
    assert mask_secret("") == "***"


def test_repr_masks_api_key() -> None:
    text = repr(Config(api_key=KEY, api_url="https://x.example", env={}))
    assert KEY not in text
    assert "sk_***" in text
    assert "https://x.example" in text


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://api.dispatch.run", "https://api.dispatch.run"),
        ("http://localhost:4450", "http://localhost:4450"),
        ("HTTPS://API.example.com/prefix/", "HTTPS://API.example.com/prefix"),
        ("http://[::1]:4450", "http://[::1]:4450"),
    ],
)
def test_valid_api_urls(value: str, expected: str) -> None:
    assert Config(env={API_URL: value}).api_url() == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ftp://api.dispatch.run", "scheme must be http or https"),
        ("bridge://abc", "scheme must be http or https"),
        ("api.dispatch.run", "scheme must be http or https"),
        ("https://", "no host"),
        ("https:///path", "no host"),
        ("http://host:99999", "port must be a number from 0 to 65535"),
        ("http://host:port", "port must be a number from 0 to 65535"),
        ("http://[::1", "not a valid URL"),
        ("", "empty"),
    ],
)
def test_invalid_api_urls(value: str, fragment: str) -> None:
    exc = _error(Config(env={API_URL: value}).api_url)
    assert exc.variable == API_URL
    assert API_URL in str(exc)
    assert fragment in str(exc)
    if value:
        assert repr(value) in str(exc)
        assert exc.value == value


@pytest.mark.parametrize(
    "value",
    [
        "http://127.0.0.1:8000",
        "https://app.example.com",
        "bridge://0e3c7a8b",
        "BRIDGE://session",
    ],
)
def test_valid_endpoint_urls(value: str) -> None:
    assert Config(env={ENDPOINT_URL: value}).endpoint_url() == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ws://app.example.com", "scheme must be http, https or bridge"),
        ("app.example.com:8000", "scheme must be http, https or bridge"),
        ("bridge://", "no host"),
        ("http:///x", "no host"),
        ("\t", "empty"),
    ],
)
def test_invalid_endpoint_urls(value: str, fragment: str) -> None:
    exc = _error(Config(env={ENDPOINT_URL: value}).endpoint_url)
    assert exc.variable == ENDPOINT_URL
    assert ENDPOINT_URL in str(exc)
    assert fragment in str(exc)


def test_missing_endpoint_url_says_what_to_do() -> None:
    exc = _error(Config(env={}).endpoint_url)
    assert exc.variable == ENDPOINT_URL
    assert "set DISPATCH_ENDPOINT_URL" in str(exc)
    assert "pass endpoint_url= to Dispatch()" in str(exc)


# --- endpoint address -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("my-host.internal:443", ("my-host.internal", 443)),
    ],
)
def test_valid_endpoint_addrs(value: str, expected: tuple[str, int]) -> None:
    assert Config(env={ENDPOINT_ADDR: value}).endpoint_addr() == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("127.0.0.1", "expected host:port"),
        ("127.0.0.1:", "port must be a number from 0 to 65535"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be a number from 0 to 65535"),
        ("127.0.0.1:80a", "port must be a number from 0 to 65535"),
        ("127.0.0.1:٣", "port must be a number from 0 to 65535"),
        (":8000", "host is missing"),
        ("::1:8000", "IPv6 address in brackets"),
        ("[::1]", "expected host:port"),
        ("[nope]:80", "not an IPv6 address"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("bad host:80", "not a host name"),
        ("http://x:80", "not a URL"),
        ("", "empty"),
    ],
)
def test_invalid_endpoint_addrs(value: str, fragment: str) -> None:
    exc = _error(Config(env={ENDPOINT_ADDR: value}).endpoint_addr)
    assert exc.variable == ENDPOINT_ADDR
    assert ENDPOINT_ADDR in str(exc)
    assert fragment in str(exc)


def test_invalid_explicit_endpoint_addr_names_argument() -> None:
    exc = _error(Config(endpoint_addr="nope", env={ENDPOINT_ADDR: "127.0.0.1:1"}).endpoint_addr)
    assert exc.variable == "endpoint_addr="
    assert exc.value == "nope"


# --- verification key and insecure mode -------------------------------------------------


def test_empty_verification_key_is_an_error() -> None:
    exc = _error(Config(env={VERIFICATION_KEY: ""}).verification_key)
    assert exc.variable == VERIFICATION_KEY
    assert VERIFICATION_KEY in str(exc)
    assert "unset it" in str(exc)
    exc = _error(Config(verification_key=" ", env={}).verification_key)
    assert exc.variable == "verification_key="


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        (" yes ", True),
        ("0", False),
        ("false", False),
        ("No", False),
    ],
)
def test_insecure_values(value: str, expected: bool) -> None:
    assert Config(env={INSECURE: value}).insecure() is expected


@pytest.mark.parametrize("value", ["", "on", "2", "y", "enabled", "truee"])
def test_invalid_insecure_values(value: str) -> None:
    exc = _error(Config(env={INSECURE: value}).insecure)
    assert exc.variable == INSECURE
    assert exc.value == value
    assert INSECURE in str(exc)
    assert repr(value) in str(exc)
    assert "1, true or yes" in str(exc)


def test_explicit_insecure_skips_env() -> None:
    assert Config(insecure=True, env={INSECURE: "garbage"}).insecure() is True
