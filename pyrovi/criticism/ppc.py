"""Posterior predictive checks (PPC) of count models, as reported on scvi-hub model cards.

:class:`PosteriorPredictiveCheck` (part of :mod:`pyrovi.criticism`) draws counts from each
model's posterior predictive distribution for the observed cells and compares summary
statistics of the draws with the same statistics of the observed counts:

- coefficient of variation of each cell (across features) or of each feature (across cells);
- fraction of zeros per feature;
- calibration of central posterior predictive intervals;
- agreement of a Wilcoxon rank-sum differential expression analysis (each group of cells
  against the rest) run on the observed counts and on generated counts.

It is pyrovi's own implementation of the checks of ``scvi.criticism.PosteriorPredictiveCheck``
(scvi-tools) with the same metric names; where a definition differs, the method's docstring
says how and why. The statistics (rank-sum test, Benjamini–Hochberg correction, ROC AUC,
average precision, sparse-aware, no scanpy or scikit-learn at run time) are in
:mod:`pyrovi.criticism.stats`; the models are reached through
:class:`~pyrovi.criticism.TrainedModel` (:mod:`pyrovi.criticism.predictive`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
from tqdm.auto import tqdm

from pyrovi.criticism.de_agreement import de_agreement
from pyrovi.criticism.interface import TrainedModel, check_trained_model
from pyrovi.criticism.predictive import (
    BLOCK_ELEMENTS,
    check_modality,
    draw_datasets,
    observed_counts,
)
from pyrovi.criticism.stats import (
    Matrix,
    _as_matrix,
    _coefficient_of_variation,
    _interval_quantiles,
    _stats_pair,
    _zero_fraction,
)
from pyrovi.data.indices import cell_positions
from pyrovi.data.multimodal import is_mudata

logger = logging.getLogger(__name__)

RAW = "Raw"
METRIC_CV_CELL = "cv_cell"
METRIC_CV_GENE = "cv_gene"
METRIC_ZERO_FRACTION = "zero_fraction"
METRIC_CALIBRATION = "calibration"
METRIC_DIFF_EXP = "diff_exp"

#: Quantile levels of scvi-tools' default intervals: central 95%, 90%, ..., 65% intervals.
DEFAULT_INTERVAL_LEVELS: tuple[float, ...] = (
    0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975,
)

Dims = Literal["cells", "features"]



class PosteriorPredictiveCheck:
    """Posterior predictive checks comparing count models with the observed counts.

    On construction, ``n_samples`` posterior predictive datasets are drawn from every model
    for the chosen cells (through the model's public ``posterior_predictive_sample``, in
    chunks of cells) and stored one matrix per sample: as scipy CSR matrices when the
    observed counts are sparse — never a dense cells × features × samples array — and as
    dense float32 arrays otherwise. Metrics are then computed with the methods below and
    stored in :attr:`metrics` under scvi-tools' keys (``"cv_cell"``, ``"cv_gene"``,
    ``"zero_fraction"``, ``"calibration"``, ``"diff_exp"``).

    Parameters
    ----------
    adata
        AnnData (or, for TOTALVI, the MuData it was set up with) holding the observed
        counts of the cells to check.
    models_dict
        ``{name: model}``: trained pyrovi models (SCVI, LDVAE, TOTALVI, ...) with the same
        features as ``adata``. ``"Raw"`` is reserved for the observed counts.
    n_samples
        Posterior predictive datasets drawn per model.
    indices
        Cells of ``adata`` to check (positions or a boolean mask), e.g. a model's
        ``train_indices`` or ``validation_indices``; default all.
    modality
        ``"rna"`` (default) checks genes; another modality the models' data fields declare
        (``model.registry.fields``, e.g. TOTALVI's second one) checks its counts instead: of
        the columns of ``posterior_predictive_sample``, those of that modality are kept.
    count_layer_key
        Where the observed counts are (an ``adata.layers`` key for RNA, the ``adata.obsm``
        key of another modality); default the models' registered field.
    batch_size
        Cells per call to ``posterior_predictive_sample`` (default: as many as fit in
        ``2**24`` values of a cells × features × samples block).
    seed
        Seed for the draws (``pyro.set_rng_seed``); ``None`` leaves the RNG as it is.
    progress_bar
        Show tqdm bars (sampling, calibration, differential expression).

    Attributes
    ----------
    raw_counts
        Observed counts of the checked cells (CSR or dense float32).
    samples
        ``{model name: [cells × features matrix per sample]}``.
    obs
        ``adata.obs`` of the checked cells.
    var_names
        Feature names (genes, or those of the checked modality).
    metrics
        Computed metrics.

    Examples
    --------
    >>> ppc = PosteriorPredictiveCheck(adata, {"nb": model_nb, "poisson": model_poisson},
    ...                                n_samples=10, indices=model_nb.validation_indices)
    ... # doctest: +SKIP
    >>> ppc.coefficient_of_variation("features")  # cell-wise CV  # doctest: +SKIP
    >>> ppc.summary("cv_cell")  # doctest: +SKIP
    >>> ppc.differential_expression(de_groupby="cell_type")  # doctest: +SKIP
    """

    def __init__(
        self,
        adata,
        models_dict: Mapping[str, TrainedModel],
        *,
        n_samples: int = 10,
        indices: Sequence[int] | np.ndarray | None = None,
        modality: str | None = None,
        count_layer_key: str | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
    ):
        if not isinstance(models_dict, Mapping) or not models_dict:
            raise ValueError("models_dict must be a non-empty {name: model} mapping.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        names = [str(name) for name in models_dict]
        if RAW in names:
            raise ValueError(f"{RAW!r} is reserved for the observed counts; rename that model.")
        models = {name: check_trained_model(model, f"Model {name!r}")
                  for name, model in zip(names, models_dict.values(), strict=True)}
        first = next(iter(models.values()))
        flat = first.as_anndata(adata) if is_mudata(adata) else adata
        if is_mudata(flat):
            raise ValueError("MuData input is supported for TOTALVI models set up with "
                             "setup_mudata; pass the AnnData of the modality otherwise.")
        modality = check_modality(modality, models)
        positions = cell_positions(indices, flat.n_obs)
        raw, var_names, columns = observed_counts(flat, models, modality,
                                                  count_layer_key)
        raw = raw[positions]
        sparse = sp.issparse(raw)
        raw = _as_matrix(raw, sparse, raw.shape, "The observed counts")
        self.models = models
        self.modality = modality
        self.count_layer_key = count_layer_key
        self.indices = positions
        self.progress_bar = progress_bar
        if seed is not None:
            pyro.set_rng_seed(seed)
        samples = {
            name: draw_datasets(name, model, adata, flat, positions, columns[name], n_samples,
                                sparse, batch_size, progress_bar)
            for name, model in models.items()
        }
        self._set_data(raw, samples, flat.obs.iloc[positions].copy(), var_names)

    def _set_data(self, raw: Matrix, samples: dict[str, list[Matrix]], obs: pd.DataFrame,
                  var_names: pd.Index) -> None:
        self.raw_counts = raw
        self.samples = samples
        self.obs = obs
        self.var_names = pd.Index(var_names)
        self.n_samples = len(next(iter(samples.values())))
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_samples(
        cls,
        raw_counts,
        samples: Mapping[str, Sequence | np.ndarray],
        *,
        obs: pd.DataFrame | None = None,
        var_names: Sequence[str] | None = None,
        progress_bar: bool = False,
    ) -> PosteriorPredictiveCheck:
        """A check from precomputed posterior predictive samples (no model needed).

        Parameters
        ----------
        raw_counts
            Observed cells × features counts (dense or scipy sparse). Sparse input keeps
            every sample sparse (CSR); dense input keeps them dense.
        samples
            ``{model name: samples}``: a list of cells × features matrices, or a cells ×
            features × samples array (what ``posterior_predictive_sample`` returns), the
            same number of samples for every model.
        obs
            Cell annotations (one row per cell; needed by :meth:`differential_expression`).
        var_names
            Feature names (default ``"0", "1", ...``).
        progress_bar
            Show tqdm bars.

        Returns
        -------
        PosteriorPredictiveCheck

        Examples
        --------
        >>> ppc = PosteriorPredictiveCheck.from_samples(counts, {"m": draws},
        ...                                             obs=adata.obs)  # doctest: +SKIP
        >>> ppc.zero_fraction()  # doctest: +SKIP
        """
        if not isinstance(samples, Mapping) or not samples:
            raise ValueError("samples must be a non-empty {name: samples} mapping.")
        sparse = sp.issparse(raw_counts)
        if not sparse:
            raw_counts = np.asarray(raw_counts)
        if raw_counts.ndim != 2:
            raise ValueError(f"raw_counts must be cells × features, got {raw_counts.shape}.")
        shape = tuple(raw_counts.shape)
        raw = _as_matrix(raw_counts, sparse, shape, "raw_counts")
        stored: dict[str, list[Matrix]] = {}
        for name, values in samples.items():
            if str(name) == RAW:
                raise ValueError(f"{RAW!r} is reserved for the observed counts.")
            if isinstance(values, np.ndarray):
                if values.ndim == 2:
                    values = [values]
                elif values.ndim == 3:
                    values = [values[:, :, s] for s in range(values.shape[2])]
                else:
                    raise ValueError(f"Samples of {name!r} must be 2-d or 3-d, got {values.ndim}.")
            stored[str(name)] = [_as_matrix(v, sparse, shape, f"A sample of {name!r}")
                                 for v in values]
        lengths = {len(v) for v in stored.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"Every model needs the same, positive number of samples; got "
                             f"{ {k: len(v) for k, v in stored.items()} }.")
        if obs is None:
            obs = pd.DataFrame(index=pd.Index([str(i) for i in range(shape[0])]))
        elif len(obs) != shape[0]:
            raise ValueError(f"obs has {len(obs)} rows for {shape[0]} cells.")
        if var_names is None:
            var_names = [str(i) for i in range(shape[1])]
        elif len(var_names) != shape[1]:
            raise ValueError(f"{len(var_names)} var_names for {shape[1]} features.")
        check = cls.__new__(cls)
        check.models = {}
        check.modality = None
        check.count_layer_key = None
        check.indices = np.arange(shape[0])
        check.progress_bar = progress_bar
        check._set_data(raw, stored, obs.copy(), pd.Index(var_names))
        return check

    def __repr__(self) -> str:
        kind = "sparse (CSR)" if sp.issparse(self.raw_counts) else "dense"
        return (f"PosteriorPredictiveCheck({self.raw_counts.shape[0]} cells × "
                f"{self.raw_counts.shape[1]} features, {kind}; models {list(self.samples)}; "
                f"{self.n_samples} samples; metrics {list(self.metrics)})")

    @property
    def model_names(self) -> list[str]:
        """Names of the checked models."""
        return list(self.samples)

    # -- metrics ----------------------------------------------------------------------

    def coefficient_of_variation(self, dim: Dims = "cells") -> pd.DataFrame:
        """Coefficient of variation (CV) of each cell or each feature, per model and raw.

        ``dim`` is the dimension the CV is computed **over**, as in scvi-tools:
        ``dim="features"`` gives one CV per cell (its values across features), stored as
        ``metrics["cv_cell"]``; ``dim="cells"`` gives one CV per feature (across cells),
        stored as ``metrics["cv_gene"]``.

        For each generated sample, ``CV = std / mean`` with the population standard
        deviation (ddof 0); the model's value is the mean over samples of the per-sample
        CVs, skipping samples where the cell/feature is all zero (CV undefined), as
        scvi-tools. The raw value is the CV of the observed counts, 0 when all zero (as
        scvi-tools). Differs from scvi-tools: a model value undefined in every sample is 0
        too (scvi-tools leaves NaN), so raw and model columns treat all-zero rows alike.

        Works on the stored matrices (sparse stays sparse).

        Parameters
        ----------
        dim
            ``"features"`` (cell-wise CV) or ``"cells"`` (feature-wise CV).

        Returns
        -------
        pandas.DataFrame
            Indexed by cell (``cv_cell``) or feature (``cv_gene``); one column per model and
            ``"Raw"``.

        Examples
        --------
        >>> ppc.coefficient_of_variation("features")  # doctest: +SKIP
        >>> ppc.metrics["cv_cell"].head()  # doctest: +SKIP
        """
        if dim not in ("cells", "features"):
            raise ValueError(f"dim must be 'cells' or 'features', got {dim!r}.")
        axis = 1 if dim == "features" else 0
        key = METRIC_CV_CELL if dim == "features" else METRIC_CV_GENE
        index = (pd.Index(self.obs.index, name="cells") if axis == 1
                 else pd.Index(self.var_names, name="features"))
        columns = {}
        for name, samples in self.samples.items():
            per_sample = np.stack([_coefficient_of_variation(s, axis) for s in samples])
            defined = np.isfinite(per_sample)
            total = np.where(defined, per_sample, 0.0).sum(0)
            count = defined.sum(0)
            columns[name] = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        columns[RAW] = np.nan_to_num(_coefficient_of_variation(self.raw_counts, axis))
        frame = pd.DataFrame(columns, index=index)
        self.metrics[key] = frame
        return frame

    def zero_fraction(self) -> pd.DataFrame:
        """Fraction of zero counts of every feature, per model (mean over samples) and raw.

        Differs from scvi-tools, whose ``zero_fraction`` computes the fraction of
        **non-zero** counts under this name; here it is the fraction of zeros, as named
        (one minus scvi-tools' values). The overall fraction of zeros is the mean of a
        column.

        Returns
        -------
        pandas.DataFrame
            Indexed by feature, one column per model and ``"Raw"``; stored as
            ``metrics["zero_fraction"]``.

        Examples
        --------
        >>> ppc.zero_fraction().mean()  # overall fraction of zeros  # doctest: +SKIP
        """
        columns = {name: np.mean([_zero_fraction(s) for s in samples], axis=0)
                   for name, samples in self.samples.items()}
        columns[RAW] = _zero_fraction(self.raw_counts)
        frame = pd.DataFrame(columns, index=pd.Index(self.var_names, name="features"))
        self.metrics[METRIC_ZERO_FRACTION] = frame
        return frame

    def calibration_error(
        self, confidence_intervals: Sequence[float] | None = None
    ) -> pd.DataFrame:
        """Calibration error of central posterior predictive intervals (lower is better).

        The quantile levels ``q_1 < ... < q_2K`` pair up from the outside in into central
        intervals ``[q_i, q_{2K+1−i}]`` of nominal level ``q_{2K+1−i} − q_i``. For every
        observed count (cell, feature), the interval's bounds are quantiles of that entry's
        ``n_samples`` generated values (linear interpolation, numpy's default, as xarray in
        scvi-tools); coverage is the fraction of entries with
        ``lower <= observed <= upper``, and the error is
        ``Σ_intervals (coverage − nominal)²``. Same definition as scvi-tools, computed for
        every model (scvi-tools' code always reads the model named ``"model1"``).

        This needs every entry's sample distribution: it builds dense cells × features ×
        samples blocks of at most ``2**24`` values, chunk by chunk over cells, so memory
        stays bounded for large sparse data.

        Parameters
        ----------
        confidence_intervals
            Increasing quantile levels in [0, 1], an even number of them; default
            scvi-tools' ``0.025, 0.05, ..., 0.175, 0.825, ..., 0.975`` (95% ... 65%).

        Returns
        -------
        pandas.DataFrame
            Indexed by model: ``calibration_error`` and ``coverage_<nominal>`` per interval;
            stored as ``metrics["calibration"]``.

        Examples
        --------
        >>> ppc.calibration_error()["calibration_error"]  # doctest: +SKIP
        """
        levels = np.asarray(DEFAULT_INTERVAL_LEVELS if confidence_intervals is None
                            else confidence_intervals, dtype=np.float64)
        if levels.ndim != 1 or levels.size == 0 or levels.size % 2:
            raise ValueError("confidence_intervals needs an even number of quantile levels "
                             "(lower and upper bound of each central interval).")
        if (levels < 0).any() or (levels > 1).any() or (np.diff(levels) < 0).any():
            raise ValueError("confidence_intervals must be increasing levels in [0, 1].")
        n_intervals = levels.size // 2
        nominal = levels[::-1][:n_intervals] - levels[:n_intervals]
        n_cells, n_features = self.raw_counts.shape
        rows = max(1, BLOCK_ELEMENTS // max(1, n_features * self.n_samples))
        sparse = sp.issparse(self.raw_counts)
        records = {}
        for name, samples in self.samples.items():
            covered = np.zeros(n_intervals)
            starts = range(0, n_cells, rows)
            for start in tqdm(starts, desc=f"Calibration {name}", disable=not self.progress_bar):
                stop = min(start + rows, n_cells)
                block = np.stack([s[start:stop].toarray() if sparse else s[start:stop]
                                  for s in samples], axis=-1)
                raw = self.raw_counts[start:stop]
                raw = raw.toarray() if sparse else raw
                quantiles = _interval_quantiles(block, levels)
                for i in range(n_intervals):
                    inside = (raw >= quantiles[i]) & (raw <= quantiles[-1 - i])
                    covered[i] += np.count_nonzero(inside)
            coverage = covered / max(n_cells * n_features, 1)
            record = {"calibration_error": float(np.sum((coverage - nominal) ** 2))}
            record.update({f"coverage_{w:.3g}": c for w, c in zip(nominal, coverage,
                                                                   strict=True)})
            records[name] = record
        frame = pd.DataFrame.from_dict(records, orient="index")
        frame.index.name = "model"
        self.metrics[METRIC_CALIBRATION] = frame
        return frame

    def differential_expression(
        self,
        de_groupby: str,
        *,
        p_val_thresh: float = 0.001,
        n_top_genes_fallback: int = 100,
        cell_scale_factor: float = 1e4,
        n_samples: int = 1,
        groups: Sequence[str] | None = None,
        min_cells_per_group: int = 3,
        tie_correct: bool = True,
    ) -> pd.DataFrame:
        """Agreement of one-vs-rest differential expression on raw and generated counts.

        For every group ``g`` of ``obs[de_groupby]``: a Wilcoxon rank-sum test of the cells
        of ``g`` against all other labelled cells on ``log1p`` of counts scaled to
        ``cell_scale_factor`` per cell (:func:`log_normalize`, :func:`wilcoxon_rank_sum`,
        tie-corrected), Benjamini–Hochberg over features, log2 fold changes as scanpy
        (``log2((expm1(mean_g) + 1e-9) / (expm1(mean_rest) + 1e-9))``) — on the observed
        counts and on each of the first ``n_samples`` generated samples of every model.
        Per group and model (averaged over the samples):

        - ``gene_f1``: F1 score of the model's DE features against the raw data's. DE
          features: adjusted p < ``p_val_thresh``. When that gives the raw data no DE
          feature or more than half of the features (an uninformative set), both sets are
          instead the ``n_top_genes_fallback`` features with the largest ``|z|`` (then
          ``fallback`` is True for that row).
        - ``lfc_mae``, ``lfc_pearson``, ``lfc_spearman``: mean absolute difference and
          correlations of the model's log fold changes with the raw ones, all features.
        - ``roc_auc``, ``pr_auc``: ROC AUC and average precision of the model's ``|z|``
          as a predictor of the raw DE set (the same set as for ``gene_f1``).
        - ``n_cells``: cells in the group; ``n_de_raw``: raw DE features (p threshold).

        Differences from scvi-tools (``de_method="t-test"`` through scanpy; this is always
        the rank-sum test, without scanpy): scvi-tools' ``gene_f1`` always compares the top
        ``n_top_genes_fallback`` features, ranked by signed score (up-regulated only); here
        the thresholded sets are compared, as the ROC truth. ROC/PR use ``|z|`` (scvi-tools:
        the signed score against a two-sided truth, which penalises down-regulated features
        found by the model). ``n_top_genes_fallback`` is capped at 10% of the features as in
        scvi-tools. ``de_groupby`` is required (scvi-tools clusters with Leiden when
        ``None``). Cells without a label are left out of every test.

        Parameters
        ----------
        de_groupby
            ``obs`` column with the groups (e.g. cell types).
        p_val_thresh
            Adjusted p-value threshold of a DE call (scvi-hub model cards use 0.2).
        n_top_genes_fallback
            Size of the top-``|z|`` sets used when the threshold gives no usable raw set.
        cell_scale_factor
            Per-cell total after normalization.
        n_samples
            Generated samples per model to test (at most the stored ``n_samples``).
        groups
            Groups to report (default: every group with at least ``min_cells_per_group``
            cells; smaller ones are skipped with a warning). Every cell labelled with any
            group still takes part in the "rest".
        min_cells_per_group
            Fewest cells in a reported group and in its rest.
        tie_correct
            Tie correction of the rank-sum variance.

        Returns
        -------
        pandas.DataFrame
            One row per group and model: ``group``, ``model``, ``gene_f1``, ``lfc_mae``,
            ``lfc_pearson``, ``lfc_spearman``, ``roc_auc``, ``pr_auc``, ``n_cells``,
            ``n_de_raw``, ``fallback``. Stored with the per-group log fold changes and raw
            test results in ``metrics["diff_exp"]`` (``"summary"``,
            ``"lfc_per_model_per_group"`` ``{model: {group: DataFrame(raw, approx)}}``,
            ``"raw"`` ``{group: DataFrame}``).

        Raises
        ------
        KeyError
            ``de_groupby`` is not an ``obs`` column, or ``groups`` names an unknown group.
        ValueError
            Fewer than two groups, a requested group (or its rest) smaller than
            ``min_cells_per_group``, or no group large enough.

        Examples
        --------
        >>> ppc.differential_expression(de_groupby="cell_type", p_val_thresh=0.2)
        ... # doctest: +SKIP
        """
        if de_groupby not in self.obs.columns:
            raise KeyError(f"de_groupby={de_groupby!r} is not a column of adata.obs "
                           f"(columns: {list(self.obs.columns)}).")
        if n_samples < 1 or n_samples > self.n_samples:
            raise ValueError(f"n_samples={n_samples} must be between 1 and the "
                             f"{self.n_samples} samples stored.")
        result = de_agreement(
            self.raw_counts, self.samples, self.obs, self.var_names, de_groupby,
            p_val_thresh=p_val_thresh, n_top_genes_fallback=n_top_genes_fallback,
            cell_scale_factor=cell_scale_factor, n_samples=n_samples, groups=groups,
            min_cells_per_group=min_cells_per_group, tie_correct=tie_correct,
            progress_bar=self.progress_bar)
        self.metrics[METRIC_DIFF_EXP] = result
        return result["summary"]

    def summary(
        self, metric: str = METRIC_CV_CELL, indices: Sequence[int] | np.ndarray | None = None
    ) -> pd.DataFrame:
        """Tidy comparison of each model with the raw data for one metric.

        For ``"cv_cell"``, ``"cv_gene"`` and ``"zero_fraction"`` (computed first if needed),
        each model's column ``m`` is compared with the ``"Raw"`` column ``r``:
        ``mean_absolute_error`` ``mean |m − r|``, ``pearson`` and ``spearman`` correlations,
        and ``r2`` as on scvi-hub model cards, which call scikit-learn's
        ``r2_score(model_values, raw_values)``: ``R² = 1 − Σ (r − m)² / Σ (m − mean m)²``,
        i.e. the model's values in the role of the reference (not the usual "raw as truth"
        R²; kept so that pyrovi's cards read like scvi-hub's; NaN when the model's values
        are constant, as are correlations with a constant column). ``n``: values compared
        (pairs with a NaN are dropped). For ``"calibration"`` and ``"diff_exp"`` the stored
        table is returned.

        Parameters
        ----------
        metric
            ``"cv_cell"``, ``"cv_gene"``, ``"zero_fraction"``, ``"calibration"`` or
            ``"diff_exp"``.
        indices
            For ``"cv_cell"`` only: positions among the checked cells to summarise (e.g. a
            model's ``train_indices`` when the check covers every cell), as model cards
            split training and validation cells.

        Returns
        -------
        pandas.DataFrame
            Indexed by model.

        Examples
        --------
        >>> ppc.summary("cv_gene")  # doctest: +SKIP
        """
        computed = {
            METRIC_CV_CELL: lambda: self.coefficient_of_variation("features"),
            METRIC_CV_GENE: lambda: self.coefficient_of_variation("cells"),
            METRIC_ZERO_FRACTION: self.zero_fraction,
            METRIC_CALIBRATION: self.calibration_error,
        }
        if metric == METRIC_DIFF_EXP:
            if metric not in self.metrics:
                raise KeyError("Run differential_expression(de_groupby=...) first.")
            return self.metrics[metric]["summary"]
        if metric not in computed:
            raise ValueError(f"metric must be one of {[*computed, METRIC_DIFF_EXP]}, got "
                             f"{metric!r}.")
        frame = self.metrics[metric] if metric in self.metrics else computed[metric]()
        if metric == METRIC_CALIBRATION:
            return frame
        if indices is not None:
            if metric != METRIC_CV_CELL:
                raise ValueError("indices selects cells: only for metric='cv_cell'.")
            frame = frame.iloc[cell_positions(indices, len(frame))]
        raw = frame[RAW].to_numpy(dtype=np.float64)
        table = pd.DataFrame.from_dict(
            {name: _stats_pair(frame[name].to_numpy(dtype=np.float64), raw)
             for name in self.samples}, orient="index")
        table.index.name = "model"
        return table
