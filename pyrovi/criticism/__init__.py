"""Reports on trained models: how well they fit and what they are (``pyrovi.criticism``).

The criticism layer sits above :mod:`pyrovi.posterior` (utilities on any model/guide pair)
and below :mod:`pyrovi.io` and the model classes of :mod:`pyrovi.models`. Its reports reach
a trained model only through the members declared by :class:`TrainedModel`, which the
model classes implement:

- :class:`PosteriorPredictiveCheck`: posterior predictive checks as on scvi-hub model
  cards (coefficient of variation, fraction of zeros, interval calibration, agreement of
  differential expression), with its statistics in :mod:`pyrovi.criticism.stats`;
- :func:`embedding_metrics`: bio-conservation and batch-correction scores of an embedding,
  as on CELLxGENE Census model cards;
- :func:`to_arviz`: posterior and posterior predictive draws as an ArviZ ``DataTree``;
- :func:`model_card`, :func:`write_card`: a model card in Markdown and JSON.

These names are also reachable from :mod:`pyrovi.posterior`, where they lived before.
"""

from pyrovi.criticism.arviz_export import to_arviz
from pyrovi.criticism.card import model_card, write_card
from pyrovi.criticism.embedding import embedding_metrics
from pyrovi.criticism.interface import TrainedModel, check_trained_model
from pyrovi.criticism.ppc import PosteriorPredictiveCheck

#: Names that lived in :mod:`pyrovi.posterior` before the criticism layer; ``pyrovi`` sets
#: them on that module too, so that old imports keep working.
FORMER_POSTERIOR_NAMES = (
    "PosteriorPredictiveCheck",
    "embedding_metrics",
    "model_card",
    "to_arviz",
    "write_card",
)

__all__ = [
    "PosteriorPredictiveCheck",
    "TrainedModel",
    "check_trained_model",
    "embedding_metrics",
    "model_card",
    "to_arviz",
    "write_card",
]
