"""The package's __all__ lists exactly its public names."""

from __future__ import annotations

import types

import dispatch_aio

# Submodules that are public API and listed in __all__; other submodules (durable, proto)
# are implementation, even though importing them makes them attributes of the package.
PUBLIC_MODULES = {"errors", "http", "interop"}


def test_all_equals_the_sorted_public_names() -> None:
    names = [
        name
        for name, value in vars(dispatch_aio).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    ]
    assert dispatch_aio.__all__ == sorted([*names, *PUBLIC_MODULES, "__version__"])


def test_public_modules_are_modules() -> None:
    for name in PUBLIC_MODULES:
        module = getattr(dispatch_aio, name)
        assert isinstance(module, types.ModuleType)
        assert module.__name__ == f"dispatch_aio.{name}"
        assert sorted(module.__all__) == module.__all__
