"""Configuration from explicit arguments and ``DISPATCH_*`` environment variables.

Nothing is read when this module is imported or when a `Config` is built: each accessor
reads and checks its value when it is called, which happens when the application starts
serving or builds a client. An explicit argument beats the environment. Every error is a
`ConfigurationError` that names the variable (or argument), shows the offending value
(an API key only masked) and says what to do.
"""

__all__ = [
    "API_KEY",
    "API_URL",
    "DATA_DIR",
    "DEFAULT_API_URL",
    "DEFAULT_ENDPOINT_ADDR",
    "DEFAULT_SCHEDULER_ADDR",
    "ENDPOINT_ADDR",
    "ENDPOINT_URL",
    "INSECURE",
    "SCHEDULER_ADDR",
    "VERIFICATION_KEY",
    "Config",
    "mask_secret",
]

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping

from .errors import ConfigurationError

API_KEY = "DISPATCH_API_KEY"
API_URL = "DISPATCH_API_URL"
ENDPOINT_URL = "DISPATCH_ENDPOINT_URL"
ENDPOINT_ADDR = "DISPATCH_ENDPOINT_ADDR"
VERIFICATION_KEY = "DISPATCH_VERIFICATION_KEY"
INSECURE = "DISPATCH_INSECURE"
DATA_DIR = "DISPATCH_DATA_DIR"
SCHEDULER_ADDR = "DISPATCH_SCHEDULER_ADDR"

DEFAULT_API_URL = "https://api.dispatch.run"
DEFAULT_ENDPOINT_ADDR = "127.0.0.1:8000"
DEFAULT_SCHEDULER_ADDR = "127.0.0.1:0"
_OFF = frozenset({"off", "none", "no"})

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")
_BRACKETED_ADDR = re.compile(r"\[(?P<host>[^\]]*)\]:(?P<port>[^:]*)")
_PLAIN_ADDR = re.compile(r"(?P<host>[^:\[\]]*):(?P<port>[^:]*)")
# Characters an HTTP header value may carry (visible ASCII); an API key is sent in one.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


def mask_secret(secret: str) -> str:
    """Return a form of `secret` that is safe to show in messages and logs.

    Args:
        secret: The secret, e.g. an API key.

    Returns:
        The first three characters followed by ``***``, or only ``***`` for a secret too
        short to reveal any of it.
    """
    return f"{secret[:3]}***" if len(secret) >= 12 else "***"


class Config:
    """The settings of one `Dispatch` application.

    Each accessor returns the explicit value given to the constructor if there is one,
    else the environment variable, else the default; it checks the value every time it is
    called and raises `ConfigurationError` if the value is missing or invalid.
    Surrounding whitespace is ignored, and a variable that is set but empty is an error
    (unset it to get the default).

    Args:
        api_key: The Dispatch API key (``DISPATCH_API_KEY``).
        api_url: The Dispatch API base URL (``DISPATCH_API_URL``).
        endpoint_url: The URL at which the scheduler reaches this application
            (``DISPATCH_ENDPOINT_URL``).
        endpoint_addr: The ``host:port`` to serve on (``DISPATCH_ENDPOINT_ADDR``).
        verification_key: The public key that signs the scheduler's requests
            (``DISPATCH_VERIFICATION_KEY``).
        insecure: Allow serving without a verification key on a non-loopback address
            (``DISPATCH_INSECURE``).
        data_dir: The embedded scheduler's data folder (``DISPATCH_DATA_DIR``).
        scheduler_addr: The ``host:port`` the embedded scheduler serves its API on
            (``DISPATCH_SCHEDULER_ADDR``), or ``off``.
        env: The environment to read; None means `os.environ`, read at each call.
        owner: What explicit values are passed to, named in error messages.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        endpoint_url: str | None = None,
        endpoint_addr: str | None = None,
        verification_key: str | None = None,
        insecure: bool | None = None,
        data_dir: str | None = None,
        scheduler_addr: str | None = None,
        env: Mapping[str, str] | None = None,
        owner: str = "Dispatch()",
    ) -> None:
        self._api_key = api_key
        self._api_url = api_url
        self._endpoint_url = endpoint_url
        self._endpoint_addr = endpoint_addr
        self._verification_key = verification_key
        self._insecure = insecure
        self._data_dir = data_dir
        self._scheduler_addr = scheduler_addr
        self._env = env
        self._owner = owner

    def __repr__(self) -> str:
        explicit = {
            "api_key": None if self._api_key is None else mask_secret(self._api_key),
            "api_url": self._api_url,
            "endpoint_url": self._endpoint_url,
            "endpoint_addr": self._endpoint_addr,
            "verification_key": self._verification_key,
            "insecure": self._insecure,
            "data_dir": self._data_dir,
            "scheduler_addr": self._scheduler_addr,
        }
        fields = ", ".join(f"{k}={v!r}" for k, v in explicit.items() if v is not None)
        return f"Config({fields})"

    def api_key(self) -> str:
        """Return the Dispatch API key.

        Raises:
            ConfigurationError: The key is missing, empty, or contains whitespace or
                non-ASCII characters.
        """
        value, source = self._value(self._api_key, API_KEY, "api_key")
        if value is None:
            raise ConfigurationError(
                f"the Dispatch API key is missing: set {API_KEY}, or pass api_key= to "
                f"{self._owner}; to run on this machine, start the app with "
                "`dispatch-aio run -- python app.py`, which sets it",
                variable=API_KEY,
            )
        if not _HEADER_TOKEN.fullmatch(value):
            masked = mask_secret(value)
            raise ConfigurationError(
                f"invalid {source} {masked!r}: an API key is made of visible ASCII "
                "characters, without spaces; check the value you copied",
                variable=source,
                value=masked,
            )
        return value

    def optional_api_key(self) -> str | None:
        """Return the API key if one is set, else None (checked as `api_key`)."""
        if self._value(self._api_key, API_KEY, "api_key")[0] is None:
            return None
        return self.api_key()

    def api_url(self) -> str:
        """Return the Dispatch API base URL, without a trailing slash.

        Defaults to ``https://api.dispatch.run``.

        Raises:
            ConfigurationError: The URL is empty, is not http or https, or has no host.
        """
        value, source = self._value(self._api_url, API_URL, "api_url")
        if value is None:
            return DEFAULT_API_URL
        return self._check_url(value, source, ("http", "https"), example=DEFAULT_API_URL)

    def embedded(self) -> bool:
        """Return whether the application runs its own scheduler (no API URL is set)."""
        return self._value(self._api_url, API_URL, "api_url")[0] is None

    def data_dir(self) -> str:
        """Return the embedded scheduler's data folder; default ``.dispatch``.

        Raises:
            ConfigurationError: The value is empty or holds control characters.
        """
        value, source = self._value(self._data_dir, DATA_DIR, "data_dir")
        if value is None:
            return ".dispatch"
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigurationError(
                f"invalid {source} {value!r}: a folder name without control characters "
                "(newlines, tabs ...) is expected",
                variable=source,
                value=value,
            )
        return value

    def scheduler_addr(self) -> tuple[str, int] | None:
        """Return where the embedded scheduler serves its API, or None for nowhere.

        Defaults to ``127.0.0.1:0`` (a free port on loopback); ``off`` serves nothing.

        Raises:
            ConfigurationError: The address is malformed.
        """
        value, source = self._value(self._scheduler_addr, SCHEDULER_ADDR, "scheduler_addr")
        if value is None:
            value = DEFAULT_SCHEDULER_ADDR
        if value.lower() in _OFF:
            return None
        host, port_text, problem = _split_addr(value)
        if problem is not None:
            raise ConfigurationError(
                f"invalid {source} {value!r}: {problem}, or off to serve no API",
                variable=source,
                value=value,
            )
        return host, int(port_text)

    def local_endpoint_url(self) -> str:
        """Return the endpoint URL of this application's calls when it runs its scheduler.

        ``DISPATCH_ENDPOINT_URL`` if set, else ``http://`` and the endpoint address: the
        URL the application would be served at, so that the same data folder works with
        a separate scheduler calling the application over HTTP.

        Raises:
            ConfigurationError: The URL or the address is invalid.
        """
        if self._value(self._endpoint_url, ENDPOINT_URL, "endpoint_url")[0] is not None:
            return self.endpoint_url()
        host, port = self.endpoint_addr()
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def endpoint_url(self) -> str:
        """Return the URL at which the scheduler reaches this application.

        The scheme is http, https or bridge (set by ``dispatch-aio run``); a trailing
        slash is removed.

        Raises:
            ConfigurationError: The URL is missing or empty, has another scheme, or has
                no host.
        """
        value, source = self._value(self._endpoint_url, ENDPOINT_URL, "endpoint_url")
        if value is None:
            raise ConfigurationError(
                "the endpoint URL (where the Dispatch scheduler reaches this application) "
                f"is missing: set {ENDPOINT_URL}, e.g. to http://127.0.0.1:8000, "
                f"or pass endpoint_url= to {self._owner}",
                variable=ENDPOINT_URL,
            )
        return self._check_url(
            value, source, ("http", "https", "bridge"), example="http://127.0.0.1:8000"
        )

    def endpoint_addr(self) -> tuple[str, int]:
        """Return the host and port to serve on.

        Defaults to ``127.0.0.1:8000``. An IPv6 address is written in brackets
        (``[::1]:8000``) and returned without them. Port 0 picks a free port.

        Raises:
            ConfigurationError: The address is empty, has no host or port, or its port
                is not a number from 0 to 65535.
        """
        value, source = self._value(self._endpoint_addr, ENDPOINT_ADDR, "endpoint_addr")
        if value is None:
            value = DEFAULT_ENDPOINT_ADDR
        host, port_text, problem = _split_addr(value)
        if problem is not None:
            raise ConfigurationError(
                f"invalid {source} {value!r}: {problem}", variable=source, value=value
            )
        return host, int(port_text)

    def verification_key(self) -> str | None:
        """Return the key that verifies request signatures, or None if none is set.

        The key itself is checked where it is loaded; this only rejects an empty value,
        which would otherwise silently disable verification.

        Raises:
            ConfigurationError: The key is set but empty.
        """
        value, _ = self._value(self._verification_key, VERIFICATION_KEY, "verification_key")
        return value

    def insecure(self) -> bool:
        """Return whether serving without a verification key is allowed everywhere.

        Defaults to False. The variable accepts 1, true, yes, 0, false and no (in any
        case).

        Raises:
            ConfigurationError: The variable has another value.
        """
        if self._insecure is not None:
            return self._insecure
        raw = self._environ().get(INSECURE)
        if raw is None:
            return False
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigurationError(
            f"invalid {INSECURE} {raw!r}: use 1, true or yes to serve without a "
            "verification key on a non-loopback address, or 0, false or no (the default)",
            variable=INSECURE,
            value=raw,
        )

    def environ(self) -> Mapping[str, str]:
        """The environment the configuration reads."""
        return self._environ()

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    def _value(self, explicit: str | None, variable: str, argument: str) -> tuple[str | None, str]:
        """Return the stripped value and the name of where it came from.

        None means neither the argument nor the variable is set; an empty value raises.
        """
        if explicit is not None:
            value, source, raw = explicit.strip(), f"{argument}=", explicit
            fix = f"pass a non-empty {argument}= to {self._owner}, or leave it out"
        else:
            env_value = self._environ().get(variable)
            if env_value is None:
                return None, variable
            value, source, raw = env_value.strip(), variable, env_value
            fix = f"give {variable} a value, or unset it"
        if not value:
            shown = "***" if variable == API_KEY and raw else raw
            raise ConfigurationError(
                f"{source} is set but empty: {fix}", variable=source, value=shown
            )
        return value, source

    def _check_url(self, value: str, source: str, schemes: tuple[str, ...], *, example: str) -> str:
        allowed = ", ".join(schemes[:-1]) + f" or {schemes[-1]}"
        try:
            parts = urllib.parse.urlsplit(value)
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            problem = f"not a valid URL ({exc})"
        else:
            if parts.scheme.lower() not in schemes:
                problem = f"the scheme must be {allowed}, e.g. {example}"
            elif not _has_valid_port(parts):
                problem = "the port must be a number from 0 to 65535"
            elif not parts.hostname:
                problem = f"the URL has no host, e.g. {example}"
            else:
                return value.rstrip("/")
        raise ConfigurationError(
            f"invalid {source} {value!r}: {problem}", variable=source, value=value
        )


def _split_addr(addr: str) -> tuple[str, str, str | None]:
    """Split ``host:port``; the third item describes what is wrong, if anything."""
    if "://" in addr:
        return "", "", "expected host:port, not a URL, e.g. 127.0.0.1:8000"
    if match := _BRACKETED_ADDR.fullmatch(addr):
        host, port = match["host"], match["port"]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return host, port, f"{host!r} is not an IPv6 address"
    elif match := _PLAIN_ADDR.fullmatch(addr):
        host, port = match["host"], match["port"]
        if not host:
            return host, port, "the host is missing, e.g. 0.0.0.0:8000 for every interface"
        if not _HOSTNAME.fullmatch(host):
            return host, port, f"{host!r} is not a host name or IP address"
    elif addr.count(":") > 1 and not addr.startswith("["):
        return "", "", "write an IPv6 address in brackets, e.g. [::1]:8000"
    else:
        return "", "", "expected host:port, e.g. 127.0.0.1:8000 or [::1]:8000"
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return host, port, "the port must be a number from 0 to 65535"
    return host, port, None


def _has_valid_port(parts: urllib.parse.SplitResult) -> bool:
    try:
        _ = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        return False
    return True
