"""The package imports and its command runs with only its required dependencies installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# What the extras and the test tools bring, never the required dependencies.
OPTIONAL = (
    "trio", "sniffio", "httpx", "uvicorn", "hypercorn", "starlette", "fastapi", "matplotlib",
    "toxiproxy", "hypothesis", "jsonschema", "mkdocs", "aiolimiter", "outcome",
)  # fmt: skip

PUBLIC_MODULES = (
    "veritas_resilience",
    "veritas_resilience.postgres",
    "veritas_resilience.redis",
    "veritas_resilience.health",
    "veritas_resilience.recovery",
    "veritas_resilience.chaos",
    "veritas_resilience.drill",
    "veritas_resilience.testing",
    "veritas_resilience.instrumentation",
    "veritas_resilience.cli",
)


def test_public_modules_import_without_optional_packages() -> None:
    """No public module needs a package that is not a required dependency."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
                return None

        sys.meta_path.insert(0, Block())
        for module in {PUBLIC_MODULES!r}:
            importlib.import_module(module)
        from veritas_resilience.cli import main
        assert main(["--version"]) == 0
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
