"""Time per epoch and peak memory of pyrovi SCVI for 10k, 100k and 1M cells (CPU).

Cells are resampled (with replacement) from the PBMC 10k data in ``../shared/data``,
restricted to its 2,000 genes of highest variance, so the matrix keeps real counts and
real sparsity (about 19% non-zero, twice the 10% of the memory target) at any size.
Each size runs in its own process, so that its peak resident memory (``ru_maxrss``) is
its own; the count matrix stays sparse (CSR) from AnnData to the device and only
minibatches are dense. The model is the default SCVI
(ZINB, 1×128 hidden, 10 latent), batch size 128, 90/10 split with validation every epoch.
Results go to the "Scaling with the number of cells" section of ``benchmarks/RESULTS.md``.

Command: ``python benchmarks/scaling.py --threads 2``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED, configure, machine_line, write_section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Scaling with the number of cells (pyrovi SCVI, CPU)"
SOURCE = "pbmc10k_5k_rna_2batch.h5ad"
N_GENES = 2000


def resampled_counts(n_cells: int, seed: int = 0):
    """AnnData of ``n_cells`` cells drawn with replacement from the real data (CSR)."""
    import anndata
    import numpy as np

    source = anndata.read_h5ad(SHARED / SOURCE)
    x = source.X.tocsr().astype(np.float32)  # on the small source: no copy of the large one
    mean = np.asarray(x.mean(0)).ravel()
    variance = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
    genes = np.sort(np.argsort(-variance)[:N_GENES])
    x = x[:, genes]
    keep = np.flatnonzero(np.diff(x.indptr) > 0)
    rows = np.random.default_rng(seed).choice(keep, n_cells, replace=True)
    counts = x[rows]
    obs = source.obs.iloc[rows][["batch"]].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    return anndata.AnnData(counts, obs=obs, var=source.var.iloc[genes].copy())


def current_rss_gb() -> float:
    """Resident memory of this process now (Linux), in GB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def run_one(n_cells: int, epochs: int, threads: int) -> dict:
    """Train on ``n_cells`` resampled cells; seconds per epoch and peak RSS of this process."""
    configure(threads)
    import pyrovi

    adata = resampled_counts(n_cells)
    counts = adata.X
    csr_bytes = counts.data.nbytes + counts.indices.nbytes + counts.indptr.nbytes
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    model = pyrovi.SCVI(adata)
    rss_with_data = current_rss_gb()
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, device="cpu", progress_bar=False, seed=0)
    seconds = (time.perf_counter() - start) / epochs
    return {
        "cells": n_cells,
        "genes": adata.n_vars,
        "nonzero_fraction": counts.nnz / (counts.shape[0] * counts.shape[1]),
        "epochs": epochs,
        "s_per_epoch": seconds,
        "cells_per_s": n_cells / seconds,
        "csr_gb": csr_bytes / 1e9,
        "dense_gb": counts.shape[0] * counts.shape[1] * 4 / 1e9,
        "rss_with_data_gb": rss_with_data,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def markdown(rows: list[dict], threads: int) -> str:
    base = rows[0]
    lines = [
        SECTION,
        "",
        machine_line(threads),
        "",
        f"Cells resampled from `{SOURCE}` ({N_GENES:,} genes of highest variance, real counts); "
        "default SCVI (ZINB, 1×128 hidden, 10 latent), batch 128, 90/10 split, validation "
        "every epoch. Time per epoch = wall time of `train()` / epochs (training steps plus "
        "validation). \"Relative\" divides time per cell by that of the smallest run: 1.00 "
        "means linear growth. RSS with data: the process after building the AnnData and the "
        "model, before `train()`; peak RSS: the whole process at its highest (Python, torch, "
        "the AnnData, training); \"dense\" is what the count matrix alone would take as "
        "float32.",
        "",
        "| cells | non-zero | epochs | s/epoch | cells/s | relative time per cell | "
        "CSR matrix GB | dense would be GB | RSS with data GB | peak RSS GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        relative = (r["s_per_epoch"] / r["cells"]) / (base["s_per_epoch"] / base["cells"])
        lines.append(
            f"| {r['cells']:,} | {100 * r['nonzero_fraction']:.1f}% | {r['epochs']} | "
            f"{r['s_per_epoch']:.1f} | {r['cells_per_s']:,.0f} | {relative:.2f} | "
            f"{r['csr_gb']:.2f} | {r['dense_gb']:.1f} | {r['rss_with_data_gb']:.2f} | "
            f"**{r['peak_rss_gb']:.2f}** |"
        )
    lines += ["", f"Command: `python benchmarks/scaling.py --threads {threads}`", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.epochs, args.threads)))
        return
    rows = []
    for n in args.cells:
        epochs = max(1, round(50_000 / n))  # a few epochs for small sizes, against noise
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--epochs", str(epochs),
             "--threads", str(args.threads)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    configure(args.threads)
    text = markdown(rows, args.threads)
    write_section(RESULTS, text, SECTION)
    RESULTS.with_suffix(".scaling.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
