"""A pretraining checkpoint of this repository -> Detectron2 weights (.pkl).

The torchvision ResNet backbone is renamed to Detectron2's names (MoCo's
``convert-pretrain-to-detectron2.py`` does the same for its checkpoints)::

    conv1 / bn1                  -> stem.conv1 / stem.conv1.norm
    layer1 .. layer4             -> res2 .. res5
    convK / bnK (in a block)     -> convK / convK.norm
    downsample.0 / downsample.1  -> shortcut / shortcut.norm

and saved as ``{"model": {name: float32 array}, "__author__": "hvs",
"matching_heuristics": True, "hvs": {...}}``.  Detectron2's checkpointer
matches the names by suffix, so ``res5.*`` lands in the C4 ROI head's res5
(:class:`detection.modeling.Res5ROIHeadsExtraNorm`) and the rest in the
backbone.  The weights need the config of :func:`detectron2_settings`
(stride in the 3x3 convolution, the CIFAR stem, ...).

Example::

    python -m detection.convert --checkpoint runs/simsiam_in100/checkpoint.pth --output backbone.pkl
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

from common.backbones import RESNETS


class ConvertError(ValueError):
    pass


_STEM = {"conv1.weight": "stem.conv1.weight", **{f"bn1.{k}": f"stem.conv1.norm.{k}"
                                                  for k in ("weight", "bias", "running_mean", "running_var")}}
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def detectron2_name(name: str) -> str | None:
    """Detectron2's name of a torchvision ResNet tensor; None for one that has
    no counterpart (to be reported)."""
    if name in _STEM:
        return _STEM[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        return None
    layer, block, module, tensor = m.groups()
    stage = f"res{int(layer) + 1}.{block}"
    if module.startswith("conv") and tensor == "weight":
        return f"{stage}.{module}.weight"
    if module.startswith("bn") and tensor in _BN_TENSORS:
        return f"{stage}.conv{module[2:]}.norm.{tensor}"
    if module == "downsample.0" and tensor == "weight":
        return f"{stage}.shortcut.weight"
    if module == "downsample.1" and tensor in _BN_TENSORS:
        return f"{stage}.shortcut.norm.{tensor}"
    return None


def convert(path, which: str = "auto") -> dict:
    """Detectron2 weights of the ResNet backbone of checkpoint ``path``
    (``which``: auto, student or teacher, as :func:`common.engine.checkpoint.load_backbone`).
    A checkpoint of another architecture is refused (:class:`ConvertError`);
    one that cannot be read raises :class:`common.engine.checkpoint.CheckpointError`."""
    from common.engine.checkpoint import load_backbone

    backbone, info = load_backbone(path, which)
    arch = info["arch"]
    if arch not in RESNETS:
        raise ConvertError(f"detection transfer needs a ResNet backbone (the paper's detection rows are RN50); "
                           f"{path} holds {arch} ({info['method']})")
    state = backbone.state_dict()
    kernel = tuple(state["conv1.weight"].shape[-2:])
    if kernel not in ((3, 3), (7, 7)):
        raise ConvertError(f"{path}: the first convolution is {kernel[0]}x{kernel[1]}, neither the ImageNet "
                           "stem (7x7) nor the CIFAR stem (3x3)")
    model, unmapped = {}, []
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = detectron2_name(name)
        if new is None:
            unmapped.append(name)
        else:
            model[new] = tensor.detach().cpu().float().numpy().copy()
    if unmapped:
        raise ConvertError(f"{path}: no Detectron2 name for {len(unmapped)} tensor(s) of the {arch} backbone: "
                           + ", ".join(unmapped))
    source = {"method": info["method"], "arch": arch, "depth": int(arch[len("resnet"):]),
              "cifar_stem": kernel == (3, 3), "which": info["which"], "hvs": info["hvs"], "epoch": info["epoch"],
              "step": info["step"], "fingerprint": info["fingerprint"], "dataset": info["dataset"],
              "checkpoint": str(Path(path).resolve())}
    return {"model": model, "__author__": "hvs", "matching_heuristics": True, "hvs": source}


def detectron2_settings(data: dict) -> dict:
    """The config overrides the converted weights ``data`` need (the trainer
    applies them): depth, stem, the stride in the 3x3 convolution as in
    torchvision, and the width of res2."""
    depth = int(data["hvs"]["depth"])
    return {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.CIFAR_STEM": bool(data["hvs"]["cifar_stem"]),
            "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256}


# ----------------------------------------------------------------------------
# .pkl files
# ----------------------------------------------------------------------------
def write_pkl(data: dict, path) -> None:
    """Pickle ``data`` (protocol 4) to ``path`` atomically (a temporary file in
    the same folder renamed over it), so a crash never leaves half a file."""
    from common.engine.checkpoint import save_atomic

    save_atomic(data, path, dump=lambda obj, f: pickle.dump(obj, f, protocol=4))


#: what a pickle of numpy arrays in plain containers refers to (numpy 1 and 2 names)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers only."""

    def __init__(self, f, path):
        super().__init__(f, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise ConvertError(f"refusing to unpickle {module}.{name} from {self.path}: a weights file holds "
                               "numpy arrays only (is it a file from an untrusted source?)")
        return super().find_class(module, name)


def load_pkl(path) -> dict:
    """Read a Detectron2 weights file (ours, or one of Detectron2's model zoo)
    without running code from it: only numpy arrays in plain containers are
    unpickled, anything else is refused (:class:`ConvertError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"weights file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, path).load()
    except ConvertError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling problem is the file's
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvertError(f"cannot read weights file {path}: {reason} (truncated, or not a pickle?)") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConvertError(f"{path} is not a Detectron2 weights file (a dict with the tensors under 'model')")
    return data


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------
def main(argv=None) -> dict:
    from common.engine.checkpoint import CheckpointError
    from common.engine.runtime import exit_on_error

    parser = argparse.ArgumentParser(
        prog="python -m detection.convert", description=__doc__.split("\n\n")[0],
        epilog="Use the file as Detectron2's MODEL.WEIGHTS, with the config overrides of "
               "detection.convert.detectron2_settings (computed from the file's 'hvs' entry).")
    parser.add_argument("--checkpoint", required=True, help="pretraining checkpoint (runs/<run>/checkpoint.pth)")
    parser.add_argument("--output", required=True, help="Detectron2 weights file to write (.pkl)")
    parser.add_argument("--which", default="auto", choices=("auto", "student", "teacher"),
                        help="weights to convert: auto is the teacher where the method has one (default: auto)")
    args = parser.parse_args(argv)

    def body():
        if not args.output.endswith(".pkl"):
            raise ConvertError(f"--output {args.output} must end in .pkl (Detectron2 reads other files as "
                               "its own checkpoints and does not match the names)")
        data = convert(args.checkpoint, args.which)
        write_pkl(data, args.output)
        s = data["hvs"]
        print(f"wrote {args.output}: {len(data['model'])} tensors of {s['arch']} (depth {s['depth']}, "
              f"{'CIFAR' if s['cifar_stem'] else 'ImageNet'} stem, {s['which']} weights of {s['method']})",
              flush=True)
        return data

    return exit_on_error("detection.convert", body, extra_errors=(ConvertError, CheckpointError, OSError))


if __name__ == "__main__":
    main()
