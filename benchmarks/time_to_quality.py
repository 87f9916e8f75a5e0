"""Time to a trained model: pyrovi.SCVI().train() against scvi.model.SCVI().train(), both with
their defaults, on the same cells.

For each dataset a fixed 90% of the cells (seeded, the same for both libraries) is what each
library is given; the other 10% are held out. Each library builds its SCVI with its default
architecture (1 hidden layer of 128, 10 latent dimensions, ZINB, gene dispersion; the same
in both) and calls ``train()`` with no training option except turning the progress bar off
(and, for scvi-tools, the CPU). Reported, medians of ``--runs`` runs, each in a fresh
process after a one-epoch warm-up there, alternating which library goes first:

- wall time of ``train()`` and the epochs it ran;
- held-out ELBO per cell: each library's own ``get_elbo`` on the held-out cells (mean of
  three one-sample estimates);
- k-NN label accuracy of the latent space, where the data have labels: a 15-nearest-
  neighbour classifier on the latent means of all cells, 5-fold stratified cross-validation.

The first run of each library also evaluates the held-out ELBO during training (every
``--curve-every`` epochs; that time is measured and taken off the clock) for the figure of
held-out ELBO against wall time, ``benchmarks/time_to_quality.png``.

Run (needs the ``bench`` extra: ``pip install -e ".[bench]"``; about an hour on 2 cores,
nearly all of it scvi-tools' 400-epoch runs)::

    python benchmarks/time_to_quality.py --threads 2 --runs 3

``--library pyrovi --options '{"batch_size": 256}'`` trains pyrovi alone with training
options (to explore defaults; nothing is written unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import anndata
import numpy as np
from _common import SHARED, configure, in_fresh_process, machine_line, train_validation_split
from _common import write_section as write_markdown_section

# name: (file, batch_key, labels_key, model)
DATASETS = {
    "cellbench_5batch": ("cellbench_lung_celllines_5batch.h5ad", "batch", "cell_line", "SCVI"),
    "pbmc4k": ("pbmc4k_10x_scdcc_top2000.h5ad", None, "cell_type", "SCVI"),
    "mouse_brain_10k": ("mouse_brain_10k.h5ad", None, None, "SCVI"),
    # Not in the default run (scvi-tools' TOTALVI runs take minutes each): --datasets.
    "pbmc10k_cite": ("pbmc10k_cite_totalvi.h5ad", None, None, "TOTALVI"),
}
DEFAULT_DATASETS = [name for name, entry in DATASETS.items() if entry[3] == "SCVI"]
SECTION = "## Time to a trained model ({models}): pyrovi's and scvi-tools' defaults"
HERE = Path(__file__).resolve().parent
# Targets of the comparison (issue 22).
MAX_TIME_RATIO = 0.25
MAX_ELBO_SHORTFALL = 0.005
MAX_KNN_SHORTFALL = 0.01


def load(name: str):
    """The dataset's AnnData, its held-out cells removed, and the held-out cells."""
    file = DATASETS[name][0]
    adata = anndata.read_h5ad(SHARED / file)
    # Cells without counts (one in mouse_brain_10k) are removed for both libraries.
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    fit, held_out = train_validation_split(adata.n_obs, 0.9, seed=0)
    return adata[fit].copy(), adata[held_out].copy()


def knn_accuracy(latent: np.ndarray, labels) -> float:
    """5-fold cross-validated accuracy of a 15-nearest-neighbour classifier."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(np.mean(cross_val_score(KNeighborsClassifier(15), latent,
                                         np.asarray(labels).astype(str), cv=folds)))


def held_out_elbo(model, held_out) -> float:
    return float(np.mean([model.get_elbo(held_out) for _ in range(3)]))


class Clock:
    """Wall time of a training run, less the time spent evaluating the curve."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.curve = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def point(self, epoch: int, evaluate) -> None:
        now = self.elapsed()
        begin = time.perf_counter()
        self.curve.append((now, epoch + 1, evaluate()))
        self.excluded += time.perf_counter() - begin


def _quality(model, fit, held_out, labels_key) -> dict:
    out = {"elbo": held_out_elbo(model, held_out)}
    if labels_key is not None:
        latent = np.concatenate([model.get_latent_representation(fit),
                                 model.get_latent_representation(held_out)])
        labels = np.concatenate([fit.obs[labels_key].astype(str),
                                 held_out.obs[labels_key].astype(str)])
        out["knn"] = knn_accuracy(latent, labels)
    return out


def setup_options(kind: str) -> dict:
    """``setup_anndata`` arguments beyond the batch key, the same in both libraries."""
    return {"protein_expression_obsm_key": "protein_expression"} if kind == "TOTALVI" else {}


def train_scvi_tools(name: str, seed: int, epochs: int | None = None, curve_every: int = 0,
                     options: dict | None = None) -> dict:
    import lightning.pytorch as pl
    import scvi
    import torch

    _, batch_key, labels_key, kind = DATASETS[name]
    fit, held_out = load(name)
    scvi.settings.seed = seed
    model_class = getattr(scvi.model, kind)
    model_class.setup_anndata(fit, batch_key=batch_key, **setup_options(kind))
    model = model_class(fit)
    model._validate_anndata(held_out)
    callbacks = []
    clock = None
    if curve_every and epochs is None:

        class Curve(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if (trainer.current_epoch + 1) % curve_every:
                    return

                def evaluate():
                    pl_module.module.eval()
                    with torch.random.fork_rng():
                        value = model.get_elbo(held_out)
                    pl_module.module.train()
                    return float(value)

                clock.point(trainer.current_epoch, evaluate)

        callbacks.append(Curve())
    kwargs = {"max_epochs": epochs} if epochs is not None else {}
    clock = Clock()
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False,
                callbacks=callbacks, **{**(options or {}), **kwargs})
    seconds = clock.elapsed()
    n_epochs = int(model.history["elbo_train"].shape[0])
    return {"seconds": seconds, "epochs": n_epochs, "curve": clock.curve,
            **_quality(model, fit, held_out, labels_key)}


def train_pyrovi(name: str, seed: int, epochs: int | None = None, curve_every: int = 0,
                 options: dict | None = None) -> dict:
    import torch

    import pyrovi
    from pyrovi.models import training

    _, batch_key, labels_key, kind = DATASETS[name]
    fit, held_out = load(name)
    model_class = getattr(pyrovi, kind)
    model_class.setup_anndata(fit, batch_key=batch_key, **setup_options(kind))
    torch.manual_seed(seed)
    model = model_class(fit)
    clock = None
    if curve_every and epochs is None:
        # The library's loop calls on_epoch_end for checkpoints; the curve rides on it.
        original = training.train_svi

        def with_curve(*args, on_epoch_end=None, **kwargs):
            def each(end):
                if on_epoch_end is not None:
                    on_epoch_end(end)
                if (end.epoch + 1) % curve_every == 0:
                    with torch.random.fork_rng():
                        clock.point(end.epoch, lambda: float(model.get_elbo(held_out)))
            return original(*args, on_epoch_end=each, **kwargs)

        training.train_svi = with_curve
    kwargs = {"max_epochs": epochs} if epochs is not None else {}
    clock = Clock()
    model.train(device="cpu", progress_bar=False, seed=seed, **{**(options or {}), **kwargs})
    seconds = clock.elapsed()
    return {"seconds": seconds, "epochs": len(model.history), "curve": clock.curve,
            "history": model.history.reset_index().to_dict(orient="list"),
            **_quality(model, fit, held_out, labels_key)}


TRAINERS = {"scvi-tools": train_scvi_tools, "pyrovi": train_pyrovi}


def _warm_up_then_run(fn, seed: int):
    fn(seed, epochs=1)
    return fn(seed)


def run(datasets, runs: int, libraries, curve_every: dict, options: dict) -> list[dict]:
    rows = []
    for name in datasets:
        results = {library: [] for library in libraries}
        loads = []
        for r in range(runs):
            order = libraries if r % 2 == 0 else libraries[::-1]
            for library in order:
                fn = partial(TRAINERS[library], name,
                             curve_every=curve_every[library] if r == 0 else 0,
                             options=options.get(library))
                loads.append(os.getloadavg()[0])
                result = in_fresh_process(_warm_up_then_run, fn, r)
                results[library].append(result)
                logging.info("%s %s run %d: %.1f s, %d epochs, held-out ELBO %.2f%s", name,
                             library, r, result["seconds"], result["epochs"], result["elbo"],
                             f", k-NN {result['knn']:.4f}" if "knn" in result else "")
        rows.append(summarise(name, results, loads))
    return rows


def summarise(name: str, results: dict, loads: list[float]) -> dict:
    row = {"dataset": name, "load_min": min(loads), "load_max": max(loads), "raw": results}
    for library, values in results.items():
        for key in ("seconds", "epochs", "elbo", "knn"):
            if key in values[0]:
                row[f"{library}_{key}"] = statistics.median(v[key] for v in values)
    if "pyrovi_seconds" in row and "scvi-tools_seconds" in row:
        row["time_ratio"] = row["pyrovi_seconds"] / row["scvi-tools_seconds"]
        # Positive: pyrovi's held-out ELBO is lower (worse) than scvi-tools'.
        row["elbo_shortfall"] = ((row["scvi-tools_elbo"] - row["pyrovi_elbo"])
                                 / abs(row["scvi-tools_elbo"]))
        if "pyrovi_knn" in row:
            row["knn_shortfall"] = row["scvi-tools_knn"] - row["pyrovi_knn"]
        row["meets"] = (row["time_ratio"] <= MAX_TIME_RATIO
                        and row["elbo_shortfall"] <= MAX_ELBO_SHORTFALL
                        and row.get("knn_shortfall", 0.0) <= MAX_KNN_SHORTFALL)
    return row


def figure(rows, path: Path) -> None:
    """Held-out ELBO against wall time, both libraries, one panel per dataset (run 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        finals = []
        for library, colour in (("scvi-tools", "tab:blue"), ("pyrovi", "tab:orange")):
            if library not in row["raw"]:
                continue
            first = row["raw"][library][0]
            if first["curve"]:
                t, _, elbo = zip(*first["curve"], strict=True)
                ax.plot(t, elbo, color=colour, label=f"{library} (run 0)")
            ax.axvline(row[f"{library}_seconds"], color=colour, ls=":", lw=1,
                       label=f"{library}: median end")
            finals.append(row[f"{library}_elbo"])
        top = max(finals)
        ax.set_ylim(top - 0.05 * abs(top), top + 0.01 * abs(top))
        ax.set_xscale("log")
        ax.set_title(row["dataset"])
        ax.set_xlabel("wall time of train() (s, log scale)")
        ax.set_ylabel("held-out ELBO per cell")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows, threads: int, runs: int, png: str, section: str) -> str:
    def fmt(row, key, spec):
        return format(row[key], spec) if key in row else "–"

    lines = [
        section, "",
        machine_line(threads), "",
        "Each library gets the same fixed 90% of the cells and trains its default model with "
        "`train()` and no option (progress bar off). Held-out ELBO: each library's "
        "`get_elbo` on the other 10% (higher is better); k-NN: 15-neighbour accuracy on "
        "the latent means, 5-fold cross-validated, where the data have labels. Medians of "
        f"{runs} runs, each in a fresh process after a one-epoch warm-up, alternating "
        "which library goes first. Targets: time ratio (pyrovi / scvi-tools) ≤ "
        f"{MAX_TIME_RATIO}, ELBO shortfall ≤ {MAX_ELBO_SHORTFALL:.1%}, k-NN shortfall ≤ "
        f"{MAX_KNN_SHORTFALL}. 1-minute load average at the runs' starts: "
        + ", ".join(f"{r['dataset']} {r['load_min']:.1f}-{r['load_max']:.1f}" for r in rows)
        + ".", "",
        "| dataset | cells (of which held out) × genes | scvi-tools s | pyrovi s | time ratio "
        "| scvi-tools epochs | pyrovi epochs | scvi-tools ELBO | pyrovi ELBO | ELBO shortfall "
        "| scvi-tools k-NN | pyrovi k-NN | meets targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['cells']:,} ({r['held_out']:,}) × {r['genes']:,} | "
            f"{fmt(r, 'scvi-tools_seconds', '.1f')} | {fmt(r, 'pyrovi_seconds', '.1f')} | "
            f"**{fmt(r, 'time_ratio', '.3f')}** | {fmt(r, 'scvi-tools_epochs', '.0f')} | "
            f"{fmt(r, 'pyrovi_epochs', '.0f')} | {fmt(r, 'scvi-tools_elbo', '.2f')} | "
            f"{fmt(r, 'pyrovi_elbo', '.2f')} | {fmt(r, 'elbo_shortfall', '+.2%')} | "
            f"{fmt(r, 'scvi-tools_knn', '.4f')} | {fmt(r, 'pyrovi_knn', '.4f')} | "
            f"{'yes' if r.get('meets') else 'no'} |")
    lines += ["", f"![Held-out ELBO against wall time]({png})", "",
              f"Command: `python benchmarks/time_to_quality.py --threads {threads} "
              f"--runs {runs}"
              + ("" if [r["dataset"] for r in rows] == DEFAULT_DATASETS
                 else " --datasets " + " ".join(r["dataset"] for r in rows)) + "`", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS,
                        choices=list(DATASETS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library", choices=[*TRAINERS, "both"], default="both")
    parser.add_argument("--options", type=json.loads, default=None,
                        help="training options (JSON) for the library run alone")
    parser.add_argument("--curve-every", type=int, nargs=2, default=(10, 2),
                        metavar=("SCVI_TOOLS", "PYROVI"))
    parser.add_argument("--out", type=Path, default=None,
                        help="RESULTS.md to write (default: benchmarks/RESULTS.md for a "
                             "run of both libraries with their defaults, else nothing)")
    args = parser.parse_args()
    configure(args.threads)
    libraries = list(TRAINERS) if args.library == "both" else [args.library]
    options = {args.library: args.options} if args.options else {}
    curve_every = dict(zip(TRAINERS, args.curve_every, strict=True))
    rows = run(args.datasets, args.runs, libraries, curve_every, options)
    for row in rows:
        fit, held_out = load(row["dataset"])
        row.update(cells=fit.n_obs + held_out.n_obs, held_out=held_out.n_obs,
                   genes=fit.n_vars)
    out = args.out
    if out is None and args.library == "both" and not options:
        out = HERE / "RESULTS.md"
    if out is None:
        json.dump(rows, sys.stdout)
        print()
        return
    kinds = sorted({DATASETS[r["dataset"]][3] for r in rows})
    suffix = "" if kinds == ["SCVI"] else "_" + "_".join(k.lower() for k in kinds)
    section = SECTION.format(models=", ".join(kinds))
    png = out.with_name(f"time_to_quality{suffix}.png")
    figure(rows, png)
    text = markdown(rows, args.threads, args.runs, png.name, section)
    write_markdown_section(out, text, section)
    out.with_suffix(f".time_to_quality{suffix}.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
