"""Functional forms of every kdloss loss (each also takes ``backend="auto"|"kernel"|"reference"``)."""

from .margin_mse import margin_mse_from_embeddings, margin_mse_loss

__all__ = ["margin_mse_loss", "margin_mse_from_embeddings"]
