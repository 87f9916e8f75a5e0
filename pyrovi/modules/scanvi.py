"""scANVI as a Pyro model/guide pair (Xu et al. 2021, Molecular Systems Biology).

Generative process for cell n with batch s_n and covariates c_n (scVI's, with its latent
state z1_n given a cell type y_n and a second latent z2_n)::

    z2_n     ~ N(0, I)
    y_n      ~ Categorical(pi)                       (uniform, or the labelled frequencies)
    z1_n     ~ N(mu(z2_n, y_n), sigma²(z2_n, y_n))    (site "z": the cell's state, as in scVI)
    log l_n  ~ Normal(mu_{s_n}, sigma²_{s_n})         (or observed: log Σ_g x_ng)
    x_ng     ~ ZINB / NB / Poisson(l_n · rho_ng(z1_n, s_n, c_n), theta_g)

Amortized posterior::

    q(z1_n | x_n)         = scVI's encoder (the shared AmortizedEncoder)
    q(y_n | z1_n)         = Categorical(classifier(z1_n))
    q(z2_n | z1_n, y_n)   = N(g_loc(z1_n, y_n), g_scale(z1_n, y_n))

Labelled cells observe y_n; for an unlabelled cell the guide's y site is enumerated
(``infer={"enumerate": "parallel"}``) and ``TraceEnum_ELBO`` sums the ELBO over its K values
weighted by q(y | z1): the ELBO is exact in y, with no sampled label and no hand-written
loop over labels. Both kinds of cell share one minibatch and one site: a labelled cell's
q(y) is a point mass on its label, so the sum over y has a single term, the ELBO with y_n
observed. (``obs_mask`` would split the site instead, but its masked guide site would
weigh each of a labelled cell's K values by 1.) The classification loss of scANVI,
``-log q(y_n | E[z1_n])`` on labelled cells weighted as scvi-tools' ``classification_ratio``,
enters the guide through ``pyro.factor``.

The training loop reads ``required_elbo``, ``max_plate_nesting`` and ``kl_warmup_sites`` from
the module (see :func:`pyrovi.infer.make_elbo` and :class:`pyrovi.infer.MinibatchScaling`):
as in scvi-tools, the KL warm-up weighs the terms of z2, y and the library, not those of z1.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovi.distributions import Normal
from pyrovi.modules.plates import cell_plate
from pyrovi.modules.scvi import SCVIModule
from pyrovi.nn import FCLayers, GaussianEncoder

#: Options of the classifier network (``classifier_parameters``).
CLASSIFIER_OPTIONS = ("n_hidden", "n_layers", "dropout_rate")


def label_prior_probs(label_prior, n_labels: int) -> torch.Tensor:
    """The label probabilities pi: uniform, or given (normalised)."""
    if label_prior is None:
        return torch.full((n_labels,), 1.0 / n_labels)
    probs = torch.as_tensor(label_prior, dtype=torch.float32).flatten()
    if probs.numel() != n_labels or not bool(torch.isfinite(probs).all()) or \
            bool((probs <= 0).any()):
        raise ValueError(f"The label prior must hold {n_labels} positive numbers, one per "
                         f"label, got {probs.tolist()}.")
    return probs / probs.sum()


class SCANVIModule(SCVIModule):
    """The scANVI generative model and its amortized guide.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of known labels K (the unlabelled category not counted): the code of an
        unlabelled cell is ``K``.
    label_prior
        Probabilities pi of the labels (K positive numbers, normalised), default uniform.
    linear_classifier
        q(y | z1) from a single linear layer instead of a network with hidden layers.
    classifier_parameters
        Options of the classifier network: ``n_hidden``, ``n_layers``, ``dropout_rate``
        (default: the module's).
    n_hidden, n_latent, n_layers, dropout_rate, use_batch_norm, use_layer_norm
        Network sizes and normalisation, for scVI's networks and scANVI's alike.
    **scvi_options
        The other options of :class:`~pyrovi.modules.SCVIModule` (covariates,
        ``dispersion``, ``gene_likelihood``, ``latent_distribution``, library size...).
        ``dispersion="gene-label"`` uses each cell's y (enumerated when unknown).
    """

    site_dims = {**SCVIModule.site_dims, "z2": ("latent",), "y": ()}
    #: The ELBO this pair needs: its guide enumerates the labels of unlabelled cells.
    required_elbo = "enum"
    max_plate_nesting = 1
    #: Latent sites the KL warm-up weighs (scvi-tools': every KL term but z1's).
    kl_warmup_sites = ("z2", "y", "library")

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        label_prior: Sequence[float] | torch.Tensor | None = None,
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        **scvi_options,
    ):
        # The module's latent prior (scVI's N(0, I)) is p(z2); z1's prior is below.
        super().__init__(n_input, n_labels=n_labels, n_hidden=n_hidden, n_latent=n_latent,
                         n_layers=n_layers, dropout_rate=dropout_rate,
                         use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm,
                         prior="normal", **scvi_options)
        self.n_labels = n_labels
        norm_in = {"use_batch_norm": use_batch_norm in ("encoder", "both"),
                   "use_layer_norm": use_layer_norm in ("encoder", "both")}
        norm_out = {"use_batch_norm": use_batch_norm in ("decoder", "both"),
                    "use_layer_norm": use_layer_norm in ("decoder", "both")}
        self.classifier = _classifier(n_latent, n_labels, linear_classifier,
                                      {"n_hidden": n_hidden, "n_layers": n_layers,
                                       "dropout_rate": dropout_rate,
                                       **(classifier_parameters or {})}, norm_in)
        # q(z2 | z1, y) and p(z1 | z2, y): Gaussians from a network of z and the label.
        # Neither has dropout: they run on every pair of a cell and a label (K times the
        # cells), where drawing the dropout mask cost about 3% of a training step on the
        # CPU (scvi-tools' q(z2 | z1, y) has dropout).
        self.z2_encoder = GaussianEncoder(n_latent, n_latent, n_cat_list=[n_labels],
                                          n_layers=n_layers, n_hidden=n_hidden,
                                          dropout_rate=0.0, **norm_in)
        self.z1_decoder = GaussianEncoder(n_latent, n_latent, n_cat_list=[n_labels],
                                          n_layers=n_layers, n_hidden=n_hidden,
                                          dropout_rate=0.0, **norm_out)
        self.register_buffer("label_probs", label_prior_probs(label_prior, n_labels))
        self.label_dispersion = scvi_options.get("dispersion") == "gene-label"

    # -- pieces shared by model, guide and the outputs ------------------------------------

    def label_logits(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Logits of q(y | z1): the classifier's, and a point mass at a known label.

        Parameters
        ----------
        z
            z1 of each cell, ``(n_cells, n_latent)``.
        labels
            Label codes (``n_labels`` for an unlabelled cell), or ``None``: all unknown.

        Returns
        -------
        torch.Tensor
            ``(n_cells, n_labels)``; a labelled cell's row is 0 at its label and ``-inf``
            elsewhere.
        """
        logits = self.classifier(z)
        if labels is None:
            return logits
        known = labels < self.n_labels
        point_mass = torch.full_like(logits, float("-inf")).scatter(
            -1, labels.clamp(max=self.n_labels - 1).unsqueeze(-1), 0.0)
        return torch.where(known.unsqueeze(-1), point_mass, logits)

    def classify(self, x, batch_index, cat_covs=None, cont_covs=None) -> torch.Tensor:
        """Logits of q(y | z1) at the posterior mean of z1 (what ``predict`` reports).

        Parameters
        ----------
        x, batch_index, cat_covs, cont_covs
            A minibatch's counts and covariates.

        Returns
        -------
        torch.Tensor
            ``(n_cells, n_labels)``.
        """
        return self.classifier(self.encode(x, batch_index, cat_covs, cont_covs).z_loc)

    def classification_loss(self, z_loc, labels, weight) -> torch.Tensor:
        """``weight · (-log q(y_n | z_loc_n))`` per cell, 0 where ``weight`` is 0 or unlabelled.

        Parameters
        ----------
        z_loc
            Posterior means of z1, ``(n_cells, n_latent)``.
        labels
            Label codes (``n_labels`` for unlabelled cells).
        weight
            Per-cell weight (:class:`~pyrovi.data.LabelledEpochs`).

        Returns
        -------
        torch.Tensor
            ``(n_cells,)``.
        """
        known = labels < self.n_labels
        log_q = torch.log_softmax(self.classifier(z_loc), -1)
        cross_entropy = -log_q.gather(-1, labels.clamp(max=self.n_labels - 1).unsqueeze(-1))
        return torch.where(known, weight * cross_entropy.squeeze(-1), torch.zeros_like(weight))

    # -- the model/guide pair -------------------------------------------------------------

    def model(self, x, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None, classification_weight=None):
        """Generative process p(x, z1, z2, y, l) for a minibatch of ``x.shape[0]`` cells.

        ``labels`` and ``classification_weight`` are read by the guide only (a labelled
        cell's y comes to this site from it).
        """
        n_cells = x.shape[0]
        with cell_plate(n_cells):
            # z2_n ~ N(0, I)
            z2 = pyro.sample("z2", self.prior(n_cells))
            # y_n ~ Categorical(pi): a labelled cell's label, every label for an unknown one
            y = pyro.sample("y", dist.Categorical(probs=self.label_probs).expand([n_cells]))
            # z1_n | z2_n, y_n ~ N(mu(z2_n, y_n), sigma²(z2_n, y_n))
            z1 = pyro.sample("z", Normal(*self.z1_decoder(z2, [y])).to_event(1))
            if self.use_observed_lib_size:
                # l_n = log of the cell's total count (or given size factor), observed
                log_library = self.observed_log_library(x, size_factor)
            else:
                # log l_n ~ N(mu_b, sigma_b^2): library size prior of the cell's batch
                log_library = pyro.sample("library", self.library_prior(batch_index))
            params = self.generative(z1, log_library, batch_index,
                                     y if self.label_dispersion else None, cat_covs, cont_covs)
            # x_ng ~ ZINB / NB / Poisson(l_n rho_ng(z1_n, s_n), theta_g, pi_ng)
            pyro.sample("x", self.likelihood(params, x_nonzero), obs=x)

    def guide(self, x, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None, classification_weight=None):
        """Amortized posterior q(z1, y, z2, l | x) for a minibatch, and the classification
        loss of its labelled cells."""
        q = self.encode(x, batch_index, cat_covs, cont_covs)
        with cell_plate(x.shape[0]):
            # q(z1_n | x_n) = N(mu(x_n), sigma^2(x_n)), scVI's encoder
            z1 = pyro.sample("z", Normal(q.z_loc, q.z_scale).to_event(1))
            if q.library_loc is not None:
                # q(log l_n | x_n): only when the library size is latent
                pyro.sample("library", Normal(q.library_loc, q.library_scale).to_event(1))
            # q(y_n | z1_n): the classifier, a point mass at a known label; enumerated
            y = pyro.sample("y", dist.Categorical(logits=self.label_logits(z1, labels)),
                            infer={"enumerate": "parallel"})
            # q(z2_n | z1_n, y_n): under enumeration y has shape (K, 1), so every cell meets
            # every label (the networks broadcast the label against the cells)
            pyro.sample("z2", Normal(*self.z2_encoder(z1, [y])).to_event(1))
            if classification_weight is not None and labels is not None:
                # -w_n log q(y_n | E[z1_n]) on labelled cells: a guide term is subtracted
                # from the ELBO, so this adds w_n log q(y_n | E[z1_n]) to the objective.
                pyro.factor("classification",
                            self.classification_loss(q.z_loc, labels, classification_weight),
                            has_rsample=True)


def _classifier(n_latent: int, n_labels: int, linear: bool, options: dict,
                norm: dict) -> nn.Module:
    """z1 -> label logits: one linear layer, or scvi-tools' network with hidden layers."""
    unknown = set(options) - set(CLASSIFIER_OPTIONS)
    if unknown:
        raise ValueError(f"classifier_parameters takes {list(CLASSIFIER_OPTIONS)}, got "
                         f"{sorted(unknown)}.")
    if linear:
        return nn.Linear(n_latent, n_labels)
    return nn.Sequential(
        FCLayers(n_latent, options["n_hidden"], n_layers=options["n_layers"],
                 n_hidden=options["n_hidden"], dropout_rate=options["dropout_rate"], **norm),
        nn.Linear(options["n_hidden"], n_labels),
    )
