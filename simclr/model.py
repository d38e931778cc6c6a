"""SimCLR (Chen et al. 2020): a backbone f and a projection head g with
BatchNorm; the loss is applied to z = g(f(x)), the representation is f(x).

Head (SimCLR v2 code's ``projection_head``, HVS Table 10: hidden 2048, output
128, BN in head): ``proj_layers - 1`` blocks Linear(no bias)-BN-ReLU, then
Linear(no bias)-BN.  As in SimCLR's code the last BN has a scale but no shift
(its ``center`` follows the absent bias): its bias stays zero, frozen."""
import torch
from torch import nn


def projection_head(in_dim: int, hidden: int = 2048, out_dim: int = 128, layers: int = 3) -> nn.Sequential:
    if layers < 1:
        raise ValueError(f"model.proj_layers={layers} must be >= 1")
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    last_bn = nn.BatchNorm1d(out_dim)
    last_bn.bias.requires_grad_(False)  # scale only (center=False in SimCLR's code)
    return nn.Sequential(*blocks, nn.Linear(width, out_dim, bias=False), last_bn)


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int = 128, proj_hidden: int = 2048, proj_layers: int = 3):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(backbone.num_features, proj_hidden, dim, proj_layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projections z of a batch of views."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Projections z1, z2 of two views.  Both go through the network as one
        batch, as in SimCLR's code, so BatchNorm sees the statistics of all 2B
        views."""
        return self.embed(torch.cat([x1, x2])).chunk(2)
