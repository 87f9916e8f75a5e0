"""Helpers shared by the side-by-side benchmarks: machine description, data split, and
writing a result section into ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(threads: int) -> str:
    """One line naming the machine, thread count, library versions and date."""
    import pyro
    import scvi

    import pyrovi

    return (
        f"Machine: {cpu_name()}, {threads} torch threads, {platform.platform()}. "
        f"Versions: pyrovi {pyrovi.__version__}, scvi-tools {scvi.__version__}, "
        f"pyro-ppl {pyro.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}."
    )


def train_validation_split(n_cells: int, fraction: float = 0.9, seed: int = 0):
    """The same random 90/10 split for both libraries (sorted positions)."""
    permuted = np.random.default_rng(seed).permutation(n_cells)
    n_train = int(np.ceil(fraction * n_cells))
    return np.sort(permuted[:n_train]), np.sort(permuted[n_train:])


def write_section(path: Path, text: str, section: str) -> None:
    """Replace the section titled ``section`` in ``path`` (sections start with '## ')."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    parts = old.split("\n## ")
    kept = [parts[0].rstrip("\n")] + [
        "## " + p.rstrip("\n") for p in parts[1:] if not ("## " + p).startswith(section)
    ]
    path.write_text("\n\n".join(kept + [text.rstrip("\n")]) + "\n")
