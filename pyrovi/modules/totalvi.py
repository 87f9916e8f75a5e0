"""TotalVI as a Pyro model/guide pair (Gayoso et al. 2021, Nature Methods).

Generative process for cell n in batch s_n, gene g and protein t::

    z_n        ~ p(z)                                     (standard normal by default)
    log l_n    ~ Normal(mu_{s_n}, sigma²_{s_n})            (or observed: log Σ_g x_ng)
    rho_n      = softmax(f_x(z_n, s_n))                   (scVI's expression decoder)
    x_ng       ~ NB / ZINB(mean = l_n · rho_ng, inverse dispersion theta_g)
    log β_nt   ~ Normal(c_{t s_n}, d_{t s_n})              (protein background, learned prior)
    α_nt, π_nt = f_y(z_n, s_n)                            (α ≥ 1: foreground scaling;
                                                          π: logit of the background weight)
    y_nt       ~ sigmoid(π_nt) · NB(β_nt, φ_t) + sigmoid(−π_nt) · NB(β_nt α_nt, φ_t)

Proteins not measured in a batch are masked out of the likelihood of that batch's cells.

Amortized posterior::

    q(z_n | x_n, y_n)      = Normal(g(log1p x_n ⊕ log1p y_n, s_n))
    q(log l_n | x_n, y_n)  = Normal(h(log1p x_n ⊕ log1p y_n, s_n))   (latent library only)
    q(log β_n | z_n)       = Normal(k(z_n, s_n))

``network_layout="scvi-tools"`` builds the networks as scvi-tools' ``TOTALVAE`` does (one
network per output, continuous covariates appended to the first layer's input), so its
weights map one to one, and follows what scvi-tools (≥ 1.2) computes around them:

- the encoder reads ``log1p(x_n / (1 + mean_g x_ng))`` ⊕ ``log1p(y_n / (1 + mean_t y_nt))``;
- a sampled log library size is clamped at 15 before it scales the expression;
- both protein means are multiplied by a learned efficiency ``e_{t s_n}`` per protein and
  batch (``log e`` starts at 0), a point estimate with a LogNormal(0, 1) penalty per cell;
- ``1e-3 · log sigmoid(π_nt)`` per cell nudges the mixing towards the background;
- proteins not measured in a batch are also left out of the background's KL term.

The two penalties are ``pyro.factor`` sites in the cell plate: they weigh as much as in
scvi-tools at the end of its KL warm-up (which scales them), and per-cell monitoring counts
them with the data terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovi.distributions import NegativeBinomialMixture, Normal
from pyrovi.modules.plates import cell_plate
from pyrovi.modules.scvi import SCVIModule
from pyrovi.nn import (
    AmortizedEncoder,
    Dispersion,
    GaussianEncoder,
    ProteinDecoder,
    ScviToolsTotalVIDecoder,
)
from pyrovi.priors import VampPrior

PROTEIN_DISPERSIONS = ("protein", "protein-batch", "protein-label")
NETWORK_LAYOUTS = ("pyrovi", "scvi-tools")
#: scvi-tools clamps a sampled log library size here before exponentiating it.
_MAX_LOG_LIBRARY = 15.0
#: Weight of scvi-tools' per-cell push of the mixing logits towards the background.
_MIXING_PENALTY = 1e-3
#: Bounds of the background log-rate (rates from ~5e-5 to ~1e6 counts): they keep the
#: protein likelihood finite when the posterior of a degenerate protein drifts.
_LOG_BACKGROUND_RANGE = (-10.0, 14.0)


class TOTALVIModule(SCVIModule):
    """The TotalVI generative model and its amortized guide.

    The RNA half is scVI's (same encoder blocks, expression decoder, dispersion and
    library size handling, inherited from :class:`SCVIModule`); the protein half adds the
    background/foreground negative-binomial mixture.

    Parameters
    ----------
    n_input
        Number of genes.
    n_proteins
        Number of proteins.
    protein_background_prior_mean, protein_background_prior_scale
        ``(n_proteins, n_batch)`` initial mean and standard deviation of the prior of the
        log background rate (learned afterwards, as in the reference implementation).
    protein_batch_mask
        ``(n_batch, n_proteins)`` booleans, ``False`` where a protein was not measured in a
        batch; ``None``: all measured.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or a callable ``(mu, theta, zi_logits) -> Distribution`` for
        the RNA (see :func:`~pyrovi.modules.scvi.count_likelihood`).
    n_hidden, n_latent, n_layers_encoder, n_layers_decoder, dropout_rate_encoder
        Network sizes (scvi-tools' TotalVI defaults 256, 20, 2, 1, 0.2).
    network_layout
        ``"pyrovi"`` (one trunk per decoder with heads) or ``"scvi-tools"`` (scvi-tools'
        networks and the computations around them, see the module docstring; needs
        ``deeply_inject_covariates``, no ``"gene-cell"`` dispersion, and no VampPrior with
        encoded continuous covariates).
    dropout_rate_decoder
        Dropout in the decoders' hidden networks: ``"scvi-tools"`` layout only (default
        0.2, as scvi-tools); pyrovi's decoders have none.
    background_activation
        ``"softplus"`` (default) or ``"exp"``: the map to the background posterior's scale
        in the ``"scvi-tools"`` layout (``"exp"`` for models saved by scvi-tools < 1.2).
    **kwargs
        The remaining :class:`SCVIModule` options (batch, labels, covariates, library,
        latent distribution, normalisation, ``prior``, ``prior_kwargs``).
    """

    observed_sites = ("x", "y")
    site_dims = {**SCVIModule.site_dims, "protein_background": ("protein",), "y": ("protein",)}
    #: Also the background prior's initial values and which proteins each batch measured.
    #: (The background posterior network reads z, not the data: it counts as a decoder.)
    data_driven_tensors = (*SCVIModule.data_driven_tensors, "background_prior_mean",
                           "background_prior_log_scale", "protein_batch_mask")

    def minify_refusal(self) -> str | None:
        """Minified data never stand in for TotalVI's counts (see the return value)."""
        return ("its posterior has a per-cell latent besides z, the protein background, "
                "which minified data do not store")

    def __init__(
        self,
        n_input: int,
        n_proteins: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        protein_background_prior_mean: torch.Tensor | None = None,
        protein_background_prior_scale: torch.Tensor | None = None,
        protein_batch_mask: torch.Tensor | None = None,
        protein_dispersion: str = "protein",
        gene_dispersion: str = "gene",
        gene_likelihood: str | Callable = "nb",
        n_hidden: int = 256,
        n_latent: int = 20,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2,
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        network_layout: str = "pyrovi",
        dropout_rate_decoder: float | None = None,
        background_activation: str | None = None,
        **kwargs,
    ):
        if not callable(gene_likelihood) and gene_likelihood not in ("nb", "zinb"):
            raise ValueError(
                f"TotalVI's gene_likelihood is 'nb', 'zinb' or a callable, got "
                f"{gene_likelihood!r}.")
        if protein_dispersion not in PROTEIN_DISPERSIONS:
            raise ValueError(
                f"protein_dispersion must be one of {PROTEIN_DISPERSIONS}, got "
                f"{protein_dispersion!r}."
            )
        if network_layout not in NETWORK_LAYOUTS:
            raise ValueError(f"network_layout must be one of {NETWORK_LAYOUTS}, got "
                             f"{network_layout!r}.")
        cat_list = [n_batch, *n_cats_per_cov]
        if network_layout == "scvi-tools":
            _check_scvi_tools_options(gene_dispersion, deeply_inject_covariates, encode_covariates,
                                      n_continuous_cov, kwargs.get("prior", "normal"))
            kwargs.update(_scvi_tools_networks(
                n_input, n_proteins, cat_list, n_continuous_cov, n_hidden=n_hidden,
                n_latent=n_latent, n_layers_encoder=n_layers_encoder,
                n_layers_decoder=n_layers_decoder, dropout_rate_encoder=dropout_rate_encoder,
                dropout_rate_decoder=0.2 if dropout_rate_decoder is None else dropout_rate_decoder,
                encode_covariates=encode_covariates, use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
                background_activation=background_activation or "softplus",
                zero_inflation=gene_likelihood == "zinb" or callable(gene_likelihood),
                # SCVIModule's options, with its defaults
                latent_library=not kwargs.get("use_observed_lib_size", True),
                latent_distribution=kwargs.get("latent_distribution", "normal"),
                use_size_factor=kwargs.get("use_size_factor", False)))
        elif dropout_rate_decoder or background_activation is not None:
            raise ValueError("dropout_rate_decoder and background_activation set the networks "
                             "of network_layout='scvi-tools'; pyrovi's layout has neither.")
        super().__init__(
            n_input,
            n_batch=n_batch,
            n_labels=n_labels,
            n_cats_per_cov=n_cats_per_cov,
            n_continuous_cov=n_continuous_cov,
            n_hidden=n_hidden,
            n_latent=n_latent,
            dropout_rate=dropout_rate_encoder,
            dispersion=gene_dispersion,
            gene_likelihood=gene_likelihood,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            n_encoder_input=n_input + n_proteins,
            n_layers_encoder=n_layers_encoder,
            n_layers_decoder=n_layers_decoder,
            **kwargs,
        )
        self.n_proteins = n_proteins
        self.network_layout = network_layout
        if network_layout == "pyrovi":
            decoder_norm = dict(
                use_batch_norm=use_batch_norm in ("decoder", "both"),
                use_layer_norm=use_layer_norm in ("decoder", "both"),
                inject_covariates=deeply_inject_covariates,
            )
            self.protein_decoder = ProteinDecoder(
                n_latent, n_proteins, n_cat_list=cat_list, n_cont=n_continuous_cov,
                n_layers=n_layers_decoder, n_hidden=n_hidden, **decoder_norm,
            )
            # q(log β | z): amortized through z (and the batch), as in the reference model.
            self.background_encoder = GaussianEncoder(
                n_latent, n_proteins, n_cat_list=cat_list, n_cont=n_continuous_cov,
                n_layers=n_layers_decoder, n_hidden=n_hidden, dropout_rate=0.0, **decoder_norm,
            )
        else:
            # log e_ts: scvi-tools' per-batch efficiency of each protein's capture.
            self.log_protein_efficiency = nn.Parameter(torch.zeros(n_proteins, n_batch))
        self.protein_dispersion = Dispersion(
            n_proteins, protein_dispersion, n_batch=n_batch, n_labels=n_labels,
            log_theta_init=(0.0, 2.0))
        if protein_background_prior_mean is None:
            protein_background_prior_mean = torch.zeros(n_proteins, n_batch)
        if protein_background_prior_scale is None:
            protein_background_prior_scale = torch.ones(n_proteins, n_batch)
        self.background_prior_mean = nn.Parameter(
            torch.as_tensor(protein_background_prior_mean, dtype=torch.float32).clone())
        self.background_prior_log_scale = nn.Parameter(
            torch.as_tensor(protein_background_prior_scale, dtype=torch.float32).log().clone())
        mask = (torch.ones(n_batch, n_proteins, dtype=torch.bool) if protein_batch_mask is None
                else torch.as_tensor(protein_batch_mask, dtype=torch.bool))
        self.register_buffer("protein_batch_mask", mask)

    # -- pieces shared by model, guide and the posterior utilities ------------------------

    def encoder_input(self, x, y=None) -> torch.Tensor:
        """What the encoder reads: ``log1p`` RNA ⊕ ``log1p`` protein counts (in the
        ``"scvi-tools"`` layout each cell's counts of a modality over 1 + their mean)."""
        if self.network_layout == "scvi-tools":
            return torch.cat([torch.log1p(x / (1 + x.mean(-1, keepdim=True))),
                              torch.log1p(y / (1 + y.mean(-1, keepdim=True)))], dim=-1)
        return torch.log1p(torch.cat([x, y], dim=-1))

    def encode(self, x, batch_index, cat_covs=None, cont_covs=None, y=None):
        """Parameters of q(z, log l | x, y): the shared encoder on log1p RNA ⊕ log1p protein."""
        features = self.encoder_input(x, y)
        if not self.encode_covariates:
            return self.encoder(features)
        cats = self.covariates(batch_index, cat_covs)
        if self.network_layout == "scvi-tools" and cont_covs is not None:
            return self.encoder(torch.cat([features, cont_covs], dim=-1), cats)
        return self.encoder(features, cats, cont_covs)

    def background_posterior(self, z, batch_index, cat_covs=None, cont_covs=None):
        """``(loc, scale)`` of q(log β | z) for a minibatch."""
        cats = self.covariates(batch_index, cat_covs)
        if self.network_layout == "scvi-tools":
            return self.decoder.background_posterior(self.z_transform(z), cats, cont_covs)
        return self.background_encoder(self.z_transform(z), cats, cont_covs)

    def measured(self, batch_index) -> torch.Tensor:
        """``(n_cells, n_proteins)`` booleans: which proteins each cell's batch measured."""
        return self.protein_batch_mask.index_select(0, batch_index)

    def background_prior(self, batch_index) -> dist.Distribution:
        """Prior of the log background rate of each cell's proteins (its batch's)."""
        return Normal(
            self.background_prior_mean.T.index_select(0, batch_index),
            self.background_prior_log_scale.T.index_select(0, batch_index).exp(),
        )

    def generative(self, z, log_library, batch_index, labels=None, cat_covs=None,
                   cont_covs=None, log_background=None):
        """Likelihood parameters of both modalities given latent values.

        Returns
        -------
        dict
            scVI's ``rho``, ``mu``, ``theta``, ``zi_logits`` for RNA, and for proteins
            ``background`` (β), ``foreground`` (β·α), ``mixing_logits`` (π, logit of the
            background weight) and ``protein_theta`` (φ); in the ``"scvi-tools"`` layout
            also ``protein_efficiency`` (e, which multiplies β and β·α in the likelihood).
        """
        if self.network_layout == "pyrovi":
            params = super().generative(z, log_library, batch_index, labels, cat_covs,
                                        cont_covs)
            protein = self.protein_decoder(
                self.z_transform(z), self.covariates(batch_index, cat_covs), cont_covs)
        else:
            expression, protein = self.decoder(
                self.z_transform(z), self.covariates(batch_index, cat_covs), cont_covs)
            if not self.use_observed_lib_size:
                log_library = log_library.clamp(max=_MAX_LOG_LIBRARY)
            params = self.expression_params(expression, log_library, batch_index, labels)
            params["protein_efficiency"] = (
                self.log_protein_efficiency.T.index_select(0, batch_index).exp())
        background = log_background.clamp(*_LOG_BACKGROUND_RANGE).exp()
        params.update(
            background=background,
            foreground=background * protein.foreground_scale,
            mixing_logits=protein.mixing_logits,
            protein_theta=self.protein_dispersion(batch_index, labels),
        )
        return params

    def protein_likelihood(self, params: dict, batch_index) -> dist.Distribution:
        """The distribution of a cell's protein counts, with unmeasured proteins masked."""
        background, foreground = params["background"], params["foreground"]
        efficiency = params.get("protein_efficiency")
        if efficiency is not None:
            background, foreground = efficiency * background, efficiency * foreground
        mixture = NegativeBinomialMixture(
            mu1=background, mu2=foreground,
            theta1=params["protein_theta"], mixture_logits=params["mixing_logits"],
        )
        return mixture.mask(self.measured(batch_index)).to_event(1)

    def _background_site(self, distribution: dist.Distribution, batch_index):
        """The background's distribution per cell; scvi-tools leaves the proteins a batch did
        not measure out of its KL term, so that layout masks them (in model and guide)."""
        if self.network_layout == "scvi-tools":
            distribution = distribution.mask(self.measured(batch_index))
        return distribution.to_event(1)

    def _scvi_tools_penalties(self, params: dict) -> None:
        """scvi-tools' per-cell penalties: LogNormal(0, 1) on the efficiencies, and
        ``1e-3 · log sigmoid(π)`` towards the background (over every protein)."""
        efficiency_prior = dist.LogNormal(0.0, 1.0).log_prob(params["protein_efficiency"])
        pyro.factor("protein_efficiency_prior", efficiency_prior.sum(-1))
        pyro.factor("protein_mixing_penalty",
                    _MIXING_PENALTY * F.logsigmoid(params["mixing_logits"]).sum(-1))

    # -- the model/guide pair -------------------------------------------------------------

    def model(self, x, y, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None):
        """Generative process p(x, y, z, l, β) for a minibatch of ``x.shape[0]`` cells."""
        n_cells = x.shape[0]
        with cell_plate(n_cells):
            # z_n ~ p(z): the cell's state, shared by its RNA and its proteins
            z = pyro.sample("z", self.prior(n_cells))
            if self.use_observed_lib_size:
                # l_n = log of the cell's total RNA count (or given size factor), observed
                log_library = self.observed_log_library(x, size_factor)
            else:
                # log l_n ~ N(mu_b, sigma_b^2): RNA library size prior of the cell's batch
                log_library = pyro.sample("library", self.library_prior(batch_index))
            # log beta_nt ~ N(c_bt, d_bt^2): protein background rates, prior per batch
            log_background = pyro.sample(
                "protein_background",
                self._background_site(self.background_prior(batch_index), batch_index))
            params = self.generative(z, log_library, batch_index, labels, cat_covs, cont_covs,
                                     log_background)
            if self.network_layout == "scvi-tools":
                self._scvi_tools_penalties(params)
            # x_ng ~ ZINB / NB(l_n rho_ng, theta_g): RNA counts, as in scVI
            pyro.sample("x", self.likelihood(params, x_nonzero), obs=x)
            # y_nt ~ sigmoid(pi_nt) NB(beta_nt, phi_t) + sigmoid(-pi_nt) NB(beta_nt alpha_nt,
            # phi_t): background or foreground, proteins measured in the cell's batch only
            pyro.sample("y", self.protein_likelihood(params, batch_index), obs=y)

    def guide(self, x, y, batch_index, labels=None, cat_covs=None, cont_covs=None,
              size_factor=None, x_nonzero=None):
        """Amortized posterior q(z, l | x, y) q(β | z) for a minibatch."""
        q = self.encode(x, batch_index, cat_covs, cont_covs, y=y)
        with cell_plate(x.shape[0]):
            # q(z_n | x_n, y_n, s_n): one encoder reads RNA and proteins
            z = pyro.sample("z", Normal(q.z_loc, q.z_scale).to_event(1))
            if q.library_loc is not None:
                # q(log l_n | x_n, y_n, s_n): only when the library size is latent
                pyro.sample("library",
                            Normal(q.library_loc, q.library_scale).to_event(1))
            # q(log beta_n | z_n, s_n)
            loc, scale = self.background_posterior(z, batch_index, cat_covs, cont_covs)
            pyro.sample("protein_background",
                        self._background_site(Normal(loc, scale), batch_index))


def _check_scvi_tools_options(gene_dispersion, deeply_inject_covariates, encode_covariates,
                              n_continuous_cov, prior) -> None:
    """Refuse the options scvi-tools' TotalVI networks cannot express."""
    if gene_dispersion == "gene-cell":
        raise ValueError("network_layout='scvi-tools' has no per-cell dispersion network "
                         "(gene_dispersion='gene-cell'): use 'gene', 'gene-batch' or 'gene-label'.")
    if not deeply_inject_covariates:
        raise ValueError("network_layout='scvi-tools' injects the covariates into every "
                         "layer: deeply_inject_covariates must be True.")
    vamp = prior == "vamp" or isinstance(prior, VampPrior)
    if vamp and encode_covariates and n_continuous_cov:
        raise ValueError("prior='vamp' with network_layout='scvi-tools' cannot encode "
                         "continuous covariates (appended to the encoder's input there); "
                         "use encode_covariates=False or another prior.")


def _scvi_tools_networks(n_input: int, n_proteins: int, cat_list: list[int], n_cont: int, *,
                         n_hidden: int, n_latent: int, n_layers_encoder: int,
                         n_layers_decoder: int, dropout_rate_encoder: float,
                         dropout_rate_decoder: float, encode_covariates: bool,
                         use_batch_norm: str, use_layer_norm: str, background_activation: str,
                         zero_inflation: bool, latent_library: bool, latent_distribution: str,
                         use_size_factor: bool) -> dict:
    """``encoder`` and ``decoder`` arguments of :class:`SCVIModule` in scvi-tools' layout."""
    encoder = AmortizedEncoder(
        # scvi-tools appends the continuous covariates to the encoder's input.
        n_input + n_proteins + (n_cont if encode_covariates else 0), n_latent,
        n_cat_list=cat_list if encode_covariates else (), latent_library=latent_library,
        library_network=True, n_layers=n_layers_encoder, n_hidden=n_hidden,
        dropout_rate=dropout_rate_encoder, use_batch_norm=use_batch_norm in ("encoder", "both"),
        use_layer_norm=use_layer_norm in ("encoder", "both"),
        latent_distribution=latent_distribution,
    )
    decoder = ScviToolsTotalVIDecoder(
        n_latent, n_input, n_proteins, n_cat_list=cat_list, n_cont=n_cont,
        n_layers=n_layers_decoder, n_hidden=n_hidden, dropout_rate=dropout_rate_decoder,
        use_batch_norm=use_batch_norm in ("decoder", "both"),
        use_layer_norm=use_layer_norm in ("decoder", "both"),
        scale_activation="softplus" if use_size_factor else "softmax",
        background_activation=background_activation, zero_inflation=zero_inflation,
    )
    return {"encoder": encoder, "decoder": decoder}
