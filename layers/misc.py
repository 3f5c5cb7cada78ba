"""Small layers: [activation], [implicit], [normalization] (LRN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Implicit(nn.Module):
    """[implicit] (YOLOR): a learned (filters, 1, 1) tensor repeated for every image."""

    def __init__(self, filters: int, atoms: int = 1, mean: float = 0.0, std: float = 0.2):
        super().__init__()
        self.filters = filters
        self.weight = nn.Parameter(torch.empty(filters * atoms))
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, mean, std)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0] if x is not None else 1
        return self.weight[: self.filters].view(1, -1, 1, 1).expand(n, -1, 1, 1)

    def darknet_tensors(self):
        return [("weights", self.weight)]


class LocalResponseNorm(nn.Module):
    """[normalization]: x / (kappa + alpha * sum of x^2 over `size` neighbouring channels)^beta
    (darknet does not divide alpha by size, unlike torch's LocalResponseNorm)."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, kappa: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.kappa = size, alpha, beta, kappa

    def forward(self, x: Tensor) -> Tensor:
        sq = (x * x).unsqueeze(1)
        half = self.size // 2
        sums = F.avg_pool3d(F.pad(sq, (0, 0, 0, 0, half, self.size - 1 - half)),
                            (self.size, 1, 1), stride=1, divisor_override=1).squeeze(1)
        return x * (self.kappa + self.alpha * sums).pow(-self.beta)
