"""Write small models saved by scvi-tools, and what scvi-tools computes on them.

The folders this script writes are the fixtures of pyrovi's scvi-tools interop tests
(issue 20): CI cannot install scvi-tools, so the folders are committed. For the running
scvi-tools version ``V`` it writes ``tests/data/scvi_tools/<V>/<name>/`` for each name in
:data:`MODELS`; each folder holds what ``model.save(folder, save_anndata=True)`` writes
(``model.pt`` and ``adata.h5ad``) plus

* ``reference.npz``: float32 / int32 arrays only (it loads with ``allow_pickle=False``),
  computed by scvi-tools in eval mode under ``torch.no_grad`` on all cells of the saved
  AnnData (see ``reference.json["arrays"]`` for what each array is);
* ``reference.json``: the scvi-tools version, the model class, the arguments used, what each
  array is, and a description of the layout of ``model.pt`` and ``adata.h5ad``.

It needs scvi-tools, i.e. pyrovi's ``bench`` extra (``pip install -e .[bench]``), and runs in
seconds on a CPU. The committed folders were made from the repository root with exactly these
commands (``/work/main/.venv-ci`` is the repository's Python 3.12 environment with scvi-tools
1.5.1, anndata 0.13.4, pandas 3, numpy 2, torch 2.15; scvi-tools 1.4.2 went beside it into a
separate folder without its dependencies, all of which that environment already satisfies)::

    export OMP_NUM_THREADS=1
    PY=/work/main/.venv-ci/bin/python
    PYTHONPATH=. $PY tests/data/scvi_tools/make_fixtures.py
    $PY -m pip install --no-deps --target /tmp/scvi142 scvi-tools==1.4.2
    PYTHONPATH=/tmp/scvi142:. $PY tests/data/scvi_tools/make_fixtures.py
    $PY tests/data/scvi_tools/make_fixtures.py --compare

The script asserts nothing about the version it runs under: it writes into the folder named
after ``scvi.__version__``. The last command needs no scvi-tools: it compares the layouts the
two runs recorded and writes the differences into each ``reference.json``
(``layout_differences``).

Data: scanpy's packaged ``pbmc68k_reduced``, whose ``.raw.X`` is log1p of counts scaled to 1e4
by ``obs["n_counts"]``, so ``round(expm1(raw.X) * n_counts / 1e4)`` restores the counts; the
150 genes of largest total count among those detected in 5-40% of the cells, and the first
100 cells with a count over them (see :data:`N_CELLS` for why 100). TOTALVI gets 10 synthetic
protein counts (Gamma-Poisson, rates depending on ``bulk_labels``, numpy seed 0). Every model
is trained 25 epochs with ``scvi.settings.seed = 0``.
"""

from __future__ import annotations

import argparse
import json
import pickletools
import shutil
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
# 100 cells, not the 300 first planned: every array of reference.npz covers all cells, and at
# 300 cells the two versions' folders took about 5.5 MB; at 100 they take about 3.1 MB.
N_CELLS = 100
N_GENES = 150
N_PROTEINS = 10
SEED = 0
MAX_EPOCHS = 25
SAVE_KWARGS = {"compression": "gzip"}
MAX_LIST = 24  # longer lists (var names, train indices) are abbreviated in reference.json
MODELS = (
    "scvi_batch_latent_library",
    "scvi_nb_encode_covariates",
    "linear_scvi",
    "totalvi",
    "scvi_minified",
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_counts():
    """Build the count AnnData every model is trained on.

    Returns
    -------
    anndata.AnnData
        ``N_CELLS`` x ``N_GENES`` integer counts (CSR, float32) with the obs columns the models
        are set up with.
    """
    import anndata
    import scanpy as sc
    from scipy import sparse

    src = sc.datasets.pbmc68k_reduced()
    log_norm = src.raw.X.toarray() if sparse.issparse(src.raw.X) else np.asarray(src.raw.X)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    counts = np.round(np.expm1(log_norm.astype(np.float64)) * n_counts[:, None] / 1e4)
    totals = counts.sum(axis=0)
    detected = (counts > 0).mean(axis=0)
    candidates = np.flatnonzero((detected >= 0.05) & (detected <= 0.4))
    genes = np.sort(candidates[np.argsort(-totals[candidates], kind="stable")[:N_GENES]])
    counts = counts[:, genes]
    cells = np.flatnonzero(counts.sum(axis=1) > 0)[:N_CELLS]
    counts = counts[cells]
    obs_src = src.obs.iloc[cells]

    obs = pd.DataFrame(index=pd.Index(obs_src.index.astype(str), name=None))
    obs["bulk_labels"] = pd.Categorical(obs_src["bulk_labels"].astype(str))
    # three batches with uneven sizes (cell-cycle phase)
    obs["phase"] = pd.Categorical(obs_src["phase"].astype(str))
    # two batches: G1 against the cycling cells
    obs["batch"] = pd.Categorical(np.where(obs_src["phase"].astype(str) == "G1", "G1", "cycling"))
    mito = obs_src["percent_mito"].to_numpy(dtype=np.float64)
    obs["mito_group"] = pd.Categorical(np.where(mito > np.median(mito), "high_mito", "low_mito"))
    obs["S_score"] = obs_src["S_score"].to_numpy(dtype=np.float32)
    var = pd.DataFrame(index=pd.Index(src.raw.var_names[genes].astype(str), name=None))
    adata = anndata.AnnData(X=sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    return adata


DATA_DOC = (
    f"scanpy.datasets.pbmc68k_reduced(): counts = round(expm1(raw.X) * obs.n_counts / 1e4); "
    f"genes: the {N_GENES} of largest total count among those detected in 5-40% of the 700 "
    f"cells (kept in raw order); cells: the first {N_CELLS} with a count over those genes; "
    "X CSR float32; obs: bulk_labels, phase (G1/G2M/S), batch (G1 / cycling, from phase), "
    "mito_group (percent_mito above / below its median), S_score (float32)"
)


def package_versions():
    """Return the versions of the packages that wrote the files.

    Returns
    -------
    dict
        Package name -> version.
    """
    from importlib.metadata import version

    names = ("scvi-tools", "torch", "anndata", "numpy", "pandas", "scanpy", "h5py", "mudata")
    return {n: version(n) for n in names}


def add_proteins(adata):
    """Add synthetic protein counts to ``adata.obsm["protein_expression"]``.

    Each of the ``N_PROTEINS`` proteins has a background rate and, per cell type
    (``bulk_labels``), a foreground rate; counts are negative binomial (Gamma-Poisson,
    shape 5) with seed ``SEED``.

    Parameters
    ----------
    adata
        The AnnData of :func:`make_counts`; changed in place.
    """
    rng = np.random.default_rng(SEED)
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    n_types = int(labels.max()) + 1
    background = rng.uniform(2.0, 10.0, size=N_PROTEINS)
    foreground = rng.lognormal(mean=2.5, sigma=1.2, size=(n_types, N_PROTEINS))
    foreground *= rng.random(size=(n_types, N_PROTEINS)) < 0.5
    rate = background[None, :] + foreground[labels]
    shape = 5.0
    gamma = rng.gamma(shape, rate / shape)
    proteins = rng.poisson(gamma).astype(np.float32)
    names = [f"protein_{i}" for i in range(N_PROTEINS)]
    adata.obsm["protein_expression"] = pd.DataFrame(proteins, index=adata.obs_names, columns=names)


# --------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------
def model_specs(scvi):
    """Return, per fixture name, the class and the arguments it is made with.

    Parameters
    ----------
    scvi
        The imported ``scvi`` package.

    Returns
    -------
    dict
        ``name -> {"cls", "notes", "setup", "init", "train"}``.
    """
    base_train = {
        "max_epochs": MAX_EPOCHS,
        "batch_size": 32,
        "train_size": 0.9,
        "accelerator": "cpu",
        "devices": 1,
        "early_stopping": False,
    }
    return {
        "scvi_batch_latent_library": {
            "cls": scvi.model.SCVI,
            "setup": {
                "batch_key": "phase",
                "labels_key": "bulk_labels",
                "categorical_covariate_keys": ["mito_group"],
                "continuous_covariate_keys": ["S_score"],
            },
            "init": {
                "n_hidden": 32,
                "n_latent": 5,
                "n_layers": 1,
                "gene_likelihood": "zinb",
                "use_observed_lib_size": False,
            },
            "train": base_train,
        },
        "scvi_nb_encode_covariates": {
            "cls": scvi.model.SCVI,
            "notes": (
                "one categorical covariate (mito_group) besides the batch, so that "
                "encode_covariates and deeply_inject_covariates act on two categorical inputs"
            ),
            "setup": {"batch_key": "batch", "categorical_covariate_keys": ["mito_group"]},
            "init": {
                "n_hidden": 16,
                "n_latent": 5,
                "n_layers": 2,
                "gene_likelihood": "nb",
                "dispersion": "gene-batch",
                "encode_covariates": True,
                "deeply_inject_covariates": True,
                "use_layer_norm": "both",
                "use_batch_norm": "none",
            },
            "train": base_train,
        },
        "linear_scvi": {
            "cls": scvi.model.LinearSCVI,
            "notes": "n_hidden=16 (default 128) to keep model.pt small; defaults otherwise",
            "setup": {"batch_key": "batch"},
            "init": {"n_latent": 5, "n_hidden": 16},
            "train": base_train,
        },
        "totalvi": {
            "cls": scvi.model.TOTALVI,
            "notes": (
                "AnnData with the proteins in obsm (not MuData); n_hidden=16 (default 256) to "
                "keep model.pt small, passed through **model_kwargs so init_params_ holds it "
                "under kwargs/model_kwargs; defaults otherwise (gene_likelihood 'nb', "
                "n_layers_encoder 2, no empirical protein prior since n_proteins <= 10); "
                "reduce_lr_on_plateau=False and early_stopping=False in train"
            ),
            "setup": {
                "protein_expression_obsm_key": "protein_expression",
                "batch_key": "batch",
            },
            "init": {"n_latent": 5, "n_hidden": 16},
            "train": {**base_train, "reduce_lr_on_plateau": False},
        },
        "scvi_minified": {
            "cls": scvi.model.SCVI,
            "notes": "observed library (the default); minified after training, before saving",
            "setup": {"batch_key": "batch", "labels_key": "bulk_labels"},
            "init": {"n_hidden": 16, "n_latent": 5, "n_layers": 1},
            "train": base_train,
        },
    }


def full_batch(model):
    """Return the registered tensors of all cells of the model's AnnData, in one batch.

    Parameters
    ----------
    model
        A trained scvi-tools model.

    Returns
    -------
    dict
        Registry key -> tensor, as the module's ``_get_inference_input`` expects.
    """
    loader = model._make_data_loader(adata=model.adata, batch_size=model.adata.n_obs, shuffle=False)
    batches = list(loader)
    assert len(batches) == 1
    return batches[0]


def _np(t):
    return t.detach().cpu().numpy().astype(np.float32)


def scvi_reference(model, n_genes):
    """Compute the reference arrays of an SCVI or LinearSCVI model.

    ``module.inference`` runs on all cells; ``module.generative`` is then called with ``z``
    replaced by ``qz.loc`` and (for a latent library) ``library`` by ``ql.loc``.

    Parameters
    ----------
    model
        A trained ``SCVI`` or ``LinearSCVI``.
    n_genes
        Number of genes (to broadcast the dispersion).

    Returns
    -------
    tuple of dict
        The arrays and their descriptions.
    """
    import torch

    module = model.module
    module.eval()
    out = {}
    doc = {}
    with torch.no_grad():
        out["latent_mean"] = np.asarray(
            model.get_latent_representation(give_mean=True), dtype=np.float32
        )
        doc["latent_mean"] = "model.get_latent_representation(give_mean=True)"
        tensors = full_batch(model)
        inference = module.inference(**module._get_inference_input(tensors))
        qz, ql = inference["qz"], inference["ql"]
        out["latent_var"] = _np(qz.variance)
        doc["latent_var"] = "qz.variance (qz = Normal of module.inference on all cells)"
        inference = dict(inference)
        inference["z"] = qz.loc
        if ql is not None:
            inference["library"] = ql.loc
            out["library_mean"] = _np(ql.loc)
            out["library_var"] = _np(ql.variance)
            doc["library_mean"] = "ql.loc: mean of the latent log library, cells x 1"
            doc["library_var"] = "ql.variance: variance of the latent log library, cells x 1"
        generative = module.generative(**module._get_generative_input(tensors, inference))
        px = generative["px"]
        n = model.adata.n_obs
        out["library"] = _np(inference["library"])
        doc["library"] = (
            "log library passed to generative, cells x 1: ql.loc for a latent library, "
            "log(sum of counts) for an observed one"
        )
        out["px_scale"] = _np(px.scale)
        doc["px_scale"] = "px.scale: decoder softmax output, cells x genes"
        out["px_rate"] = _np(px.mu)
        doc["px_rate"] = "px.mu = exp(library) * px_scale: NB mean, cells x genes"
        out["px_r"] = np.ascontiguousarray(
            np.broadcast_to(_np(px.theta), (n, n_genes)), dtype=np.float32
        )
        doc["px_r"] = (
            "px.theta = exp(module.px_r) (per gene, or the cell's batch column for "
            "gene-batch) broadcast to cells x genes"
        )
        expected = np.exp(out["library"]) * out["px_scale"]
        np.testing.assert_allclose(out["px_rate"], expected, rtol=1e-5)
        zi = getattr(px, "zi_logits", None)
        if zi is not None:
            out["px_dropout"] = _np(zi)
            doc["px_dropout"] = "px.zi_logits: zero-inflation logits, cells x genes"
        out["batch_index"] = tensors["batch"].numpy().astype(np.int32).reshape(-1)
        doc["batch_index"] = "batch codes scvi-tools fed the module (tensors['batch']), cells"
        if "labels" in tensors:
            out["labels_index"] = tensors["labels"].numpy().astype(np.int32).reshape(-1)
            doc["labels_index"] = "label codes (tensors['labels']), cells"
    return out, doc


@contextmanager
def normal_rsample_at_mean():
    """Make ``torch.distributions.Normal.rsample`` return the mean while active.

    TOTALVI's protein decoder draws the log background rate from
    ``Normal(back_alpha, back_beta).rsample()``; with this patch the rates are those at the
    mean, ``rate_back = exp(back_alpha)``.

    Yields
    ------
    None
    """
    from torch.distributions import Normal

    def at_mean(self, sample_shape=()):
        import torch

        return self.loc.expand(self._extended_shape(torch.Size(sample_shape))).clone()

    with mock.patch.object(Normal, "rsample", at_mean):
        yield


def totalvi_reference(model, n_genes, n_proteins):
    """Compute the reference arrays of a TOTALVI model.

    ``module.inference`` runs on all cells; ``module.generative`` is called with ``z =
    qz.loc`` (observed library, ``library_gene`` = sum of counts, not its log) while
    :func:`normal_rsample_at_mean` is active, so the protein background is taken at the mean
    of its Normal (``log rate_back = py_back_alpha``).

    Parameters
    ----------
    model
        A trained ``TOTALVI``.
    n_genes, n_proteins
        Numbers of genes and proteins (to broadcast the dispersions).

    Returns
    -------
    tuple of dict
        The arrays and their descriptions.
    """
    import torch

    module = model.module
    module.eval()
    out, doc = {}, {}
    n = model.adata.n_obs
    with torch.no_grad():
        out["latent_mean"] = np.asarray(
            model.get_latent_representation(give_mean=True), dtype=np.float32
        )
        doc["latent_mean"] = "model.get_latent_representation(give_mean=True)"
        tensors = full_batch(model)
        inference = dict(module.inference(**module._get_inference_input(tensors)))
        qz = inference["qz"]
        out["latent_var"] = _np(qz.variance)
        doc["latent_var"] = "qz.variance"
        inference["z"] = qz.loc
        if not module.use_observed_lib_size:
            raise AssertionError("the fixture expects an observed library")
        with normal_rsample_at_mean():
            generative = module.generative(**module._get_generative_input(tensors, inference))
        px_, py_ = generative["px_"], generative["py_"]
        out["library_gene"] = _np(inference["library_gene"])
        doc["library_gene"] = (
            "library_gene passed to generative: sum of the gene counts (NOT its log), cells x 1"
        )
        out["px_scale"] = _np(px_["scale"])
        doc["px_scale"] = "px_['scale'], cells x genes"
        out["px_rate"] = _np(px_["rate"])
        doc["px_rate"] = "px_['rate'] = library_gene * px_scale, cells x genes"
        out["px_r"] = np.ascontiguousarray(
            np.broadcast_to(_np(px_["r"]), (n, n_genes)), dtype=np.float32
        )
        doc["px_r"] = "px_['r'] = exp(module.px_r) broadcast to cells x genes"
        out["px_dropout"] = _np(px_["dropout"])
        doc["px_dropout"] = (
            "px_['dropout']: zero-inflation logits (computed even when gene_likelihood='nb', "
            "where the likelihood ignores them), cells x genes"
        )
        out["py_back_alpha"] = _np(py_["back_alpha"])
        doc["py_back_alpha"] = "py_['back_alpha']: mean of the Normal of log rate_back"
        out["py_back_beta"] = _np(py_["back_beta"])
        doc["py_back_beta"] = "py_['back_beta']: scale (std) of the Normal of log rate_back"
        out["py_rate_back"] = _np(py_["rate_back"])
        doc["py_rate_back"] = (
            "py_['rate_back'] with the Normal sample set to its mean: exp(py_back_alpha)"
        )
        out["py_fore_scale"] = _np(py_["fore_scale"])
        doc["py_fore_scale"] = "py_['fore_scale'] (>= 1)"
        out["py_rate_fore"] = _np(py_["rate_fore"])
        doc["py_rate_fore"] = "py_['rate_fore'] = py_rate_back * py_fore_scale"
        out["py_mixing"] = _np(py_["mixing"])
        doc["py_mixing"] = "py_['mixing']: logits of the background probability"
        out["py_scale"] = _np(py_["scale"])
        doc["py_scale"] = "py_['scale'] = L1-normalised (1 - sigmoid(mixing)) * rate_fore"
        out["py_r"] = np.ascontiguousarray(
            np.broadcast_to(_np(py_["r"]), (n, n_proteins)), dtype=np.float32
        )
        doc["py_r"] = "py_['r'] = exp(module.py_r) broadcast to cells x proteins"
        out["per_batch_efficiency"] = _np(generative["per_batch_efficiency"])
        doc["per_batch_efficiency"] = (
            "exp(module.log_per_batch_efficiency) (proteins x batches) at the cell's batch; "
            "generative's py_norm_ rates are the py_ rates times this, cells x proteins"
        )
        np.testing.assert_allclose(out["py_rate_back"], np.exp(out["py_back_alpha"]), rtol=1e-5)
        np.testing.assert_allclose(out["px_rate"], out["library_gene"] * out["px_scale"], rtol=1e-5)
        out["batch_index"] = tensors["batch"].numpy().astype(np.int32).reshape(-1)
        doc["batch_index"] = "batch codes (tensors['batch']), cells"
    return out, doc


# --------------------------------------------------------------------------------------------
# layout description
# --------------------------------------------------------------------------------------------
def jsonable(obj, depth=0):
    """Convert registries and init params into JSON-friendly values.

    Parameters
    ----------
    obj
        Any value found in ``attr_dict``.
    depth
        Recursion depth.

    Returns
    -------
    object
        Dicts, lists, strings and numbers; arrays become lists, and a sequence longer than
        ``MAX_LIST`` becomes ``{"n_items", "first", "last"}``.
    """
    if depth > 12:
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, pd.DataFrame):
        return f"pandas.DataFrame shape={list(obj.shape)} columns={list(obj.columns)}"
    if isinstance(obj, np.ndarray | pd.Index | pd.Series):
        obj = obj.tolist()
    if isinstance(obj, list | tuple):
        if len(obj) > MAX_LIST:
            return {
                "n_items": len(obj),
                "first": [jsonable(v, depth + 1) for v in obj[:3]],
                "last": jsonable(obj[-1], depth + 1),
            }
        return [jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


def type_tree(obj, depth=0):
    """Describe the Python types inside a nested value.

    Parameters
    ----------
    obj
        A value of ``attr_dict``.
    depth
        Recursion depth.

    Returns
    -------
    object
        The same nesting of dicts, with leaves replaced by type names (arrays with dtype and
        shape).
    """
    if isinstance(obj, dict) and depth < 8:
        return {str(k): type_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return f"numpy.ndarray[{obj.dtype}, shape={list(obj.shape)}]"
    if isinstance(obj, list | tuple):
        inner = sorted({type(v).__name__ for v in obj})
        return f"{type(obj).__name__}[{', '.join(inner)}] (len {len(obj)})"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def pickle_globals(path):
    """List the ``module.name`` globals that ``model.pt``'s pickle refers to.

    The pickle is only scanned (``pickletools.genops``), never unpickled.

    Parameters
    ----------
    path
        A ``model.pt`` written by ``torch.save``.

    Returns
    -------
    list of str
        Sorted distinct globals.
    """
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        data = zf.read(name)
    found = set()
    strings = []
    memo = {}
    last = None
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
            last = arg
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(arg)
            if isinstance(last, str):
                strings.append(last)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        else:
            last = None
    return sorted(found)


def describe_model_pt(path):
    """Describe what a ``model.pt`` written by ``model.save`` holds.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    dict
        Top-level keys, state-dict key names with ``"dtype [shape]"``, ``var_names``, the
        ``attr_dict`` keys with their types, ``init_params_``, the registry (as JSON), the
        pickle globals and whether ``torch.load(weights_only=True)`` reads it.
    """
    import torch

    desc = {}
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        desc["torch_load_weights_only_true"] = "ok"
    except Exception as err:  # noqa: BLE001 - recorded, not handled
        lines = [ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln]
        desc["torch_load_weights_only_true"] = (lines or [str(err).strip()])[0][:400]
    # Our own file, just written by scvi-tools: a full load to describe it.
    saved = torch.load(path, map_location="cpu", weights_only=False)
    desc["top_level_keys"] = list(saved)
    state = saved["model_state_dict"]
    desc["state_dict"] = {
        k: f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
        for k, v in state.items()
        if k != "pyro_param_store"
    }
    desc["state_dict_extra_entries"] = {
        "pyro_param_store": type_tree(state.get("pyro_param_store"))
    }
    var_names = saved["var_names"]
    desc["var_names"] = type_tree(var_names)
    attr = saved["attr_dict"]
    desc["attr_dict_types"] = type_tree(attr)
    desc["init_params_"] = jsonable(attr.get("init_params_"))
    desc["registry_"] = jsonable(attr.get("registry_"))
    desc["other_attr_dict_values"] = {
        k: jsonable(v) for k, v in attr.items() if k not in ("init_params_", "registry_")
    }
    desc["pickle_globals"] = pickle_globals(path)
    return desc


def describe_h5ad(path):
    """Describe the AnnData file ``model.save`` wrote.

    Parameters
    ----------
    path
        ``adata.h5ad``.

    Returns
    -------
    dict
        Shape, ``X`` storage, obs/var columns with dtypes, obsm/uns/layers keys.
    """
    import anndata
    import h5py

    adata = anndata.read_h5ad(path)
    with h5py.File(path, "r") as f:
        x = f["X"]
        x_encoding = dict(x.attrs).get("encoding-type", "dense")
        x_encoding = x_encoding.decode() if isinstance(x_encoding, bytes) else str(x_encoding)
    nnz = int(adata.X.nnz) if hasattr(adata.X, "nnz") else int(np.count_nonzero(adata.X))
    obsm = {}
    for k, v in adata.obsm.items():
        obsm[k] = {"type": type(v).__name__, "shape": list(np.shape(v))}
        if isinstance(v, pd.DataFrame):
            obsm[k]["columns"] = [str(c) for c in v.columns]
    groups = {}
    with h5py.File(path, "r") as f:
        for key, item in f.items():
            attrs = dict(item.attrs)
            enc = attrs.get("encoding-type", "")
            entry = {"encoding-type": enc.decode() if isinstance(enc, bytes) else str(enc)}
            if isinstance(item, h5py.Group):
                entry["members"] = sorted(item.keys())
                if "_index" in attrs:
                    index = attrs["_index"]
                    entry["_index"] = index.decode() if isinstance(index, bytes) else index
                    idx = item[entry["_index"]]
                    idx_enc = dict(idx.attrs).get("encoding-type", "")
                    entry["index_encoding"] = (
                        idx_enc.decode() if isinstance(idx_enc, bytes) else str(idx_enc)
                    )
            groups[key] = entry
    return {
        "hdf5_top_level": groups,
        "shape": list(adata.shape),
        "X": {"encoding": x_encoding, "dtype": str(adata.X.dtype), "nnz": nnz},
        "obs": {k: str(v.dtype) for k, v in adata.obs.items()},
        "var": {k: str(v.dtype) for k, v in adata.var.items()},
        "obsm": obsm,
        "uns": {
            k: jsonable(v) if np.size(v) < 50 else type(v).__name__ for k, v in adata.uns.items()
        },
        "layers": [k for k in adata.layers if k is not None],
        "raw": adata.raw is not None,
    }


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def train(model, train_kwargs):
    """Train quietly with the given arguments.

    Parameters
    ----------
    model
        An scvi-tools model.
    train_kwargs
        Arguments of ``model.train``.
    """
    model.train(**train_kwargs, enable_progress_bar=False)


def write_fixture(scvi, name, spec, base, out_root):
    """Train one model, save it and write its references.

    Parameters
    ----------
    scvi
        The imported ``scvi`` package.
    name
        Fixture name (folder name).
    spec
        Its entry of :func:`model_specs`.
    base
        The AnnData of :func:`make_counts` (copied, not changed).
    out_root
        ``tests/data/scvi_tools/<version>``.

    Returns
    -------
    pathlib.Path
        The folder written.
    """
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    cls = spec["cls"]
    setup = spec["setup"]
    used = {"bulk_labels", setup.get("batch_key"), setup.get("labels_key")}
    used |= set(setup.get("categorical_covariate_keys", []))
    used |= set(setup.get("continuous_covariate_keys", []))
    adata = base[:, :].copy()
    adata.obs = adata.obs[[c for c in adata.obs if c in used]].copy()
    if name == "totalvi":
        add_proteins(adata)
    scvi.settings.seed = SEED
    cls.setup_anndata(adata, **spec["setup"])
    model = cls(adata, **spec["init"])
    train(model, spec["train"])
    model.module.eval()
    n_genes = adata.n_vars
    info = {
        "scvi_tools_version": scvi.__version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "module_class": f"{type(model.module).__module__}.{type(model.module).__qualname__}",
        "notes": spec.get("notes", ""),
        "setup_method": f"{cls.__name__}.setup_anndata",
        "setup_anndata_kwargs": spec["setup"],
        "init_kwargs": spec["init"],
        "train_kwargs": {**spec["train"], "enable_progress_bar": False},
        "seed": f"scvi.settings.seed = {SEED} before setup, construction and training",
        "package_versions": package_versions(),
        "data": DATA_DOC + f"; obs columns kept: {list(adata.obs)}",
    }
    if name == "totalvi":
        info["data"] += (
            f"; obsm['protein_expression']: DataFrame of {N_PROTEINS} synthetic protein "
            "counts, Gamma(5, rate/5)-Poisson with rate = background[protein] + "
            "foreground[bulk_label, protein] (numpy default_rng(0))"
        )
        arrays, doc = totalvi_reference(model, n_genes, N_PROTEINS)
        info["reference_method"] = (
            "module.eval(); torch.no_grad(); one data-loader batch of all cells "
            "(model._make_data_loader(adata, batch_size=n_obs, shuffle=False)); "
            "inference = module.inference(**module._get_inference_input(tensors)); "
            "inference['z'] = qz.loc; generative = module.generative("
            "**module._get_generative_input(tensors, inference)) while "
            "torch.distributions.Normal.rsample is patched to return loc, so the decoder's "
            "log_pro_back_mean = Normal(back_alpha, back_beta).rsample() is back_alpha "
            "(rate_back = exp(back_alpha), rate_fore = rate_back * fore_scale, "
            "py_scale from that rate_fore). px_/py_ are generative['px_'], ['py_'] "
            "(py_, not py_norm_: no per-batch efficiency applied)."
        )
    elif name == "scvi_minified":
        arrays, doc, minify = minify_and_reference(scvi, model)
        info["minify"] = minify
    else:
        arrays, doc = scvi_reference(model, n_genes)
        info["reference_method"] = (
            "module.eval(); torch.no_grad(); one data-loader batch of all cells "
            "(model._make_data_loader(adata, batch_size=n_obs, shuffle=False)); "
            "inference = module.inference(**module._get_inference_input(tensors)); "
            "inference['z'] = qz.loc; for a latent library inference['library'] = ql.loc; "
            "generative = module.generative(**module._get_generative_input(tensors, "
            "inference)); px = generative['px']"
        )
        if name == "linear_scvi":
            arrays["loadings"] = model.get_loadings().to_numpy().astype(np.float32)
            doc["loadings"] = "model.get_loadings().to_numpy(), genes x latent"
    # gzip pays only where X holds counts (the minified X is empty: HDF5 chunking costs more)
    save_kwargs = {} if name == "scvi_minified" else SAVE_KWARGS
    model.save(str(folder), save_anndata=True, overwrite=True, **save_kwargs)
    info["save_call"] = f"model.save(folder, save_anndata=True, overwrite=True, **{save_kwargs})"
    for key, value in arrays.items():
        assert value.dtype in (np.float32, np.int32), (key, value.dtype)
        assert np.isfinite(value).all(), key
    np.savez_compressed(folder / "reference.npz", **arrays)

    # The saved folder loads back in scvi-tools and gives the same latent means.
    loaded = cls.load(str(folder), accelerator="cpu")
    again = loaded.get_latent_representation(give_mean=True)
    np.testing.assert_allclose(again, arrays["latent_mean"], rtol=1e-5, atol=1e-5)
    info["roundtrip_checked"] = (
        f"{cls.__name__}.load(folder) gives latent_mean again (rtol=atol=1e-5)"
    )
    info["arrays"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype), "what": doc[k]}
        for k, v in arrays.items()
    }
    info["files"] = sorted(p.name for p in folder.iterdir()) + ["reference.json"]
    info["model_pt"] = describe_model_pt(folder / "model.pt")
    info["adata_h5ad"] = describe_h5ad(folder / "adata.h5ad")
    with open(folder / "reference.json", "w") as f:
        json.dump(info, f, indent=1, sort_keys=False)
        f.write("\n")
    return folder


def minify_and_reference(scvi, model):
    """Minify the model's AnnData with scvi-tools and compute its references.

    Parameters
    ----------
    scvi
        The imported ``scvi`` package.
    model
        A trained SCVI with an observed library.

    Returns
    -------
    tuple
        Arrays, their descriptions and a description of the minification.
    """
    import torch

    with torch.no_grad():
        qzm, qzv = model.get_latent_representation(give_mean=True, return_dist=True)
        full_mean = np.asarray(model.get_latent_representation(give_mean=True))
    model.adata.obsm["X_latent_qzm"] = qzm
    model.adata.obsm["X_latent_qzv"] = qzv
    obs_before = set(model.adata.obs)
    obsm_before = set(model.adata.obsm)
    uns_before = set(model.adata.uns)
    model.minify_adata()  # default minified_data_type "latent_posterior_parameters"
    adata = model.adata
    with torch.no_grad():
        latent = np.asarray(model.get_latent_representation(give_mean=True), dtype=np.float32)
    np.testing.assert_allclose(latent, full_mean, rtol=1e-6, atol=1e-6)
    arrays = {
        "latent_mean": latent,
        "latent_var": np.asarray(qzv, dtype=np.float32),
        "observed_lib_size": np.asarray(adata.obs[model._OBSERVED_LIB_SIZE_KEY], dtype=np.float32),
    }
    doc = {
        "latent_mean": (
            "model.get_latent_representation(give_mean=True) after minify_adata(); equals the "
            "full-data value (which is obsm['X_latent_qzm'] = obsm['scvi_latent_qzm'])"
        ),
        "latent_var": "get_latent_representation(return_dist=True)[1] before minifying",
        "observed_lib_size": "obs['observed_lib_size'] = sum of counts, cells",
    }
    minify = {
        "api": (
            "adata.obsm['X_latent_qzm'], adata.obsm['X_latent_qzv'] = "
            "model.get_latent_representation(give_mean=True, return_dist=True); "
            "model.minify_adata()  (SCVI method from BaseMinifiedModeModelClass; the same "
            "signature in 1.4.2 and 1.5.1: minified_data_type='latent_posterior_parameters', "
            "use_latent_qzm_key='X_latent_qzm', use_latent_qzv_key='X_latent_qzv')"
        ),
        "minified_data_type": str(model.minified_data_type),
        "model_class_constants": {
            "_LATENT_QZM_KEY": model._LATENT_QZM_KEY,
            "_LATENT_QZV_KEY": model._LATENT_QZV_KEY,
            "_OBSERVED_LIB_SIZE_KEY": model._OBSERVED_LIB_SIZE_KEY,
        },
        "obs_keys_added": sorted(set(adata.obs) - obs_before),
        "obsm_keys_added": sorted(set(adata.obsm) - obsm_before),
        "uns_keys_added": sorted(set(adata.uns) - uns_before),
        "uns_keys_removed": sorted(uns_before - set(adata.uns)),
        "obsm_keys": sorted(adata.obsm),
        "obs_keys": sorted(adata.obs),
        "uns_keys": sorted(adata.uns),
        "X_nnz_after": int(adata.X.nnz) if hasattr(adata.X, "nnz") else None,
        "registry_fields_after": sorted(model.adata_manager.data_registry),
    }
    return arrays, doc, minify


# --------------------------------------------------------------------------------------------
# comparing the versions
# --------------------------------------------------------------------------------------------
def _paths(obj, prefix=""):
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}/{k}"
            out.add(p)
            out |= _paths(v, p)
    return out


def compare_versions(root):
    """Write into each ``reference.json`` how its layout differs from the other version's.

    Parameters
    ----------
    root
        ``tests/data/scvi_tools``.
    """
    versions = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0].isdigit())
    if len(versions) != 2:
        raise SystemExit(f"expected two version folders under {root}, found {versions}")
    for name in MODELS:
        refs = {}
        for v in versions:
            with open(root / v / name / "reference.json") as f:
                refs[v] = json.load(f)
        for v in versions:
            other = next(o for o in versions if o != v)
            mine, theirs = refs[v], refs[other]
            m, t = mine["model_pt"], theirs["model_pt"]
            diff = {}
            sd_m, sd_t = m["state_dict"], t["state_dict"]
            diff["state_dict_keys_only_here"] = sorted(set(sd_m) - set(sd_t))
            diff["state_dict_keys_only_there"] = sorted(set(sd_t) - set(sd_m))
            diff["state_dict_shape_changes"] = sorted(
                k for k in set(sd_m) & set(sd_t) if sd_m[k] != sd_t[k]
            )
            for key in ("attr_dict_types", "init_params_", "registry_"):
                pm, pt = _paths(m[key]), _paths(t[key])
                diff[f"{key}_paths_only_here"] = sorted(pm - pt)
                diff[f"{key}_paths_only_there"] = sorted(pt - pm)
            diff["attr_dict_type_changes"] = sorted(
                k
                for k in set(m["attr_dict_types"]) & set(t["attr_dict_types"])
                if m["attr_dict_types"][k] != t["attr_dict_types"][k]
            )
            diff["pickle_globals_only_here"] = sorted(
                set(m["pickle_globals"]) - set(t["pickle_globals"])
            )
            diff["pickle_globals_only_there"] = sorted(
                set(t["pickle_globals"]) - set(m["pickle_globals"])
            )
            ha, hb = mine["adata_h5ad"], theirs["adata_h5ad"]
            for key in ("obs", "var", "obsm", "uns", "layers"):
                diff[f"h5ad_{key}_only_here"] = sorted(set(ha[key]) - set(hb[key]))
                diff[f"h5ad_{key}_only_there"] = sorted(set(hb[key]) - set(ha[key]))
            diff = {k: v for k, v in diff.items() if v}
            mine["layout_differences"] = {
                "compared_with": other,
                "here": v,
                "differences": diff or "none found in key names, shapes and types",
            }
        for v in versions:
            with open(root / v / name / "reference.json", "w") as f:
                json.dump(refs[v], f, indent=1)
                f.write("\n")
            print(v, name, json.dumps(refs[v]["layout_differences"]["differences"])[:2000])


def main(argv=None):
    """Write the fixtures of the running scvi-tools version, or compare two versions.

    Parameters
    ----------
    argv
        Command-line arguments (``--compare``, ``--only NAME``...).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        action="store_true",
        help="compare the two version folders (needs no scvi-tools)",
    )
    parser.add_argument("--only", nargs="*", choices=MODELS, help="fixtures to write")
    parser.add_argument("--out", type=Path, default=HERE, help="root folder")
    args = parser.parse_args(argv)
    if args.compare:
        compare_versions(args.out)
        return
    import scvi
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    base = make_counts()
    out_root = args.out / scvi.__version__
    out_root.mkdir(parents=True, exist_ok=True)
    specs = model_specs(scvi)
    for name in args.only or MODELS:
        folder = write_fixture(scvi, name, specs[name], base, out_root)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{folder.relative_to(args.out)}: {size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
