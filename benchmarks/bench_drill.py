"""The failover drill on the embedded default, timed as a user runs it.

Run: ``python -m benchmarks.bench_drill`` (``--quick`` prints the section without writing it).

Runs ``python -m veritas_resilience drill --json`` in a child process (the README's main job,
servers started and stopped by the drill itself), times the whole command from the outside, and
writes the drill's table to RESULTS.md: per scenario the verdict, detection, recovery and first
write after the fault, the set check's counts and the errors by type.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks._results import write_section


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in errors.items()) or "-"


def report(data: dict[str, Any], wall: float) -> str:
    """The RESULTS.md section body for one drill's JSON report and its wall time."""
    env = data["environment"]
    setup = data["setup_seconds"]
    lines = [
        f"`veritas-resilience drill` on the embedded default ({env['postgres']}; {env['redis']}; "
        f"{env['disk']}). Whole command, server start and stop included: {wall:.2f} s wall "
        f"({_seconds(setup)} s to start the servers, {data['duration_seconds']:.2f} s of "
        "scenarios). Times in seconds from the fault: detection (first failed or stale call, or "
        "the client's health leaving ok), recovery (the repair restored a primary/master), first "
        "successful write begun once the fault was noticed.",
        "",
        "| scenario | result | detection | recovery | first write | writes ok | lost | "
        "unexpected | indeterminate | stale reads | errors by type |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in data["scenarios"]:
        if s["skipped"] is not None:
            lines.append(f"| {s['name']} | skipped ({s['skipped']}) |" + " - |" * 9)
            continue
        lines.append(
            f"| {s['name']} | {'PASS' if s['passed'] else 'FAIL'} | "
            f"{_seconds(s['detection_seconds'])} | {_seconds(s['recovered_seconds'])} | "
            f"{_seconds(s['first_write_seconds'])} | {s['writes_ok']} | {s['lost']} | "
            f"{s['unexpected']} | {s['indeterminate']} | {s['fallback_served']} | "
            f"{_errors(s['errors'])} |"
        )
    verdict = "every scenario passed" if data["passed"] else "a scenario FAILED"
    lines += ["", f"Verdict: {verdict} (the command's exit status is non-zero when one fails)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the drill once and write its section of RESULTS.md (unless ``--quick``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="print the section, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-drill-") as folder:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "veritas_resilience", "drill", "--json"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
    if not proc.stdout.strip():
        sys.exit(f"the drill printed no report (exit status {proc.returncode}):\n{proc.stderr}")
    text = report(json.loads(proc.stdout), wall)
    print(text)
    if not args.quick:
        write_section("drill", "Failover drill (veritas-resilience drill)", text)


if __name__ == "__main__":
    main()
