"""Helpers shared by the side-by-side benchmarks: machine description, data split, and
writing a result section into ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import platform
import re
import sys
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


def alternate_runs(name: str, runs: int, trainers: dict) -> tuple[dict, dict]:
    """Run each library's trainer ``runs`` times, alternating which goes first.

    ``trainers`` maps a label to ``fn(seed, epochs=None) -> (seconds per epoch, held-out
    ELBO)`` (a picklable ``functools.partial`` of a module-level function). Every run is a
    fresh process, spawned with this process's torch thread count, that first trains the
    same library for one epoch (imports, first-call set-up and allocator warm-up are then
    not timed) and then the timed run: neither library inherits the other's imports,
    caches, garbage or allocator settings. Returns the raw results and the ratio summary
    of :func:`summarise`.
    """
    import logging

    results = {label: [] for label in trainers}
    order = list(trainers.items())
    for r in range(runs):
        for label, fn in order if r % 2 == 0 else order[::-1]:
            per_epoch, elbo = in_fresh_process(_warm_up_then_time, fn, r)
            results[label].append((per_epoch, float(elbo)))
            logging.info("%s %s run %d: %.3f s/epoch, held-out ELBO %.2f",
                         name, label, r, per_epoch, elbo)
    return results, summarise(results)


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a newly spawned process with this process's torch thread count
    (``fn`` must be picklable: a module-level function or a partial of one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=configure,
                             initargs=(torch.get_num_threads(),)) as worker:
        return worker.submit(fn, *args).result()


def _warm_up_then_time(fn, seed: int):
    fn(seed, epochs=1)
    return fn(seed)


def summarise(results: dict) -> dict:
    """Medians per library and pyrovi / scvi-tools ratios."""
    import statistics

    med = {k: (statistics.median(t for t, _ in v), statistics.median(e for _, e in v))
           for k, v in results.items()}
    return {
        "pyrovi_s_per_epoch": med["pyrovi"][0], "scvi_s_per_epoch": med["scvi-tools"][0],
        "time_ratio": med["pyrovi"][0] / med["scvi-tools"][0],
        "pyrovi_elbo": med["pyrovi"][1], "scvi_elbo": med["scvi-tools"][1],
        "elbo_rel_diff": (med["pyrovi"][1] - med["scvi-tools"][1]) / abs(med["scvi-tools"][1]),
    }


def cli(description: str, datasets: dict, run, markdown, section: str, json_suffix: str):
    """Parse the common options, run the benchmark, write RESULTS.md and a JSON file."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--datasets", nargs="+", default=list(datasets), choices=list(datasets))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override per-dataset epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    configure(args.threads)
    rows = run(args.datasets, args.runs, args.epochs)
    text = markdown(rows, args.threads)
    # The command as run (minus --out), so that an --epochs or --datasets override shows.
    shown = [a for i, a in enumerate(sys.argv[1:], 1)
             if a != "--out" and sys.argv[i - 1] != "--out" and not a.startswith("--out=")]
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *shown])
    text = re.sub(r"^Command: `[^`]*`", f"Command: `{command}`", text, flags=re.MULTILINE)
    write_section(args.out, text, section)
    args.out.with_suffix(json_suffix).write_text(json.dumps(rows, indent=1))
    print(text)


def configure(threads: int) -> None:
    """Log progress (quietly for scvi-tools and lightning) and fix torch's thread count."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)
