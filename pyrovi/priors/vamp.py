"""The VampPrior: a mixture of the amortized posterior at learned pseudo-inputs.

Tomczak & Welling (2018), "VAE with a VampPrior", AISTATS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pyro.distributions as dist
import torch
from torch import nn

from pyrovi.priors.mixture import gaussian_mixture

#: What the prior needs from an encoder: ``(inputs, cats, cont) -> (loc, scale)`` of the
#: Gaussian q(z | inputs), or an object with ``z_loc`` and ``z_scale``
#: (:class:`~pyrovi.nn.AmortizedPosterior`).
EncoderFn = Callable[..., object]

PSEUDO_INPUT_INITS = ("data", "random")


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule of ``module`` in eval mode, then restore each one's own flag.

    Each flag is restored separately (not with ``module.train(previous)``), so submodules
    that were deliberately left in eval mode (frozen batch norm, say) stay there.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class VampPrior(nn.Module):
    """p(z) = Σ_k w_k q(z | u_k): the encoder's posterior at ``n_components`` pseudo-inputs.

    The pseudo-inputs ``u_k`` live in the encoder's input space (``log1p`` counts for scVI,
    those of every modality side by side for a multi-modal model) and are learned with the
    rest of the model, so the prior moves towards the aggregate posterior. They are
    unconstrained: nothing keeps them non-negative, since only the encoder's output at them
    matters. Weights are uniform (as in the paper) or learned.

    **Coupling with the encoder.** The prior evaluates the model's own encoder but does
    not own it: the encoder is kept as a plain attribute, not a registered submodule, so it
    appears once in the model's ``parameters()`` and ``state_dict()`` (under the model's
    ``encoder``), is moved and switched to train/eval mode by its owner, and a
    ``deepcopy`` or pickle of the owning model keeps both pointing to one copy. The
    prior's ``state_dict`` holds only the pseudo-inputs, their covariates and the weights.
    pyrovi models pass the encoder for you (``prior="vamp"``); a standalone prior needs
    ``encoder=`` (or :meth:`attach_encoder`), and its owner must train the encoder's
    parameters.

    **Batch norm and dropout.** The pseudo-inputs always go through the encoder in eval
    mode: batch norm normalises them with its running statistics, which they never update,
    and dropout is off. In training mode they would be normalised with statistics of the
    pseudo-inputs as a batch (not of cells), would shift the running statistics used to
    embed real cells at inference, and dropout would make the prior density random. After
    training, the prior is exactly the mixture of the posteriors that
    ``get_latent_representation`` computes for the pseudo-inputs. (Early in training the
    running statistics lag the minibatch statistics that real cells are normalised with;
    the difference vanishes as they converge.)

    **Covariates.** When the encoder takes covariates (``encode_covariates=True``), each
    pseudo-input carries fixed covariate values (buffers, not learned): those of the cell it
    was initialised from, or, for random initialisation, category ``k mod n_categories``
    and zero continuous covariates. The prior is still one distribution for every cell.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_input
        Width of the encoder's input (the pseudo-inputs' dimension).
    n_components
        Number of pseudo-inputs K.
    encoder
        The encoder, ``(inputs, cats, cont) -> (loc, scale)`` (a
        :class:`~pyrovi.nn.GaussianEncoder`) or returning an object with ``z_loc`` and
        ``z_scale`` (an :class:`~pyrovi.nn.AmortizedEncoder`); ``None`` to attach later.
    n_cat_list
        Categories of each categorical covariate the encoder takes (empty: none).
    n_cont
        Number of continuous covariates the encoder takes.
    learn_weights
        Learn the mixture weights (default: uniform, 1/K).
    pseudo_input_init
        ``"data"``: pyrovi models replace the pseudo-inputs by the encoder inputs of K random
        training cells when training starts (once; until then, and for ``"random"``, they
        are uniform on [0, 1) in each feature).

    Examples
    --------
    >>> from pyrovi.nn import GaussianEncoder
    >>> encoder = GaussianEncoder(100, 10)
    >>> prior = VampPrior(10, 100, n_components=20, encoder=encoder)
    >>> prior(4).batch_shape, prior(4).event_shape
    (torch.Size([4]), torch.Size([10]))
    """

    def __init__(
        self,
        n_latent: int,
        n_input: int,
        n_components: int = 50,
        encoder: EncoderFn | None = None,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        learn_weights: bool = False,
        pseudo_input_init: str = "data",
    ):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}.")
        if pseudo_input_init not in PSEUDO_INPUT_INITS:
            raise ValueError(
                f"pseudo_input_init must be one of {PSEUDO_INPUT_INITS}, got "
                f"{pseudo_input_init!r}."
            )
        self.n_latent = n_latent
        self.n_input = n_input
        self.n_components = n_components
        self.n_cat_list = tuple(int(n) for n in n_cat_list)
        self.n_cont = n_cont
        self.pseudo_input_init = pseudo_input_init
        self.attach_encoder(encoder)
        self.pseudo_inputs = nn.Parameter(torch.rand(n_components, n_input))
        codes = torch.arange(n_components).unsqueeze(-1)
        self.register_buffer("pseudo_cats", torch.cat(
            [codes % n for n in self.n_cat_list], dim=-1) if self.n_cat_list
            else torch.zeros(n_components, 0, dtype=torch.long))
        self.register_buffer("pseudo_cont", torch.zeros(n_components, n_cont))
        logits = torch.zeros(n_components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)
        # Saved with the model, so a loaded or transferred model keeps its learned
        # pseudo-inputs instead of being re-initialised from new cells.
        self.register_buffer("data_initialized", torch.tensor(False))

    # -- the encoder, held without being registered ---------------------------------------

    @property
    def encoder(self) -> EncoderFn | None:
        """The encoder evaluated at the pseudo-inputs (not a submodule of the prior)."""
        return self.__dict__.get("_encoder")

    def attach_encoder(self, encoder: EncoderFn | None) -> None:
        """Use ``encoder`` for q(z | u_k), without registering it as a submodule.

        Parameters
        ----------
        encoder
            See the class parameters.
        """
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable, got {type(encoder).__name__}.")
        # object.__setattr__ bypasses nn.Module's registration of submodules.
        object.__setattr__(self, "_encoder", encoder)

    # -- data-dependent initialisation ----------------------------------------------------

    @property
    def n_init_cells(self) -> int:
        """Cells wanted by :meth:`initialize_from_cells` (0 once initialised, or never)."""
        if self.pseudo_input_init != "data" or bool(self.data_initialized):
            return 0
        return self.n_components

    @torch.no_grad()
    def initialize_from_cells(
        self,
        inputs: torch.Tensor,
        cats: Sequence[torch.Tensor] = (),
        cont: torch.Tensor | None = None,
    ) -> None:
        """Set the pseudo-inputs (and their covariates) to those of given cells.

        Parameters
        ----------
        inputs
            Encoder inputs of the cells, ``(n_cells, n_input)``; with fewer than K cells,
            they are reused in turn.
        cats
            Their categorical covariate codes, one ``(n_cells,)`` tensor per covariate
            (when the encoder takes covariates).
        cont
            Their continuous covariates, ``(n_cells, n_cont)``.
        """
        if inputs.dim() != 2 or inputs.shape[1] != self.n_input or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs must have shape (n_cells >= 1, {self.n_input}), got "
                f"{tuple(inputs.shape)}."
            )
        rows = torch.arange(self.n_components, device=inputs.device) % inputs.shape[0]
        self.pseudo_inputs.copy_(inputs.index_select(0, rows))
        for j, codes in enumerate(list(cats)[: len(self.n_cat_list)]):
            self.pseudo_cats[:, j] = codes.index_select(0, rows)
        if self.n_cont and cont is not None:
            self.pseudo_cont.copy_(cont.index_select(0, rows))
        self.data_initialized.fill_(True)

    # -- the prior --------------------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights, shape ``(n_components,)``."""
        return torch.softmax(self.logits, -1)

    def component_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z | u_k) for every pseudo-input, each ``(K, n_latent)``.

        The encoder runs in eval mode (see the class notes on batch norm).
        """
        encoder = self.encoder
        if encoder is None:
            raise RuntimeError(
                "This VampPrior has no encoder: use prior='vamp' in a pyrovi model, or pass "
                "encoder= (or call attach_encoder)."
            )
        cats = list(self.pseudo_cats.unbind(-1))
        cont = self.pseudo_cont if self.n_cont else None
        if isinstance(encoder, nn.Module):
            with evaluation_mode(encoder):
                out = encoder(self.pseudo_inputs, cats, cont)
        else:
            out = encoder(self.pseudo_inputs, cats, cont)
        if hasattr(out, "z_loc"):
            return out.z_loc, out.z_scale
        loc, scale = out
        return loc, scale

    def forward(self, n_cells: int) -> dist.Distribution:
        """The prior over ``n_cells`` independent latent vectors.

        Parameters
        ----------
        n_cells
            Number of cells in the plate.

        Returns
        -------
        pyro.distributions.MixtureSameFamily
            Batch shape ``(n_cells,)``, event shape ``(n_latent,)``.
        """
        loc, scale = self.component_parameters()
        return gaussian_mixture(self.logits, loc, scale, n_cells)

    def extra_repr(self) -> str:
        return (f"n_latent={self.n_latent}, n_input={self.n_input}, "
                f"n_components={self.n_components}")
