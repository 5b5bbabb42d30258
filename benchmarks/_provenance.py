"""Where a benchmark result comes from: machine, versions, sources, date, load.

Shared by the scripts of this folder (run as ``python benchmarks/<name>.py``, so
this folder is on ``sys.path`` and ``import _provenance`` finds this file).

>>> info = machine_info(numpy="1.0")
>>> sorted(k for k in info if k in ("cpu_model", "date", "loadavg_start", "numpy"))
['cpu_model', 'date', 'loadavg_start', 'numpy']
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pso_jax


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform``'s guess)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def source_fingerprint() -> dict[str, str | None]:
    """git HEAD, and a hash of pso_jax's sources (they may differ from HEAD)."""
    root = Path(pso_jax.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    head = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return dict(git_head=head, sources_sha256=digest.hexdigest()[:16])


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run, from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    return f"PYTHONPATH=. .venv/bin/python benchmarks/{script} " + " ".join(
        shlex.quote(a) for a in argv
    )


def now() -> str:
    """The local date and time, to the second, with its UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, accelerator, platform, Python, jax, pso_jax's sources, date, load.

    ``extra`` (library versions, device lists...) is added to (or overrides)
    the common fields.
    """
    import jax

    info = dict(
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        devices=[d.device_kind for d in jax.devices()],
        pso_jax_source=source_fingerprint(),
        date=now(),
        loadavg_start=os.getloadavg(),
    )
    info.update(extra)
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One line naming the machine: its accelerator if jax runs on one, and the CPU.

    >>> machine_label({"cpu_model": "EPYC", "cpu_count": 2, "jax_backend": "cpu"})
    'EPYC, 2 cores'
    >>> machine_label({"cpu_model": "Xeon", "cpu_count": 16, "jax_backend": "gpu",
    ...                "devices": ["NVIDIA H200"]})
    '1 x NVIDIA H200 (jax gpu), host Xeon, 16 cores'
    """
    host = f"{info['cpu_model']}, {info['cpu_count']} cores"
    if info.get("jax_backend", "cpu") == "cpu":
        return host
    kinds = info.get("devices") or ["?"]
    return f"{len(kinds)} x {kinds[0]} (jax {info['jax_backend']}), host {host}"
