"""Hard View Selection in a plain PyTorch loop: your model, your per-sample loss.  From the repository
root (CPU, seconds): python -m examples.hvs_in_your_loop.  You write three things: the outputs of all N
candidates (one forward, no grad) and the per-sample score of every pair [B, C], on an object with your
model, for the selector; and the loss on the chosen views.  Per image, the hardest pair is kept."""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms as T

from common.hvs import HardViewSelector

N, DIM = 4, 32  # candidate views per image, embedding width
augment = T.Compose([T.RandomResizedCrop(16, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                     T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.ToTensor()])
data = datasets.FakeData(96, (3, 32, 32), transform=lambda img: [augment(img) for _ in range(N)])
loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)  # batch: N tensors [B, 3, 16, 16]

torch.manual_seed(0)
encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, DIM))
predictor = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
model = nn.ModuleList([encoder, predictor])


def embed(x):
    z = encoder(x)
    return predictor(z), z


def loss_per_sample(p1, z1, p2, z2):  # symmetric MSE of unit vectors, no gradient into the targets z
    p1, p2, z1, z2 = (F.normalize(t, dim=-1) for t in (p1, p2, z1.detach(), z2.detach()))
    return 0.5 * ((p1 - z2).pow(2).sum(-1) + (p2 - z1).pow(2).sum(-1))  # one value per sample


class Hooks:  # what the selector asks for: the model (it switches its BatchNorm layers), two functions
    model = model

    def candidate_outputs(self, model, candidates, step):  # 1. all N candidates, one forward: (p, z) [N, B, DIM]
        p, z = embed(torch.cat(candidates))
        return p.unflatten(0, (N, -1)), z.unflatten(0, (N, -1))

    def combination_scores(self, outputs, combos, step):  # 2. the per-sample loss of every pair (k, l): [B, C]
        (p, z), k, l = outputs, combos[:, 0], combos[:, 1]
        return loss_per_sample(p[k], z[k], p[l], z[l]).T


selector = HardViewSelector(pools=[(N, 2)], mode="hard")  # all C(4, 2) = 6 pairs
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
other = []  # per step: share of images whose pair is not the baseline's, candidates (0, 1)
for epoch in range(2):
    for step, (candidates, _) in enumerate(loader):
        sel = selector(candidates, Hooks())  # step: passed on to the two functions (unused here)
        loss = loss_per_sample(*embed(sel.views[0]), *embed(sel.views[1])).mean()  # 3. chosen pair
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        other.append((sel.indices != selector.baseline_combo).any(1).float().mean().item())
        print(f"epoch {epoch} step {step}: loss {loss.item():.4f}, "
              f"pair other than (0, 1) so far: {sum(other) / len(other):.0%}")
