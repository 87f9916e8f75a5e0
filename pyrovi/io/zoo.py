"""The model zoo: reference models trained on real data, each reproducible by one command.

Each model lives in a folder of the repository's ``models/`` directory::

    models/<name>/
        config.json   data set, gene selection, setup, model and training arguments
        model/        the saved model (``model.save``: weights as safetensors, the rest as
                      JSON, a manifest of SHA-256 digests; see :mod:`pyrovi.io.model_files`)
        README.md     the model card (``model.card``), with the command that made it
        card.json     the card's content for programs

``python -m pyrovi.zoo train <name>`` retrains a model from its ``config.json`` and the
data in ``../shared/data`` (or ``--data-dir``) and rewrites its weights and card;
:func:`load_pretrained` loads one for new data with the same genes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp
import torch

from pyrovi.io.model_classes import model_class
from pyrovi.io.model_files import SavedModel

logger = logging.getLogger(__name__)

MODELS_ENV = "PYROVI_MODELS"
DATA_ENV = "PYROVI_DATA"
CONFIG = "config.json"
#: Folder of a zoo model that holds the saved model itself.
MODEL_FOLDER = "model"
_REPO = Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    """The zoo's folder: ``$PYROVI_MODELS``, else ``models/`` of the pyrovi checkout."""
    return Path(os.environ.get(MODELS_ENV, _REPO / "models"))


def default_data_dir() -> Path:
    """Where the zoo's data sets are read: ``$PYROVI_DATA``, else ``../shared/data``."""
    return Path(os.environ.get(DATA_ENV, _REPO.parent / "shared" / "data"))


def available_models() -> list[str]:
    """Names of the models in :func:`models_dir` (folders with a ``config.json``)."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file())


def model_path(name_or_path: str | os.PathLike) -> Path:
    """The folder of a zoo model given its name or its path.

    Raises
    ------
    FileNotFoundError
        Neither a folder with a ``config.json`` nor a known name (the message lists them).
    """
    path = Path(name_or_path)
    if (path / CONFIG).is_file():
        return path
    named = models_dir() / str(name_or_path)
    if (named / CONFIG).is_file():
        return named
    raise FileNotFoundError(
        f"No pyrovi model {os.fspath(name_or_path)!r}: not a folder with {CONFIG} and not a "
        f"model of the zoo in {models_dir()} (available: {available_models()})."
    )


def read_config(name_or_path: str | os.PathLike) -> dict:
    """The ``config.json`` of a zoo model."""
    return json.loads((model_path(name_or_path) / CONFIG).read_text())


def _model_class(config: dict) -> type:
    """The pyrovi model class a zoo config names (a file's text: known names only)."""
    name = config.get("model_class")
    try:
        return model_class(name)
    except ValueError as error:
        raise ValueError(f"config.json names model_class={name!r}: {error}") from None


def top_variable_genes(adata, n_top_genes: int, layer: str | None = None) -> list[str]:
    """The ``n_top_genes`` genes of highest variance of log1p(counts per 10,000).

    A simple, deterministic selection (ties broken by gene order) that needs no scanpy.

    Returns
    -------
    list of str
        Gene names, in the AnnData's order.
    """
    counts = adata.layers[layer] if layer else adata.X
    totals = np.asarray(counts.sum(1)).ravel()
    scale = 1e4 / np.maximum(totals, 1)
    if sp.issparse(counts):
        normalized = sp.diags(scale) @ counts.tocsr()
        normalized.data = np.log1p(normalized.data)
        mean = np.asarray(normalized.mean(0)).ravel()
        mean_sq = np.asarray(normalized.multiply(normalized).mean(0)).ravel()
    else:
        normalized = np.log1p(np.asarray(counts) * scale[:, None])
        mean, mean_sq = normalized.mean(0), (normalized**2).mean(0)
    variance = mean_sq - mean**2
    keep = np.sort(np.argsort(-variance, kind="stable")[:n_top_genes])
    return list(adata.var_names[keep])


def prepare_data(config: dict, data_dir: str | os.PathLike | None = None):
    """Read a zoo model's data set, select its genes and register it with its model class.

    Returns
    -------
    anndata.AnnData
    """

    path = Path(data_dir or default_data_dir()) / config["dataset"]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the zoo's data sets are read from ../shared/data beside the "
            f"repository, ${DATA_ENV}, or --data-dir."
        )
    adata = anndata.read_h5ad(path)
    n_top = config.get("n_top_genes")
    if n_top:
        adata = adata[:, top_variable_genes(adata, n_top)].copy()
    _model_class(config).setup_anndata(adata, **config.get("setup", {}))
    return adata


def train_reference(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    progress_bar: bool = False,
):
    """Train a zoo model from its ``config.json`` and write its weights and card.

    Parameters
    ----------
    name_or_path
        Zoo name or folder (which holds ``config.json``).
    data_dir
        Folder with the data set (default :func:`default_data_dir`).
    progress_bar
        Show training progress.

    Returns
    -------
    The trained model.

    Examples
    --------
    >>> pyrovi.zoo.train_reference("scvi_pbmc4k")  # doctest: +SKIP
    """

    folder = model_path(name_or_path)
    config = read_config(folder)
    adata = prepare_data(config, data_dir)
    seed = config.get("seed", 0)
    torch.manual_seed(seed)
    model = _model_class(config)(adata, **config.get("model", {}))
    model.train(seed=seed, progress_bar=progress_bar, **config.get("train", {}))
    model.save(folder / MODEL_FOLDER, overwrite=True)
    model.card(folder, title=config.get("title"), description=config.get("description", ""),
               reproduce=f"python -m pyrovi.zoo train {folder.name}", seed=seed,
               **config.get("card", {}))
    return model


def load_pretrained(
    name_or_path: str | os.PathLike,
    adata,
    device: str = "cpu",
    subset_genes: bool = True,
):
    """Load a zoo model for ``adata``, checking that the genes match.

    Parameters
    ----------
    name_or_path
        Zoo name (see :func:`available_models`) or folder of a saved model with a
        ``config.json``.
    adata
        Cells to use the model on, with raw counts of (at least) the model's genes; for a
        model with batches, an ``obs`` batch column with the model's batch names.
    device
        Where to put the model.
    subset_genes
        When ``adata`` has every gene of the model but also others or in another order,
        use a copy restricted to the model's genes in its order (``False``: raise).

    Returns
    -------
    The model, attached to ``adata`` (or its gene-subset copy).

    Raises
    ------
    ValueError
        Genes of the model missing from ``adata`` (the message names them), or genes in
        another order with ``subset_genes=False``.

    Examples
    --------
    >>> model = pyrovi.load_pretrained("scvi_pbmc4k", adata)  # doctest: +SKIP
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
    """
    folder = model_path(name_or_path)
    cls = _model_class(read_config(folder))
    genes = SavedModel(folder / MODEL_FOLDER).var_names
    flat = cls.as_anndata(adata)
    present = set(map(str, flat.var_names))
    missing = [g for g in genes if g not in present]
    if missing:
        raise ValueError(
            f"adata lacks {len(missing)} of the {len(genes)} genes of model {folder.name!r} "
            f"(e.g. {missing[:5]}). A reference model reads exactly its genes: measure or "
            "keep them (raw counts of genes not measured cannot be invented), or retrain on "
            "your genes."
        )
    if list(map(str, flat.var_names)) != genes:
        if not subset_genes:
            raise ValueError(
                f"adata has the genes of model {folder.name!r} but also others or in another "
                f"order; pass adata[:, genes] in the model's order, or subset_genes=True."
            )
        logger.info("Using the %d genes of %s out of the %d of adata.", len(genes),
                    folder.name, flat.n_vars)
        adata = flat[:, genes].copy()
    return cls.load(folder / MODEL_FOLDER, adata=adata, device=device)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m pyrovi.zoo {train NAME [--data-dir D] | list}``."""
    parser = argparse.ArgumentParser(prog="python -m pyrovi.zoo", description=__doc__.split(
        "\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="retrain a zoo model and rewrite its card")
    train.add_argument("name", help="model name (folder of models/) or path")
    train.add_argument("--data-dir", default=None, help="folder with the data sets")
    commands.add_parser("list", help="list the zoo's models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        for name in available_models():
            logger.info("%s: %s", name, read_config(name).get("title", ""))
        return
    model = train_reference(args.name, args.data_dir, progress_bar=True)
    logger.info("Trained %s; weights and card in %s.", type(model).__name__,
                model_path(args.name))


if __name__ == "__main__":
    main()
