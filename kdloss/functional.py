"""Functional forms of every kdloss loss (each also takes ``backend="auto"|"kernel"|"reference"``)."""

from .margin_mse import margin_mse_from_embeddings, margin_mse_loss
from .sinkhorn import sinkhorn_loss
from .plackett_luce import plackett_luce_loss, plackett_luce_ranking

__all__ = ["sinkhorn_loss", "margin_mse_loss", "margin_mse_from_embeddings"]
__all__ += ["plackett_luce_loss", "plackett_luce_ranking"]
