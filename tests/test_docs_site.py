"""The documentation site builds with ``mkdocs build --strict`` and its references are complete."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import veritas_resilience
from veritas_resilience.instrumentation import describe_metrics
from veritas_resilience.instrumentation.prometheus import METRIC_MODULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module with warnings as errors."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", **_environ()},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}"
    return out


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def public_modules() -> Iterator[types.ModuleType]:
    """Every public module of the package: no part of its dotted name starts with ``_``."""
    yield veritas_resilience
    for info in pkgutil.walk_packages(veritas_resilience.__path__, "veritas_resilience."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def inventory(site: Path) -> list[str]:
    """The identifiers mkdocstrings documented (Sphinx inventory format, version 2)."""
    header, body = _split_inventory((site / "objects.inv").read_bytes())
    assert header.startswith(b"# Sphinx inventory version 2")
    return [line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()]


def _split_inventory(data: bytes) -> tuple[bytes, bytes]:
    parts = data.split(b"\n", 4)
    return b"\n".join(parts[:4]), parts[4]


def _resolve(identifier: str) -> object | None:
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def test_api_reference_lists_every_public_name(site: Path) -> None:
    """Every name in ``__all__`` of every public module is documented in the API reference."""
    documented = set(inventory(site))
    documented_objects = {id(_resolve(name)) for name in documented}
    missing = [
        f"{module.__name__}.{name}"
        for module in public_modules()
        for name in getattr(module, "__all__", ())
        if f"{module.__name__}.{name}" not in documented
        and id(getattr(module, name)) not in documented_objects
    ]
    assert not missing, f"not in the API reference: {missing}"


def test_metrics_reference_lists_every_metric(site: Path) -> None:
    """The generated metrics page names every series of every metric family."""
    page = (site / "metrics" / "index.html").read_text(encoding="utf-8")
    missing = [s for m in describe_metrics() for s in m.series if f"<code>{s}</code>" not in page]
    assert not missing, f"missing from the metrics reference: {missing}"


def test_metric_modules_lists_every_module_that_declares_metrics() -> None:
    """describe_metrics() imports every module of the package that calls define_metric()."""
    package = ROOT / "veritas_resilience"
    declaring = set()
    for path in package.rglob("*.py"):
        if path.name != "prometheus.py" and re.search(r"^define_metric\(", path.read_text(), re.M):
            relative = path.relative_to(ROOT).with_suffix("")
            declaring.add(".".join(relative.parts).removesuffix(".__init__"))
    assert declaring <= set(METRIC_MODULES), sorted(declaring - set(METRIC_MODULES))
