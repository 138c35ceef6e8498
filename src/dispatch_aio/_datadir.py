"""The scheduler's data folder: its database and the connection file clients read.

The folder (``.dispatch`` by default) holds the database, ``scheduler.db``, and, while
a scheduler serves its API, ``scheduler.json``: the API URL and key, so that
``dispatch-aio calls`` and ``show`` find it without being told. The folder is its
owner's alone (the database holds the signing key) and gets a ``.gitignore`` so that it
is never committed by accident. Both the command's scheduler and the one embedded in an
application use it.
"""

from __future__ import annotations

__all__ = [
    "CONNECTION_FILE",
    "DB_FILE",
    "DEFAULT_DATA_DIR",
    "prepare_data_dir",
    "publish_connection",
    "read_connection",
]

import json
import os
from pathlib import Path

DEFAULT_DATA_DIR = ".dispatch"
DB_FILE = "scheduler.db"
CONNECTION_FILE = "scheduler.json"


def prepare_data_dir(data_dir: str) -> Path:
    """Create the data folder if needed, owner-only; return the database path.

    Raises:
        OSError: The folder cannot be created or its mode set.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700)
        (folder / ".gitignore").write_text(
            "# Created by dispatch-aio: the local scheduler's data.\n*\n", "utf-8"
        )
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)
    return folder / DB_FILE


def publish_connection(data_dir: str, api_url: str, api_key: str) -> Path | None:
    """Write the connection file (owner-only); return its path, or None if it failed.

    The file is a convenience for the inspection commands: failing to write it is not
    an error.
    """
    path = Path(data_dir) / CONNECTION_FILE
    data = {"api_url": api_url, "api_key": api_key, "pid": os.getpid()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file)
    except OSError:
        return None
    return path


def read_connection(data_dir: str) -> tuple[str, str] | None:
    """Return the API URL and key a scheduler running on `data_dir` published, if any."""
    try:
        data = json.loads((Path(data_dir) / CONNECTION_FILE).read_text("utf-8"))
        url, key = data["api_url"], data["api_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(url, str) and isinstance(key, str) and url and key:
        return url, key
    return None
