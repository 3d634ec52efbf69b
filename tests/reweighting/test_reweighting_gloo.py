"""The real-process check: one spawn of 2 gloo ranks runs every distributed scenario
(weights in both S4 modes, store, ELR/PS-KD epochs) and compares with the 1-process runs."""
from __future__ import annotations

from distreg.runtime.comm import Comm
from distreg.testing import run_distributed
from tests.reweighting.scenarios import (
    WEIGHT_SPLITS,
    assert_epochs_match,
    assert_store_ok,
    assert_weights_match,
    gloo_main,
    run_epochs,
    weights_checks,
)


def test_two_gloo_ranks_match_single_process():
    ranks = run_distributed(gloo_main, 2)
    single = Comm()  # no process group: world size 1
    assert single.world_size == 1
    for mode in ("allreduce", "allgather"):
        ref = weights_checks(single, WEIGHT_SPLITS[1], mode)
        assert_weights_match(ref, [r["weights"][mode] for r in ranks], mode)
    assert_store_ok([r["store"] for r in ranks])
    assert_epochs_match([r["epochs"] for r in ranks], run_epochs(single))
