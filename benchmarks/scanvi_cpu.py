"""Side-by-side benchmark: pyrovi.SCANVI against scvi-tools' SCANVI on the same labelled cells.

For each dataset a tenth of the cells (the same ones for both libraries) keep their label,
the others get ``"Unknown"``. Each library trains its scVI (1 hidden layer of 128, 10
latent dimensions, ZINB, batch size 128) for the same epochs on all cells, starts its
scANVI from it (``from_scvi_model``) and trains that for the same epochs with its
defaults (classification ratio 50, every labelled cell in the classification loss, KL
warm-up over 400 epochs). Every run is a fresh process (after a one-epoch warm-up there),
alternating which library goes first. Reported: the accuracy and balanced accuracy of
``predict()`` on the unlabelled cells, and the wall time of the scANVI ``train()`` divided
by its epochs (medians of ``--runs``).

Run (needs the ``bench`` extra: ``pip install -e ".[bench]"``)::

    python benchmarks/scanvi_cpu.py --threads 2 --runs 3

``--epochs`` overrides the scANVI epochs of every dataset (the scVI epochs stay). Results
are written as a markdown section into ``--out`` (replacing an earlier section of the same
title) and as JSON next to it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from functools import partial

import anndata
import numpy as np
from _common import SHARED, _warm_up_then_time, cli, in_fresh_process, machine_line

# name: (file, labels column, batch_key, genes kept, scVI epochs, scANVI epochs)
DATASETS = {
    "pbmc4k": ("pbmc4k_10x_scdcc_top2000.h5ad", "cell_type", None, None, 60, 20),
    "cellbench_5batch": ("cellbench_lung_celllines_5batch.h5ad", "cell_line", "batch", 2000,
                         60, 20),
}
SECTION = "## scANVI on CPU: pyrovi vs scvi-tools"
LABELLED_FRACTION = 0.1
UNKNOWN = "Unknown"


def with_labels(adata, labels_key: str):
    """``adata`` with ``obs["labels"]``: the truth for a fixed tenth of the cells, else
    ``UNKNOWN``; and the mask of the labelled cells."""
    truth = adata.obs[labels_key].astype(str).to_numpy()
    labelled = np.random.default_rng(0).random(adata.n_obs) < LABELLED_FRACTION
    adata = adata.copy()
    adata.obs["labels"] = np.where(labelled, truth, UNKNOWN)
    return adata, truth, labelled


def scores(predicted, truth, labelled) -> tuple[float, float]:
    """Accuracy and balanced accuracy on the unlabelled cells."""
    from sklearn.metrics import balanced_accuracy_score

    predicted, truth = np.asarray(predicted)[~labelled], truth[~labelled]
    return float((predicted == truth).mean()), float(balanced_accuracy_score(truth, predicted))


def train_scvi_tools(adata, labels_key, batch_key, seed, *, pretrain, epochs):
    import scvi

    scvi.settings.seed = seed
    adata, truth, labelled = with_labels(adata, labels_key)
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key="labels")
    scvi_model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1,
                                 dropout_rate=0.1, gene_likelihood="zinb", dispersion="gene")
    scvi_model.train(max_epochs=pretrain, batch_size=128, train_size=1.0, accelerator="cpu",
                     devices=1, early_stopping=False, enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category=UNKNOWN)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, accelerator="cpu",
                devices=1, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    return (seconds / epochs, *scores(model.predict(), truth, labelled))


def train_pyrovi(adata, labels_key, batch_key, seed, *, pretrain, epochs):
    import pyrovi

    adata, truth, labelled = with_labels(adata, labels_key)
    pyrovi.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key="labels")
    scvi_model = pyrovi.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1,
                             gene_likelihood="zinb", dispersion="gene")
    scvi_model.train(max_epochs=pretrain, batch_size=128, train_size=1.0, progress_bar=False,
                     seed=seed, device="cpu")
    model = pyrovi.SCANVI.from_scvi_model(scvi_model, unlabeled_category=UNKNOWN)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, progress_bar=False,
                seed=seed, device="cpu")
    seconds = time.perf_counter() - start
    return (seconds / epochs, *scores(model.predict(), truth, labelled))


def _fresh(fn, seed: int, epochs: int | None = None):
    """``fn`` with its scVI pre-training cut to ``epochs`` too (the one-epoch warm-up)."""
    if epochs is None:
        return fn(seed)
    return fn(seed, pretrain=epochs, epochs=epochs)


def run(datasets, runs, epochs_override):
    rows = []
    for name in datasets:
        file, labels_key, batch_key, n_genes, pretrain, epochs = DATASETS[name]
        epochs = epochs_override or epochs
        adata = anndata.read_h5ad(SHARED / file)
        if n_genes is not None:
            # The genes of highest variance (labels unused), as pbmc4k comes.
            from pyrovi.zoo import top_variable_genes

            adata = adata[:, top_variable_genes(adata, n_genes)].copy()
        trainers = {
            "scvi-tools": partial(train_scvi_tools, adata, labels_key, batch_key,
                                  pretrain=pretrain, epochs=epochs),
            "pyrovi": partial(train_pyrovi, adata, labels_key, batch_key, pretrain=pretrain,
                              epochs=epochs),
        }
        results = {label: [] for label in trainers}
        loads = []
        order = list(trainers.items())
        for r in range(runs):
            for label, fn in order if r % 2 == 0 else order[::-1]:
                # The machine may be shared: its load at each run's start is reported.
                loads.append(os.getloadavg()[0])
                result = in_fresh_process(_warm_up_then_time, partial(_fresh, fn), r)
                results[label].append(result)
                logging.info("%s %s run %d: %.3f s/epoch, accuracy %.3f, balanced %.3f",
                             name, label, r, *result)
        medians = {label: [statistics.median(v[i] for v in values) for i in range(3)]
                   for label, values in results.items()}
        rows.append({
            "dataset": name, "cells": adata.n_obs, "genes": adata.n_vars,
            "labels": int(adata.obs[labels_key].nunique()), "pretrain_epochs": pretrain,
            "epochs": epochs, "runs": runs,
            "pyrovi_s_per_epoch": medians["pyrovi"][0],
            "scvi_s_per_epoch": medians["scvi-tools"][0],
            "time_ratio": medians["pyrovi"][0] / medians["scvi-tools"][0],
            # Run r of both libraries ran back to back: their ratio shows the spread left
            # by the machine's drift over the benchmark.
            "run_ratios": [mine[0] / theirs[0] for mine, theirs in
                           zip(results["pyrovi"], results["scvi-tools"], strict=True)],
            "pyrovi_accuracy": medians["pyrovi"][1], "scvi_accuracy": medians["scvi-tools"][1],
            "pyrovi_balanced": medians["pyrovi"][2], "scvi_balanced": medians["scvi-tools"][2],
            "load_min": min(loads), "load_max": max(loads), "raw": results,
        })
    return rows


def markdown(rows, threads) -> str:
    lines = [
        SECTION,
        "",
        machine_line(threads),
        "",
        "A tenth of the cells labelled (the same cells for both libraries), the others "
        "`Unknown`. Each library: scVI (ZINB, 1×128 hidden, 10 latent, batch 128) on all "
        "cells, then `SCANVI.from_scvi_model` trained with its defaults (classification "
        "ratio 50, KL warm-up over 400 epochs), the same epochs in both. Accuracy and "
        "balanced accuracy of `predict()` on the unlabelled cells; time = wall time of the "
        "scANVI `train()` / epochs. Medians of runs, each in a fresh process after a "
        "one-epoch warm-up, alternating which library goes first; ratio = pyrovi / "
        "scvi-tools. CellBench is cut to its 2,000 genes of highest variance "
        "(`pyrovi.zoo.top_variable_genes`, labels unused), as pbmc4k comes; at all 11,533 "
        "genes an epoch is mostly the decoder and likelihood both models share with scVI "
        "(see the scVI table). Per run: the ratio of the two libraries' runs made back to "
        "back, lowest and highest over the runs. 1-minute load average of the machine at "
        "the runs' starts: "
        + ", ".join(f"{r['dataset']} {r['load_min']:.1f}-{r['load_max']:.1f}" for r in rows)
        + ".",
        "",
        "| dataset | cells × genes | labels | scVI + scANVI epochs | runs | pyrovi accuracy | "
        "scvi-tools accuracy | pyrovi balanced | scvi-tools balanced | pyrovi s/epoch | "
        "scvi-tools s/epoch | time ratio | per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['cells']:,} × {r['genes']:,} | {r['labels']} | "
            f"{r['pretrain_epochs']} + {r['epochs']} | {r['runs']} | "
            f"{r['pyrovi_accuracy']:.3f} | {r['scvi_accuracy']:.3f} | "
            f"{r['pyrovi_balanced']:.3f} | {r['scvi_balanced']:.3f} | "
            f"{r['pyrovi_s_per_epoch']:.3f} | {r['scvi_s_per_epoch']:.3f} | "
            f"**{r['time_ratio']:.2f}** | "
            f"{min(r['run_ratios']):.2f}-{max(r['run_ratios']):.2f} |"
        )
    lines += ["", "Command: `python benchmarks/scanvi_cpu.py --threads "
              f"{threads} --runs {rows[0]['runs'] if rows else 0}`", ""]
    return "\n".join(lines)


def main():
    cli(__doc__.split("\n")[0], DATASETS, run, markdown, SECTION, ".scanvi_cpu.json")


if __name__ == "__main__":
    main()
