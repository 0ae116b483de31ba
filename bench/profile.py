"""Flame graphs of one server worker while a bench scenario runs (`--profile DIR`).

py-spy samples the worker from outside, without pausing it (`--nonblocking`), so the
scenario's figures stay close to an unprofiled run; each graph shows where one worker's
CPU went during the measured seconds of the scenario's first repetition."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

RATE_HZ = 200  # samples per second


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into the SVG flame graph `out`."""
    beside = Path(sys.executable).with_name("py-spy")  # in the venv, which may not be on PATH
    exe = str(beside) if beside.exists() else shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[dev]')")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(RATE_HZ), "--nonblocking", "--format", "flamegraph"]
    return subprocess.Popen([*argv, "--output", str(out)], stdout=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a recording to be written; a failed one is said, not fatal."""
    if proc.wait(timeout=60) != 0:
        print(f"warning: py-spy exited with {proc.returncode}; no flame graph", flush=True)
