"""Several heads on one frozen trunk, their logits averaged (model.head_pools).

Each head (member) is the paper's embedding, AFFM and logit layer, reading its own part of the
trunk's vector: e.g. the class tokens alone, and the class tokens with the patch-token statistics.
Heads that see different features make different mistakes, so their mean logit ranks better than
either (docs/loo_clip_b16_heads_seed1.json), while the trunk, the cost of a scan, runs once.

The three containers stand where a single head's modules stand (Detector.embed, .fusion, .head),
so everything that runs or exports the detector keeps its shape contract, with the embedding M
heads wide: embed (..., C) -> (..., M*D); fusion (B, T, M*D) -> (B, M, D); head (B, M, D) -> (B, M).
"""

from __future__ import annotations

import torch
from torch import nn

from scanner.model.fusion import AFFM


class MemberEmbeddings(nn.Module):
    def __init__(self, columns: list[list[int]], members: list[nn.Module]):
        super().__init__()
        for i, cols in enumerate(columns):
            self.register_buffer(f"columns{i}", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.members = nn.ModuleList(members)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., C) trunk vectors -> (..., M*D): member i's embedding of its columns in slice i."""
        return torch.cat([m(vectors.index_select(-1, getattr(self, f"columns{i}")))
                          for i, m in enumerate(self.members)], dim=-1)


class MemberFusion(nn.Module):
    def __init__(self, members: list[AFFM], dim: int):
        super().__init__()
        self.dim = dim
        self.members = nn.ModuleList(members)

    def forward(self, tokens: torch.Tensor, need_weights: bool = False):
        """(B, T, M*D) -> fused global tokens (B, M, D), per-layer attention averaged over the members."""
        fused, weights = [], []
        for i, affm in enumerate(self.members):
            out, w = affm(tokens[..., i * self.dim:(i + 1) * self.dim], need_weights)
            fused.append(out)
            weights.append(w)
        mean_weights = [None if w[0] is None else torch.stack(list(w)).mean(0) for w in zip(*weights)]
        return torch.stack(fused, dim=1), mean_weights


class MemberHeads(nn.Module):
    def __init__(self, heads: list[nn.Linear]):
        super().__init__()
        self.members = nn.ModuleList(heads)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, M, D) -> (B, M) logits, one per member."""
        return torch.cat([head(fused[:, i]) for i, head in enumerate(self.members)], dim=-1)

    def linears(self) -> list[nn.Linear]:
        return list(self.members)


def build_members(columns: list[list[int]], dim: int, heads: int, layers: int, dropout: float,
                  seed: int | None) -> tuple[MemberEmbeddings, MemberFusion, MemberHeads]:
    """The three containers. With a seed, each member is built right after seeding torch with it, in
    the order embedding, AFFM, head: exactly the initialisation a single head reading the same
    columns gets from Detector.reset_trainable(seed), so a member trains as that head would alone."""
    embeds, affms, linears = [], [], []
    for cols in columns:
        if seed is not None:
            torch.manual_seed(seed)
        embeds.append(nn.Sequential(nn.Linear(len(cols), dim), nn.ReLU()))
        affms.append(AFFM(dim, heads, layers, dropout))
        linears.append(nn.Linear(dim, 1))
    return MemberEmbeddings(columns, embeds), MemberFusion(affms, dim), MemberHeads(linears)
