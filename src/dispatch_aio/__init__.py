"""dispatch_aio: asyncio-native durable functions for the Dispatch protocol."""

__version__ = "0.1.0"

__all__ = ["__version__"]
