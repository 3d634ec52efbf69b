"""Run code on a CUDA device faked on the CPU, to catch CPU-vs-CUDA tensor mixing
without a GPU (the CI has none).

`torch._subclasses.fake_tensor.FakeTensorMode` creates `cuda` tensors that carry only
metadata and checks devices like the CUDA kernels do: `cpu_accumulator += cuda_tensor`
raises, a 0-dim CPU scalar operand is allowed (as on a real GPU). The `meta` device
does not catch these mixes, hence this mode. Two gaps are bridged here:
- host reads (`.item()`, `float()`, `int()`, `bool()`, `.tolist()`) of a fake tensor
  have no value: they return a fixed stand-in (1 / True) so control flow proceeds;
- ops whose output shape depends on values (`nonzero`, boolean-mask indexing,
  `masked_select`) get the largest possible shape (every element selected);
- the autograd engine needs a real CUDA context for fake-CUDA graphs: `torch.autograd.grad`
  returns random stand-ins on the inputs' devices, and callers set `.grad` directly
  instead of calling `backward()` (see tests/gpu/test_fake_cuda.py).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch._subclasses import fake_impls
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

FAKE_CUDA = torch.device("cuda", 0)


def _stand_in(t: torch.Tensor):
    if t.dtype == torch.bool:
        return False  # error checks (`if bad.any(): raise`) stay quiet
    return 1.0 if t.is_floating_point() else 1


@contextlib.contextmanager
def fake_cuda_mode():
    """Yields the FakeTensorMode; inside it `torch.device("cuda")` tensors need no GPU.
    Host reads are counted in `mode.host_reads` (a list of (kind, device))."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.host_reads = []
    real = {n: getattr(torch.Tensor, n) for n in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")}

    def patched(name):
        def f(self, *a, **k):
            if isinstance(self, FakeTensor):
                mode.host_reads.append((name, self.device.type))
                if name == "tolist":
                    return torch.full(self.shape, _stand_in(self), dtype=torch.float64).tolist() if self.dim() else _stand_in(self)
                v = _stand_in(self)
                return {"__float__": float, "__int__": int, "__index__": int, "__bool__": bool}.get(name, lambda x: x)(v)
            return real[name](self, *a, **k)
        return f

    def nonzero(fake_mode, func, arg):
        return arg.new_empty((arg.numel(), arg.dim()), dtype=torch.int64)

    def masked_select(fake_mode, func, arg, mask):
        return arg.new_empty((torch.broadcast_shapes(arg.shape, mask.shape).numel(),))

    def bincount(fake_mode, func, arg, weights=None, minlength=0):
        return arg.new_empty((minlength or arg.numel(),), dtype=torch.int64 if weights is None else weights.dtype)

    def unique_dim(fake_mode, func, arg, dim, sorted=True, return_inverse=False, return_counts=False):
        long = arg.new_empty((arg.shape[dim],), dtype=torch.int64)
        return arg.new_empty(arg.shape), long, long

    def unique2(fake_mode, func, arg, sorted=True, return_inverse=False, return_counts=False):
        return arg.new_empty((arg.numel(),)), arg.new_empty(arg.shape, dtype=torch.int64), arg.new_empty((arg.numel(),), dtype=torch.int64)

    dynamic = {torch.ops.aten.nonzero.default: nonzero, torch.ops.aten.masked_select.default: masked_select,
               torch.ops.aten.bincount.default: bincount, torch.ops.aten.unique_dim.default: unique_dim,
               torch.ops.aten._unique2.default: unique2}

    def grad(outputs, inputs, *a, **k):
        # Stand-in gradients on each input's device (no real CUDA context for the engine).
        single = isinstance(inputs, torch.Tensor)
        outs = tuple(torch.randn_like(i) for i in ((inputs,) if single else inputs))
        return outs
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(fake_impls.op_implementations_dict, dynamic))
        stack.enter_context(mock.patch.object(torch.autograd, "grad", grad))
        for name in real:
            stack.enter_context(mock.patch.object(torch.Tensor, name, patched(name)))
        stack.enter_context(mode)
        yield mode
