"""Glue between kdloss and training frameworks. Each submodule imports its framework on import and
raises an ``ImportError`` naming the package to install when it is missing:

* :mod:`kdloss.integrations.transformers` — Hugging Face ``Trainer`` distillation of causal LMs
  (online teacher or stored top-k targets; plain or fused LM head): ``KDTrainer``,
  ``distillation_loss``, ``DistillationConfig``, ``DistillationCollator``.
* :mod:`kdloss.integrations.sentence_transformers` — sentence-transformers loss classes for
  Margin-MSE and Plackett-Luce distillation (bi-encoders and cross-encoders).

Nothing here is imported by ``import kdloss``.
"""
