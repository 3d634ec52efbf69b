"""Orthogonality regularisers (spec regularizers.md section 7).

Parameter-only terms (P2): compute them on the whole tensor (P2a inside the module's forward,
or P2b on the gathered tensor), or - for the matrix form under a row sharding (FSDP2
`Shard(0)`) - with `soft_orthogonality(local_rows, comm=...)`, which all-reduces the column
Gram instead of gathering the matrix ("replicated" convention: same value on every rank, each
rank's gradient is its exact slice of the full gradient; add it to the already-reduced
gradient, never through the data-parallel average).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distreg.regularizers._dist import active, sum_spliced
from distreg.runtime.comm import Comm


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with value 0 and gradient 0 (not NaN) at v <= 0 (rounding can make a zero norm
    slightly negative when it is formed from Gram identities)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def soft_orthogonality(weight: torch.Tensor, side: str = "auto", squared: bool = True,
                       comm: Comm | None = None, gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """||W W^T - I||_F^2 ("rows") or ||W^T W - I||_F^2 ("cols") of W = weight.reshape(out, -1).

    `side="auto"` takes the smaller Gram (rows if out < in*k*k, else cols), as Wang et al.'s
    `orth_dist` [CODE]; `squared=False` gives their non-squared norm (orth_dist itself is
    `soft_orthogonality(w, squared=False)`); Bansal et al.'s SO is `side="cols"`, DSO the sum
    of both sides. The Gram is formed in `gram_dtype` (float64 by default).

    Sharded form: with `comm`, `weight` is this rank's block of whole rows (any sizes, rank
    order, an empty block allowed). Then G = W^T W = sum_r W_r^T W_r (in x in) is all-reduced
    (one collective, with the row count) and the rows side uses the trace identity
    ||W W^T - I_m||^2 = ||G||^2 - 2 tr G + m, so no rank needs another rank's rows. Memory
    (in*k*k)^2 in `gram_dtype`: for out << in*k*k a whole-matrix gather can be cheaper.
    """
    if side not in ("auto", "rows", "cols"):
        raise ValueError(f"side must be 'auto', 'rows' or 'cols', got {side!r}")
    w = weight.reshape(weight.shape[0], math.prod(weight.shape[1:])).to(gram_dtype)
    n = w.shape[1]
    if not active(comm):
        m = w.shape[0]
        rows = side == "rows" or (side == "auto" and m < n)
        gram = w @ w.t() if rows else w.t() @ w
        value = ((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)) ** 2).sum()
        return value if squared else _safe_sqrt(value)
    local = torch.cat([(w.t() @ w).reshape(-1), w.new_tensor([float(w.shape[0])])])
    total = sum_spliced(local, comm)
    gram, m = total[:-1].reshape(n, n), int(total[-1].item())
    rows = side == "rows" or (side == "auto" and m < n)
    if rows:
        value = (gram * gram).sum() - 2 * torch.diagonal(gram).sum() + m
    else:
        value = ((gram - torch.eye(n, dtype=gram.dtype, device=gram.device)) ** 2).sum()
    return value if squared else _safe_sqrt(value)


def soft_orthogonality_grad(weight: torch.Tensor, side: str = "auto", squared: bool = True,
                            comm: Comm | None = None, gram_dtype: torch.dtype | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d value / d weight) of :func:`soft_orthogonality` in closed form, no autograd:
    with G the Gram of the chosen side, d||G - I||^2/dW = 4 W (W^T W - I) (cols) or
    4 (W W^T - I) W (rows) - one matrix product for the value and one for the gradient,
    where autograd through the Gram needs two more. Sharded form (`comm`, blocks of whole
    rows): G = sum_r W_r^T W_r is all-reduced and both sides give rank r's rows of the
    gradient as 4 W_r (G - I) (trace identity, as in `soft_orthogonality`).

    `gram_dtype=None` forms the products in the weight's own dtype (fp32 master weights:
    the fast path) and sums the squared error in float64; float64 reproduces
    `soft_orthogonality` to round-off. The value is float64; the gradient has the Gram's
    dtype and the weight's shape."""
    if side not in ("auto", "rows", "cols"):
        raise ValueError(f"side must be 'auto', 'rows' or 'cols', got {side!r}")
    w = weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    w = w.to(gram_dtype or w.dtype)
    m, n = w.shape
    if active(comm):
        local = torch.cat([(w.t() @ w).reshape(-1), w.new_tensor([float(m)])])
        total = comm.all_reduce(local)
        gram, m = total[:-1].reshape(n, n), int(total[-1].item())
        gram_i = gram - torch.eye(n, dtype=gram.dtype, device=gram.device)
        rows = side == "rows" or (side == "auto" and m < n)
        g64 = gram.to(torch.float64)
        value = (g64 * g64).sum() - 2 * torch.diagonal(g64).sum() + m if rows else (gram_i.to(torch.float64) ** 2).sum()
        grad = 4 * (w @ gram_i)
    else:
        rows = side == "rows" or (side == "auto" and m < n)
        gram = w @ w.t() if rows else w.t() @ w
        gram_i = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        value = (gram_i.to(torch.float64) ** 2).sum()
        grad = 4 * (gram_i @ w if rows else w @ gram_i)
    if not squared:
        root = _safe_sqrt(value)
        scale = torch.where(root > 0, 0.5 / torch.where(root > 0, root, torch.ones_like(root)), torch.zeros_like(root))
        value, grad = root, grad * scale.to(grad.dtype)
    return value, grad.reshape(weight.shape)


def conv_orthogonality(kernel: torch.Tensor, stride: int = 1, reference_compat: bool = False) -> torch.Tensor:
    """Orthogonality of the strided convolution operator from the kernel self-correlation.

    Paper form (Wang et al. 2020; Achour et al.) [PAPER/DERIVED]: with K [M, C, kh, kw],
    P = floor((k - 1) / S) * S per spatial dim, Conv(K, K) = conv2d(K, K, stride=S, padding=P)
    and I_r0 the identity at zero shift (spatial index P / S):
      L = ||Conv(K, K) - I_r0||_F^2, minus (M - C S^2) when M > C S^2 (column orthogonality).
    L = 0 iff the convolution is orthogonal.

    `reference_compat=True` reproduces the reference `deconv_orth_dist` [CODE]: padding 1 for any
    k and S, identity at spatial index floor(W_out / 2), non-squared norm, no correction.
    Needs the whole kernel (P2a / P2b).
    """
    if kernel.dim() != 4:
        raise ValueError(f"kernel must be [out, in, kh, kw], got shape {tuple(kernel.shape)}")
    m, c, kh, kw = kernel.shape
    if reference_compat:
        out = F.conv2d(kernel, kernel, stride=stride, padding=1)
        ct = out.shape[-1] // 2
        target = torch.zeros_like(out)
        target[:, :, ct, ct] = torch.eye(m, dtype=out.dtype, device=out.device)
        return torch.linalg.vector_norm(out - target)
    ph, pw = (kh - 1) // stride * stride, (kw - 1) // stride * stride
    out = F.conv2d(kernel, kernel, stride=stride, padding=(ph, pw))
    target = torch.zeros_like(out)
    target[:, :, ph // stride, pw // stride] = torch.eye(m, dtype=out.dtype, device=out.device)
    value = ((out - target) ** 2).sum()
    return value - max(0, m - c * stride * stride)
