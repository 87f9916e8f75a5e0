"""Side-by-side benchmark: pyrovi.TOTALVI against scvi-tools' TOTALVI on real CITE-seq data.

Both libraries train the same architecture (20 latent dimensions, 256 hidden units, 2
encoder layers, 1 decoder layer, encoder dropout 0.2, NB genes, protein background/foreground
mixture, empirical background prior) with scvi-tools' TotalVI optimiser settings (Adam,
lr 4e-3, batch 256, KL warm-up over 0.75 · n_cells steps), the same epochs and the same
train/validation split, alternating which goes first, each run in a fresh process after a
one-epoch warm-up there. scvi-tools' learning-rate schedule and adversarial classifier are
off, and neither stops early, so both take the same steps. Reported: wall time of
``train()`` divided by the number of epochs (median of ``--runs``), and the held-out ELBO
per cell from each library's own ``get_elbo(indices=validation)`` (median of runs).

Run (needs the ``bench`` extra: ``pip install -e ".[bench]"``)::

    python benchmarks/totalvi_cpu.py --threads 2 --runs 3
"""

from __future__ import annotations

import time
from functools import partial

import anndata
import numpy as np
import torch
from _common import SHARED, alternate_runs, cli, machine_line, train_validation_split

# name: (file, epochs, cells to subsample or None)
DATASETS = {
    "pbmc10k_cite": ("pbmc10k_cite_totalvi.h5ad", 15, None),
}
SECTION = "## TotalVI on CPU: pyrovi vs scvi-tools"


def train_scvi_tools(adata, seed, *, epochs, split):
    import scvi

    scvi.settings.seed = seed
    adata = adata.copy()
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = scvi.model.TOTALVI(adata, n_latent=20, empirical_protein_background_prior=True)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=256, lr=4e-3, accelerator="cpu", devices=1,
        early_stopping=False, reduce_lr_on_plateau=False, adversarial_classifier=False,
        check_val_every_n_epoch=1, enable_progress_bar=False,
        external_indexing=[split[0], split[1], np.array([], int)],
    )
    seconds = time.perf_counter() - start
    return seconds / epochs, model.get_elbo(indices=split[1])


def train_pyrovi(adata, seed, *, epochs, split):
    import pyrovi

    adata = adata.copy()
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    torch.manual_seed(seed)
    model = pyrovi.TOTALVI(adata, n_latent=20)
    start = time.perf_counter()
    model.train(max_epochs=epochs, device="cpu", progress_bar=False, seed=seed,
                early_stopping=False, reduce_lr_on_plateau=False,
                train_indices=split[0], validation_indices=split[1])
    seconds = time.perf_counter() - start
    return seconds / epochs, model.get_elbo(indices=split[1])


def run(datasets, runs, epochs_override):
    rows = []
    for name in datasets:
        file, epochs, n_cells = DATASETS[name]
        epochs = epochs_override or epochs
        adata = anndata.read_h5ad(SHARED / file)
        if n_cells is not None:
            keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))
            adata = adata[keep].copy()
        split = train_validation_split(adata.n_obs)
        results, summary = alternate_runs(name, runs, {
            "scvi-tools": partial(train_scvi_tools, adata, epochs=epochs, split=split),
            "pyrovi": partial(train_pyrovi, adata, epochs=epochs, split=split),
        })
        rows.append({
            "dataset": name, "cells": adata.n_obs, "genes": adata.n_vars,
            "proteins": adata.obsm["protein_expression"].shape[1], "epochs": epochs,
            "runs": runs, **summary,
            "raw": results,
        })
    return rows


def markdown(rows, threads) -> str:
    lines = [
        SECTION,
        "",
        machine_line(threads),
        "",
        "Same architecture (20 latent, 256 hidden, 2 encoder / 1 decoder layers, NB genes, "
        "empirical background prior), Adam lr 4e-3, batch 256, KL warm-up over 0.75 · n_cells "
        "steps, same epochs and 90/10 split, no early stopping, no learning-rate schedule, no "
        "adversarial classifier. scvi-tools applies dropout 0.2 in the decoder too; pyrovi's "
        "decoders have none. Time = wall time of `train()` / epochs; ELBO = held-out ELBO per "
        "cell (`get_elbo` on the validation cells, RNA and protein, higher is better); medians "
        "of runs. Ratios are pyrovi / scvi-tools.",
        "",
        "| dataset | cells × genes + proteins | epochs | runs | pyrovi s/epoch | "
        "scvi-tools s/epoch | time ratio | pyrovi ELBO | scvi-tools ELBO | ELBO rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['cells']:,} × {r['genes']:,} + {r['proteins']} | "
            f"{r['epochs']} | {r['runs']} | {r['pyrovi_s_per_epoch']:.3f} | "
            f"{r['scvi_s_per_epoch']:.3f} | **{r['time_ratio']:.2f}** | {r['pyrovi_elbo']:.2f} | "
            f"{r['scvi_elbo']:.2f} | {100 * r['elbo_rel_diff']:+.2f}% |"
        )
    lines += ["", "Command: `python benchmarks/totalvi_cpu.py --threads "
              f"{threads} --runs {rows[0]['runs'] if rows else 0}`", ""]
    return "\n".join(lines)


def main():
    cli(__doc__.split("\n")[0], DATASETS, run, markdown, SECTION, ".totalvi_cpu.json")


if __name__ == "__main__":
    main()
