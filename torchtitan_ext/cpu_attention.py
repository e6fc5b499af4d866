"""Dense-mask attention for CPU runs: FlexAttention has no backward pass on the CPU.

:class:`DenseMaskAttention` subclasses torchtitan's ``FlexAttention`` so the decoder still builds
its ``BlockMask`` (block-causal, per document); the forward materializes that mask densely and
calls SDPA. Same math, O(L^2) memory: meant for the small CPU runs only.

The ``@override`` factory :func:`dense_attention` swaps every ``FlexAttention.Config`` in a model
config. The ``torchtitan_ext`` configs enable it automatically when no GPU is present; for a stock
torchtitan config use ``--override.imports torchtitan_ext.cpu_attention.dense_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torchtitan.config.override import derive, override
from torchtitan.models.common.attention import FlexAttention

__all__ = ["DENSE_ATTENTION_OVERRIDE", "DenseMaskAttention", "dense_attention"]

DENSE_ATTENTION_OVERRIDE = "torchtitan_ext.cpu_attention.dense_attention"


class DenseMaskAttention(FlexAttention):
    """FlexAttention's interface, evaluated with a dense boolean mask and SDPA."""

    @dataclass(kw_only=True, slots=True)
    class Config(FlexAttention.Config):
        pass

    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: BlockMask,
        score_mod=None,
        scale: float | None = None,
        enable_gqa: bool = False,
        out_transform=None,
        **kwargs,
    ) -> torch.Tensor:
        if score_mod is not None or out_transform is not None:
            raise RuntimeError(
                "DenseMaskAttention supports mask_mod-only attention (no score_mod, no out_transform). "
                "Run this model on a GPU with the stock FlexAttention."
            )
        if not isinstance(attention_masks, BlockMask):
            raise RuntimeError(f"attention_masks must be a BlockMask, got {type(attention_masks).__name__}")
        B, L, _, _ = q_BLNH.shape
        S = k_BLNH.shape[1]
        mask = create_mask(attention_masks.mask_mod, B, 1, L, S, device=q_BLNH.device)
        out_BNLH = F.scaled_dot_product_attention(
            q_BLNH.transpose(1, 2),
            k_BLNH.transpose(1, 2),
            v_BLNH.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        return out_BNLH.transpose(1, 2)


@override(
    target=FlexAttention.Config,
    exact=True,
    description="dense-mask SDPA in place of FlexAttention (CPU has no FlexAttention backward)",
)
def dense_attention(cfg: FlexAttention.Config) -> DenseMaskAttention.Config:
    return derive(cfg, DenseMaskAttention.Config)
