"""Writing one section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine_line() -> str:
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
            f"Python {platform.python_version()}, torch {torch.__version__}.")


def update_benchmarks(section: str, command: str, rows: list[str]) -> None:
    """Replace (or append) the ``## <section>`` block of BENCHMARKS.md."""
    block = "\n".join([f"## {section}", "", f"Command: `{command}`", machine_line(), "", *rows, ""])
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
    print(f"updated {BENCHMARKS} section '{section}'")
