"""SimSiam (Chen & He 2021): a backbone, a 3-layer projector with BatchNorm
(the last without affine parameters) and a 2-layer bottleneck predictor."""
import torch
from torch import nn


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int = 2048, pred_dim: int = 512, proj_hidden: int = 2048):
        super().__init__()
        self.backbone = backbone
        f = backbone.num_features
        self.projector = nn.Sequential(
            nn.Linear(f, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def embed(self, x: torch.Tensor):
        """(prediction p, projection z) of a batch of views."""
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """p1, p2, and the stop-gradient projections z1, z2 of two views."""
        p1, z1 = self.embed(x1)
        p2, z2 = self.embed(x2)
        return p1, p2, z1.detach(), z2.detach()
