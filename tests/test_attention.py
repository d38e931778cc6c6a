"""Tests of the attention maps (eval/attention.py): the [CLS] attention against a
direct computation from the last block's weights, the kept-mass threshold,
the grid (a matplotlib figure: its panels and what they show), and the CLI on
the tiny DINO checkpoints."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from common.views.augment import eval_transform
from common.backbones import build_vit
from common.engine.checkpoint import load_backbone
from common.views.data import load_rgb
from eval import attention
from eval.attention import DIM, cls_attention, keep_mass, main, map_entropy, mask_overlay, render_grid


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
def test_render_grid_is_rows_by_columns_of_panels(tmp_path):
    P = 40
    img = [np.full((16, 16, 3), 7 * (i + 1), np.uint8) for i in range(2)]
    head = lambda v: np.full((4, 4), v, np.float64) + np.eye(4)  # noqa: E731
    panels = [[[head(100), head(101), head(102)], [head(110), head(111), head(112)]],  # 3 heads
              [[head(200), head(201)], [head(210), head(211)]]]  # 2 heads: last panel empty
    fig = render_grid(img, panels, ["A", "checkpoint B"], ["x", "y"], P)
    axes = np.array(fig.axes).reshape(4, 4)  # 2 images x 2 checkpoints rows, image + 3 heads columns
    assert axes[0, 0].get_subplotspec().get_gridspec().get_geometry() == (4, 4)
    for i in range(2):
        for j in range(2):
            row = axes[i * 2 + j]
            assert np.array_equal(row[0].images[0].get_array(), img[i])
            assert row[0].get_ylabel() == ["A", "checkpoint B"][j]
            for k in range(3):
                if j == 1 and k == 2:
                    assert not row[k + 1].images and not row[k + 1].axison  # padded: empty
                    continue
                shown = row[k + 1].images[0]
                assert np.array_equal(shown.get_array(), panels[j][i][k])
                assert shown.get_cmap().name == "viridis" and shown.get_interpolation() == "nearest"
                assert (row[k + 1].get_title() == f"head {k + 1}") is (j == 0)
        assert axes[2 * i, 0].get_title(loc="left") == f"image {i + 1}"  # no room for the name at 40 px
    wide = render_grid(img, panels, ["A", "B"], ["x", "a_long_file_name.png"], 96)
    assert [wide.axes[8 * i].get_title(loc="left") for i in range(2)] == ["image 1: x", "image 2: a_long.."]
    # the PNG: the figure's size in pixels, every panel P pixels square
    out = tmp_path / "grid.png"
    fig.savefig(out, dpi=fig.dpi)
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
    fig.canvas.draw()
    for ax in fig.axes:
        if ax.images:
            box = ax.get_window_extent()
            assert abs(box.width - P) <= 1 and abs(box.height - P) <= 1
    # columns and rows are ordered left to right and top to bottom
    x = [ax.get_position().x0 for ax in axes[0]]
    y = [ax.get_position().y0 for ax in axes[:, 0]]
    assert x == sorted(x) and y == sorted(y, reverse=True)


def test_mask_overlay_darkens_the_dropped_patches():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) + 100
    mask = torch.tensor([[True, False], [False, True]])
    out = mask_overlay(image, mask)
    assert np.array_equal(out[:4, :4], image[:4, :4]) and np.array_equal(out[4:, 4:], image[4:, 4:])
    assert np.array_equal(out[:4, 4:], (image[:4, 4:] * DIM).astype(np.uint8))
    assert np.array_equal(out[4:, :4], (image[4:, :4] * DIM).astype(np.uint8))


# ---------------------------------------------------------------------------
# Command line on the tiny DINO checkpoints
# ---------------------------------------------------------------------------
def panel(report, image, row, column):
    """The array shown in a panel of the report's figure."""
    geo = report["geometry"]
    ax = report["figure"].axes[(image * geo["rows_per_image"] + row) * geo["columns"] + column]
    return ax.images[0]


def model_inputs(report, size):
    transform = eval_transform(size)
    return torch.stack([transform(load_rgb(d["path"])) for d in report["images"]])


def sharpened(src, dst, scale=30.0):
    """A copy of checkpoint ``src`` whose qkv weights (teacher and student) are
    scaled by ``scale``: far more peaked attention than the 1-epoch checkpoints."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v * scale if k.endswith("attn.qkv.weight") else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dst)
    return dst


@pytest.mark.slow
def test_cli_draws_both_checkpoints_head_by_head(tiny_checkpoints, image_root, tmp_path):
    out = tmp_path / "grid.png"
    ckpts = [tiny_checkpoints["dino_hvs"], tiny_checkpoints["dino"]]
    report = main(["--checkpoints", *map(str, ckpts), "--labels", "HVS", "baseline",
                   "--dataset", "imagefolder", "--data-dir", str(image_root), "--n-images", "2",
                   "attention.panel_size=32", "run.device=cpu", "--output", str(out)])
    n, rows, cols = 2, 2, 1 + 3
    with Image.open(out) as png:
        assert png.format == "PNG"
        size = png.size

    sidecar = json.loads((tmp_path / "grid.png.json").read_text())
    assert [c["path"] for c in sidecar["checkpoints"]] == list(map(str, ckpts))
    assert [c["hvs"] for c in sidecar["checkpoints"]] == [True, False]
    assert sidecar["labels"] == ["HVS", "baseline"] and sidecar["heads"] == [3, 3]
    assert [c["heads"] for c in sidecar["checkpoints"]] == [3, 3]
    assert len(sidecar["images"]) == 2 and sidecar["image_size"] == 16
    assert len(sidecar["maps"]) == 2 * 2 * 3
    geometry = sidecar["geometry"]
    assert (geometry["rows"], geometry["columns"], geometry["rows_per_image"]) == (n * rows, cols, rows)
    assert (geometry["width"], geometry["height"]) == size
    assert len(report["figure"].axes) == n * rows * cols

    images = model_inputs(report, 16)
    maps = []
    for j, path in enumerate(ckpts):
        direct = direct_cls_attention(load_backbone(path)[0], images)  # [2, 3, 4, 4]
        maps.append(direct)
        for i in range(n):
            for k in range(3):
                shown = panel(report, i, j, k + 1)
                assert shown.get_cmap().name == "viridis"
                assert np.allclose(shown.get_array(), direct[i, k].numpy(), atol=1e-5)
                entry = next(m for m in sidecar["maps"] if (m["checkpoint"], m["image"], m["head"]) == (j, i, k + 1))
                assert entry["entropy"] == pytest.approx(map_entropy(direct[i, k]).item(), abs=1e-4)
                assert entry["cls_to_patches"] == pytest.approx(direct[i, k].sum().item(), abs=1e-5)
            # the image column is the same for every checkpoint
            assert np.array_equal(panel(report, i, j, 0).get_array(), panel(report, i, 0, 0).get_array())
    # the two checkpoints differ (slightly, after one tiny epoch), and so do their panels
    assert not torch.equal(maps[0], maps[1])
    for i in range(n):
        for k in range(3):
            assert not np.array_equal(panel(report, i, 0, k + 1).get_array(), panel(report, i, 1, k + 1).get_array())


@pytest.mark.slow
def test_cli_threshold_overlay_and_image_files(tiny_checkpoints, image_root, tmp_path, capsys):
    files = sorted((image_root / "val").rglob("*.png"))[:2]
    ckpts = [sharpened(tiny_checkpoints["dino"], tmp_path / "sharp.pth"), tiny_checkpoints["dino"]]
    report = main(["--checkpoints", *map(str, ckpts), "--which", "student",
                   f"attention.images=[{files[0]},{files[1]}]", "data.image_size=18", "attention.threshold=0.6",
                   "run.device=cpu", "--output", str(tmp_path / "t.png"), f"attention.json={tmp_path / 'side.json'}"])
    assert "using 16" in capsys.readouterr().err  # 18 rounded down to a multiple of the patch size 4
    assert report["image_size"] == 16 and report["labels"] == ["dino baseline #1", "dino baseline #2"]
    sidecar = json.loads((tmp_path / "side.json").read_text())
    assert sidecar["threshold"] == 0.6 and [d["path"] for d in sidecar["images"]] == list(map(str, files))
    assert (tmp_path / "t.png").is_file()
    images = model_inputs(report, 16)
    kept = []
    for j, path in enumerate(ckpts):
        direct = direct_cls_attention(load_backbone(path, which="student")[0], images)
        for i in range(2):
            image = panel(report, i, j, 0).get_array()
            assert image.shape == (16, 16, 3) and image.dtype == np.uint8
            for k in range(3):
                mask = keep_mass(direct[i, k], 0.6).numpy()
                cells = np.arange(16) // 4  # pixel -> patch of 4 px
                keep = mask[np.ix_(cells, cells)][..., None]
                assert np.array_equal(np.asarray(panel(report, i, j, k + 1).get_array()),
                                      np.where(keep, image, (image * DIM).astype(np.uint8)))
                entry = next(m for m in sidecar["maps"] if (m["checkpoint"], m["image"], m["head"]) == (j, i, k + 1))
                assert entry["kept_fraction"] == pytest.approx(mask.mean())
                assert 0 < entry["kept_fraction"] < 1
        kept.append(sidecar["checkpoints"][j]["mean_kept_fraction"])
    # peaked attention holds 60% of its mass on fewer patches than near-uniform attention
    assert kept[0] < 0.5 < kept[1]


def refused(capsys, argv):
    """main(argv) ends with status 2 and one error line; returns the line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("eval.attention: error:"), err
    return err[0]


@pytest.mark.slow
def test_cli_refuses_a_resnet_and_a_missing_checkpoint(tiny_checkpoints, image_root, tmp_path, capsys):
    common = ["--dataset", "imagefolder", "--data-dir", str(image_root), "--output", str(tmp_path / "x.png")]
    assert re.search(r"checkpoint .*simsiam.* holds a resnet18 backbone",
                     refused(capsys, ["--checkpoints", str(tiny_checkpoints["dino"]),
                                      str(tiny_checkpoints["simsiam"]), *common]))
    assert re.search(r"nope\.pth does not exist", refused(capsys, ["--checkpoints", str(tmp_path / "nope.pth"),
                                                                   *common]))
    assert re.search(r"attention\.indices: \[99\] out of range",
                     refused(capsys, ["--checkpoints", str(tiny_checkpoints["dino"]), "attention.indices=[0,99]",
                                      *common]))
    assert re.search(r"cannot read image .*missing\.png",
                     refused(capsys, ["--checkpoints", str(tiny_checkpoints["dino"]),
                                      f"attention.images=[{tmp_path / 'missing.png'}]",
                                      "--output", str(tmp_path / "x.png")]))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("bad, key", [
    (["attention.threshold=1.5"], "attention.threshold"),
    (["attention.panel_size=0"], "attention.panel_size"),
    (["--n-images", "0"], "attention.n_images"),
    (["--labels", "a", "b"], "attention.labels"),
    (["attention.indices=[-1]"], "attention.indices"),
    (["attention.indices=[0.5]"], "attention.indices"),
    (["data.split=dev"], "data.split"),
    (["attention.images=[a.png]", "--dataset", "cifar10"], "attention.images"),
])
def test_cli_refuses_bad_values_before_loading_anything(bad, key, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(attention, "load_backbone", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    line = refused(capsys, ["--checkpoints", "a.pth", "--output", str(tmp_path / "x.png"), *bad])
    assert key in line, line


def test_cli_overrides_may_follow_the_several_value_flags(monkeypatch, capsys, tmp_path):
    # a key=value among the --labels values is an override, not a label
    monkeypatch.setattr(attention, "load_backbone", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    cfg = attention.parse_attention_args(["--checkpoints", "a.pth", "b.pth", "--labels", "dino + HVS", "dino",
                                          "attention.n_images=2", "--output", "x.png"])
    assert cfg["attention"]["labels"] == ["dino + HVS", "dino"] and cfg["attention"]["n_images"] == 2
    assert cfg["attention"]["checkpoints"] == ["a.pth", "b.pth"]
    assert "no checkpoints" in refused(capsys, ["--output", str(tmp_path / "x.png")])


def test_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, spec in attention.ATTENTION_SPEC.items():
        assert f"{key} = {spec['default']!r}" in out, key
    assert "--checkpoints" in out and "--labels" in out
