"""Readable pure-PyTorch references of every kdloss loss (the ground truth of the kernel tests).

They compute in the accumulation dtype (fp32, or fp64 for fp64 inputs) and return the student's
dtype; gradients come from autograd.
"""

from .margin_mse import margin_mse_from_embeddings_reference, margin_mse_reference, teacher_is_scores, teacher_margins
from .sinkhorn import sinkhorn_reference
from .fused_linear_topk_kl import fused_linear_topk_kl_reference, linear_logits
from .topk_kl import teacher_log_targets, topk_kl_reference
from .plackett_luce import plackett_luce_reference, teacher_ranking

__all__ = ["fused_linear_topk_kl_reference", "linear_logits", "sinkhorn_reference", "topk_kl_reference", "teacher_log_targets", "margin_mse_reference", "margin_mse_from_embeddings_reference", "teacher_margins", "teacher_is_scores"]
__all__ += ["plackett_luce_reference", "teacher_ranking"]
from .token_contextual import token_contextual_reference  # noqa: E402
from .token_graph import token_contrastive_reference, token_graph_reference  # noqa: E402
__all__ += ["token_contextual_reference", "token_graph_reference", "token_contrastive_reference"]
