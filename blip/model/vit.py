"""Vision encoder: timm's VisionTransformer configured as BLIP's ``vit.py``.

Parameter names are timm's, which are also the official BLIP names below ``visual_encoder.``
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, ``norm``), so official checkpoints load key for key.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import VisionConfig


class VisionEncoder(VisionTransformer):
    """ViT returning the full token sequence ``(B, 1 + N, D)``; token 0 is the global feature."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="",
            class_token=True,
            drop_path_rate=cfg.drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        )
        self.cfg = cfg
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1 + N, D)
        return self.forward_features(x)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a ``(1, 1 + N, D)`` position embedding to ``num_tokens`` (= 1 + new grid²).

    Bicubic on the patch grid, class position untouched: the rule of BLIP's ``load_checkpoint``
    (e.g. 224 → 384 px turns a 14×14 grid into 24×24).
    """
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    dim = pos_embed.shape[-1]
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    new = int(round((num_tokens - 1) ** 0.5))
    if old * old != pos_embed.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(
            f"cannot interpolate pos_embed of {pos_embed.shape[1]} tokens to {num_tokens}: "
            "only square patch grids plus one class token are supported"
        )
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)
