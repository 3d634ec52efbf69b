"""Regularizer hooks (issue 7): thin, stateful, distributed-aware wrappers around the
functional cores in `distreg.regularizers`, usable by name from YAML.

- `penalties`: `orthogonality`, `nuclear_norm`, `trained_rank_pruning`, `wdr`, `mba_l2`
  (gradient additions on the reduced local gradients; TRP's periodic projection).
- `proximal`: `group_envelope` (WGSEF prox after each optimizer step).
- `losses`: `stablemax`, `z_loss_logit`, `z_loss_spherical`, `collapse_monitor`.
- `gradients`: `perp_grad` (⊥Grad on the reduced gradients).
- `monitors`: `hessian_trace` (Hutchinson, logged beside 2 / lr).
- `features`: `nested_dropout` (ordered feature dropout keyed by the step).
- `embeddings`: `normalized_softmax`, `tcm`, `cs_ib` (losses on the head's input features).
- `distillation`: teacher-ensemble distillation (MEAL V2) and FerKD.
- `sorsa`: SVD adapters with the orthonormal regulariser (merge: `distreg adapters merge`).

Each module's docstring states the order of its events inside a step, its communication
and its metrics; `_common` describes how whole-matrix terms reach sharded weights.
"""
from distreg.hooks.regularizers import features, gradients, losses, monitors, penalties, proximal  # noqa: F401
from distreg.hooks.regularizers import distillation, embeddings, sorsa  # noqa: F401
