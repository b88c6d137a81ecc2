"""Helpers the benchmark scripts share: the machine's description, how busy it is, writing the JSON result."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def system_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine so far (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def write_report(path: str | Path, report: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


def machine_basics() -> dict:
    """CPU and platform facts every benchmark result records; each script adds its library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model() or platform.processor(),
            "platform": platform.platform(), "python": platform.python_version()}


def wait_quiet(limit: float, max_wait: float, interval: float = 1.0) -> float:
    """Wait (up to max_wait s) until other processes use at most `limit` of the machine's CPUs; returns the
    seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        busy0 = system_busy_seconds()
        if busy0 is None:
            break
        time.sleep(interval)
        if (system_busy_seconds() - busy0) / (interval * (os.cpu_count() or 1)) <= limit:
            break
    return time.perf_counter() - t0
