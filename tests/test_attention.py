"""Tests of the attention maps (eval/attention.py): the [CLS] attention against a
direct computation from the last block's weights, the kept-mass threshold,
the grid's geometry and pixels, and the CLI on the tiny DINO checkpoints."""
import json
import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import eval_transform
from common.backbones import build_vit
from common.checkpoint import load_backbone
from common.data import load_rgb
from eval.attention import BAND, DIM, GAP, cls_attention, keep_mass, main, map_entropy, render_grid


def small_vit(seed=0):
    """ViT-tiny/4 with 2 blocks (3 heads) for 16 px images, with attention
    weights large enough to make the maps far from uniform."""
    torch.manual_seed(seed)
    vit = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2).eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.normal_(0, 0.3)
    return vit


def direct_cls_attention(vit, images):
    """softmax(q k^T / sqrt(d)) of the last block, [CLS] row, patch columns,
    from the block's own weights (norm1, qkv) applied to its input, in float64."""
    captured = {}
    blk = vit.blocks[-1]
    handle = blk.register_forward_pre_hook(lambda module, inputs: captured.update(x=inputs[0]))
    with torch.no_grad():
        vit(images)
        x = blk.norm1(captured["x"]).double()
    handle.remove()
    heads = blk.attn.num_heads
    w, b = blk.attn.qkv.weight.detach().double(), blk.attn.qkv.bias.detach().double()
    B, T, D = x.shape
    q, k, _ = (x @ w.T + b).reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // heads), dim=-1)
    p = vit.patch_embed.patch_size[0]
    return attn[:, :, 0, 1:].reshape(B, heads, images.shape[-2] // p, images.shape[-1] // p)


# ---------------------------------------------------------------------------
# cls_attention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 16), (24, 32)])
def test_cls_attention_matches_a_direct_computation(size):
    vit = small_vit()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    attn = cls_attention(vit, images)
    assert attn.shape == (2, 3, size[0] // 4, size[1] // 4)
    assert not attn.requires_grad
    assert torch.allclose(attn.double(), direct_cls_attention(vit, images), atol=1e-5)
    sums = attn.sum(dim=(-2, -1))
    assert (sums > 0).all() and (sums <= 1 + 1e-6).all()
    assert attn.std() > 0.01  # not a uniform map: the comparison above means something


def test_cls_attention_leaves_the_model_as_it_was():
    vit = small_vit().train()
    attn_module = vit.blocks[-1].attn
    fused = attn_module.fused_attn
    with torch.enable_grad():
        cls_attention(vit, torch.randn(1, 3, 16, 16))
    assert vit.training and attn_module.fused_attn == fused
    assert not attn_module.attn_drop._forward_hooks
    assert all(m.training for m in vit.modules())


def test_cls_attention_refuses_other_inputs():
    vit = small_vit()
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        cls_attention(vit, torch.randn(1, 3, 18, 16))
    from common.backbones import build_resnet
    with pytest.raises(TypeError, match="VisionTransformer.*ResNet"):
        cls_attention(build_resnet("resnet18"), torch.randn(1, 3, 16, 16))


def test_map_entropy():
    uniform = torch.full((1, 2, 4, 4), 0.05)
    assert torch.allclose(map_entropy(uniform), torch.full((1, 2), math.log(16), dtype=torch.float64))
    peaked = torch.zeros(4, 4)
    peaked[1, 2] = 0.3
    assert map_entropy(peaked).item() == 0.0


# ---------------------------------------------------------------------------
# keep_mass
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_keep_mass_is_the_smallest_top_set_reaching_the_fraction(fraction):
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(4, 3, 5, 6, generator=g) ** 4
    keep = keep_mass(attn, fraction)
    assert keep.shape == attn.shape and keep.dtype == torch.bool
    a, k = attn.double(), keep
    total = a.sum(dim=(-2, -1))
    kept = (a * k).sum(dim=(-2, -1))
    smallest_kept = torch.where(k, a, torch.inf).amin(dim=(-2, -1))
    largest_dropped = torch.where(k, -torch.inf, a).amax(dim=(-2, -1))
    assert (kept >= fraction * total - 1e-12).all()
    assert (kept - smallest_kept < fraction * total).all()  # minimal
    assert (smallest_kept >= largest_dropped).all()  # the largest cells


def test_keep_mass_fraction_one_and_edge_cases():
    attn = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    attn[attn < 0.3] = 0
    attn[0, 0, 0, 0] = 1e-12  # tiny but not zero: kept
    assert torch.equal(keep_mass(attn, 1.0), attn > 0)
    assert not keep_mass(torch.zeros(2, 3, 3), 0.5).any()
    # one dominant cell holding more than the fraction is kept alone
    one = torch.full((4, 4), 0.01)
    one[2, 1] = 0.9
    assert keep_mass(one, 0.8).nonzero().tolist() == [[2, 1]]


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.01, float("nan"), "half"])
def test_keep_mass_rejects_bad_fractions(bad):
    with pytest.raises(ValueError, match=r"fraction=.* must be a number in \(0, 1\]"):
        keep_mass(torch.rand(1, 3, 4, 4), bad)


# ---------------------------------------------------------------------------
# Grid composition
# ---------------------------------------------------------------------------
def test_render_grid_geometry_and_padding():
    P = 10
    img = [np.full((P, P, 3), 7 * (i + 1), np.uint8) for i in range(2)]
    head = lambda v: np.full((P, P, 3), v, np.uint8)  # noqa: E731
    panels = [[[head(100), head(101), head(102)], [head(110), head(111), head(112)]],  # 3 heads
              [[head(200), head(201)], [head(210), head(211)]]]  # 2 heads: last panel padded
    grid, geo = render_grid(img, panels, ["A", "B"], ["x", "y"], P)
    assert grid.size == (GAP + 4 * (P + GAP), GAP + 2 * (BAND + 2 * (BAND + P + GAP)))
    assert (geo.width, geo.height) == grid.size
    pix = np.asarray(grid)
    for i in range(2):
        for j in range(2):
            x, y = geo.panel_xy(i, j, 0)
            assert (x, y) == (GAP, GAP + i * (BAND + 2 * (BAND + P + GAP)) + BAND + j * (BAND + P + GAP) + BAND)
            assert (pix[y:y + P, x:x + P] == 7 * (i + 1)).all()
            for k in range(3):
                x, y = geo.panel_xy(i, j, k + 1)
                expected = 255 if j == 1 and k == 2 else 100 * (j + 1) + 10 * i + k
                assert (pix[y:y + P, x:x + P] == expected).all()
    # the caption bands hold text: dark pixels above the first row of each image
    y = geo.row_y(0, 0)
    assert (pix[y:y + BAND, GAP:GAP + P] < 128).any()


# ---------------------------------------------------------------------------
# Command line on the tiny DINO checkpoints
# ---------------------------------------------------------------------------
def panel_at(pix, geometry, image, row, column):
    P = geometry["panel"]
    x, y = geometry["panel_x"][column], geometry["panel_y"][image][row]
    return pix[y:y + P, x:x + P]


def cell_centres(P, h):
    """Pixel rows (or columns) at the centre of each of ``h`` cells of a panel."""
    return [int((r + 0.5) * P / h) for r in range(h)]


def model_inputs(report, size):
    transform = eval_transform(size)
    return torch.stack([transform(load_rgb(d["path"])) for d in report["images"]])


def assert_viridis_panel(panel, attn_map):
    """The panel shows ``attn_map`` [h, w] scaled to [0, 1] by its minimum and
    maximum, in the colour of viridis' table entry floor(256 x) (or that of a
    neighbouring entry where x is within 0.05 entry of a boundary: the model's
    float32 and this float64 may round apart, the 1-epoch maps spanning only ~5%
    of their values)."""
    cmap = matplotlib.colormaps["viridis"]
    table = cmap(np.arange(cmap.N), bytes=True)[:, :3]
    a = attn_map.double().numpy()
    scaled = (a - a.min()) / (a.max() - a.min()) * 256
    entry = lambda v: np.clip(np.floor(v), 0, 255).astype(int)  # noqa: E731
    rows = cell_centres(panel.shape[0], a.shape[0])
    cols = cell_centres(panel.shape[1], a.shape[1])
    got = panel[np.ix_(rows, cols)]
    ok = [(got == table[entry(scaled + d)]).all(-1) for d in (0.0, -0.05, 0.05)]
    assert (ok[0] | ((ok[1] | ok[2]) & (np.abs(scaled - np.round(scaled)) < 0.05))).all(), (got, scaled)
    assert (got[a == a.max()] == table[255]).all() and (got[a == a.min()] == table[0]).all()


def sharpened(src, dst, scale=30.0):
    """A copy of checkpoint ``src`` whose qkv weights (teacher and student) are
    scaled by ``scale``: far more peaked attention than the 1-epoch checkpoints."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v * scale if k.endswith("attn.qkv.weight") else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dst)
    return dst


def test_cli_draws_both_checkpoints_head_by_head(tiny_checkpoints, image_root, tmp_path):
    out = tmp_path / "grid.png"
    ckpts = [tiny_checkpoints["dino_hvs"], tiny_checkpoints["dino"]]
    report = main(["--checkpoints", *map(str, ckpts), "--labels", "HVS", "baseline",
                   "--dataset", "imagefolder", "--data-dir", str(image_root), "--n-images", "2",
                   "--panel-size", "32", "--device", "cpu", "--output", str(out)])
    P, n, rows, cols = 32, 2, 2, 1 + 3
    pix = np.asarray(Image.open(out).convert("RGB"))
    assert pix.shape == (GAP + n * (BAND + rows * (BAND + P + GAP)), GAP + cols * (P + GAP), 3)

    sidecar = json.loads((tmp_path / "grid.png.json").read_text())
    assert [c["path"] for c in sidecar["checkpoints"]] == list(map(str, ckpts))
    assert [c["hvs"] for c in sidecar["checkpoints"]] == [True, False]
    assert sidecar["labels"] == ["HVS", "baseline"] and sidecar["heads"] == [3, 3]
    assert [c["heads"] for c in sidecar["checkpoints"]] == [3, 3]
    assert len(sidecar["images"]) == 2 and sidecar["image_size"] == 16
    assert len(sidecar["maps"]) == 2 * 2 * 3
    geometry = sidecar["geometry"]
    assert (geometry["width"], geometry["height"]) == (pix.shape[1], pix.shape[0])

    images = model_inputs(report, 16)
    maps = []
    for j, path in enumerate(ckpts):
        direct = direct_cls_attention(load_backbone(path)[0], images)  # [2, 3, 4, 4]
        maps.append(direct)
        for i in range(n):
            for k in range(3):
                assert_viridis_panel(panel_at(pix, geometry, i, j, k + 1), direct[i, k])
                entry = next(m for m in sidecar["maps"] if (m["checkpoint"], m["image"], m["head"]) == (j, i, k + 1))
                assert entry["entropy"] == pytest.approx(map_entropy(direct[i, k]).item(), abs=1e-4)
                assert entry["cls_to_patches"] == pytest.approx(direct[i, k].sum().item(), abs=1e-5)
            # the image column is the same for every checkpoint
            assert np.array_equal(panel_at(pix, geometry, i, j, 0), panel_at(pix, geometry, i, 0, 0))
    # the two checkpoints differ (slightly, after one tiny epoch), and so do their panels
    assert not torch.equal(maps[0], maps[1])
    for i in range(n):
        for k in range(3):
            assert not np.array_equal(panel_at(pix, geometry, i, 0, k + 1), panel_at(pix, geometry, i, 1, k + 1))


def test_cli_threshold_overlay_and_image_files(tiny_checkpoints, image_root, tmp_path, capsys):
    files = sorted((image_root / "val").rglob("*.png"))[:2]
    ckpts = [sharpened(tiny_checkpoints["dino"], tmp_path / "sharp.pth"), tiny_checkpoints["dino"]]
    report = main(["--checkpoints", *map(str, ckpts), "--which", "student", "--images", *map(str, files),
                   "--image-size", "18", "--threshold", "0.6", "--device", "cpu",
                   "--output", str(tmp_path / "t.png"), "--json", str(tmp_path / "side.json")])
    assert "using 16" in capsys.readouterr().err  # 18 rounded down to a multiple of the patch size 4
    assert report["image_size"] == 16 and report["labels"] == ["dino baseline #1", "dino baseline #2"]
    sidecar = json.loads((tmp_path / "side.json").read_text())
    assert sidecar["threshold"] == 0.6 and [d["path"] for d in sidecar["images"]] == list(map(str, files))
    pix = np.asarray(Image.open(tmp_path / "t.png").convert("RGB"))
    geometry, P = sidecar["geometry"], 96
    images = model_inputs(report, 16)
    kept = []
    for j, path in enumerate(ckpts):
        direct = direct_cls_attention(load_backbone(path, which="student")[0], images)
        for i in range(2):
            image = panel_at(pix, geometry, i, j, 0)
            for k in range(3):
                mask = keep_mass(direct[i, k], 0.6).numpy()
                cells = np.arange(P) * 4 // P
                keep = mask[np.ix_(cells, cells)][..., None]
                assert np.array_equal(panel_at(pix, geometry, i, j, k + 1),
                                      np.where(keep, image, (image * DIM).astype(np.uint8)))
                entry = next(m for m in sidecar["maps"] if (m["checkpoint"], m["image"], m["head"]) == (j, i, k + 1))
                assert entry["kept_fraction"] == pytest.approx(mask.mean())
                assert 0 < entry["kept_fraction"] < 1
        kept.append(sidecar["checkpoints"][j]["mean_kept_fraction"])
    # peaked attention holds 60% of its mass on fewer patches than near-uniform attention
    assert kept[0] < 0.5 < kept[1]


def test_cli_refuses_a_resnet_and_a_missing_checkpoint(tiny_checkpoints, image_root, tmp_path):
    common = ["--dataset", "imagefolder", "--data-dir", str(image_root), "--output", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match=r"eval\.attention: checkpoint .*simsiam.* holds a resnet18 backbone"):
        main(["--checkpoints", str(tiny_checkpoints["dino"]), str(tiny_checkpoints["simsiam"]), *common])
    with pytest.raises(SystemExit, match=r"eval\.attention: checkpoint .*nope\.pth does not exist"):
        main(["--checkpoints", str(tmp_path / "nope.pth"), *common])
    with pytest.raises(SystemExit, match="2 --labels for 1 --checkpoints"):
        main(["--checkpoints", str(tiny_checkpoints["dino"]), "--labels", "a", "b", *common])
    with pytest.raises(SystemExit, match=r"--indices \[99\] out of range"):
        main(["--checkpoints", str(tiny_checkpoints["dino"]), "--indices", "0", "99", *common])
    with pytest.raises(SystemExit, match=r"eval\.attention: cannot read image .*missing\.png"):
        main(["--checkpoints", str(tiny_checkpoints["dino"]), "--images", str(tmp_path / "missing.png"),
              "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
