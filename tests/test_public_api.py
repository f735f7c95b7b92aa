"""The public surface: __all__ lists exactly the public names, and the drivers stay unimported."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import veritas_resilience
import veritas_resilience.testing


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name not in {"annotations", "TYPE_CHECKING", "Any"}
    }


def test_all_lists_exactly_the_public_names() -> None:
    """Every public name of the package is in __all__, and __all__ names only real objects."""
    assert sorted(veritas_resilience.__all__) == veritas_resilience.__all__
    assert set(veritas_resilience.__all__) == _public_names(veritas_resilience)


def test_testing_all_lists_exactly_the_public_names() -> None:
    """veritas_resilience.testing exports exactly its __all__ (the server kits load lazily)."""
    module = veritas_resilience.testing
    assert sorted(module.__all__) == module.__all__
    for name in module.__all__:
        assert getattr(module, name).__name__ == name
    assert _public_names(module) == set(module.__all__)


@pytest.mark.parametrize(
    "name",
    [
        "veritas_resilience.postgres",
        "veritas_resilience.redis",
        "veritas_resilience.recovery",
        "veritas_resilience.chaos",
        "veritas_resilience.drill",
    ],
)
def test_integration_packages_list_exactly_their_public_names(name: str) -> None:
    """The PostgreSQL and Redis packages export exactly their sorted __all__, all documented."""
    module = importlib.import_module(name)
    assert sorted(module.__all__) == module.__all__
    assert set(module.__all__) == _public_names(module)
    for attr in module.__all__:
        obj = getattr(module, attr)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{name}.{attr} has no docstring"


def test_every_public_name_has_a_docstring() -> None:
    """Each exported class and function is documented."""
    for module in (veritas_resilience, veritas_resilience.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                assert (obj.__doc__ or "").strip(), f"{module.__name__}.{name} has no docstring"


def test_import_does_not_load_the_drivers() -> None:
    """import veritas_resilience loads neither asyncpg nor redis."""
    code = (
        "import sys, veritas_resilience, veritas_resilience.testing; "
        "print(sorted(m for m in ('asyncpg', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_health_lists_exactly_its_public_names() -> None:
    """veritas_resilience.health exports its sorted __all__ (plus the checks module), all
    documented; the checks module does the same."""
    import veritas_resilience.health as health
    import veritas_resilience.health.checks as checks

    assert sorted(health.__all__) == health.__all__
    assert set(health.__all__) == _public_names(health) | {"checks"}
    assert sorted(checks.__all__) == checks.__all__
    public = {
        n
        for n in _public_names(checks)
        if getattr(getattr(checks, n), "__module__", None) == checks.__name__
    }
    assert set(checks.__all__) == public
    for module in (health, checks):
        for attr in module.__all__:
            obj = getattr(module, attr)
            # A type alias such as Callable[...] passes isinstance(obj, type) on Python 3.10.
            is_alias = isinstance(obj, types.GenericAlias) or type(obj).__module__ == "typing"
            if isinstance(obj, (type, types.FunctionType)) and not is_alias:
                assert (obj.__doc__ or "").strip(), f"{module.__name__}.{attr} has no docstring"
