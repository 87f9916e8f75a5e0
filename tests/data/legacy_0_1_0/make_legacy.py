"""Write a small model with pyrovi 0.1.0 (torch.save pickle format) for the legacy-load test.

How scvi_0.1.0/ and latent.npy were made, from a checkout of pyrovi 0.1.0 (commit 4345cab):
``git worktree add /tmp/v010 4345cab && PYTHONPATH=/tmp/v010 python make_legacy.py``.
"""
import numpy as np
import torch

import pyrovi

assert pyrovi.__version__ == "0.1.0"
adata = pyrovi.datasets.pbmc68k_reduced()
adata = adata[:, :200].copy()
adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
pyrovi.SCVI.setup_anndata(adata, batch_key=None, labels_key="bulk_labels")
torch.manual_seed(0)
model = pyrovi.SCVI(adata, n_hidden=16, n_latent=4, gene_likelihood="nb")
model.train(max_epochs=5, progress_bar=False, seed=0)
model.save("scvi_0.1.0", overwrite=True)
np.save("latent.npy", model.get_latent_representation())
print(adata.shape, list(adata.var_names[:3]))
