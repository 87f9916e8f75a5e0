"""scVI as a Pyro model/guide pair (Lopez et al. 2018, Nature Methods).

Generative process for cell n with batch s_n and covariates c_n::

    z_n      ~ p(z)                                   (standard normal by default)
    log l_n  ~ Normal(mu_{s_n}, sigma²_{s_n})          (or observed: log Σ_g x_ng)
    rho_n    = softmax(f(z_n, s_n, c_n))              (decoder network)
    x_ng     ~ ZINB / NB / Poisson(mean = l_n · rho_ng, inverse dispersion theta_g)

Amortized posterior::

    q(z_n | x_n)      = Normal(g_loc(log1p x_n), g_scale(log1p x_n))
    q(log l_n | x_n)  = Normal(h_loc(log1p x_n), h_scale(log1p x_n))   (latent library only)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovi.distributions import (
    NegativeBinomial,
    NonzeroPositions,
    Normal,
    Poisson,
    ZeroInflatedNegativeBinomial,
)
from pyrovi.modules.plates import cell_plate
from pyrovi.nn import (
    AmortizedEncoder,
    AmortizedPosterior,
    Dispersion,
    ExpressionDecoder,
    ExpressionParams,
    latent_transform,
)
from pyrovi.nn.fc import check_layer_size
from pyrovi.priors import build_prior

GENE_LIKELIHOODS = ("zinb", "nb", "poisson")
NORM_OPTIONS = ("encoder", "decoder", "both", "none")


def count_likelihood(
    name_or_fn: str | Callable, mu, theta, zi_logits, nonzero: NonzeroPositions | None = None
) -> dist.Distribution:
    """The per-feature count distribution with mean ``mu``.

    Parameters
    ----------
    name_or_fn
        ``"zinb"``, ``"nb"``, ``"poisson"``, or a callable ``(mu, theta, zi_logits) ->
        Distribution`` for a custom likelihood. A model with a callable likelihood gets
        every parameter: the dispersion ``theta`` and the decoder's zero-inflation head
        ``zi_logits`` (a likelihood that does not use them leaves them untrained). The
        callable returns a Pyro distribution either per feature (batch shape ``mu.shape``,
        event shape ``()``) or over the features of a cell (batch shape
        ``mu.shape[:-1]``, event shape ``mu.shape[-1:]``, e.g. a Dirichlet-multinomial).
    mu, theta, zi_logits
        Mean, inverse dispersion and zero-inflation logits (the latter two may be ``None``
        where the likelihood does not use them).
    nonzero
        Non-zero positions of the counts the distribution will score (a minibatch's
        ``x_nonzero``), for the negative binomials (``nonzero=``); ignored otherwise.

    Returns
    -------
    pyro.distributions.Distribution

    Raises
    ------
    TypeError, ValueError
        If a callable does not return a Pyro distribution of one of those shapes.
    """
    if callable(name_or_fn):
        return _checked_custom_likelihood(name_or_fn, name_or_fn(mu, theta, zi_logits), mu)
    if name_or_fn == "zinb":
        return ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits,
                                            nonzero=nonzero)
    if name_or_fn == "nb":
        return NegativeBinomial(mu=mu, theta=theta, nonzero=nonzero)
    if name_or_fn == "poisson":
        return Poisson(mu=mu)
    raise ValueError(
        f"gene_likelihood must be one of {GENE_LIKELIHOODS} or a callable, got {name_or_fn!r}."
    )


def _checked_custom_likelihood(fn, distribution, mu) -> dist.Distribution:
    """``distribution`` if a custom likelihood returned something usable, else a clear error."""
    name = getattr(fn, "__name__", type(fn).__name__)
    if not isinstance(distribution, dist.Distribution):
        raise TypeError(
            f"The gene_likelihood callable {name} returned {type(distribution).__name__}; it "
            "must return a Pyro distribution (pyro.distributions or pyrovi.distributions)."
        )
    shape = tuple(distribution.batch_shape + distribution.event_shape)
    if shape != tuple(mu.shape) or len(distribution.event_shape) > 1:
        raise ValueError(
            f"The gene_likelihood callable {name} returned a distribution of batch shape "
            f"{tuple(distribution.batch_shape)} and event shape "
            f"{tuple(distribution.event_shape)} for mu of shape {tuple(mu.shape)}: it must be "
            "per feature (batch shape mu.shape) or over the features (event shape "
            "mu.shape[-1:])."
        )
    return distribution


#: Range of the mean counts: above 0, so log-densities are finite at any count up to ~1e8,
#: and below float32's overflow.
MEAN_RANGE = (1e-20, 1e15)


class _KeepInRange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def keep_in_range(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` clamped to ``[low, high]``, with the gradient passed through unchanged.

    Inside the range this is the identity, value and gradient. Outside it the value is the
    bound and the gradient is the bound's, not zero: a mean pushed out of range by the
    networks is pulled back by the data instead of being stuck, and the backward pass needs
    no mask over the (cells, genes) matrix (a plain clamp's backward costs another pass).

    Parameters
    ----------
    x
        Tensor to keep in range.
    low, high
        The bounds.

    Returns
    -------
    torch.Tensor
    """
    return _KeepInRange.apply(x, low, high)


class SCVIModule(nn.Module):
    """The scVI generative model and its amortized guide.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch, n_labels
        Number of batches and labels.
    n_cats_per_cov
        Categories of each extra categorical covariate.
    n_continuous_cov
        Number of continuous covariates.
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes (scvi-tools defaults 128, 10, 1, 0.1).
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"`` or a callable (see :func:`count_likelihood`).
    latent_distribution
        ``"normal"`` or ``"ln"``.
    use_observed_lib_size
        Observed library size (``log Σ x``, or log size factor) instead of a latent one.
    library_log_means, library_log_vars
        Per-batch mean and variance of the log library size (prior of the latent library).
    encode_covariates
        Give the encoder the batch and covariates too.
    deeply_inject_covariates
        Inject covariates into every hidden layer.
    use_batch_norm, use_layer_norm
        ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"``.
    use_size_factor
        Size factors are given (softplus rates instead of softmax proportions).
    prior
        Latent prior: ``"normal"``, ``"mog"`` (mixture of Gaussians), ``"vamp"`` (VampPrior
        on this module's encoder) or a prior module (see :mod:`pyrovi.priors`).
    prior_kwargs
        Options of a named prior, e.g. ``{"n_components": 5}``.
    decoder
        Replace the decoder (e.g. a linear one for LDVAE); must return
        :class:`~pyrovi.nn.ExpressionParams`.
    n_encoder_input
        Width of the encoder input (default ``n_input``); multi-modal models append their
        other modalities to the genes.
    n_layers_encoder, n_layers_decoder
        Hidden layers of each network (default ``n_layers`` for both).
    encoder
        Replace the encoder built from the options above (e.g. one with another covariate
        layout); an :class:`~pyrovi.nn.AmortizedEncoder` or a module with its interface.
    """

    #: Observed sites (posterior predictive samples) and the plate over cells.
    observed_sites = ("x",)
    cell_plate = "cells"
    #: Named dimensions of each site's value after the cell axis (for ArviZ export).
    site_dims = {"z": ("latent",), "library": (), "x": ("gene",)}
    #: Submodules that read the observed data; every other network decodes (reference
    #: mapping freezes and releases the two sides separately).
    encoders = ("encoder",)
    #: Tensors indexed by batch that are estimated from the counts when the module is built
    #: (the library-size prior), not learned: a query model keeps its own values for the
    #: query's new batches instead of starting them at the reference's mean.
    data_driven_tensors = ("library_log_means", "library_log_vars")

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str | Callable = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        use_size_factor: bool = False,
        prior: str | nn.Module = "normal",
        prior_kwargs: dict | None = None,
        decoder: nn.Module | None = None,
        n_encoder_input: int | None = None,
        n_layers_encoder: int | None = None,
        n_layers_decoder: int | None = None,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        for name, value in (("n_hidden", n_hidden), ("n_latent", n_latent),
                            ("n_layers", n_layers)):
            check_layer_size(name, value)
        for name, value in (("use_batch_norm", use_batch_norm), ("use_layer_norm", use_layer_norm)):
            if value not in NORM_OPTIONS:
                raise ValueError(f"{name} must be one of {NORM_OPTIONS}, got {value!r}.")
        if not callable(gene_likelihood) and gene_likelihood not in GENE_LIKELIHOODS:
            raise ValueError(
                f"gene_likelihood must be one of {GENE_LIKELIHOODS} or a callable, "
                f"got {gene_likelihood!r}."
            )
        self.n_input = n_input
        self.n_latent = n_latent
        self.gene_likelihood = gene_likelihood
        self.use_observed_lib_size = use_observed_lib_size
        self.use_size_factor = use_size_factor
        self.encode_covariates = encode_covariates
        self.z_transform = latent_transform(latent_distribution)

        cat_list = [n_batch, *n_cats_per_cov]
        self.encoder = encoder or AmortizedEncoder(
            n_encoder_input or n_input,
            n_latent,
            n_cat_list=cat_list if encode_covariates else (),
            n_cont=n_continuous_cov if encode_covariates else 0,
            latent_library=not use_observed_lib_size,
            n_layers=n_layers_encoder or n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm in ("encoder", "both"),
            use_layer_norm=use_layer_norm in ("encoder", "both"),
            inject_covariates=deeply_inject_covariates,
            latent_distribution=latent_distribution,
        )
        self.decoder = decoder or ExpressionDecoder(
            n_latent,
            n_input,
            n_cat_list=cat_list,
            n_cont=n_continuous_cov,
            n_layers=n_layers_decoder or n_layers,
            n_hidden=n_hidden,
            use_batch_norm=use_batch_norm in ("decoder", "both"),
            use_layer_norm=use_layer_norm in ("decoder", "both"),
            inject_covariates=deeply_inject_covariates,
            predict_dispersion=dispersion == "gene-cell",
            zero_inflation=gene_likelihood == "zinb" or callable(gene_likelihood),
            scale_activation="softplus" if use_size_factor else "softmax",
        )
        self.dispersion = Dispersion(n_input, dispersion, n_batch=n_batch, n_labels=n_labels)
        # The VampPrior evaluates q(z | u) with the z network of this encoder (held by the
        # prior, not registered twice), at inputs of the encoder's width.
        self.prior = build_prior(
            prior, n_latent, prior_kwargs,
            encoder=self.encoder.z_encoder,
            n_input=n_encoder_input or n_input,
            n_cat_list=cat_list if encode_covariates else (),
            n_cont=n_continuous_cov if encode_covariates else 0,
        )
        if not use_observed_lib_size and (library_log_means is None or library_log_vars is None):
            raise ValueError("A latent library size needs library_log_means and library_log_vars.")
        means = torch.zeros(n_batch) if library_log_means is None else library_log_means
        variances = torch.ones(n_batch) if library_log_vars is None else library_log_vars
        self.register_buffer("library_log_means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("library_log_vars", torch.as_tensor(variances, dtype=torch.float32))

    # -- pieces shared by model, guide and the posterior utilities ------------------------

    def covariates(self, batch_index, cat_covs) -> list[torch.Tensor]:
        """Categorical covariate codes in network order: batch first, then extra ones."""
        extra = [] if cat_covs is None else list(cat_covs.unbind(-1))
        return [batch_index, *extra]

    def observed_log_library(self, x, size_factor=None, library_size=None) -> torch.Tensor:
        """Observed log library size, shape ``(n_cells, 1)``: of the size factor if given,
        else of ``library_size`` (minified data, whose counts are gone), else of ``Σ x``."""
        if size_factor is not None:
            return size_factor.log().unsqueeze(-1)
        if library_size is not None:
            return library_size.log().unsqueeze(-1)
        return x.sum(-1, keepdim=True).log()

    def minify_refusal(self) -> str | None:
        """Why minified data cannot stand in for this module's counts (``None``: they can).

        Minified data keep each cell's posterior of ``z`` and its observed library size,
        which is the whole per-cell posterior only when the library size is observed.
        """
        if self.use_observed_lib_size:
            return None
        return ("its library size is latent (use_observed_lib_size=False), and minified data "
                "store the posterior of z only, not that of the library size")

    def library_prior(self, batch_index) -> dist.Distribution:
        """Prior of the latent log library size: its batch's empirical log-normal."""
        return Normal(
            self.library_log_means[batch_index].unsqueeze(-1),
            self.library_log_vars[batch_index].sqrt().unsqueeze(-1),
        ).to_event(1)

    def encoder_input(self, x, y=None) -> torch.Tensor:
        """What the encoder reads: ``log1p`` of the counts."""
        return torch.log1p(x)

    def encode(self, x, batch_index, cat_covs=None, cont_covs=None) -> AmortizedPosterior:
        """Parameters of q(z, log l | x) for a minibatch."""
        if self.encode_covariates:
            return self.encoder(self.encoder_input(x), self.covariates(batch_index, cat_covs),
                                cont_covs)
        return self.encoder(self.encoder_input(x))

    def initialize_prior(self, batch: dict) -> None:
        """Initialise a data-dependent prior from cells (the VampPrior's pseudo-inputs).

        Parameters
        ----------
        batch
            A minibatch (:meth:`pyrovi.data.CellTensors.minibatch`) of the cells to use.
        """
        initialize = getattr(self.prior, "initialize_from_cells", None)
        if initialize is None:
            return
        cats, cont = (), None
        if self.encode_covariates:
            cats = self.covariates(batch["batch_index"], batch.get("cat_covs"))
            cont = batch.get("cont_covs")
        initialize(self.encoder_input(batch["x"], batch.get("y")), cats, cont)

    def generative(self, z, log_library, batch_index, labels=None, cat_covs=None, cont_covs=None):
        """Likelihood parameters given latent values.

        Returns
        -------
        dict
            ``rho`` (normalized expression), ``mu`` (mean counts), ``theta`` (inverse
            dispersion, ``None`` for Poisson) and ``zi_logits`` (``None`` unless ZINB).
        """
        out = self.decoder(self.z_transform(z), self.covariates(batch_index, cat_covs), cont_covs)
        return self.expression_params(out, log_library, batch_index, labels)

    def expression_params(self, out: ExpressionParams, log_library, batch_index, labels=None
                          ) -> dict:
        """:meth:`generative`'s dictionary from the decoder's outputs ``out``."""
        theta = None
        if self.gene_likelihood != "poisson":
            theta = self.dispersion(batch_index, labels, out.theta_logits)
        return {
            "rho": out.rho,
            # Kept inside a range where every log-density term and its gradient stay finite: a
            # mean that underflows to 0 at a cell's counts gives log p = -inf (a latent
            # library drawn far below the data, a softmax entry that underflows).
            "mu": keep_in_range(torch.exp(log_library) * out.rho, *MEAN_RANGE),
            "theta": theta,
            "zi_logits": out.zi_logits,
        }

    def likelihood(self, params: dict, nonzero: NonzeroPositions | None = None
                   ) -> dist.Distribution:
        """The distribution of a cell's counts (event shape: genes).

        ``nonzero``: the non-zero positions of the counts it will score, if known.
        """
        counts = count_likelihood(
            self.gene_likelihood, params["mu"], params["theta"], params["zi_logits"], nonzero)
        # A custom likelihood may already be a distribution over the genes of a cell.
        return counts if counts.event_shape else counts.to_event(1)

    # -- the model/guide pair -------------------------------------------------------------

    def model(self, x, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None, library_size=None):
        """Generative process p(x, z, l) for a minibatch of ``x.shape[0]`` cells.

        ``x_nonzero`` (:data:`pyrovi.data.NONZERO_FIELD`) are the non-zero positions of
        ``x`` when the loader knows them; they only speed up the likelihood.
        ``library_size`` is each cell's observed library size when ``x`` does not hold
        its counts (minified data, :mod:`pyrovi.data.minified`).
        """
        n_cells = x.shape[0]
        with cell_plate(n_cells):
            # z_n ~ p(z): the cell's state (standard normal, or the chosen prior)
            z = pyro.sample("z", self.prior(n_cells))
            if self.use_observed_lib_size:
                # l_n = log of the cell's total count (or given size factor), observed
                log_library = self.observed_log_library(x, size_factor, library_size)
            else:
                # log l_n ~ N(mu_b, sigma_b^2): library size prior of the cell's batch
                log_library = pyro.sample("library", self.library_prior(batch_index))
            params = self.generative(z, log_library, batch_index, labels, cat_covs, cont_covs)
            # x_ng ~ ZINB / NB / Poisson(l_n rho_ng(z_n, s_n), theta_g, pi_ng)
            pyro.sample("x", self.likelihood(params, x_nonzero), obs=x)

    def guide(self, x, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None, library_size=None):
        """Amortized posterior q(z, l | x) for a minibatch."""
        q = self.encode(x, batch_index, cat_covs, cont_covs)
        with cell_plate(x.shape[0]):
            # q(z_n | x_n, s_n) = N(mu(x_n, s_n), sigma^2(x_n, s_n))
            pyro.sample("z", Normal(q.z_loc, q.z_scale).to_event(1))
            if q.library_loc is not None:
                # q(log l_n | x_n, s_n): only when the library size is latent
                pyro.sample("library",
                            Normal(q.library_loc, q.library_scale).to_event(1))
