"""Every supported CPython installed here, each with a venv of its own for the benchmarks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_pythons() -> list[str]:
    """A CPython 3.10 ... 3.14 each, from ~/.pyenv/versions or PATH (as tests/other_pythons.sh)."""
    found = []
    for minor in range(10, 15):
        candidates = sorted(
            glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python"))
        )
        candidates.append(shutil.which(f"python3.{minor}") or "")
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                found.append(candidate)
                break
    return found


def bench_venv(python: str) -> tuple[str, Path]:
    """The version of ``python`` and the interpreter of its venv with the ``benchmarks`` extra.

    The venv lives in .venvs/bench-pyX.Y and is reinstalled when pyproject.toml changed.
    """
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    venv = ROOT / ".venvs" / f"bench-py{version}"
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    stamp = venv / ".installed"
    wanted = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if not stamp.exists() or stamp.read_text(encoding="utf-8") != wanted:
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{ROOT}[benchmarks]"], check=True)
        stamp.write_text(wanted, encoding="utf-8")
    return version, venv / "bin" / "python"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "unknown"
