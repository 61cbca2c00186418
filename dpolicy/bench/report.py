"""BENCHMARKS.md as a set of named sections, each replaced in place when its benchmark reruns."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
from pathlib import Path

import torch

HEADER = "# Benchmarks\n\nEvery figure below was produced by `dpolicy-bench`; each section names the exact command and machine.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {dev}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {sys.version.split()[0]}")


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the platform says, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (unchanged when None or 0), restored after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_section(path, name: str, body: str, command: str) -> None:
    """Replace (or append) section ``name`` of the markdown file at ``path``."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    block = (f"<!-- section:{name} -->\n{body.rstrip()}\n\nCommand: `{command}`  \nMachine: {machine()}\n"
             f"<!-- /section:{name} -->")
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
