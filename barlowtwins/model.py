"""Barlow Twins (Zbontar et al. 2021, Section 2 and App. A): a ResNet encoder
and a projector of three linear layers (8192-8192-8192 on ImageNet), the first
two followed by BatchNorm and ReLU, no biases, the last without BatchNorm.
The loss standardises the embeddings itself (:mod:`barlowtwins.loss`); the
representation is the encoder's output."""
import torch
from torch import nn


def projector(in_dim: int, hidden: int, out_dim: int, hidden_bias: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear (no bias)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=hidden_bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=hidden_bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
    )


class BarlowTwins(nn.Module):
    #: biases in the projector's hidden linear layers (VICReg's expander has them)
    hidden_bias = False

    def __init__(self, backbone: nn.Module, dim: int = 8192, proj_hidden: int = 8192):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(backbone.num_features, proj_hidden, dim, self.hidden_bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings z of a batch of views."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Embeddings z1, z2 of the two views, each batch through the network
        on its own (as the official code), so BatchNorm normalises each view's
        batch with its own statistics."""
        return self.embed(x1), self.embed(x2)
