"""Build hook: compile the breaker's optional C fast path (veritas_resilience/_speedups.c).

The package works without it (pure Python, slower). A wheel or editable install compiles it when
a C compiler and the Python headers are present, and says so when they are not. Environment:

- ``VERITAS_RESILIENCE_NO_EXTENSIONS=1``: do not compile (a pure-Python wheel).
- ``VERITAS_RESILIENCE_REQUIRE_EXTENSIONS=1``: fail the build instead of falling back.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_SOURCE = "veritas_resilience/_speedups.c"
_MODULE = "veritas_resilience._speedups"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class SpeedupsBuildHook(BuildHookInterface):
    """Compile ``_speedups`` into the wheel (or next to the sources for an editable install)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or _flag("VERITAS_RESILIENCE_NO_EXTENSIONS"):
            return
        root = Path(self.root)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        target = root / "veritas_resilience" / f"_speedups{suffix}"
        try:
            built = self._compile(root)
        except Exception as exc:
            self._cleanup()
            if _flag("VERITAS_RESILIENCE_REQUIRE_EXTENSIONS"):
                raise
            warnings.warn(
                f"veritas-resilience: the C fast path was not compiled ({exc}); the package "
                "works in pure Python, with a slower circuit breaker",
                stacklevel=1,
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version == "editable":
            # The editable install imports from the source tree: put the module there.
            shutil.copyfile(built, target)
            self._cleanup()
        else:
            build_data["force_include"][str(built)] = f"veritas_resilience/{target.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        out = getattr(self, "_out", None)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
            self._out = None

    def _compile(self, root: Path) -> Path:
        from setuptools import Distribution, Extension
        from setuptools.command.build_ext import build_ext

        out = self._out = Path(tempfile.mkdtemp(prefix="veritas-speedups-"))
        extension = Extension(
            _MODULE, [str(root / _SOURCE)], extra_compile_args=["-O2"] if os.name != "nt" else []
        )
        dist = Distribution({"name": "veritas-resilience", "ext_modules": [extension]})
        command = build_ext(dist)
        command.build_lib = str(out / "lib")
        command.build_temp = str(out / "tmp")
        command.ensure_finalized()
        command.run()
        (built,) = (Path(p) for p in command.get_outputs())
        if not built.exists():
            raise RuntimeError(f"the compiler produced no {built.name}")
        print(f"veritas-resilience: compiled {_MODULE} for {sys.implementation.name}")
        return built
