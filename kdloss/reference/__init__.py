"""Readable pure-PyTorch references of every kdloss loss (the ground truth of the kernel tests).

They compute in the accumulation dtype (fp32, or fp64 for fp64 inputs) and return the student's
dtype; gradients come from autograd.
"""

from .margin_mse import margin_mse_from_embeddings_reference, margin_mse_reference, teacher_is_scores, teacher_margins
from .sinkhorn import sinkhorn_reference
from .plackett_luce import plackett_luce_reference, teacher_ranking

__all__ = ["sinkhorn_reference", "margin_mse_reference", "margin_mse_from_embeddings_reference", "teacher_margins", "teacher_is_scores"]
__all__ += ["plackett_luce_reference", "teacher_ranking"]
