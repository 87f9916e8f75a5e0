"""Side-by-side benchmark: pyrovi.SCVI against scvi-tools' SCVI on the same data and split.

Both libraries train the same architecture (1 hidden layer of 128, 10 latent dimensions,
ZINB, gene dispersion, observed library size, batch norm, dropout 0.1) with the same batch
size, epochs, KL warm-up and train/validation split, alternating which goes first; every
run is a fresh process (after a one-epoch warm-up there), so that neither library inherits
the other's imports, caches or allocator state. Validation runs every epoch in both
(scvi-tools does not by default; pyrovi records it in the history). Reported: wall time
of ``train()`` divided by the number of epochs (median of ``--runs``), and the held-out
ELBO per cell from each library's own ``get_elbo(indices=validation)``.

Run (needs the ``bench`` extra: ``pip install -e ".[bench]"``)::

    python benchmarks/scvi_cpu.py --threads 2 --runs 3 --out benchmarks/RESULTS.md

Results are written as a markdown section into ``--out`` (replacing an earlier section of
the same title) and as JSON next to it.
"""

from __future__ import annotations

import time
from functools import partial

import anndata
import numpy as np
import torch
from _common import SHARED, alternate_runs, cli, machine_line, train_validation_split

# name: (file, batch_key, epochs)
DATASETS = {
    "mouse_brain_10k": ("mouse_brain_10k.h5ad", None, 40),
    "cellbench_5batch": ("cellbench_lung_celllines_5batch.h5ad", "batch", 60),
    "pbmc_2batch_4k_genes": ("pbmc10k_5k_rna_2batch.h5ad", "batch", 15),
}
SECTION = "## scVI on CPU: pyrovi vs scvi-tools"


def train_scvi_tools(adata, batch_key, seed, *, epochs, split, device="cpu"):
    import scvi

    scvi.settings.seed = seed
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1,
                            gene_likelihood="zinb", dispersion="gene")
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=128, accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        check_val_every_n_epoch=1, early_stopping=False, enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": [split[0], split[1], np.array([], int)]},
    )
    seconds = time.perf_counter() - start
    return seconds / epochs, model.get_elbo(indices=split[1])


def train_pyrovi(adata, batch_key, seed, *, epochs, split, device="cpu"):
    import pyrovi

    adata = adata.copy()
    pyrovi.SCVI.setup_anndata(adata, batch_key=batch_key)
    torch.manual_seed(seed)
    model = pyrovi.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1,
                        gene_likelihood="zinb", dispersion="gene")
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, device=device, progress_bar=False, seed=seed,
                train_indices=split[0], validation_indices=split[1])
    seconds = time.perf_counter() - start
    return seconds / epochs, model.get_elbo(indices=split[1])


def run(datasets, runs, epochs_override, device="cpu"):
    rows = []
    for name in datasets:
        file, batch_key, epochs = DATASETS[name]
        epochs = epochs_override or epochs
        adata = anndata.read_h5ad(SHARED / file)
        # Cells without counts (one in mouse_brain_10k) are removed for both libraries.
        adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
        split = train_validation_split(adata.n_obs)
        results, summary = alternate_runs(name, runs, {
            "scvi-tools": partial(train_scvi_tools, adata, batch_key, epochs=epochs,
                                  split=split, device=device),
            "pyrovi": partial(train_pyrovi, adata, batch_key, epochs=epochs, split=split,
                              device=device),
        })
        rows.append({
            "dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "epochs": epochs,
            "runs": runs, "train_cells": len(split[0]), **summary,
            "raw": results,
        })
    return rows


def markdown(rows, threads) -> str:
    lines = [
        SECTION,
        "",
        machine_line(threads),
        "",
        "Same architecture (ZINB, 1×128 hidden, 10 latent), batch size 128, same epochs, same "
        "90/10 split, validation every epoch in both. Time = wall time of `train()` / epochs, "
        "median of runs; ELBO = held-out ELBO per cell (`get_elbo` on the validation cells, "
        "higher is better), median of runs. Ratios are pyrovi / scvi-tools.",
        "",
        "| dataset | cells × genes | epochs | runs | pyrovi s/epoch | scvi-tools s/epoch | "
        "time ratio | pyrovi ELBO | scvi-tools ELBO | ELBO rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['cells']:,} × {r['genes']:,} | {r['epochs']} | {r['runs']} | "
            f"{r['pyrovi_s_per_epoch']:.3f} | {r['scvi_s_per_epoch']:.3f} | "
            f"**{r['time_ratio']:.2f}** | {r['pyrovi_elbo']:.2f} | {r['scvi_elbo']:.2f} | "
            f"{100 * r['elbo_rel_diff']:+.2f}% |"
        )
    lines += ["", "Command: `python benchmarks/scvi_cpu.py --threads "
              f"{threads} --runs {rows[0]['runs'] if rows else 0}`", ""]
    return "\n".join(lines)


def main():
    cli(__doc__.split("\n")[0], DATASETS, run, markdown, SECTION, ".scvi_cpu.json")


if __name__ == "__main__":
    main()
