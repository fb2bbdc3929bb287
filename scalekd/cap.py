"""Cross Attention Projector (CAP): a student map → the teacher's token space.

SCALEKD.md, five steps:
1. patchify: Conv3×3 (Cs→Cs, stride 1) + BatchNorm (LayerNorm2d for ConvNeXt-like students) + ReLU;
2. a learned positional embedding (1, Cs, H, W), trunc-normal std 0.02, added after the conv;
3. queries (B, Nt, Ct), trainable (N(0,1) init) or given at call time, through a 1×1 conv + ReLU;
4. one multi-head cross attention (no self attention, no residual): q from the queries, k and v
   from the student tokens, logits scaled by head_dim^-0.5 · softmax_scale, output projection;
5. LayerNorm(Ct), then FFN Ct→4Ct→Ct with ReLU, the LN output added back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttentionProjector", "default_num_heads"]


def default_num_heads(dim: int, head_dim: int = 64) -> int:
    """The number of heads that divides ``dim`` with a head size closest to ``head_dim``."""
    divisors = [h for h in range(1, dim + 1) if dim % h == 0]
    return min(divisors, key=lambda h: (abs(dim // h - head_dim), -h))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class CrossAttentionProjector(nn.Module):
    """Projects a student map (B, Cs, H, W) to teacher tokens (B, Nt, Ct).

    Args:
        student_channels, student_hw: Cs and (H, W) of the student map this CAP reads.
        teacher_channels, teacher_hw: Ct and the query grid (Ht, Wt), Nt = Ht·Wt.
        num_heads: attention heads (must divide Ct).
        softmax_scale: extra factor on the attention logits (5.0, 1.0 or 0.2 in the release).
        trainable_queries: True for an own query embedding; False when queries come at call time
            (TPP's main path, whose queries are the proxy path's output).
        norm: 'bn' (BatchNorm2d) or 'ln' (LayerNorm2d, for ConvNeXt-like students) in the patchify step.
    """

    def __init__(
        self,
        student_channels: int,
        student_hw: tuple[int, int],
        teacher_channels: int,
        teacher_hw: tuple[int, int],
        num_heads: int | None = None,
        softmax_scale: float = 1.0,
        trainable_queries: bool = True,
        norm: str = "bn",
    ):
        super().__init__()
        cs, ct = student_channels, teacher_channels
        num_heads = num_heads or default_num_heads(ct)
        if ct % num_heads:
            raise ValueError(f"CAP: {num_heads} heads do not divide the teacher's {ct} channels")
        if norm not in ("bn", "ln"):
            raise ValueError(f"CAP: norm must be 'bn' or 'ln', got {norm!r}")
        self.student_channels, self.student_hw = cs, tuple(student_hw)
        self.teacher_channels, self.teacher_hw = ct, tuple(teacher_hw)
        self.num_tokens = teacher_hw[0] * teacher_hw[1]
        self.num_heads, self.softmax_scale = num_heads, float(softmax_scale)

        self.patchify = nn.Sequential(
            nn.Conv2d(cs, cs, 3, 1, 1),
            nn.BatchNorm2d(cs) if norm == "bn" else LayerNorm2d(cs),
            nn.ReLU(inplace=True),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, cs, *student_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.queries = nn.Parameter(torch.randn(1, self.num_tokens, ct)) if trainable_queries else None
        # The release's 1×1 conv over the query grid is the same map as a per-token Linear.
        self.query_proj = nn.Linear(ct, ct)
        self.q = nn.Linear(ct, ct)
        self.kv = nn.Linear(cs, 2 * ct)
        self.out = nn.Linear(ct, ct)
        self.norm = nn.LayerNorm(ct)
        self.ffn = nn.Sequential(nn.Linear(ct, 4 * ct), nn.ReLU(inplace=True), nn.Linear(4 * ct, ct))

    def forward(self, student_map: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """student_map: (B, Cs, H, W); queries: (B, Nt, Ct) when not trainable. Returns (B, Nt, Ct)."""
        if student_map.ndim != 4:
            raise ValueError(f"CAP: expected a student map (B, {self.student_channels}, {self.student_hw[0]}, "
                             f"{self.student_hw[1]}), found a tensor of shape {tuple(student_map.shape)}")
        b, cs, h, w = student_map.shape
        if (cs, (h, w)) != (self.student_channels, self.student_hw):
            raise ValueError(
                f"CAP: expected a student map of {self.student_channels} channels at {self.student_hw}, "
                f"found {cs} channels at {(h, w)}"
            )
        if self.queries is not None:
            if queries is not None:
                raise ValueError("CAP: this projector has trainable queries; do not pass queries")
            queries = self.queries.expand(b, -1, -1)
        elif queries is None:
            raise ValueError("CAP: this projector takes its queries at call time; pass queries=(B, Nt, Ct)")
        elif queries.shape[1:] != (self.num_tokens, self.teacher_channels):
            raise ValueError(
                f"CAP: expected queries of shape (B, {self.num_tokens}, {self.teacher_channels}), "
                f"found {tuple(queries.shape)}"
            )

        x = self.patchify(student_map) + self.pos_embed
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, Cs)
        q = self.q(F.relu(self.query_proj(queries)))
        k, v = self.kv(tokens).chunk(2, dim=-1)
        heads = self.num_heads
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        scale = q.shape[-1] ** -0.5 * self.softmax_scale
        attn = F.scaled_dot_product_attention(q, k, v, scale=scale)
        y = self.norm(self.out(attn.transpose(1, 2).flatten(2)))
        return y + self.ffn(y)
