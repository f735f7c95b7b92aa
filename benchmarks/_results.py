"""Writes one benchmark's section of benchmarks/RESULTS.md, leaving the other sections alone."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = """# Benchmark results

Each section is written by the benchmark named in its heading (run it again to refresh it), with
the machine and the date it ran on. Numbers are medians of alternating rounds in one process run.
"""


def machine() -> str:
    """One line describing this machine and interpreter."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_kb = int(
            subprocess.run(
                ["awk", "/MemTotal/ {print $2}", "/proc/meminfo"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or 0
        )
    except OSError:
        mem_kb = 0
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kb / 1024 / 1024:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def command() -> str:
    """The command that is running, as typed from the repository's root (no absolute paths)."""
    script = Path(sys.argv[0]).resolve()
    try:
        head = f"python {script.relative_to(RESULTS.parent.parent).as_posix()}"
    except ValueError:
        head = f"python {script.name}"
    return " ".join([head, *sys.argv[1:]])


def stamp() -> str:
    """The machine line and today's date, for a section's first lines."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Machine: {machine()}  \nDate: {now}  \nCommand: `{command()}`\n"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section ``key`` of RESULTS.md with ``title`` and ``body``."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else _HEADER
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    section = f"{begin}\n## {title}\n\n{stamp()}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text, encoding="utf-8")
