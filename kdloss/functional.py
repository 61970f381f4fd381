"""Functional forms of every kdloss loss (each also takes ``backend="auto"|"kernel"|"reference"``)."""

from .margin_mse import margin_mse_from_embeddings, margin_mse_loss
from .sinkhorn import sinkhorn_loss
from .fused_linear_topk_kl import fused_linear_topk_kl_loss
from .topk_kl import topk_kl_loss
from .plackett_luce import plackett_luce_loss, plackett_luce_ranking

__all__ = ["fused_linear_topk_kl_loss", "sinkhorn_loss", "topk_kl_loss", "margin_mse_loss", "margin_mse_from_embeddings"]
__all__ += ["plackett_luce_loss", "plackett_luce_ranking"]
from .trg import token_contextual_loss, token_contrastive_loss, token_graph_loss  # noqa: E402
__all__ += ["token_contextual_loss", "token_graph_loss", "token_contrastive_loss"]
