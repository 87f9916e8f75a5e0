"""What ``pyrovi train`` writes after training: the cells with their latent space and UMAP,
the pictures and the model card (see :mod:`pyrovi.cli` for the folder's layout)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("pyrovi.cli")

ADATA_H5AD = "adata.h5ad"
UMAP_PNG = "umap.png"
HISTORY_PNG = "history.png"
CARD_DIR = "card"
#: obsm keys of the latent representation (also ``embed``'s default) and of its UMAP.
LATENT_KEY = "X_pyrovi"
UMAP_KEY = "X_umap"
# The card that train writes is a first look; ``pyrovi card`` writes a fuller one.
TRAIN_CARD_SAMPLES = 2
TRAIN_CARD_MAX_CELLS = 1000


def _registry_of(adata):
    from pyrovi.data.registry import REGISTRY_UNS_KEY

    return adata.uns.get(REGISTRY_UNS_KEY)


def _write_h5ad(adata, out: Path, registry_before) -> None:
    """Write ``adata`` to ``out`` with the registry it came with, atomically."""
    from pyrovi.data.registry import REGISTRY_UNS_KEY

    # Set-up or loading registers the data with the model in adata.uns; the written file
    # keeps whatever registry it had (the model folder holds the model's).
    registry_now = adata.uns.pop(REGISTRY_UNS_KEY, None)
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
        # The model keeps using adata (for the card), registered as it was.
        adata.uns.pop(REGISTRY_UNS_KEY, None)
        if registry_now is not None:
            adata.uns[REGISTRY_UNS_KEY] = registry_now


def _write_outputs(model, adata, registry_before, out: Path, title: str, reproduce: str | None,
                   seed: int, umap: bool, card: bool, progress: bool) -> None:
    """Write what a user looks at first: adata.h5ad, umap.png, history.png, the card."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pyrovi.criticism.card import CARD_JSON, CARD_MARKDOWN
    from pyrovi.plotting import (
        PLOT_INSTALL,
        missing_plot_packages,
        plot_history,
        plot_umap,
        umap_coordinates,
    )

    # Only the packages of the outputs asked for count as missing.
    missing = [p for p in missing_plot_packages() if umap or p != "umap-learn"]
    can_draw = "matplotlib" not in missing
    can_embed = umap and "umap-learn" not in missing
    registry = model.registry
    keys = [k for k in (registry.labels_key, registry.batch_key) if k is not None]
    written = []
    steps = ["latent space", "UMAP", ADATA_H5AD, "pictures"] + (["model card"] if card else [])
    with logging_redirect_tqdm(), tqdm(total=len(steps), desc="outputs", unit="step",
                                       disable=not progress) as bar:
        bar.set_postfix_str("latent space")
        adata.obsm[LATENT_KEY] = model.get_latent_representation()
        bar.update()

        bar.set_postfix_str("UMAP")
        coordinates = umap_coordinates(adata.obsm[LATENT_KEY], seed=seed) if can_embed else None
        if coordinates is not None:
            adata.obsm[UMAP_KEY] = coordinates
        elif UMAP_KEY in adata.obsm and umap:
            logger.warning("obsm[%r] of %s is the input's own, not a UMAP of the latent space.",
                           UMAP_KEY, ADATA_H5AD)
        bar.update()

        bar.set_postfix_str(ADATA_H5AD)
        _write_h5ad(adata, out / ADATA_H5AD, registry_before)
        written.append(f"{out / ADATA_H5AD} (obsm[{LATENT_KEY!r}]"
                       + (f", obsm[{UMAP_KEY!r}])" if coordinates is not None else ")"))
        bar.update()

        bar.set_postfix_str("pictures")
        pictures = {HISTORY_PNG: can_draw, UMAP_PNG: can_draw and coordinates is not None}
        for picture, possible in pictures.items():
            if not possible:
                # A picture of an earlier run (--overwrite) would pass for this run's.
                (out / picture).unlink(missing_ok=True)
        if pictures[HISTORY_PNG]:
            plot_history(model.history, out / HISTORY_PNG)
            written.append(os.fspath(out / HISTORY_PNG))
        if pictures[UMAP_PNG]:
            plot_umap(coordinates, adata.obs, keys, out / UMAP_PNG, seed=seed)
            written.append(os.fspath(out / UMAP_PNG))
        if missing:
            left_out = [p for p, possible in pictures.items() if not possible
                        and (umap or p != UMAP_PNG)]
            if not can_embed and umap:
                left_out.append(f"obsm[{UMAP_KEY!r}]")
            logger.warning("Left out %s: %s not installed. Add them with: %s", ", ".join(left_out),
                           " and ".join(missing) + (" is" if len(missing) == 1 else " are"),
                           PLOT_INSTALL)
        bar.update()

        if card:
            bar.set_postfix_str("model card")
            model.card(out / CARD_DIR, title=title, reproduce=reproduce,
                       labels_key=registry.labels_key, batch_key=registry.batch_key,
                       n_samples=TRAIN_CARD_SAMPLES, max_cells=TRAIN_CARD_MAX_CELLS, seed=seed)
            written.append(os.fspath(out / CARD_DIR / CARD_MARKDOWN))
            bar.update()
        else:
            # As for the pictures: an earlier run's card must not pass for this run's.
            for stale in (CARD_MARKDOWN, CARD_JSON):
                (out / CARD_DIR / stale).unlink(missing_ok=True)
    logger.info("Wrote %s.", "; ".join(written))
