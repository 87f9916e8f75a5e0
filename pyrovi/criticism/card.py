"""Model cards: what a trained model is, what it was trained on, and how well it fits.

A card has the sections of the scvi-hub model cards (model parameters, setup arguments, data
registry, summary statistics, training, posterior predictive checks on training and
validation cells, differential-expression agreement per cell type) plus the embedding
quality table of the CELLxGENE Census cards, and is written both as Markdown (for people)
and as JSON (for programs). Part of :mod:`pyrovi.criticism`: the card reads the model
through :class:`~pyrovi.criticism.TrainedModel`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import torch

from pyrovi._version import __version__
from pyrovi.criticism.embedding import embedding_metrics
from pyrovi.criticism.interface import TrainedModel, check_trained_model
from pyrovi.criticism.ppc import PosteriorPredictiveCheck
from pyrovi.criticism.predictive import modalities
from pyrovi.data.fields import DataField
from pyrovi.data.minified import is_minified

logger = logging.getLogger(__name__)

CARD_MARKDOWN = "README.md"
CARD_JSON = "card.json"
#: What a card of minified data says in place of the sections that compare with the counts.
NEEDS_COUNTS = (
    "The data are minified (adata.uns['_scvi_adata_minify_type']): their counts were "
    "replaced by each cell's stored posterior. The held-out ELBO, the posterior predictive "
    "checks and the differential-expression agreement compare the model with the observed "
    "counts and need them: pass the AnnData with the counts (model.card(adata=...)).")
_STAT_NAMES = {
    "mean_absolute_error": "Mean absolute error",
    "pearson": "Pearson correlation",
    "spearman": "Spearman correlation",
    "r2": "R² (scvi-hub definition)",
}


def package_versions() -> dict[str, str]:
    """Versions of pyrovi and the packages a model's numbers depend on."""
    from importlib.metadata import version

    # torch's own version string names its build (2.13.0+cpu, 2.13.0+cu130), which the
    # package metadata leaves out.
    return {"pyrovi": __version__, "torch": torch.__version__,
            **{name: version(name) for name in ("pyro-ppl", "anndata", "numpy")},
            "python": platform.python_version()}


def _jsonable(value):
    """Plain JSON values (callables and modules become their repr, NaN becomes null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _records(frame: pd.DataFrame) -> list[dict]:
    return _jsonable(frame.reset_index().to_dict("records"))


def _subsample(indices, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    indices = np.asarray(indices if indices is not None else [], dtype=np.int64)
    if len(indices) > max_cells:
        indices = np.sort(rng.choice(indices, max_cells, replace=False))
    return indices


def _registry_sections(model: TrainedModel) -> tuple[dict, list[dict], dict]:
    registry = model.registry
    setup = {k: v for k, v in {
        "layer": registry.layer, "batch_key": registry.batch_key,
        "labels_key": registry.labels_key, "size_factor_key": registry.size_factor_key,
        "categorical_covariate_keys": list(registry.categorical_covariate_keys) or None,
        "continuous_covariate_keys": list(registry.continuous_covariate_keys) or None,
    }.items() if v is not None}
    plugins = [f for f in registry.fields if type(f) in DataField.plugins]
    for field in plugins:
        setup.update(field.setup_arguments())
    fields = [{"field": "counts", "location": registry.field("x").location(),
               "size": registry.n_vars}]
    for name, key, categories in (("batch", registry.batch_key, registry.batch_categories),
                                  ("labels", registry.labels_key, registry.label_categories)):
        if key is not None:
            fields.append({"field": name, "location": f"adata.obs[{key!r}]",
                           "size": len(categories)})
    for key in registry.categorical_covariate_keys:
        fields.append({"field": "categorical covariate", "location": f"adata.obs[{key!r}]",
                       "size": len(registry.covariate_categories[key])})
    for key in registry.continuous_covariate_keys:
        fields.append({"field": "continuous covariate", "location": f"adata.obs[{key!r}]",
                       "size": 1})
    fields += [row for row in (f.card_row(registry) for f in plugins) if row is not None]
    return setup, fields, registry.summary()


def _training_section(model: TrainedModel) -> dict:
    section = {"hyperparameters": model.train_params or {}}
    history = model.history
    if history is None or history.empty:
        return section
    summary = {"epochs_trained": len(history)}
    for column in ("elbo_train", "elbo_validation", "reconstruction_loss_train",
                   "reconstruction_loss_validation", "kl_local_train", "kl_local_validation"):
        if column in history and history[column].notna().any():
            summary[f"final_{column}"] = float(history[column].dropna().iloc[-1])
    if "elbo_validation" in history and history["elbo_validation"].notna().any():
        best = history["elbo_validation"].idxmin()
        summary["best_elbo_validation"] = float(history["elbo_validation"].min())
        summary["best_epoch"] = int(best)
    section["history"] = summary
    return section


def _cv_tables(model: TrainedModel, adata, splits: dict[str, np.ndarray], n_samples: int, seed: int,
               modality: str | None) -> dict[str, pd.DataFrame]:
    """Cell-wise and gene-wise CV summaries (rows: statistics; columns: splits)."""
    tables: dict[str, dict[str, pd.Series]] = {"cv_cell": {}, "cv_gene": {}}
    for split, cells in splits.items():
        if len(cells) < 2:
            continue
        ppc = PosteriorPredictiveCheck(adata, {"model": model}, n_samples=n_samples,
                                       indices=cells, modality=modality, seed=seed,
                                       progress_bar=False)
        for metric in tables:
            tables[metric][split] = ppc.summary(metric).loc["model", list(_STAT_NAMES)]
    return {metric: pd.DataFrame(columns).rename(index=_STAT_NAMES)
            for metric, columns in tables.items() if columns}


def _de_table(model: TrainedModel, adata, cells: np.ndarray, groupby: str,
              seed: int) -> pd.DataFrame:
    ppc = PosteriorPredictiveCheck(adata, {"model": model}, n_samples=1, indices=cells,
                                   seed=seed, progress_bar=False)
    # p < 0.2 (adjusted) calls a gene DE, as scvi-hub's cards do.
    table = ppc.differential_expression(de_groupby=groupby, p_val_thresh=0.2)
    return table.drop(columns="model").set_index("group")


def _embedding_table(model: TrainedModel, adata, cells: np.ndarray, label_key,
                     batch_key) -> pd.DataFrame:
    view = anndata.AnnData(obs=adata.obs.iloc[cells][[k for k in (label_key, batch_key)
                                                      if k is not None]].copy())
    view.obsm["X_latent"] = model.get_latent_representation(adata, indices=cells)
    return embedding_metrics(view, rep="X_latent", label_key=label_key, batch_key=batch_key)


def model_card(
    model: TrainedModel,
    path: str | os.PathLike | None = None,
    adata=None,
    title: str | None = None,
    description: str = "",
    reproduce: str | None = None,
    labels_key: str | None = None,
    batch_key: str | None = None,
    n_samples: int = 3,
    max_cells: int = 3000,
    embedding: bool = True,
    seed: int = 0,
) -> dict:
    """Build (and optionally write) the card of a trained model.

    Sections (on minified data, those that compare with the counts are replaced by a note
    saying they need them): model parameters, setup arguments, data registry, summary statistics,
    training hyperparameters and history summary, cell-wise and gene-wise coefficient of
    variation of posterior predictive samples vs the raw counts (mean absolute error,
    Pearson, Spearman, R²) on training and validation cells, the per-cell-type
    differential-expression agreement of :meth:`PosteriorPredictiveCheck.
    differential_expression` when labels exist, embedding quality
    (:func:`~pyrovi.criticism.embedding_metrics`) when labels or batches exist and the
    ``metrics`` extra is installed, and package versions.

    Parameters
    ----------
    model
        A trained pyrovi model (any :class:`~pyrovi.criticism.TrainedModel`).
    path
        Where to write: a directory (gets ``README.md`` and ``card.json``) or a ``.md``
        file (the JSON goes beside it, same stem). ``None``: write nothing.
    adata
        The data to check the model on (default: its training data).
    title, description
        Card heading and a free-text paragraph.
    reproduce
        The command that reproduces the model, shown on the card.
    labels_key, batch_key
        ``obs`` columns for the DE and embedding tables (default: the registered ones).
    n_samples
        Posterior predictive datasets for the CV tables.
    max_cells
        Cells per split (seeded subsample) for the checks, which bounds their cost.
    embedding
        Compute the embedding-quality table.
    seed
        Seed for subsampling and sampling.

    Returns
    -------
    dict
        The card's content (what the JSON file holds).

    Examples
    --------
    >>> card = model.card("my_model_card")  # doctest: +SKIP
    >>> card["posterior_predictive_checks"]["cv_cell"]  # doctest: +SKIP
    """
    check_trained_model(model)
    if not model.is_trained:
        raise ValueError("The model is not trained; call model.train() before model.card().")
    adata = model.adata if adata is None else model.as_anndata(adata)
    own_data = adata is model.adata
    labels_key = labels_key or model.registry.labels_key
    batch_key = batch_key or model.registry.batch_key
    for key in (labels_key, batch_key):
        if key is not None and key not in adata.obs:
            raise KeyError(f"adata.obs has no column {key!r}; pass labels_key/batch_key that "
                           "exist or None.")
    rng = np.random.default_rng(seed)
    if own_data and model.train_indices is not None:
        splits = {"Training set": model.train_indices,
                  "Validation set": model.validation_indices}
    else:
        splits = {"All cells": np.arange(adata.n_obs)}
    splits = {name: _subsample(cells, max_cells, rng) for name, cells in splits.items()}
    all_cells = _subsample(np.arange(adata.n_obs), max_cells, rng)

    setup, fields, summary = _registry_sections(model)
    card: dict = {
        "title": title or f"{type(model).__name__} model card",
        "description": description,
        "model_class": type(model).__name__,
        "model_parameters": model.init_params,
        "setup_arguments": setup,
        "data_registry": fields,
        "summary_statistics": summary,
        "training": _training_section(model),
        "reproduce": reproduce,
        "versions": package_versions(),
        "created": datetime.date.today().isoformat(),
        "checks": {"n_samples": n_samples, "cells_per_split": {
            name: len(cells) for name, cells in splits.items()}, "seed": seed},
    }
    checks = {}
    if is_minified(adata):
        # Minified data hold the stored posterior, not the counts: what compares with the
        # counts is named as such, and the rest of the card is reported.
        card["needs_counts"] = NEEDS_COUNTS
    else:
        if own_data and model.validation_indices is not None and len(model.validation_indices):
            card["training"]["heldout_elbo_per_cell"] = model.get_elbo(
                indices=model.validation_indices)
        observed = list(modalities(model))
        for modality in observed if len(observed) > 1 else [None]:
            suffix = "" if modality in (None, "rna") else f"_{modality}"
            for metric, table in _cv_tables(model, adata, splits, n_samples, seed,
                                            modality).items():
                checks[metric + suffix] = table
        if labels_key is not None:
            card["differential_expression"] = _de_table(model, adata, all_cells, labels_key,
                                                        seed)
    card["posterior_predictive_checks"] = checks
    if embedding and (labels_key is not None or batch_key is not None):
        try:
            card["embedding_metrics"] = _embedding_table(model, adata, all_cells, labels_key,
                                                         batch_key)
        except ImportError as err:
            logger.warning("Embedding metrics left out of the card: %s", err)
            card["embedding_metrics_skipped"] = str(err)
    content = _to_json(card)
    if path is not None:
        write_card(content, path)
    return content


def _to_json(card: dict) -> dict:
    out = {}
    for key, value in card.items():
        if isinstance(value, pd.DataFrame):
            out[key] = _records(value)
        elif key == "posterior_predictive_checks":
            out[key] = {metric: {"index": list(t.index), **{c: _jsonable(list(t[c]))
                                                          for c in t.columns}}
                        for metric, t in value.items()}
        else:
            out[key] = _jsonable(value)
    return out


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pairs(mapping: dict) -> str:
    return _table([{"name": k, "value": v} for k, v in mapping.items()])


_CHECK_TITLES = {
    "cv_cell": "Cell-wise coefficient of variation",
    "cv_gene": "Gene-wise coefficient of variation",
}


def _check_title(metric: str) -> str:
    """Heading of a check's table; other modalities than RNA carry their name as suffix."""
    if metric in _CHECK_TITLES:
        return _CHECK_TITLES[metric]
    for base, what in (("cv_cell_", "Cell-wise"), ("cv_gene_", "Feature-wise")):
        if metric.startswith(base):
            return f"{what} coefficient of variation ({metric[len(base):]})"
    return metric


def card_markdown(card: dict) -> str:
    """Render a card's content (as returned by :func:`model_card`) as Markdown."""
    out = [f"# {card['title']}\n"]
    if card.get("description"):
        out.append(card["description"] + "\n")
    out.append(f"Model class: `pyrovi.{card['model_class']}`. Created {card['created']}.\n")
    if card.get("reproduce"):
        out.append("## Reproduce\n\n```bash\n" + card["reproduce"] + "\n```\n")
    out.append("## Model parameters\n\n" + _pairs(card["model_parameters"]))
    out.append("## Setup arguments\n\n" + _pairs(card["setup_arguments"]))
    out.append("## Data registry\n\n" + _table(card["data_registry"]))
    out.append("## Summary statistics\n\n" + _pairs(card["summary_statistics"]))
    training = card["training"]
    out.append("## Training\n\n### Hyperparameters\n\n" + _pairs(training["hyperparameters"]))
    if "history" in training:
        history = dict(training["history"])
        if "heldout_elbo_per_cell" in training:
            history["heldout_elbo_per_cell (higher is better)"] = training[
                "heldout_elbo_per_cell"]
        out.append("### History summary (negative ELBO per cell, lower is better)\n\n"
                   + _pairs(history))
    if card.get("needs_counts"):
        out.append("## Checks against the observed counts\n\nNot computed: "
                   + card["needs_counts"] + "\n")
    checks = card["posterior_predictive_checks"]
    if checks:
        cells = ", ".join(f"{k}: {v}" for k, v in card["checks"]["cells_per_split"].items())
        out.append(
            "## Posterior predictive checks\n\nCoefficient of variation of "
            f"{card['checks']['n_samples']} posterior predictive datasets against the raw "
            f"counts (cells: {cells}).\n")
        for metric, table in checks.items():
            rows = [{"metric": name, **{c: table[c][i] for c in table if c != "index"}}
                    for i, name in enumerate(table["index"])]
            out.append(f"### {_check_title(metric)}\n\n" + _table(rows))
    if "differential_expression" in card:
        out.append("## Differential expression (raw vs generated, Wilcoxon, one vs rest)\n\n"
                   + _table(card["differential_expression"]))
    if "embedding_metrics" in card:
        out.append("## Embedding quality (latent mean)\n\n" + _table(
            card["embedding_metrics"], ["metric", "category", "key", "value"]))
    elif "embedding_metrics_skipped" in card:
        out.append("## Embedding quality\n\nNot computed: "
                   + card["embedding_metrics_skipped"] + "\n")
    out.append("## Versions\n\n" + _pairs(card["versions"]))
    return "\n".join(out)


def write_card(card: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a card as Markdown and JSON.

    Parameters
    ----------
    card
        Content from :func:`model_card`.
    path
        A directory (``README.md`` and ``card.json`` inside) or a ``.md`` file.

    Returns
    -------
    tuple of Path
        The Markdown and JSON files written.
    """
    path = Path(path)
    if path.suffix == ".md":
        markdown, js = path, path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        markdown, js = path / CARD_MARKDOWN, path / CARD_JSON
    markdown.write_text(card_markdown(card))
    js.write_text(json.dumps(card, indent=1) + "\n")
    return markdown, js
