"""Labels of which some are unknown: the field of semi-supervised models, and which labelled
cells carry the classification loss in an epoch.

:class:`LabelsWithUnlabeledField` reads ``adata.obs[labels_key]`` where one value (the
``unlabeled_category``, e.g. ``"Unknown"``) marks cells whose label is to be inferred. The
known labels get codes ``0 .. K-1`` and the unlabelled category the last code ``K``, as in
scvi-tools; it replaces the plain :class:`~pyrovi.data.fields.LabelsField` in a registry
that records an unlabelled category.

:class:`LabelledEpochs` wraps a model's training data: at the start of every epoch it picks
the labelled training cells that enter the classification loss (all of them, or at most
``n_samples_per_label`` of each label) and hands each minibatch their weights as the field
``classification_weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from pyrovi.data.fields import LabelsField, SetupError, categories_of, category_codes
from pyrovi.data.tensors import CellData, Minibatch

logger = logging.getLogger(__name__)

#: Minibatch keyword of the per-cell weight of the classification loss.
CLASSIFICATION_WEIGHT_FIELD = "classification_weight"

#: Values that usually mark unlabelled cells: a spelling of one of them in the column, when
#: the given ``unlabeled_category`` is absent, is taken for a typo (see ``register``).
_UNLABELLED_SPELLINGS = ("unknown", "unlabeled", "unlabelled", "unassigned", "nan", "none",
                         "na", "n/a", "")


class LabelsWithUnlabeledField(LabelsField):
    """Label codes with an unlabelled category (minibatch ``labels``).

    Parameters
    ----------
    obs_key
        ``obs`` column with the labels.
    unlabeled_category
        The value of that column marking unlabelled cells.
    categories
        Category order (known labels, then the unlabelled category), once registered.

    Notes
    -----
    On new data (outputs, a query) the column is optional: without it every cell is
    unlabelled. Where it is present, its values must be labels the model knows or the
    unlabelled category.
    """

    registry_keys = {"unlabeled_category": None}
    derived = {
        "n_known_labels": lambda registry: (
            registry.n_labels - 1 if registry.unlabeled_category is not None
            else registry.n_labels),
    }

    def __init__(self, obs_key: str, unlabeled_category, categories: Sequence[str] | None = None):
        super().__init__(obs_key, categories)
        self.unlabeled_category = str(unlabeled_category)

    def _column(self, adata, what: str) -> pd.Series:
        """``adata.obs[obs_key]`` as strings, refusing missing values with the fix."""
        column = adata.obs[self.obs_key]
        if column.isna().any():
            fix = (f"{what}.obs[{self.obs_key!r}] = {what}.obs[{self.obs_key!r}].astype(object)"
                   f".fillna({self.unlabeled_category!r})")
            raise SetupError(
                f"{what}.obs[{self.obs_key!r}] has {int(column.isna().sum())} missing "
                f"value(s). Mark cells without a label with the unlabeled_category "
                f"{self.unlabeled_category!r} instead, e.g. {fix}.")
        return column.astype(str)

    def register(self, adata, registry) -> None:
        if self.obs_key not in adata.obs.columns:
            raise SetupError(f"labels_key={self.obs_key!r} is not a column of adata.obs. "
                             f"Available columns: {list(adata.obs.columns)}.")
        column = self._column(adata, "adata")
        present = categories_of(adata.obs[self.obs_key])
        if self.unlabeled_category not in present:
            lookalikes = [c for c in present if c.strip().lower() in _UNLABELLED_SPELLINGS
                          or c.strip().lower() == self.unlabeled_category.strip().lower()]
            if lookalikes:
                raise SetupError(
                    f"unlabeled_category={self.unlabeled_category!r} is not a value of "
                    f"adata.obs[{self.obs_key!r}], which has {lookalikes}: pass the value "
                    f"that marks its unlabelled cells (e.g. unlabeled_category="
                    f"{lookalikes[0]!r}); otherwise those cells would be taken for a cell "
                    "type of their own.")
            # A fully labelled reference (the query's cells being the unlabelled ones).
            logger.info("No cell of adata.obs[%r] is %r: every cell is labelled.",
                        self.obs_key, self.unlabeled_category)
        known = [c for c in present if c != self.unlabeled_category]
        if not known:
            raise SetupError(
                f"Every cell of adata.obs[{self.obs_key!r}] is {self.unlabeled_category!r}: "
                "a semi-supervised model learns the labels from labelled cells; label some "
                "cells (a few per cell type suffice).")
        counts = column.value_counts()
        logger.info("%d labelled cells of %d labels, %d unlabelled.",
                    int(counts.drop(self.unlabeled_category, errors="ignore").sum()),
                    len(known), int(counts.get(self.unlabeled_category, 0)))
        registry.labels_key = self.obs_key
        registry.label_categories = known + [self.unlabeled_category]
        registry.unlabeled_category = self.unlabeled_category

    def _check_known(self, adata, what: str) -> None:
        if self.obs_key not in adata.obs.columns:
            return
        column = self._column(adata, what)
        unseen = sorted(set(column) - set(self.categories))
        if unseen:
            raise SetupError(
                f"{what}.obs[{self.obs_key!r}] has labels the model was not trained on: "
                f"{unseen[:10]} (it knows {list(self.categories[:-1])[:20]}). A model cannot "
                f"learn new labels from unlabelled data: set those cells to the "
                f"unlabeled_category {self.unlabeled_category!r} to have them predicted.")

    def check(self, adata, registry) -> None:
        self._check_known(adata, "adata")

    def check_query(self, query, registry) -> None:
        self._check_known(query, "query_adata")

    def cell_array(self, adata):
        unlabelled = len(self.categories) - 1
        if self.obs_key not in adata.obs.columns:
            return np.full(adata.n_obs, unlabelled, dtype=np.int64)
        return category_codes(adata, self.obs_key, self.categories, "labels_key")

    def setup_arguments(self) -> dict:
        return {"unlabeled_category": self.unlabeled_category}

    @classmethod
    def from_registry(cls, registry) -> LabelsWithUnlabeledField | None:
        if registry.unlabeled_category is None:
            return None
        return cls(registry.labels_key, registry.unlabeled_category, registry.label_categories)

    @classmethod
    def read_record(cls, record: dict) -> dict:
        entries = super().read_record(record)
        if entries.get("unlabeled_category") is not None:
            entries["unlabeled_category"] = str(entries["unlabeled_category"])
        return entries


class LabelledEpochs(CellData):
    """Training data whose labelled cells carry the classification loss, chosen per epoch.

    Each call of :meth:`training_batches` (one per epoch) picks the labelled training cells
    of the epoch: every one, or up to ``n_samples_per_label`` of each label drawn anew
    (torch's generator, which ``train(seed=)`` seeds and checkpoints save). A chosen cell
    gets the weight ``classification_ratio · n_train / n_chosen``, the others 0: the loop
    scales a minibatch to the training set and divides by its size, so over an epoch the
    classification loss weighs ``classification_ratio`` times the mean over the chosen
    cells per step, as scvi-tools' ``classification_ratio`` does.

    Parameters
    ----------
    data
        The model's data (in memory or on disk).
    labels
        Label code of every cell of ``data``; ``unlabelled_code`` marks unlabelled cells.
    unlabelled_code
        The code of the unlabelled category.
    train_indices
        The training cells (positions in ``data``).
    n_samples_per_label
        Labelled cells of each label per epoch; ``None`` takes every labelled cell.
    classification_ratio
        Weight of the classification loss relative to the ELBO per cell.
    """

    def __init__(self, data: CellData, labels: np.ndarray, unlabelled_code: int,
                 train_indices: np.ndarray, n_samples_per_label: int | None,
                 classification_ratio: float):
        self.data = data
        labels = np.asarray(labels)
        train = np.asarray(train_indices, dtype=np.int64)
        by_label = {}
        for code in np.unique(labels[train]):
            if code != unlabelled_code:
                by_label[int(code)] = train[labels[train] == code]
        self.by_label = [torch.as_tensor(cells) for cells in by_label.values()]
        self.n_samples_per_label = n_samples_per_label
        self.classification_ratio = float(classification_ratio)
        self.n_train = len(train)
        self.weights = torch.zeros(data.n_obs, device=data.device)
        if not self.by_label:
            logger.info("No labelled training cell: the classifier learns from the ELBO only.")

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.data.n_obs

    @property
    def device(self) -> torch.device:
        """The device of the data."""
        return self.data.device

    def choose_labelled(self) -> torch.Tensor:
        """Pick this epoch's labelled cells and set their weights; return their positions."""
        chosen = []
        for cells in self.by_label:
            n = self.n_samples_per_label
            if n is None or len(cells) <= n:
                chosen.append(cells)
            else:
                chosen.append(cells[torch.randperm(len(cells))[:n]])
        chosen = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
        self.weights.zero_()
        if len(chosen):
            self.weights[chosen.to(self.device)] = (
                self.classification_ratio * self.n_train / len(chosen))
        return chosen

    def minibatch(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The wrapped data's minibatch plus the cells' classification weights."""
        batch = self.data.minibatch(index)
        batch[CLASSIFICATION_WEIGHT_FIELD] = self.weights.index_select(0, index)
        return batch

    def training_batches(self, train_index, batch_size: int,
                         generator: torch.Generator | None = None) -> Iterator[Minibatch]:
        """One epoch of the wrapped data's minibatches, after choosing its labelled cells."""
        self.choose_labelled()
        for index, batch in self.data.training_batches(train_index, batch_size, generator):
            batch[CLASSIFICATION_WEIGHT_FIELD] = self.weights.index_select(0, index)
            yield index, batch

    def __getattr__(self, name):
        # The wrapped data's other attributes (``informative``, the fields...).
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)
