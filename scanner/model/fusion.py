"""Attention-based Feature Fusion Module (AFFM): post-norm attention blocks over [l1..lK, g]."""

from __future__ import annotations

import torch
from torch import nn


class FusionBlock(nn.Module):
    """MultiheadAttention + residual + LayerNorm, then Linear-ReLU-Linear + residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, need_weights: bool = False):
        """tokens: (B, T, D) -> (B, T, D), and attention weights (B, T, T) averaged over heads or None."""
        attended, weights = self.attn(tokens, tokens, tokens, need_weights=need_weights)
        x = self.norm1(tokens + self.drop(attended))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return x, weights


class AFFM(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 3, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(FusionBlock(dim, heads, dropout) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, need_weights: bool = False):
        """tokens: (B, K+1, D), global token last -> fused global token (B, D), per-layer weights."""
        weights = []
        for block in self.blocks:
            tokens, w = block(tokens, need_weights)
            weights.append(w)
        return tokens[:, -1], weights
