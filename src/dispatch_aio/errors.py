"""Exceptions raised by dispatch_aio (placeholder; the full hierarchy lands with the statuses)."""

__all__ = ["DispatchError", "RemoteError"]


class DispatchError(Exception):
    """Root of every exception defined by dispatch_aio."""


class RemoteError(DispatchError):
    """Stand-in for an error whose original exception could not be reconstructed.

    Args:
        type_name: The error type reported by the remote side.
        message: The error message reported by the remote side.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if type_name else message)
        self._type_name = type_name
        self._message = message

    @property
    def type_name(self) -> str:
        """The error type reported by the remote side."""
        return self._type_name

    @property
    def message(self) -> str:
        """The error message reported by the remote side."""
        return self._message
