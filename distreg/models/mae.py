"""A small MAE-style masked autoencoder (ViT encoder / decoder) for masked image modeling.

Shape of the model follows MAE (He et al. 2022; the HPM reference's `models_mae.py`):
patches -> linear embedding + fixed 2-D sin-cos positions -> the *visible* patches and a
cls token through the encoder blocks -> a linear map to the decoder width -> mask tokens
at the masked positions, decoder positions -> decoder blocks -> a linear map back to the
patch's pixels. The reconstruction loss of a patch is the mean squared error of its pixels
against the input's (optionally per-patch normalised: `norm_pix_loss`), and a sample's
loss is the mean over its *masked* patches.

The mask is an input: `forward(images, visible)` with `visible` the [B, n_keep] sorted
indices of the patches the encoder sees (every sample keeps the same number, so shapes
carry the counts and nothing is read back to the host). The Trainer draws a keyed random
mask (`random_visible`: (seed, step, global sample index, patch) -> uniform, the n_keep
smallest kept), so 1 or N ranks, any strategy, a resumed run draw the same masks; a hook
(`hpm`) may replace it. Unlike the reference the decoder sequence keeps patch order (mask
tokens scattered in place of the hidden patches): attention is order-free, positions are
added, so this computes the same function.

`add_loss_predictor` adds HPM's auxiliary branch (the reference's
`decoder_blocks_losspred` / `decoder_norm_losspred` / `decoder_pred_losspred`): the
decoder's input sequence through its own blocks, norm and a linear map to patch pixels,
averaged to one predicted loss per patch. Its output is in `out["loss_pred"]`.

Output of `forward` (a dict, which every strategy passes through): `patch_loss` [B, L]
(every patch's loss, masked or not), `mask` [B, L] (1.0 = masked), and `loss_pred` when
the predictor is there. `per_sample_mim_loss` reduces it (runtime/loss.py calls it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distreg.sparsity.masks import index_uniform_at


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid + 1, dim] fixed 2-D sin-cos position embedding, row 0 (cls) zero (MAE's
    get_2d_sincos_pos_embed: half the channels encode the row, half the column)."""
    if dim % 4:
        raise ValueError(f"mae: embedding width {dim} must be divisible by 4 (2-D sin-cos positions)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def one(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one(xs), one(ys)], dim=1)  # MAE: w first, then h
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def patch_losses(pred: torch.Tensor, patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """[B, L] mean squared error per patch; with `norm_pix` the target patch is
    normalised by its own mean and (unbiased) variance, (x - mean) / sqrt(var + 1e-6),
    as in MAE's forward_loss."""
    target = patches
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return ((pred.float() - target.float()) ** 2).mean(dim=-1)


def mask_uniforms(seed: int, step: int, index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, L] keyed uniforms: patch j of global sample i at optimizer step `step` draws
    the same value whatever rank / micro-batch holds the sample."""
    j = torch.arange(num_patches, device=index.device, dtype=torch.int64)
    return index_uniform_at(seed, f"mae_mask/{step}", index.to(torch.int64)[:, None] * num_patches + j[None])


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps: int(L * (1 - mask_ratio)), MAE's / HPM's len_keep."""
    return int(num_patches * (1 - mask_ratio))


def visible_from_scores(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The n_keep lowest-scoring patches of each row, sorted by patch index."""
    return torch.argsort(scores, dim=1, stable=True)[:, :n_keep].sort(dim=1).values


def random_visible(seed: int, step: int, index: torch.Tensor, num_patches: int, mask_ratio: float) -> torch.Tensor:
    """MAE's random masking, keyed: each sample keeps its n_keep lowest keyed uniforms."""
    return visible_from_scores(mask_uniforms(seed, step, index, num_patches), num_visible(num_patches, mask_ratio))


def add_random_masks(micro_batches: list[dict], cfg, seed: int, step: int) -> list[dict]:
    """Each micro-batch with `visible` (its samples' keyed random masks at `step`);
    cfg: config.MaeConfig."""
    n = (cfg.image_size // cfg.patch_size) ** 2
    return [{**b, "visible": random_visible(seed, step, b["index"], n, cfg.mask_ratio)} for b in micro_batches]


def per_sample_mim_loss(out: dict) -> torch.Tensor:
    """Each sample's mean reconstruction loss over its masked patches."""
    mask = out["mask"]
    return (out["patch_loss"] * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"mae: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LossPredictor(nn.Module):
    """HPM's loss-prediction branch: blocks + norm + linear to patch pixels, mean -> [B, L+1]."""

    def __init__(self, dim: int, depth: int, heads: int, patch_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).mean(dim=-1)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):  # MAE: xavier_uniform, zero bias
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedAutoencoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 decoder_dim: int, decoder_depth: int, decoder_heads: int, norm_pix_loss: bool = True,
                 in_chans: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"mae: image size {image_size} is not divisible by patch size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_dim = patch_size * patch_size * in_chans
        self.norm_pix_loss = norm_pix_loss
        self.decoder_depth, self.decoder_heads = decoder_depth, decoder_heads
        self.patch_embed = nn.Linear(self.patch_dim, dim)  # = MAE's stride-p conv on patchified pixels
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_dim)
        self.loss_predictor: LossPredictor | None = None

    def init_weights(self, seed: int) -> None:
        torch.manual_seed(seed)
        _init(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def add_loss_predictor(self, seed: int) -> LossPredictor:
        """Build HPM's loss-prediction branch (same depth / width / heads as the decoder,
        as in the reference), initialised from `seed` alone (identical on every rank)."""
        if self.loss_predictor is not None:
            raise ValueError("mae: the model already has a loss predictor")
        device = self.decoder_pred.weight.device
        with torch.device(device):
            pred = LossPredictor(self.decoder_embed.out_features, self.decoder_depth, self.decoder_heads,
                                 self.patch_dim)
        if device.type != "meta":
            g_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            _init(pred)
            torch.random.set_rng_state(g_state)
        self.loss_predictor = pred
        return pred

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> dict:
        patches = patchify(images, self.patch_size)
        b, n, _ = patches.shape
        if visible is None:  # every patch visible (nothing to reconstruct: patch_loss of a full view)
            visible = torch.arange(n, device=images.device).expand(b, n)
        x = self.patch_embed(patches) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, visible[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        # mask tokens everywhere, the encoded visible patches scattered back in patch order
        full = self.mask_token.to(x.dtype).expand(b, n, -1)
        full = full.scatter(1, visible[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        out = {}
        if self.loss_predictor is not None:
            out["loss_pred"] = self.loss_predictor(x)[:, 1:]
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        mask = torch.ones(b, n, device=images.device, dtype=torch.float32)
        mask = mask.scatter(1, visible, 0.0)
        out["patch_loss"] = patch_losses(pred, patches, self.norm_pix_loss)
        out["mask"] = mask
        return out


def build_mae(cfg, device="cpu", init: bool = True, seed: int = 0) -> MaskedAutoencoder:
    """The model of `model.kind: mae` (cfg: config.MaeConfig)."""
    with torch.device(device):
        model = MaskedAutoencoder(cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.decoder_dim,
                                  cfg.decoder_depth, cfg.decoder_heads, cfg.norm_pix_loss)
    if init and str(device) != "meta":
        model.init_weights(seed)
    return model
