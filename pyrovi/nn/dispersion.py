"""Inverse dispersion (theta) of negative-binomial likelihoods, shared or per group."""

from __future__ import annotations

import torch
from torch import nn

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")


class Dispersion(nn.Module):
    """Inverse dispersion ``theta > 0`` per feature, per feature and group, or per cell.

    Parameters
    ----------
    n_features
        Number of features (genes, or the features of another modality).
    mode
        ``"gene"`` (one theta per feature), ``"gene-batch"`` / ``"gene-label"`` (one per
        feature and batch / label), or ``"gene-cell"`` (predicted by the decoder per cell).
        Another modality names its features in place of ``gene`` (TotalVI's
        ``"peak-batch"``): the word before the dash is a name, the rest the grouping.
    n_batch, n_labels
        Number of groups for the grouped modes.
    log_theta_init
        Range of a uniform initialisation of ``log theta``; default: standard normal.

    Notes
    -----
    Like scvi-tools, theta is a point estimate (a parameter, not a latent variable), stored
    on the log scale and initialised from a standard normal unless ``log_theta_init`` says
    otherwise (TotalVI's mixture starts in ``[0, 2]``, as scvi-tools': a feature starting
    with a very small theta can settle in a single overdispersed component).
    """

    def __init__(self, n_features: int, mode: str = "gene", n_batch: int = 1, n_labels: int = 1,
                 log_theta_init: tuple[float, float] | None = None):
        super().__init__()
        feature, dash, grouping = mode.partition("-")
        canonical = "gene" + dash + grouping if feature.isidentifier() else mode
        if canonical not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {mode!r}.")
        self.mode = canonical
        n_groups = {"gene": 1, "gene-batch": n_batch, "gene-label": n_labels, "gene-cell": 0}
        self.log_theta = None
        if canonical != "gene-cell":
            shape = (n_groups[canonical], n_features)
            initial = (torch.randn(shape) if log_theta_init is None
                       else torch.empty(shape).uniform_(*log_theta_init))
            self.log_theta = nn.Parameter(initial)

    def forward(
        self,
        batch_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        theta_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Theta for a minibatch: shape ``(n_features,)`` for ``"gene"``, else per cell
        (``labels.shape + (n_features,)`` for ``"gene-label"``)."""
        if self.mode == "gene":
            return self.log_theta[0].exp()
        if self.mode == "gene-batch":
            return self.log_theta.index_select(0, batch_index).exp()
        if self.mode == "gene-label":
            # Labels of any shape (a latent label enumerated over its values, say).
            rows = self.log_theta.index_select(0, labels.reshape(-1))
            return rows.reshape(*labels.shape, -1).exp()
        if theta_logits is None:
            raise ValueError("dispersion='gene-cell' needs theta_logits from the decoder.")
        return theta_logits.exp()
