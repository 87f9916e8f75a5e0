"""What keeping freed memory in the heap during training is worth: pyrovi's SCVI with
``pyrovi.infer.heap.enabled`` on and off.

Each run is a fresh process (spawned; on and off alternate) that trains one epoch as a
warm-up and then ``--epochs`` timed epochs of the default SCVI (ZINB, batch 128) on the
same 90/10 split as ``scvi_cpu.py``. Reported per data set: medians of the wall time per
epoch and of the minor page faults per epoch (``getrusage``), and their ratio on/off.

Run::

    python benchmarks/heap_ab.py --threads 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import time
from pathlib import Path

import anndata
import numpy as np
import torch
from _common import (
    SHARED,
    configure,
    in_fresh_process,
    machine_line,
    train_validation_split,
    write_section,
)
from scvi_cpu import DATASETS

SECTION = "## Heap retention during CPU training: on vs off"


def train(name: str, epochs: int, retain: bool) -> tuple[float, float]:
    """Seconds and minor page faults per epoch of one timed training (after a warm-up)."""
    import pyrovi
    import pyrovi.infer.heap

    pyrovi.infer.heap.enabled = retain
    file, batch_key, _ = DATASETS[name]
    adata = anndata.read_h5ad(SHARED / file)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    split = train_validation_split(adata.n_obs)
    pyrovi.SCVI.setup_anndata(adata, batch_key=batch_key)
    for n_epochs in (1, epochs):  # warm-up, then timed
        torch.manual_seed(0)
        model = pyrovi.SCVI(adata)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model.train(max_epochs=n_epochs, batch_size=128, progress_bar=False, seed=0,
                    train_indices=split[0], validation_indices=split[1])
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds / epochs, faults / epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    configure(args.threads)
    rows = []
    for name in args.datasets:
        raw = {True: [], False: []}
        for r in range(args.runs):
            for retain in (True, False) if r % 2 == 0 else (False, True):
                result = in_fresh_process(train, name, args.epochs, retain)
                raw[retain].append(result)
                logging.info("%s heap retained=%s run %d: %.3f s/epoch, %.0f faults/epoch",
                             name, retain, r, *result)
        med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in raw.items()}
        rows.append({"dataset": name, "runs": args.runs, "epochs": args.epochs,
                     "on_s_per_epoch": med[True][0], "off_s_per_epoch": med[False][0],
                     "on_faults_per_epoch": med[True][1], "off_faults_per_epoch": med[False][1],
                     "raw": {"on": raw[True], "off": raw[False]}})
    lines = [
        SECTION, "", machine_line(args.threads), "",
        "pyrovi SCVI (defaults, batch 128), `pyrovi.infer.heap.enabled` on and off, each run a "
        "fresh process after a one-epoch warm-up; medians of runs.", "",
        "| dataset | runs | s/epoch on | s/epoch off | time on/off | page faults/epoch on | "
        "page faults/epoch off |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['runs']} | {r['on_s_per_epoch']:.3f} | "
            f"{r['off_s_per_epoch']:.3f} | **{r['on_s_per_epoch'] / r['off_s_per_epoch']:.2f}** | "
            f"{r['on_faults_per_epoch']:,.0f} | {r['off_faults_per_epoch']:,.0f} |")
    lines += ["", f"Command: `python benchmarks/heap_ab.py --threads {args.threads} --runs "
              f"{args.runs} --epochs {args.epochs}`", ""]
    text = "\n".join(lines)
    write_section(args.out, text, SECTION)
    args.out.with_suffix(".heap_ab.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
