"""CUDA paths, marked `cuda`: skipped without a GPU, run by benchmarks/gpu_check.sh.

Each compares against the CPU result of the same code (the CI checks the CPU side).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from distreg.testing import free_port
from tests.conftest import tiny_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def nccl_world_of_one():
    """A one-rank NCCL process group (Comm then routes CPU statistics through the GPU)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    yield
    dist.destroy_process_group()


def test_radix_select_on_cuda_shards_equals_cpu():
    from distreg.sparsity.topk import ShardScores, select_bottom_k

    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, generator=g) for n in (1000, 37, 4096)]
    scores[1][:5] = scores[0][:5]  # ties across shards: the tie-break must agree
    for by_abs in (False, True):
        cpu = select_bottom_k([ShardScores(s, 0, f"p{i}") for i, s in enumerate(scores)], 700, by_abs=by_abs)
        gpu = select_bottom_k([ShardScores(s.to(CUDA), 0, f"p{i}") for i, s in enumerate(scores)], 700, by_abs=by_abs)
        assert cpu.k == gpu.k and cpu.threshold == gpu.threshold
        for a, b in zip(cpu.keep, gpu.keep):
            assert b.device.type == "cuda" and torch.equal(a, b.cpu())


def test_comm_moves_cpu_statistics_through_nccl(nccl_world_of_one):
    from distreg.runtime.comm import Comm

    comm = Comm()
    assert comm.device is not None and comm.device.type == "cuda"
    stats = torch.tensor([1.5, 2.0], dtype=torch.float64)
    out = comm.all_reduce(stats)
    assert out is stats and stats.device.type == "cpu" and stats.tolist() == [1.5, 2.0]
    gathered = comm.all_gather_uneven(torch.arange(3))
    assert gathered[0].device.type == "cpu" and gathered[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("router", ["topk", "sinkhorn"])
def test_moe_dispatch_on_cuda_equals_cpu(router):
    from distreg.models.moe import MoEFeedForward

    torch.manual_seed(0)
    layer = MoEFeedForward(32, 64, num_experts=4, top_k=2, router=router)
    x = torch.randn(2, 16, 32)
    ref = layer(x)
    ref.sum().backward()
    ref_grad = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer_gpu = layer.to(CUDA)
    out = layer_gpu(x.to(CUDA))
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
    for a, p in zip(ref_grad, layer_gpu.parameters()):
        torch.testing.assert_close(p.grad.cpu(), a, rtol=1e-3, atol=1e-5)


def _trainer(token_data, run_dir, **extra):
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    cfg = tiny_config(token_data, run_dir, **{"scaling.num_workers": 1, "scaling.use_gpu": True, **extra})
    return Trainer(cfg, Comm(), CUDA, track=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_bf16_step_close_to_fp32(token_data, tmp_path, nccl_world_of_one, strategy):
    """bf16 (DDP: autocast; FSDP2: the mixed-precision policy) trains: first-step loss
    within bf16 round-off of fp32, on the same batch."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        trainer = _trainer(token_data, str(tmp_path / dtype), **{
            "strategy.name": strategy, "strategy.mixed_precision.param_dtype": dtype})
        losses[dtype] = trainer.train_step()[0]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])


def test_step_has_no_host_sync(token_data, tmp_path, nccl_world_of_one):
    """One Trainer step under torch.cuda.set_sync_debug_mode("warn"): no synchronizing
    call (the first step, with lazy initialisation, is not checked)."""
    trainer = _trainer(token_data, str(tmp_path), **{"strategy.name": "fsdp2", "strategy.mixed_precision.param_dtype": "bf16"})
    trainer.step_on_device()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step_on_device()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs
    (record,), _ = trainer.step_metrics.flush()
    assert torch.isfinite(torch.tensor(record.loss))


def test_grouped_expert_gemm_on_cuda_bf16_equals_cpu_loop():
    import torch.nn.functional as F

    from distreg.models.moe import _grouped_mm_ok, expert_swiglu

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([40, 0, 70, 18])
    rows = torch.randn(128, 64, generator=g)
    w1, w3 = (torch.randn(4, 96, 64, generator=g) / 8 for _ in range(2))
    w2 = torch.randn(4, 64, 96, generator=g) / 8
    args = [t.to(CUDA, torch.bfloat16) for t in (rows, w1, w3, w2)]
    assert _grouped_mm_ok(args[0], *args[1:])  # bf16 on CUDA takes the grouped kernel
    got = expert_swiglu(args[0], counts.to(CUDA), *args[1:]).float().cpu()
    parts = torch.split(rows, counts.tolist())
    want = torch.cat([F.linear(F.silu(F.linear(p, w1[e])) * F.linear(p, w3[e]), w2[e]) for e, p in enumerate(parts)])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 inputs and products
