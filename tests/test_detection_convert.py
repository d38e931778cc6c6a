"""Detection transfer (detection/convert.py, detection/modeling.py): a
checkpoint of this repository, converted, loads into Detectron2's C4 Faster
R-CNN without a missing or unexpected tensor and computes the same features as
our torchvision backbone; the CIFAR stem's strides; refused inputs."""
import pickle

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see docs/detection.md)")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from common.engine import checkpoint as ckpt_io  # noqa: E402
from common.engine.train import save_checkpoint  # noqa: E402
from detection.convert import ConvertError, convert, detectron2_settings, load_pkl, write_pkl  # noqa: E402
from detection.modeling import add_hvs_config  # noqa: E402
from dino.method import DINOMethod  # noqa: E402
from simsiam.method import SimSiamMethod  # noqa: E402
from tests.helpers import cli, dino_cfg, tiny_cfg  # noqa: E402

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def write_checkpoint(path, method_cls, cfg):
    """A checkpoint as the training loop writes it, of a freshly built model
    whose norm layers have random statistics and affine parameters."""
    torch.manual_seed(0)
    method = method_cls(cfg, torch.device("cpu"))
    for m in method.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(path, method, method.model.state_dict(), method.build_optimizer(8), None, cfg, 1, 5)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, image_root):
    root = tmp_path_factory.mktemp("detection")
    return {
        "resnet50": write_checkpoint(root / "r50.pth", SimSiamMethod, tiny_cfg(
            SimSiamMethod, root / "r50", image_root, "model.arch=resnet50", "model.cifar_stem=false")),
        "resnet18": write_checkpoint(root / "r18.pth", SimSiamMethod, tiny_cfg(
            SimSiamMethod, root / "r18", image_root, "model.arch=resnet18", "model.cifar_stem=true")),
        "vit": write_checkpoint(root / "vit.pth", DINOMethod, dino_cfg(root / "vit", image_root)),
    }


def detectron2_cfg(data=None, **settings):
    """MoCo's C4 Faster R-CNN config (BN, nothing frozen) on the CPU, with the
    converted weights' settings."""
    cfg = add_hvs_config(get_cfg())
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.DEVICE", "cpu",
                         "MODEL.BACKBONE.NAME", "build_hvs_resnet_backbone", "MODEL.BACKBONE.FREEZE_AT", 0,
                         "MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm", "MODEL.RESNETS.OUT_FEATURES", ["res4"],
                         "MODEL.ROI_HEADS.IN_FEATURES", ["res4"], "MODEL.RESNETS.NORM", "BN",
                         "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "MODEL.PIXEL_STD", [58.395, 57.12, 57.375],
                         "INPUT.FORMAT", "RGB"])
    for key, value in {**(detectron2_settings(data) if data else {}), **settings}.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.fixture(scope="module", params=["resnet50", "resnet18"])
def converted(request, checkpoints, tmp_path_factory):
    """(arch, our backbone, converted data, pkl path, Detectron2 model with the weights loaded, load report)."""
    path = checkpoints[request.param]
    data = convert(path)
    pkl = tmp_path_factory.mktemp("pkl") / f"{request.param}.pkl"
    write_pkl(data, pkl)
    model = build_model(detectron2_cfg(data)).eval()
    checkpointer = DetectionCheckpointer(model)
    report = checkpointer._load_model(checkpointer._load_file(str(pkl)))
    ours = ckpt_io.load_backbone(path)[0]
    return request.param, ours, data, pkl, model, report


def test_settings_and_source_info(converted, checkpoints):
    arch, ours, data, _, _, _ = converted
    depth, cifar = {"resnet50": (50, False), "resnet18": (18, True)}[arch]
    assert detectron2_settings(data) == {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.CIFAR_STEM": cifar,
                                         "MODEL.RESNETS.STRIDE_IN_1X1": False,
                                         "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256}
    s = data["hvs"]
    assert (s["method"], s["arch"], s["depth"], s["cifar_stem"], s["which"]) == ("simsiam", arch, depth, cifar,
                                                                                 "student")
    assert (s["epoch"], s["step"], s["hvs"]) == (1, 5, False) and s["checkpoint"] == str(checkpoints[arch])
    assert s["fingerprint"] == ckpt_io.fingerprint(ours)
    assert data["__author__"] == "hvs" and data["matching_heuristics"] is True
    assert all(v.dtype == "float32" for v in data["model"].values())
    assert not any("num_batches_tracked" in k for k in data["model"])


def test_every_tensor_loads_into_detectron2(converted):
    _, ours, data, pkl, model, report = converted
    assert report.unexpected_keys == [] and report.incorrect_shapes == []
    # only the parts that are not pretrained are missing: RPN, box predictor, the extra norm
    ours_in_model = {k for k in report.missing_keys if k.startswith(("backbone.", "roi_heads.res5."))}
    assert ours_in_model == {f"roi_heads.res5.norm.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
    state = model.state_dict()
    targets = {("roi_heads." if k.startswith("res5.") else "backbone.") + k: v for k, v in data["model"].items()}
    pretrained = {k for k in state if k.startswith("backbone.") or (k.startswith("roi_heads.res5.")
                                                                   and not k.startswith("roi_heads.res5.norm."))}
    assert {k for k in pretrained if not k.endswith("num_batches_tracked")} == set(targets)
    for key, value in targets.items():
        assert torch.equal(state[key], torch.from_numpy(value)), key
    # ... and they are our backbone's tensors: the same count and values
    source = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(source) == len(data["model"])
    assert torch.equal(torch.from_numpy(data["model"]["res5.0.shortcut.norm.running_var"]),
                       source["layer4.0.downsample.1.running_var"])
    assert torch.equal(torch.from_numpy(data["model"]["res3.1.conv2.norm.bias"]), source["layer2.1.bn2.bias"])
    # the restricted reader gives back the same file
    again = load_pkl(pkl)
    assert again["hvs"] == data["hvs"] and again["model"].keys() == data["model"].keys()
    assert all((again["model"][k] == v).all() and again["model"][k].dtype == v.dtype for k, v in data["model"].items())


@torch.no_grad()
def test_features_equal_our_backbone(converted):
    arch, ours, _, _, model, _ = converted
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = model.preprocess_image([{"image": img * 255} for img in x]).tensor
    res4 = model.backbone(images)["res4"]
    h = ours.maxpool(ours.relu(ours.bn1(ours.conv1((x - MEAN[:, None, None]) / STD[:, None, None]))))
    h = ours.layer3(ours.layer2(ours.layer1(h)))
    # ResNet-18 with the CIFAR stem: res4 at stride 4; ResNet-50: stride 16
    assert res4.shape == h.shape == ((2, 256, 16, 16) if arch == "resnet18" else (2, 1024, 4, 4))
    assert torch.allclose(res4, h, rtol=1e-4, atol=1e-4 * h.abs().max().item())
    res5 = model.roi_heads.res5[:-1](res4)  # without the extra norm
    expected = ours.layer4(h)
    assert torch.allclose(res5, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_res5_head_blocks():
    from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

    for depth, block, n in ((18, BasicBlock, 2), (34, BasicBlock, 3), (50, BottleneckBlock, 3)):
        cfg = detectron2_cfg(**{"MODEL.RESNETS.DEPTH": depth,
                                "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256})
        res5 = build_model(cfg).roi_heads.res5
        names = [name for name, _ in res5.named_children()]
        assert names == [str(i) for i in range(n)] + ["norm"]
        assert all(type(b) is block for b in list(res5)[:-1]) and isinstance(res5.norm, torch.nn.BatchNorm2d)
        assert res5[0].stride == 2 and res5.norm.num_features == (512 if depth < 50 else 2048)


@pytest.mark.parametrize("cifar, strides", [(True, (1, 1, 2, 4, 8)), (False, (4, 4, 8, 16, 32))])
def test_backbone_strides(cifar, strides):
    names = ["stem", "res2", "res3", "res4", "res5"]
    cfg = detectron2_cfg(**{"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
                            "MODEL.RESNETS.CIFAR_STEM": cifar, "MODEL.RESNETS.OUT_FEATURES": names})
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    shapes = backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == dict(zip(names, strides))
    assert [shapes[k].channels for k in names] == [64, 64, 128, 256, 512]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {k: (64 // s, 64 // s) for k, s in zip(names, strides)}
    # freezing reaches the CIFAR stem too
    cfg.merge_from_list(["MODEL.BACKBONE.FREEZE_AT", 2])
    frozen = build_backbone(cfg, ShapeSpec(channels=3))
    assert not any(p.requires_grad for p in frozen.stem.parameters())
    assert not any(p.requires_grad for p in frozen.res2.parameters())
    assert all(p.requires_grad for p in frozen.res3.parameters())


def test_cifar_stem_faster_rcnn_trains_and_predicts():
    """Anchors and the ROI pooler follow the stride-1 stem: one training
    forward gives finite losses, and inference gives boxes inside the image."""
    cfg = detectron2_cfg(**{"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
                            "MODEL.RESNETS.CIFAR_STEM": True, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
                            "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 50,
                            "MODEL.RPN.POST_NMS_TOPK_TEST": 20, "MODEL.ROI_HEADS.NUM_CLASSES": 3})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.roi_heads.pooler.level_poolers[0].spatial_scale == 1 / 4
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0]])), gt_classes=torch.tensor([1]))
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": gt}]
    with EventStorage(0):  # Detectron2's training forward logs into one
        losses = model(batch)
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        boxes = model.eval()([{"image": batch[0]["image"]}])[0]["instances"].pred_boxes.tensor
    assert ((boxes >= 0) & (boxes <= 64)).all()


def test_add_hvs_config_twice_keeps_the_value():
    cfg = add_hvs_config(get_cfg())
    assert cfg.MODEL.RESNETS.CIFAR_STEM is False
    cfg.merge_from_list(["MODEL.RESNETS.CIFAR_STEM", True])
    assert add_hvs_config(cfg).MODEL.RESNETS.CIFAR_STEM is True


# --- refused inputs -------------------------------------------------------------------
def test_refused_checkpoints(checkpoints, tmp_path):
    with pytest.raises(ConvertError, match=f"needs a ResNet.*{checkpoints['vit']} holds vit_tiny"):
        convert(checkpoints["vit"])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="notes.pth is not a PyTorch checkpoint"):
        convert(tmp_path / "notes.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="no teacher"):
        convert(checkpoints["resnet18"], which="teacher")


class Evil:
    def __reduce__(self):
        import os
        return os.system, ("touch pwned",)


def test_load_pkl_refuses_code_and_damaged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": Evil()}, "__author__": "x"}, protocol=4))
    with pytest.raises(ConvertError, match=f"refusing to unpickle (posix|nt|os).system from {evil}"):
        load_pkl(evil)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.pkl"
    write_pkl({"model": {"w": torch.ones(3).numpy()}, "__author__": "hvs"}, good)
    assert list(load_pkl(good)["model"]["w"]) == [1, 1, 1]
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ConvertError, match=f"cannot read weights file {cut}"):
        load_pkl(cut)
    no_model = tmp_path / "blobs.pkl"
    write_pkl({"blobs": {}}, no_model)
    with pytest.raises(ConvertError, match=f"{no_model} is not a Detectron2 weights file"):
        load_pkl(no_model)
    with pytest.raises(ConvertError, match="does not exist"):
        load_pkl(tmp_path / "missing.pkl")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_cli(checkpoints, tmp_path):
    out = tmp_path / "w" / "r18.pkl"
    r = cli("-m", "detection.convert", "--checkpoint", str(checkpoints["resnet18"]), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "resnet18" in r.stdout and "CIFAR stem" in r.stdout
    assert load_pkl(out)["hvs"]["arch"] == "resnet18"
    r = cli("-m", "detection.convert", "--checkpoint", str(checkpoints["vit"]), "--output", str(tmp_path / "v.pkl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(checkpoints["vit"]) in r.stderr
    assert not (tmp_path / "v.pkl").exists()
