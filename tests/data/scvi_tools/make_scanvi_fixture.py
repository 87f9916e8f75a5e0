"""Write ``<scvi-tools version>/scanvi/``: an scvi-tools SCANVI saved by the running scvi-tools.

The data are those of :mod:`make_fixtures` (100 of scanpy's ``pbmc68k_reduced`` cells, 150
genes), with every other cell's ``bulk_labels`` replaced by ``"Unknown"`` (column
``partial_labels``). An SCVI is trained (25 epochs), scANVI starts from it
(``SCANVI.from_scvi_model``) and trains 10 epochs; the folder holds ``model.save(...,
save_anndata=True)`` and ``reference.npz``: ``latent_mean`` (``get_latent_representation``)
and ``predict_soft`` (``predict(soft=True)``, columns in the order of ``reference.json``'s
``labels``). Needs the ``bench`` extra::

    PYTHONPATH=. python tests/data/scvi_tools/make_scanvi_fixture.py
    PYTHONPATH=/tmp/scvi142:. python tests/data/scvi_tools/make_scanvi_fixture.py
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_fixtures import MAX_EPOCHS, SEED, make_counts  # noqa: E402

UNLABELED = "Unknown"


def main() -> None:
    """Train, save and record the reference outputs for the running scvi-tools."""
    import scvi

    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.ERROR)
    adata = make_counts()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy().copy()
    labels[1::2] = UNLABELED
    adata.obs["partial_labels"] = labels
    scvi.settings.seed = SEED
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="partial_labels")
    pretrained = scvi.model.SCVI(adata, n_hidden=16, n_latent=5)
    train = dict(batch_size=32, train_size=0.9, accelerator="cpu", devices=1,
                 early_stopping=False, enable_progress_bar=False)
    pretrained.train(max_epochs=MAX_EPOCHS, **train)
    model = scvi.model.SCANVI.from_scvi_model(pretrained, unlabeled_category=UNLABELED)
    model.train(max_epochs=10, **train)
    out = HERE / scvi.__version__ / "scanvi"
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out), save_anndata=True)
    soft = model.predict(soft=True)
    np.savez_compressed(out / "reference.npz",
                        latent_mean=model.get_latent_representation().astype(np.float32),
                        predict_soft=soft.to_numpy().astype(np.float32))
    (out / "reference.json").write_text(json.dumps({
        "scvi_tools_version": scvi.__version__, "model_class": "SCANVI",
        "labels": [str(c) for c in soft.columns], "unlabeled_category": UNLABELED,
        "made_by": "tests/data/scvi_tools/make_scanvi_fixture.py"}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
