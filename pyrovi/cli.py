"""The ``pyrovi`` command: train a model on an h5ad file, resume it, embed cells, write a card.

::

    pyrovi train data.h5ad --model scvi --batch-key batch --max-epochs 400 --out run/
    pyrovi train data.h5ad --model scvi --batch-key batch --max-epochs 400 --out run/ --resume
    pyrovi embed run/model query.h5ad --out query_embedded.h5ad --key X_pyrovi
    pyrovi card run/model data.h5ad --out run/model/README.md --labels-key cell_type

``train`` writes ``<out>/model`` (``model.save``), ``<out>/history.csv`` and checkpoints in
``<out>/checkpoints``; after an interruption (a killed job, a preempted node) the same
command with ``--resume`` continues from the last checkpoint, exactly where the run stopped.
The same is ``python -m pyrovi``. Errors are reported in one line with exit status 1 (2 for
a wrong command line); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: Command-line model names and their classes in :mod:`pyrovi`.
MODELS = {"scvi": "SCVI", "ldvae": "LDVAE", "totalvi": "TOTALVI"}
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
HISTORY_CSV = "history.csv"


class CommandError(Exception):
    """A problem with the command's inputs or outputs, reported without a traceback."""


def _message(error: BaseException) -> str:
    # KeyError's str() quotes its message; show the message itself.
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def _existing_file(path: str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{what} {os.fspath(path)!r} does not exist.")
    if path.is_dir():
        raise CommandError(f"{what} {os.fspath(path)!r} is a folder, not a file.")
    return path


def _read_h5ad(path: str):
    import anndata

    return anndata.read_h5ad(_existing_file(path, "Data file"))


def _saved_model(model_dir: str) -> tuple[type, dict]:
    """The class of the model saved in ``model_dir`` and its saved content."""
    import torch

    import pyrovi
    from pyrovi.models.base import _CHECKPOINT

    path = Path(model_dir) / _CHECKPOINT
    if not path.is_file():
        raise CommandError(f"No saved pyrovi model in {model_dir!r} (no {_CHECKPOINT}; "
                           "write one with pyrovi train or model.save).")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return getattr(pyrovi, saved["model_class"]), saved


def _load_model(model_dir: str, adata, device: str, subset_genes: bool = False):
    """Load the model of ``model_dir`` on ``adata`` (optionally on its genes only)."""
    cls, saved = _saved_model(model_dir)
    data = adata
    if subset_genes:
        genes = saved["var_names"]
        flat = cls._as_anndata(adata)
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

    import pyrovi
    from pyrovi.infer import checkpoint

    data_path = _existing_file(args.data, "Data file")
    out = Path(args.out)
    model_dir, checkpoint_dir = out / MODEL_DIR, out / CHECKPOINT_DIR
    found = checkpoint.list_checkpoints(checkpoint_dir)
    resume = args.resume and bool(found)
    if args.resume and not found:
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

    adata = _read_h5ad(data_path)
    progress = not args.no_progress
    checkpointing = {"checkpoint_every": args.checkpoint_every,
                     "keep_checkpoints": None if args.keep_checkpoints == 0
                     else args.keep_checkpoints}
    if resume:
        state = checkpoint.read_checkpoint(checkpoint_dir)
        name = state["model"]["model_class"]
        if args.model is not None and MODELS[args.model] != name:
            raise CommandError(f"--resume: the run in {os.fspath(checkpoint_dir)!r} trains a "
                               f"{name}, not a {MODELS[args.model]}.")
        logger.info("Resuming the %s run in %s (model, setup and training options from the "
                    "checkpoint).", name, checkpoint_dir)
        model = getattr(pyrovi, name).load_checkpoint(state["path"], adata)
        model.train(resume_from=state["path"], device=args.device, progress_bar=progress,
                    checkpoint_dir=checkpoint_dir, **checkpointing)
    else:
        cls = getattr(pyrovi, MODELS[args.model or "scvi"])
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


# -- embed ------------------------------------------------------------------------------------


def _embed(args: argparse.Namespace) -> None:
    from pyrovi.data.registry import REGISTRY_UNS_KEY

    source = _existing_file(args.data, "Data file")
    out = Path(args.out)
    if out.resolve() == source.resolve() and not args.overwrite:
        raise CommandError(f"--out {os.fspath(out)!r} is the input file; pass --overwrite to "
                           "add the representation to it in place.")
    _refuse_existing(out, args.overwrite)
    adata = _read_h5ad(source)
    registry_before = adata.uns.get(REGISTRY_UNS_KEY)
    model, _ = _load_model(args.model_dir, adata, args.device, args.subset_genes)
    latent = model.get_latent_representation(batch_size=args.batch_size)
    adata.obsm[args.key] = latent
    # Loading registers the data with the model in adata.uns; the written file keeps
    # whatever registry it had.
    adata.uns.pop(REGISTRY_UNS_KEY, None)
    if registry_before is not None:
        adata.uns[REGISTRY_UNS_KEY] = registry_before
    # Written beside the target and renamed, so that a failure leaves --out (maybe the
    # input itself) as it was.
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        adata.write_h5ad(temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("Wrote %s: obsm[%r], %d cells x %d latent dimensions.", out, args.key,
                latent.shape[0], latent.shape[1])


# -- card -------------------------------------------------------------------------------------


def _card(args: argparse.Namespace) -> None:
    from pyrovi.infer.checkpoint import data_fingerprint
    from pyrovi.posterior.card import CARD_MARKDOWN

    out = Path(args.out)
    _refuse_existing(out if out.suffix == ".md" else out / CARD_MARKDOWN, args.overwrite)
    adata = _read_h5ad(args.data)
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


# -- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyrovi`` (one subcommand each for train, embed, card)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None,
                        help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'... "
                             "(default: auto for train, cpu otherwise)")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an error")

    parser = argparse.ArgumentParser(
        prog="pyrovi",
        description="Train pyrovi models on h5ad files (checkpointed, resumable), embed "
                    "cells with a trained model, write model cards.",
        epilog="Run 'pyrovi <command> --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    train = commands.add_parser(
        "train", parents=[common], help="train a model on an h5ad file (checkpointed)",
        description="Train a model on the raw counts of an h5ad file. Writes OUT/model "
                    "(model.save), OUT/history.csv and checkpoints in OUT/checkpoints.")
    train.add_argument("data", help="h5ad file with raw counts")
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
                         help="epochs (default: scvi-tools' size-based rule)")
    fitting.add_argument("--batch-size", type=_positive, default=None,
                         help="cells per minibatch (default: the model's)")
    fitting.add_argument("--lr", type=float, default=None,
                         help="learning rate (default: the model's)")
    fitting.add_argument("--train-size", type=float, default=None,
                         help="fraction of cells for training (default 0.9)")
    fitting.add_argument("--seed", type=int, default=0,
                         help="seed of the initial weights, split, minibatches and draws")
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
    train.set_defaults(handler=_train)

    embed = commands.add_parser(
        "embed", parents=[common], help="write the latent representation into obsm",
        description="Write a trained model's latent representation (posterior mean) of the "
                    "cells of an h5ad file into obsm of a new h5ad file. The cells need the "
                    "model's genes (in its order, or --subset-genes) and batches.")
    embed.add_argument("model_dir", help="folder of a saved model (OUT/model of train)")
    embed.add_argument("data", help="h5ad file with raw counts")
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
    card.add_argument("data", help="h5ad file with raw counts (the training data for the "
                                   "training/validation split)")
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
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "auto" if args.command == "train" else "cpu"
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
