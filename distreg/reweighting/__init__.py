"""Loss reweighting and per-sample stores — the functional core (no hook state).

* `weights`: per-sample weights normalised over the global batch (Sow et al. ICLR 2025
  strategies, KL-DRO), reweighted losses and global weight statistics.
* `store`: `ShardedSampleStore`, per-sample rows keyed by global dataset index and
  sharded over ranks.
* `targets`: ELR and PS-KD target / loss math and their store-driven steps.

Specs: shared/methods/sparsity-reweighting-ot.md §8–9 (S4) and
shared/methods/regularizers.md §3–4 (P1, P4).
"""
from distreg.reweighting.store import ShardedSampleStore
from distreg.reweighting.targets import (
    ELR_PRESETS,
    elr_loss,
    elr_probs,
    elr_regularizer,
    elr_step,
    elr_target_update,
    pskd_alpha,
    pskd_loss,
    pskd_step,
    pskd_targets,
)
from distreg.reweighting.weights import (
    DEFAULTS,
    STRATEGIES,
    extremes_weights,
    global_mean,
    kl_dro_normalizer_update,
    kl_dro_objective,
    kl_dro_weights,
    linear_weights,
    linupper_weights,
    quadratic_weights,
    reweighted_loss,
    sample_weights,
    temperature_schedule,
    uniform_weights,
    weight_stats,
)

__all__ = [
    "DEFAULTS", "ELR_PRESETS", "STRATEGIES", "ShardedSampleStore",
    "elr_loss", "elr_probs", "elr_regularizer", "elr_step", "elr_target_update",
    "extremes_weights", "global_mean", "kl_dro_normalizer_update", "kl_dro_objective", "kl_dro_weights",
    "linear_weights", "linupper_weights", "pskd_alpha", "pskd_loss", "pskd_step", "pskd_targets",
    "quadratic_weights", "reweighted_loss", "sample_weights", "temperature_schedule", "uniform_weights",
    "weight_stats",
]
