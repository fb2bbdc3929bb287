"""φ: removing the direct (zero-frequency) component of a feature map.

SCALEKD.md defines φ(x) = DCT⁻¹(σ(DCT(x))) with σ zeroing the zero-frequency coefficient of a
2-D DCT-II over the spatial grid of each channel. With the orthonormal DCT the zero-frequency
basis vector is constant, so zeroing it is exactly subtracting the per-channel spatial mean; we
use that O(N) form (tests prove the identity against scipy's DCT).
"""
from __future__ import annotations

import torch

__all__ = ["dc_removed", "dc_component", "dc_removed_map", "dc_energy_fraction"]


def dc_component(tokens: torch.Tensor) -> torch.Tensor:
    """Per-channel DC component of a token grid.

    tokens: (B, N, C), N = H·W tokens of one spatial grid. Returns (B, 1, C), so that
    ``tokens == dc_removed(tokens) + dc_component(tokens)``.
    """
    return tokens.mean(dim=1, keepdim=True)


def dc_removed(tokens: torch.Tensor) -> torch.Tensor:
    """φ on a token grid: (B, N, C) → (B, N, C) with every channel's spatial mean removed."""
    return tokens - dc_component(tokens)


def dc_removed_map(x: torch.Tensor) -> torch.Tensor:
    """φ on a feature map: (B, C, H, W) → (B, C, H, W)."""
    return x - x.mean(dim=(-2, -1), keepdim=True)


def dc_energy_fraction(tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of the squared energy that lies in the DC component, per sample.

    With the orthonormal DCT the DC coefficient of a channel is sqrt(N)·mean, so its energy is
    N·mean²; the total energy is Σ x² (Parseval). tokens: (B, N, C) → (B,).
    """
    t = tokens.float()
    dc_energy = t.shape[1] * dc_component(t).pow(2).sum(dim=(1, 2))
    total = t.pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(t.dtype).tiny)
    return dc_energy / total
