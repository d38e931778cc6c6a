"""CPU training speed options: the training images decoded once into memory
(``data.in_memory``), the channels_last memory format (``train.channels_last``)
and their benchmark (``bench/cpu_step.py``)."""
import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.engine.config import COMMON_SPEC, ConfigError, load_yaml, resolve
from common.engine.memory_format import model_channels_last, use_channels_last, views_channels_last
from common.engine.method import StepInfo
from common.views.augment import MultiViewDataset, MultiViewTransform, ViewRecipe
from common.views.data import DataError, DecodedImages, build_dataset, in_memory
from simsiam.method import SimSiamMethod
from tests.helpers import ROOT, tiny_cfg

MEDIUM = ROOT / "configs" / "simsiam_medium.yaml"


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """An ImageFolder tree with images of several sizes, RGB and grayscale JPEG and PNG files."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate([(20, 20), (17, 31), (40, 23)]):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L") if i == 1 else Image.fromarray(pixels)
            image.save(folder / f"{i}.{'jpg' if c == 0 else 'png'}")
    return root


def same_views(a, b) -> bool:
    va, pa, la, ia = a
    vb, pb, lb, ib = b
    if isinstance(va, torch.Tensor):
        va, vb = [va], [vb]
    return la == lb and ia == ib and torch.equal(pa, pb) and all(torch.equal(x, y) for x, y in zip(va, vb))


@pytest.mark.parametrize("where", ["loader", "model", "model_crop"])
def test_decoded_images_give_the_same_views_bit_for_bit(mixed_root, where):
    """Every view drawn from an image held in memory equals the one drawn from its file (every
    augment.device path; images of several sizes and modes, JPEG and PNG); labels and classes the same."""
    files = build_dataset("imagefolder", "train", str(mixed_root))
    decoded = DecodedImages(files, threads=2)
    assert len(decoded) == len(files) and decoded.targets == files.targets and decoded.classes == files.classes
    for i in range(len(files)):
        image, label = files[i]
        held, held_label = decoded[i]
        assert held.mode == "RGB" and held.size == image.size and label == held_label
        assert np.array_equal(np.asarray(held), np.asarray(image))
    transform = MultiViewTransform([(ViewRecipe(size=16, blur_p=0.5, solarize_p=0.3), 4)], photometric=where)
    for epoch in (0, 3):
        a, b = MultiViewDataset(files, transform, seed=7), MultiViewDataset(decoded, transform, seed=7)
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert all(same_views(a[i], b[i]) for i in range(len(files)))


def test_decoded_images_of_a_subset_and_the_memory_limit(mixed_root):
    """A Subset is decoded in its own order (only its images); beyond max_bytes a DataError names data.in_memory."""
    files = build_dataset("imagefolder", "train", str(mixed_root))
    subset = torch.utils.data.Subset(files, [5, 0, 7])
    decoded = DecodedImages(subset)
    assert len(decoded) == 3 and decoded.targets == [files.targets[i] for i in (5, 0, 7)]
    assert all(np.array_equal(np.asarray(decoded[k][0]), np.asarray(files[i][0])) for k, i in enumerate((5, 0, 7)))
    assert decoded.root == files.root
    with pytest.raises(DataError, match="data.in_memory=false"):
        DecodedImages(files, max_bytes=2000)


def test_in_memory_modes(mixed_root):
    """auto decodes CIFAR-10/100 only; true any dataset; false none; torchvision's CIFAR (already
    an array in memory) and a decoded dataset stay as they are."""
    from torchvision import datasets

    files = build_dataset("imagefolder", "train", str(mixed_root))
    assert in_memory(files, "auto", "imagefolder") is files
    assert in_memory(files, "false", "cifar10") is files
    assert isinstance(in_memory(files, "auto", "cifar10"), DecodedImages)
    assert isinstance(in_memory(files, "true", "imagefolder"), DecodedImages)
    cifar = datasets.CIFAR100.__new__(datasets.CIFAR100)  # holds its pickled batches as one uint8 array
    assert in_memory(cifar, "true", "cifar100") is cifar
    held = DecodedImages(files)
    assert in_memory(torch.utils.data.Subset(held, [0]), "true", "imagefolder").dataset is held
    with pytest.raises(ValueError, match="data.in_memory"):
        in_memory(files, "yes please", "cifar10")


def test_config_keys_take_yaml_booleans():
    """data.in_memory and train.channels_last take auto, true, false (YAML's true/false included); other values
    are refused with the key named."""
    spec = {**COMMON_SPEC, **SimSiamMethod.spec}
    cfg = resolve(spec, None, ["data.in_memory=true", "train.channels_last=false"])
    assert cfg["data"]["in_memory"] == "true" and cfg["train"]["channels_last"] == "false"
    assert resolve(spec, None, [])["train"]["channels_last"] == "auto"
    with pytest.raises(ConfigError, match="train.channels_last"):
        resolve(spec, None, ["train.channels_last=nhwc"])


def digest(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_training_in_memory_gives_the_same_weights(tmp_path, image_root):
    """A SimSiam HVS run with a loader worker (forked: it reads the decoded pixels of the main process)
    trains to the same weights, bit for bit, with the images in memory as from their files; data.in_memory=auto
    decodes a CIFAR-10 given as image files."""
    from common.engine.train import build_train_data, run

    shutil.copytree(image_root / "train", tmp_path / "data" / "cifar10" / "train")
    states = {}
    for mode in ("false", "auto"):
        cfg = tiny_cfg(SimSiamMethod, tmp_path / mode, tmp_path / "data", "data.dataset=cifar10",
                       f"data.in_memory={mode}", "data.num_workers=1", "hvs.enabled=true", "train.epochs=2",
                       "run.max_steps_per_epoch=2")
        _, dataset, _, _ = build_train_data(cfg, SimSiamMethod(cfg, torch.device("cpu")), 8)
        assert isinstance(dataset.base, DecodedImages) == (mode == "auto")
        states[mode] = digest(run(cfg, SimSiamMethod))
    assert states["false"].keys() == states["auto"].keys()
    assert all(torch.equal(states["false"][k], states["auto"][k]) for k in states["false"])


# ----------------------------------------------------------------------------
# channels_last
# ----------------------------------------------------------------------------
def test_channels_last_auto_is_on_only_for_a_conv_net_on_a_gpu_under_mixed_precision():
    resnet = SimSiamMethod(resolve({**COMMON_SPEC, **SimSiamMethod.spec}, [MEDIUM], []), torch.device("cpu")).model
    vit = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_channels_last("auto", cpu, resnet, "bf16")  # the CPU default stays the default layout
    assert use_channels_last("auto", cuda, resnet, "auto") and use_channels_last("auto", cuda, resnet, "fp16")
    assert not use_channels_last("auto", cuda, resnet, "off") and not use_channels_last("auto", cuda, vit, "bf16")
    assert use_channels_last("true", cpu, vit, "off") and not use_channels_last("false", cuda, resnet, "bf16")


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_channels_last_step_matches_the_default_layout(amp):
    """Three SimSiam steps of the medium profile's network (resnet18_w16, CIFAR stem, 32 px), channels_last
    against the default layout from the same initial weights: outputs of the same shapes, losses within 1e-5
    in fp32 and 0.01 under bf16 autocast (the loss is a negative cosine in [-1, 1]); the weights are
    channels_last, the same Parameter objects the optimizer holds."""
    from common.hvs import cpu_has_bf16

    if amp == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU computes bf16 by emulation only")
    cfg = resolve({**COMMON_SPEC, **SimSiamMethod.spec}, [MEDIUM], [])
    cfg["method"] = "simsiam"
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for layout in ("default", "channels_last"):
            torch.manual_seed(0)
            method = SimSiamMethod(cfg, torch.device("cpu"))
            optimizer = method.build_optimizer(16)
            params = list(method.model.parameters())
            x = views
            if layout == "channels_last":
                model_channels_last(method.model)
                x = views_channels_last(views)
                assert all(p is q for p, q in zip(params, method.model.parameters()))
                conv = next(m for m in method.model.modules() if isinstance(m, torch.nn.Conv2d))
                assert conv.weight.is_contiguous(memory_format=torch.channels_last)
                assert all(v.is_contiguous(memory_format=torch.channels_last) for v in x)
            losses, shapes = [], None
            for it in range(3):
                autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
                with autocast:
                    outputs = method.model(x[0], x[1])
                    loss, _ = method.training_loss(method.model, x, None, StepInfo(0, it, 3))
                shapes = [tuple(o.shape) for o in outputs]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            out[layout] = losses, shapes
    finally:
        torch.set_num_threads(threads)
    tolerance = 1e-5 if amp == "fp32" else 0.01
    assert out["default"][1] == out["channels_last"][1]
    assert max(abs(a - b) for a, b in zip(out["default"][0], out["channels_last"][0])) <= tolerance


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_training_run_with_channels_last(tmp_path, image_root):
    """train.channels_last=true: the loop trains a channels_last model on channels_last views (checked
    at the model's input) and its weights stay close to the default layout's (3 steps); the default
    (auto, on a CPU) leaves the layout as it was."""
    from common.engine.train import build, run

    cfg = tiny_cfg(SimSiamMethod, tmp_path / "probe", image_root, "train.channels_last=true")
    r = build(cfg, SimSiamMethod, torch.device("cpu"))
    convs = [m.weight for m in r.ctx.method.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert r.channels_last and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not build(tiny_cfg(SimSiamMethod, tmp_path / "probe2", image_root), SimSiamMethod,
                     torch.device("cpu")).channels_last

    seen = []
    original = SimSiamMethod.training_loss

    def watched(self, model, views, selection, step):
        seen.append(all(v.is_contiguous(memory_format=torch.channels_last) for v in views))
        return original(self, model, views, selection, step)

    states = {}
    for layout in ("false", "true"):
        seen.clear()
        cfg = tiny_cfg(SimSiamMethod, tmp_path / layout, image_root, f"train.channels_last={layout}",
                       "train.epochs=3", "run.max_steps_per_epoch=1")
        SimSiamMethod.training_loss = watched
        try:
            states[layout] = digest(run(cfg, SimSiamMethod))
        finally:
            SimSiamMethod.training_loss = original
        assert seen and all(seen) == (layout == "true")
    for key, value in states["false"].items():
        if value.is_floating_point():
            assert torch.allclose(value, states["true"][key], atol=1e-3, rtol=1e-3), key
        else:
            assert torch.equal(value, states["true"][key]), key


# ----------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_cpu_step_tiny_writes_every_field(tmp_path):
    """python -m bench.cpu_step --tiny: the loader alone for every arm, source and worker count, the decoding
    cost, and the training step of the reference and of every option's variant, each compared with the
    reference, written as JSON."""
    from bench.cpu_step import main

    out = tmp_path / "cpu_step.json"
    main(["--tiny", "--configs", str(MEDIUM), "--output", str(out), "--workdir", str(tmp_path / "w")])
    res = json.loads(out.read_text())
    assert res["complete"] and res["tiny"] and res["settings"]["workers"] == [0, 1]
    assert {"load_average", "load_average_after", "native_bf16", "torch_threads"} <= set(res["environment"])
    cells = {(r["arm"], r["source"], r["num_workers"]) for r in res["loader"]}
    assert cells == {(a, s, w) for a in ("baseline", "hvs") for s in ("files", "in_memory") for w in (0, 1)}
    assert all(r["images_per_s"] > 0 and r["startup_s"] >= 0 for r in res["loader"])
    assert all(r["ratio_vs_files"] > 0 for r in res["loader"] if r["source"] == "in_memory")
    assert res["decode"][0]["s_per_image"] > 0 and res["decode"][0]["full_set_images"] == 32
    compared = {(c["arm"], c["option"], c["reference"]["value"], c["variant"]["value"]) for c in res["comparisons"]}
    layout = "true" if load_yaml(MEDIUM).get("train.channels_last") is True else "false"  # the config's; the variant: the other
    for arm in ("baseline", "hvs"):
        assert {(arm, "amp", "bf16", "off"), (arm, "channels_last", layout, {"true": "false", "false": "true"}[layout]),
                (arm, "in_memory", "false", "true"), (arm, "workers", "1", "0"), (arm, "batch", "8", "16")} <= compared
    for row in res["step"]:
        assert len(row["step_times"]) == 2 and row["images_per_s"] == pytest.approx(
            row["batch_size"] / row["median_step_s"])
    for c in res["comparisons"]:
        assert c["ratio_variant_over_reference"] == pytest.approx(
            c["variant"]["images_per_s"] / c["reference"]["images_per_s"])


@pytest.mark.slow
def test_bench_cpu_step_refuses_bad_arguments(tmp_path):
    from tests.helpers import cli

    r = cli("-m", "bench.cpu_step", "--tiny", "--steps", "0")
    assert r.returncode == 2 and "--steps" in r.stderr and "Traceback" not in r.stderr
    r = cli("-m", "bench.cpu_step", "--tiny", "--configs", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "none.yaml" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr


def test_random_is_untouched_by_decoding(mixed_root):
    """Decoding into memory draws no random numbers (the run's generators are seeded before the data is built)."""
    files = build_dataset("imagefolder", "train", str(mixed_root))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    DecodedImages(files)
    assert (torch.rand(1), random.random(), np.random.rand()) == before
