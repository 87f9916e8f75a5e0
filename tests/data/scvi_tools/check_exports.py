"""Check that the scvi-tools installed here loads what pyrovi's ``to_scvi_tools`` writes.

Every committed fixture is imported with :func:`pyrovi.from_scvi_tools`, written back with
``to_scvi_tools`` and loaded with the running scvi-tools' ``<Model>.load``; the latent means
of both are compared. The tests do the same against the scvi-tools of the ``bench`` extra;
this script also serves an older release installed beside it::

    python -m pip install --no-deps --target /tmp/scvi142 scvi-tools==1.4.2
    PYTHONPATH=/tmp/scvi142:. python tests/data/scvi_tools/check_exports.py
    PYTHONPATH=. python tests/data/scvi_tools/check_exports.py
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import anndata
import numpy as np

import pyrovi

FIXTURES = Path(__file__).resolve().parent
MODELS = {"scvi_batch_latent_library": "SCVI", "scvi_nb_encode_covariates": "SCVI",
          "linear_scvi": "LinearSCVI", "totalvi": "TOTALVI", "scanvi": "SCANVI"}


def main() -> int:
    """Export each fixture and load it with scvi-tools; non-zero exit on a mismatch."""
    import scvi

    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.ERROR)
    print(f"scvi-tools {scvi.__version__}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for name, class_name in MODELS.items():
            source = FIXTURES / "1.5.1" / name
            model = pyrovi.from_scvi_tools(source)
            target = Path(scratch) / name
            model.to_scvi_tools(target)
            loaded = getattr(scvi.model, class_name).load(
                str(target), adata=anndata.read_h5ad(source / "adata.h5ad"))
            difference = float(np.abs(loaded.get_latent_representation()
                                      - model.get_latent_representation()).max())
            worst = max(worst, difference)
            print(f"{name}: loaded as scvi.model.{class_name}; largest latent difference "
                  f"{difference:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
