"""The ``pyrovi`` command: train a model, resume it, embed cells, write a card, list datasets.

::

    pyrovi train pbmc68k_reduced --labels-key bulk_labels --out demo/
    pyrovi train data.h5ad --model scvi --batch-key batch --max-epochs 400 --out run/
    pyrovi train data.h5ad --model scvi --batch-key batch --max-epochs 400 --out run/ --resume
    pyrovi embed run/model query.h5ad --out query_embedded.h5ad --key X_pyrovi
    pyrovi card run/model data.h5ad --out run/model/README.md --labels-key cell_type
    pyrovi datasets

The data argument is an h5ad file of raw counts or the name of a packaged dataset
(:data:`pyrovi.datasets.PACKAGED_DATASETS`, listed by ``pyrovi datasets``); a file of that
name wins over the dataset.

``train`` writes, in ``<out>``:

- ``model/``: the trained model (``model.save``; load it with ``pyrovi.SCVI.load``...);
- ``history.csv``: the training history, one row per epoch;
- ``checkpoints/``: the run's checkpoints; after an interruption (a killed job, a preempted
  node) the same command with ``--resume`` continues from the last one, exactly where the
  run stopped, and then writes the outputs below;
- ``adata.h5ad``: the cells, with the latent representation (posterior mean) in
  ``obsm["X_pyrovi"]`` and its two-dimensional UMAP in ``obsm["X_umap"]`` (the same for the
  same ``--seed``);
- ``umap.png``: that UMAP, one panel per ``--labels-key`` / ``--batch-key`` it is coloured by
  (``--no-umap`` leaves out both: a seeded UMAP runs on one core);
- ``history.png``: training and validation negative ELBO per epoch;
- ``card/README.md`` and ``card/card.json``: the model card (``model.card``; checks on a
  subsample, leave it out with ``--no-card``).

The pictures and the UMAP need the ``plot`` extra (matplotlib, umap-learn); without it the
rest is written and the log says what to install (``pip install "pyrovi[plot]"``, or
``pip install -e ".[plot]"`` in a source checkout). ``--threads N`` sets torch's CPU threads
(default: one per core); when the cores are busy with other work, ``--threads 1`` trains small
models many times faster. The same command is ``python -m pyrovi``. Errors are reported in
one line with exit status 1 (2 for a wrong command line); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from pyrovi.cli.outputs import (  # noqa: F401  (the file names of the layout above)
    ADATA_H5AD,
    CARD_DIR,
    HISTORY_PNG,
    LATENT_KEY,
    TRAIN_CARD_MAX_CELLS,
    UMAP_KEY,
    UMAP_PNG,
    _registry_of,
    _write_h5ad,
    _write_outputs,
)
from pyrovi.datasets import PACKAGED_DATASETS, load_dataset

logger = logging.getLogger(__name__)

#: Command-line model names and their classes in :mod:`pyrovi`.
MODELS = {"scvi": "SCVI", "ldvae": "LDVAE", "totalvi": "TOTALVI"}
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
HISTORY_CSV = "history.csv"
# Flags that change how a run is shown or stored, not the model it trains.
_NOT_REPRODUCING = {"--no-progress", "-q", "--quiet", "--debug", "--overwrite", "--resume",
                    "--no-umap", "--no-card"}


class CommandError(Exception):
    """A problem with the command's inputs or outputs, reported without a traceback."""


def _message(error: BaseException) -> str:
    # KeyError's str() quotes its message; show the message itself.
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def _data_source(data: str) -> Path | str:
    """The h5ad file ``data`` names, else the name of a packaged dataset."""
    path = Path(data)
    # A file wins over a packaged dataset of the same name; a folder cannot hold the data,
    # so it does not hide one (e.g. an earlier --out named after the dataset).
    if path.is_file():
        return path
    if data in PACKAGED_DATASETS:
        return data
    problem = "is a folder, not a file" if path.exists() else "does not exist"
    raise CommandError(f"Data file {data!r} {problem}, and it is not a packaged dataset "
                       f"(packaged: {', '.join(PACKAGED_DATASETS)}; see pyrovi datasets).")


def _read_data(source: Path | str):
    """The AnnData of an h5ad file or of a packaged dataset (from :func:`_data_source`)."""
    import anndata

    if isinstance(source, Path):
        try:
            return anndata.read_h5ad(source)
        except (OSError, KeyError, ValueError) as error:
            # h5py's and anndata's own messages name neither the file nor the problem.
            raise CommandError(f"{os.fspath(source)!r} is not a readable h5ad file "
                               f"({str(error).splitlines()[0][:160]}).") from None
    logger.info("Loading the packaged dataset %s.", source)
    return load_dataset(source)


def _model_class(name: str) -> type:
    """The pyrovi model class called ``name`` (read from a file: only known names pass)."""
    from pyrovi.io.model_classes import model_class

    try:
        return model_class(name)
    except ValueError as error:
        raise CommandError(f"The saved model: {error}") from None


def _saved_model(model_dir: str) -> tuple[type, dict]:
    """The class of the model saved in ``model_dir`` and its saved content."""
    from pyrovi.io.model_files import SavedModel

    try:
        saved = SavedModel(model_dir)
    except FileNotFoundError as error:
        raise CommandError(f"{error} Write one with pyrovi train or model.save.") from None
    return _model_class(saved.model_class), saved.state


def _load_model(model_dir: str, adata, device: str, subset_genes: bool = False):
    """Load the model of ``model_dir`` on ``adata`` (optionally on its genes only)."""
    cls, saved = _saved_model(model_dir)
    data = adata
    if subset_genes:
        genes = saved["var_names"]
        flat = cls.as_anndata(adata)
        missing = [g for g in genes if g not in set(map(str, flat.var_names))]
        if not missing and list(map(str, flat.var_names)) != genes:
            logger.info("Using the model's %d genes of the %d in the data.", len(genes),
                        flat.n_vars)
            data = flat[:, genes].copy()
    return cls.load(model_dir, adata=data, device=device), saved


def _refuse_existing(path: Path, overwrite: bool, what: str = "Output") -> None:
    if path.exists() and not overwrite:
        raise CommandError(f"{what} {os.fspath(path)!r} exists; pass --overwrite to replace it.")


# -- train ------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> None:
    import torch

    from pyrovi.infer import checkpoint

    source = _data_source(args.data)
    out = Path(args.out)
    model_dir, checkpoint_dir = out / MODEL_DIR, out / CHECKPOINT_DIR
    found = checkpoint.list_checkpoints(checkpoint_dir)
    resume = args.resume and bool(found)
    if args.resume and not found:
        if checkpoint_dir.is_dir():
            try:  # refuses pyrovi 0.1.0's pickled checkpoints with its own message
                checkpoint.latest_checkpoint(checkpoint_dir)
            except FileNotFoundError:
                pass
        logger.warning("No checkpoint in %s yet: starting the run from the beginning.",
                       checkpoint_dir)
    if not resume:
        if found or model_dir.exists():
            if not args.overwrite:
                raise CommandError(
                    f"{os.fspath(out)!r} holds an earlier run ({MODEL_DIR}/ or {CHECKPOINT_DIR}/"
                    "); continue it with --resume, or start again with --overwrite."
                )
            checkpoint.remove_checkpoints(checkpoint_dir)
    if args.model == "totalvi" and not args.protein_obsm_key and not resume:
        raise CommandError("--model totalvi needs --protein-obsm-key (the obsm key of the "
                           "protein counts).")
    if args.protein_obsm_key and (args.model or "scvi") != "totalvi" and not resume:
        raise CommandError("--protein-obsm-key is for --model totalvi.")

    adata = _read_data(source)
    registry_before = _registry_of(adata)
    progress = not args.no_progress
    checkpointing = {"checkpoint_every": args.checkpoint_every,
                     "keep_checkpoints": None if args.keep_checkpoints == 0
                     else args.keep_checkpoints}
    if resume:
        from pyrovi.io.checkpoint_files import read_checkpoint

        state = read_checkpoint(checkpoint_dir)
        name = state["model"]["model_class"]
        if args.model is not None and MODELS[args.model] != name:
            raise CommandError(f"--resume: the run in {os.fspath(checkpoint_dir)!r} trains a "
                               f"{name}, not a {MODELS[args.model]}.")
        logger.info("Resuming the %s run in %s (model, setup and training options from the "
                    "checkpoint).", name, checkpoint_dir)
        model = _model_class(name).load_checkpoint(state["path"], adata)
        # --max-epochs, if given, must be the run's: the library says so otherwise.
        model.train(resume_from=state["path"], max_epochs=args.max_epochs, device=args.device,
                    progress_bar=progress, checkpoint_dir=checkpoint_dir, **checkpointing)
    else:
        cls = _model_class(MODELS[args.model or "scvi"])
        setup = {"batch_key": args.batch_key, "labels_key": args.labels_key,
                 "layer": args.layer}
        if args.protein_obsm_key:
            setup["protein_expression_obsm_key"] = args.protein_obsm_key
        cls.setup_anndata(adata, **setup)
        model_kwargs = {k: v for k, v in {"n_latent": args.n_latent, "n_hidden": args.n_hidden,
                                           "gene_likelihood": args.gene_likelihood}.items()
                        if v is not None}
        # The weights are initialised from torch's generator: seed it for a reproducible run.
        torch.manual_seed(args.seed)
        model = cls(adata, **model_kwargs)
        # Unset options keep the model's own defaults (TOTALVI's differ from SCVI's).
        train_kwargs = {k: v for k, v in {"max_epochs": args.max_epochs,
                                           "batch_size": args.batch_size, "lr": args.lr,
                                           "train_size": args.train_size}.items()
                        if v is not None}
        model.train(device=args.device, seed=args.seed, progress_bar=progress,
                    checkpoint_dir=checkpoint_dir, strategy=args.strategy, **checkpointing,
                    **train_kwargs)
    if args.strategy == "ddp" and torch.distributed.get_rank() != 0:
        return  # every rank holds the same model: rank 0 writes it
    model.save(model_dir, overwrite=True)
    model.history.to_csv(out / HISTORY_CSV)
    last = model.history.iloc[-1]
    logger.info("Trained %d epochs; final elbo_train %.4g%s. Model in %s, history in %s.",
                len(model.history), last["elbo_train"],
                f", elbo_validation {last['elbo_validation']:.4g}"
                if "elbo_validation" in last and last["elbo_validation"] == last["elbo_validation"]
                else "", model_dir, out / HISTORY_CSV)
    reproduce = None if resume else "pyrovi " + shlex.join(
        a for a in args.argv if a not in _NOT_REPRODUCING)
    _write_outputs(model, adata, registry_before, out, title=f"{type(model).__name__} on "
                   f"{source.name if isinstance(source, Path) else source}",
                   reproduce=reproduce, seed=args.seed, umap=not args.no_umap,
                   card=not args.no_card, progress=progress)


# -- embed ------------------------------------------------------------------------------------


def _embed(args: argparse.Namespace) -> None:
    source = _data_source(args.data)
    out = Path(args.out)
    if isinstance(source, Path) and out.resolve() == source.resolve() and not args.overwrite:
        raise CommandError(f"--out {os.fspath(out)!r} is the input file; pass --overwrite to "
                           "add the representation to it in place.")
    _refuse_existing(out, args.overwrite)
    adata = _read_data(source)
    registry_before = _registry_of(adata)
    model, _ = _load_model(args.model_dir, adata, args.device, args.subset_genes)
    latent = model.get_latent_representation(batch_size=args.batch_size)
    adata.obsm[args.key] = latent
    _write_h5ad(adata, out, registry_before)
    logger.info("Wrote %s: obsm[%r], %d cells x %d latent dimensions.", out, args.key,
                latent.shape[0], latent.shape[1])


# -- card -------------------------------------------------------------------------------------


def _card(args: argparse.Namespace) -> None:
    from pyrovi.criticism.card import CARD_MARKDOWN
    from pyrovi.infer.checkpoint import data_fingerprint

    out = Path(args.out)
    _refuse_existing(out if out.suffix == ".md" else out / CARD_MARKDOWN, args.overwrite)
    adata = _read_data(_data_source(args.data))
    model, saved = _load_model(args.model_dir, adata, args.device)
    if saved.get("data") != data_fingerprint(model.adata):
        # Not the training cells (or unknown): the saved split does not index these cells,
        # so the card checks all of them as one set.
        logger.info("The data are not the model's training cells: checking all cells.")
        model.train_indices = model.validation_indices = None
    model.card(out, title=args.title, description=args.description,
               labels_key=args.labels_key, batch_key=args.batch_key, n_samples=args.n_samples,
               max_cells=args.max_cells, embedding=not args.no_embedding, seed=args.seed)
    logger.info("Wrote the model card %s.", out)


# -- datasets ---------------------------------------------------------------------------------


def _datasets(args: argparse.Namespace) -> None:
    rows = [(name, f"{entry.n_cells} cells x {entry.n_genes} genes", entry.description,
             ", ".join(f"{key} ({what})" for key, what in entry.obs_keys.items()))
            for name, entry in PACKAGED_DATASETS.items()]
    name_width = max(len(r[0]) for r in rows)
    size_width = max(len(r[1]) for r in rows)
    for name, size, description, keys in rows:
        print(f"{name:<{name_width}}  {size:<{size_width}}  {description}")
        if keys:
            print(f"{'':<{name_width}}  {'':<{size_width}}  obs keys: {keys}")
    print("\nUse a name in place of an h5ad path, e.g. pyrovi train pbmc68k_reduced "
          "--labels-key bulk_labels --out demo")


# -- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyrovi`` (subcommands train, embed, card, datasets)."""
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    logging_options.add_argument("--debug", action="store_true",
                                 help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False, parents=[logging_options])
    common.add_argument("--device", default=None,
                        help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'... "
                             "(default: auto for train, cpu otherwise)")
    common.add_argument("--threads", type=_positive, default=None,
                        help="CPU threads of torch (default: torch's, one per core); 1 is "
                             "often faster for small data or on a busy machine")
    data_help = ("h5ad file with raw counts, or the name of a packaged dataset such as "
                 "pbmc68k_reduced (pyrovi datasets lists them; an existing file wins)")

    parser = argparse.ArgumentParser(
        prog="pyrovi",
        description="Train pyrovi models on h5ad files or packaged datasets (checkpointed, "
                    "resumable), embed cells with a trained model, write model cards.",
        epilog="Run 'pyrovi <command> --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    train = commands.add_parser(
        "train", parents=[common],
        help="train a model (checkpointed); write its latent space, UMAP, pictures and card",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model on the raw counts of an h5ad file or a packaged dataset.\n"
                    "\n"
                    "Writes in OUT:\n"
                    "  model/             the trained model (model.save)\n"
                    "  history.csv        the training history, one row per epoch\n"
                    "  checkpoints/       checkpoints, for --resume after an interruption\n"
                    f"  adata.h5ad         the cells, with the latent space (posterior mean) "
                    f"in\n                     obsm[{LATENT_KEY!r}] and its UMAP in "
                    f"obsm[{UMAP_KEY!r}]\n"
                    "  umap.png           the UMAP, coloured by --labels-key and --batch-key;"
                    " not with\n                     --no-umap\n"
                    "  history.png        training and validation ELBO per epoch\n"
                    "  card/README.md     the model card (and card/card.json); not with "
                    "--no-card\n"
                    "\n"
                    "The UMAP and the pictures need the plot extra: pip install "
                    "\"pyrovi[plot]\"\n"
                    "(in a source checkout: pip install -e \".[plot]\"); without it the "
                    "rest is written.\n"
                    "A resumed run (--resume) writes all of these when it ends.",
        epilog="example: pyrovi train pbmc68k_reduced --labels-key bulk_labels --out demo")
    train.add_argument("data", help=data_help)
    train.add_argument("--model", choices=sorted(MODELS), default=None,
                       help="model class (default: scvi; with --resume, the checkpoint's)")
    train.add_argument("--out", required=True, help="output folder")
    setup = train.add_argument_group("data set-up (setup_anndata)")
    setup.add_argument("--batch-key", default=None, help="obs column of the batches")
    setup.add_argument("--labels-key", default=None, help="obs column of the labels")
    setup.add_argument("--layer", default=None, help="layer with the counts (default: X)")
    setup.add_argument("--protein-obsm-key", default=None,
                       help="obsm key of the protein counts (totalvi)")
    arch = train.add_argument_group("model")
    arch.add_argument("--n-latent", type=_positive, default=None,
                      help="latent dimensions (default: the model's, 10 for scvi)")
    arch.add_argument("--n-hidden", type=_positive, default=None, help="hidden units")
    arch.add_argument("--gene-likelihood", choices=("zinb", "nb", "poisson"), default=None,
                      help="count distribution (default: the model's)")
    fitting = train.add_argument_group("training")
    fitting.add_argument("--max-epochs", type=_positive, default=None,
                         help="epochs (default: until converged, see train())")
    fitting.add_argument("--batch-size", type=_positive, default=None,
                         help="cells per minibatch (default: the model's)")
    fitting.add_argument("--lr", type=float, default=None,
                         help="learning rate (default: the model's)")
    fitting.add_argument("--train-size", type=float, default=None,
                         help="fraction of cells for training (default 0.9)")
    fitting.add_argument("--seed", type=int, default=0,
                         help="seed of the initial weights, split, minibatches and draws, "
                              "and of the UMAP and the card's checks")
    fitting.add_argument("--no-progress", action="store_true", help="no progress bar")
    fitting.add_argument("--strategy", choices=("single", "ddp"), default="single",
                         help="ddp: data-parallel over the processes of a torchrun launch "
                              "(`torchrun --nproc-per-node N -m pyrovi train ...`)")
    ckpt = train.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-every", type=_positive, default=None,
                      help="epochs between checkpoints (default 1)")
    ckpt.add_argument("--keep-checkpoints", type=int, default=1,
                      help="newest checkpoints to keep (0: all; default 1)")
    ckpt.add_argument("--resume", action="store_true",
                      help="continue the run in OUT/checkpoints after an interruption "
                           "(model, set-up and training options come from the checkpoint; "
                           "starts afresh if there is none yet)")
    ckpt.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in OUT (its checkpoints are deleted)")
    outputs = train.add_argument_group("outputs")
    outputs.add_argument("--no-umap", action="store_true",
                         help="leave out obsm['X_umap'] and umap.png (a seeded UMAP runs on "
                              "one core: minutes beyond ~100k cells)")
    outputs.add_argument("--no-card", action="store_true",
                         help="leave out OUT/card (its checks on up to "
                              f"{TRAIN_CARD_MAX_CELLS} cells per split take the longest of the "
                              "outputs; pyrovi card writes a fuller card later)")
    train.set_defaults(handler=_train)

    embed = commands.add_parser(
        "embed", parents=[common], help="write the latent representation into obsm",
        description="Write a trained model's latent representation (posterior mean) of the "
                    "cells of an h5ad file (or a packaged dataset) into obsm of a new h5ad "
                    "file. The cells need the "
                    "model's genes (in its order, or --subset-genes) and batches.")
    embed.add_argument("model_dir", help="folder of a saved model (OUT/model of train)")
    embed.add_argument("data", help=data_help)
    embed.add_argument("--out", required=True, help="h5ad file to write")
    embed.add_argument("--key", default="X_pyrovi", help="obsm key (default: X_pyrovi)")
    embed.add_argument("--batch-size", type=_positive, default=None,
                       help="cells per forward pass")
    embed.add_argument("--subset-genes", action="store_true",
                       help="use the model's genes when the data have more or in another order")
    embed.add_argument("--overwrite", action="store_true",
                       help="replace --out if it exists (also when it is the input file)")
    embed.set_defaults(handler=_embed)

    card = commands.add_parser(
        "card", parents=[common], help="write a model card (Markdown and JSON)",
        description="Write a trained model's card: parameters, set-up, training, posterior "
                    "predictive checks, DE agreement and embedding metrics on the given data.")
    card.add_argument("model_dir", help="folder of a saved model")
    card.add_argument("data", help=data_help + "; the training data give the card the "
                                               "training/validation split")
    card.add_argument("--out", required=True,
                      help="a .md file (JSON beside it) or a folder (README.md, card.json)")
    card.add_argument("--labels-key", default=None,
                      help="obs column of cell types for the DE and embedding tables")
    card.add_argument("--batch-key", default=None, help="obs column of batches")
    card.add_argument("--title", default=None, help="card heading")
    card.add_argument("--description", default="", help="a paragraph about the model")
    card.add_argument("--n-samples", type=_positive, default=3,
                      help="posterior predictive data sets for the checks")
    card.add_argument("--max-cells", type=_positive, default=3000,
                      help="cells per split for the checks")
    card.add_argument("--no-embedding", action="store_true",
                      help="leave out the embedding-quality table")
    card.add_argument("--seed", type=int, default=0, help="seed of subsampling and draws")
    card.add_argument("--overwrite", action="store_true", help="replace an existing card")
    card.set_defaults(handler=_card)

    datasets = commands.add_parser(
        "datasets", parents=[logging_options], help="list the packaged datasets",
        description="List the datasets that train, embed and card accept by name in place of "
                    "an h5ad path: name, size, description and useful obs keys.")
    datasets.set_defaults(handler=_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyrovi`` command line.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 on an error of the inputs or the run (reported in one
        line on stderr), 130 when interrupted. A wrong command line exits with 2.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "device", "") is None:
        args.device = "auto" if args.command == "train" else "cpu"
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"pyrovi {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line, not a traceback
        if args.debug:
            raise
        print(f"pyrovi {args.command}: error: {_message(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
