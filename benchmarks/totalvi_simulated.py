"""Accuracy benchmark: pyrovi.TOTALVI against scvi-tools' TOTALVI on simulated CITE-seq data.

Data from :func:`pyrovi.datasets.simulate_cite_seq` (1500 cells, 100 genes, 12 proteins, 2
batches) with known positive populations and background rates. Both libraries train with
their own defaults for 200 epochs, KL warm-up over 50 epochs, no early stopping. Reported per
simulation seed: the smallest and the median AUROC over proteins of the foreground
probability for the truly positive cells, and the largest and mean absolute log error of the
background mean on each protein's negative cells (median over those cells), plus wall time.

Run (needs the ``bench`` extra)::

    python benchmarks/totalvi_simulated.py --threads 2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import configure, machine_line, write_section
from sklearn.metrics import roc_auc_score

SECTION = "## TotalVI on simulated CITE-seq: accuracy, pyrovi vs scvi-tools"
EPOCHS, WARMUP = 200, 50


def simulate(seed):
    from pyrovi.datasets import simulate_cite_seq

    adata = simulate_cite_seq(n_cells=1500, n_genes=100, n_proteins=12, seed=seed)
    truth = {key: adata.obsm.pop(key) for key in ("protein_positive", "protein_background")}
    del adata.uns["protein_background_rate"]
    return adata, truth


def scores(truth, foreground, background) -> dict:
    positive, true_background = truth["protein_positive"], truth["protein_background"]
    auroc = [roc_auc_score(positive[:, t], foreground[:, t]) for t in range(positive.shape[1])]
    error = np.abs([
        np.median(np.log(background[~positive[:, t], t] / true_background[~positive[:, t], t]))
        for t in range(positive.shape[1])
    ])
    return {"auroc_min": float(np.min(auroc)), "auroc_median": float(np.median(auroc)),
            "background_error_max": float(error.max()),
            "background_error_mean": float(error.mean())}


def run_scvi_tools(seed):
    import scvi

    adata, truth = simulate(seed)
    scvi.settings.seed = seed
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                     batch_key="batch")
    model = scvi.model.TOTALVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=EPOCHS, n_epochs_kl_warmup=WARMUP, early_stopping=False,
                accelerator="cpu", devices=1, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    foreground = np.asarray(model.get_protein_foreground_probability(n_samples=5))
    background = np.asarray(model.get_protein_background_mean(None, None, 1024))
    return {**scores(truth, foreground, background), "seconds": seconds}


def run_pyrovi(seed):
    import pyrovi

    adata, truth = simulate(seed)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    torch.manual_seed(seed)
    model = pyrovi.TOTALVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=EPOCHS, n_epochs_kl_warmup=WARMUP, early_stopping=False, seed=seed,
                device="cpu", progress_bar=False)
    seconds = time.perf_counter() - start
    foreground = model.get_protein_foreground_probability(n_samples=5).to_numpy()
    background = model.get_protein_background_mean(n_samples=5)
    return {**scores(truth, foreground, background), "seconds": seconds}


def markdown(rows, threads) -> str:
    lines = [
        SECTION, "", machine_line(threads), "",
        f"Simulated CITE-seq (`pyrovi.datasets.simulate_cite_seq`, 1,500 cells, 100 genes, 12 "
        f"proteins, 2 batches; truth known). Each library's defaults, {EPOCHS} epochs, KL "
        f"warm-up {WARMUP} epochs, no early stopping. Foreground AUROC: foreground probability "
        "vs truly positive cells, per protein (min / median over proteins). Background error: "
        "|log(estimated / true background)| on each protein's negative cells (max / mean over "
        "proteins). Time: wall time of `train()`.",
        "",
        "| seed | library | AUROC min | AUROC median | bg error max | bg error mean | "
        "train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['library']} | {r['auroc_min']:.3f} | {r['auroc_median']:.3f} | "
            f"{r['background_error_max']:.2f} | {r['background_error_mean']:.2f} | "
            f"{r['seconds']:.1f} |")
    seeds = " ".join(str(s) for s in sorted({r["seed"] for r in rows}))
    lines += ["", f"Command: `python benchmarks/totalvi_simulated.py --threads {threads} "
              f"--seeds {seeds}`", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    configure(args.threads)
    rows = []
    for seed in args.seeds:
        for library, fn in (("scvi-tools", run_scvi_tools), ("pyrovi", run_pyrovi)):
            rows.append({"seed": seed, "library": library, **fn(seed)})
            logging.info("%s", rows[-1])
    text = markdown(rows, args.threads)
    write_section(args.out, text, SECTION)
    args.out.with_suffix(".totalvi_simulated.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
