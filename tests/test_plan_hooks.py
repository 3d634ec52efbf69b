"""`distreg plan` lists every hook with its per-rank memory (masks, per-sample stores)."""
from __future__ import annotations

import math
import subprocess
import sys

from distreg.config import load_config
from distreg.plan import plan
from tests.conftest import tiny_config


def test_7b_reweight_plan_shows_the_hook():
    proc = subprocess.run([sys.executable, "-m", "distreg.cli", "plan", "configs/llama7b_reweight.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hooks = proc.stdout.split("hooks (per-rank memory")[1]
    assert "loss_reweighting" in hooks and "param_norm" in hooks


def test_mask_and_store_bytes_by_hand(token_data, tmp_path):
    from distreg.data.tokens import TokenDataset
    from distreg.models import build_model

    cfg = tiny_config(token_data, str(tmp_path), **{
        "scaling.num_workers": 2, "strategy.name": "ddp",
        "hooks": "[{name: magnitude_pruning, sparsity: 0.5}, {name: elr, num_classes: 10}, {name: loss_reweighting}]"})
    info = plan(cfg)
    model = build_model(cfg.model, 0, device="meta")
    weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("tok_embeddings"))
    rows = {h["name"]: h for h in info["hooks"]}
    assert rows["magnitude_pruning"]["bytes"] == weights  # DDP: whole tensors, one bool each
    n = len(TokenDataset(token_data, cfg.data.seq_len))
    assert rows["elr"]["bytes"] == math.ceil(n / 2) * 10 * 4
    assert info["bytes"]["hook:elr"] == rows["elr"]["bytes"]
    # FSDP2 over 2 ranks: each rank keeps the mask of its row shard (ceil(rows/2) rows).
    fsdp = plan(load_config(None, [f"data.path={token_data}", "scaling.num_workers=2", "train.global_batch_size=8",
                                   "hooks=[{name: magnitude_pruning, sparsity: 0.5}]"]))
    half = sum(math.ceil(p.shape[0] / 2) * p.shape[1:].numel() for n_, p in model.named_parameters()
               if p.ndim >= 2 and not n_.startswith("tok_embeddings"))
    assert fsdp["hooks"][0]["bytes"] == half
