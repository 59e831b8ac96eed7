"""What every benchmark's result JSON records about how it was made: the command that wrote it, the
git commit of the checkout it ran from and the CPU it ran on."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict[str, str]:
    """The git commit of this checkout (with ``+dirty`` when tracked files differ) and the CPU."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"commit": commit, "cpu": cpu}


def record(script: str) -> dict[str, str]:
    """``command`` (``python benchmarks/NAME.py`` and this process's arguments, quoted for a shell),
    ``commit`` and ``cpu``, for the script at path ``script`` (its ``__file__``)."""
    command = shlex.join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]])
    return {"command": command, **provenance()}
