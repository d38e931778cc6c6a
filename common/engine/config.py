"""Run configuration: a method's defaults, overlaid by YAML files from
``configs/``, overlaid by ``key.sub=value`` overrides from the command line.

Every key is declared once, with :func:`setting`: its default, a help text,
and what values it takes (the type of its default, or ``type``; ``choices``;
``range``).  Every entry point (pretraining, evaluations, benchmarks) resolves
its configuration here, so every one of them refuses an unknown key, a value
of the wrong type or a value out of range before it builds data or a model,
with one line that names the key.  The resolved configuration is saved beside
every run (``config.yaml``) and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
import sys
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


_RANGE = re.compile(r"^\s*([\[(])\s*([^,]*?)\s*,\s*([^,]*?)\s*([\])])\s*$")
TYPES = ("int", "float", "number", "bool", "str", "list", "any")


def setting(default, help_text, choices=None, *, range=None, type=None, items=None, length=None):  # noqa: A002
    """Declare one config key.

    ``type``: int, float, number (an int or a float: counts that may also be
    fractions), bool, str, list or any; by default the type of ``default``
    (``None``: any).  ``range``: an interval in the usual notation, bounds
    included with ``[ ]`` and excluded with ``( )``, e.g. ``"[1, inf)"`` or
    ``"(0, 1]"``; for a list, every element must lie in it.  ``choices``:
    the allowed values.  Lists: ``items`` is the type of every element (by
    default the type of the default's elements), ``length`` a fixed number of
    elements (by default any number, at least one if the default has one); a
    single value stands for a list of one."""
    if type is None:
        type = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list"}.get(
            default.__class__, "any")
    if type not in TYPES:
        raise ValueError(f"setting type {type!r} is not one of {TYPES}")
    bounds = None
    if range is not None:
        m = _RANGE.match(range)
        if not m:
            raise ValueError(f"setting range {range!r} must look like '[0, 1)' or '(0, inf)'")
        bounds = (m.group(1) == "[", float(m.group(2)), float(m.group(3)), m.group(4) == "]")
    if type == "list" and items is None and default:
        kinds = {d.__class__ for d in default}
        items = "int" if kinds == {int} else "float" if kinds <= {int, float} else "str" if kinds == {str} else None
    return {"default": default, "help": help_text, "choices": choices, "type": type, "range": range,
            "bounds": bounds, "items": items, "length": length}


#: Keys shared by every method: (default, help[, choices]).
COMMON_SPEC = {
    "method": setting("", "SSL method (set by the entry point)"),
    "run.output_dir": setting("runs/default", "folder for config.yaml, log.jsonl, checkpoints and selection logs"),
    "run.seed": setting(0, "seed of model init, data order, augmentations and selection", range="[0, inf)"),
    "run.device": setting("auto", "auto (cuda if available), cpu or cuda", ["auto", "cpu", "cuda"]),
    "run.log_every": setting(10, "write a JSON line and a console progress line every K steps", range="[1, inf)"),
    "run.ckpt_every_steps": setting(0, "also checkpoint every K steps inside an epoch (0: only at epoch ends)", range="[0, inf)"),
    "run.selection_log_every": setting(100, "every K steps log per-view augmentation params, all combination scores and the choice (0: never)", range="[0, inf)"),
    "run.stop_after_steps": setting(0, "checkpoint and exit after K steps in total, as if preempted (0: run to the end); re-run the command to resume", range="[0, inf)"),
    "run.max_steps_per_epoch": setting(0, "cut each epoch after K steps, for smoke tests (0: full epochs)", range="[0, inf)"),
    "data.dataset": setting("cifar10", "cifar10 | cifar100 | tiny-imagenet-100 | imagenet | imagefolder | flowers102 | food101 | inat21 | inat21-mini"),
    "data.data_dir": setting(None, "data root (default: env HVS_DATA_DIR); may hold the offline archives", type="str"),
    "data.subset": setting(0, "train on a class-stratified subset: N images (int) or a fraction (float); 0: all", type="number", range="[0, inf)"),
    "data.num_workers": setting(2, "DataLoader worker processes per rank", range="[0, inf)"),
    "data.in_memory": setting("auto", "decode the training images once into memory (one uint8 buffer, shared with the forked loader workers) instead of reading and decoding an image file per sample and epoch: auto (CIFAR-10/100 given as image files; torchvision's CIFAR batches are held decoded already), true (any dataset; refused beyond half the machine's memory), false. The views are the same bit for bit", ["auto", "true", "false"]),
    "data.download": setting(False, "let torchvision download the dataset (CIFAR, Flowers102, Food101, iNat21) where a network exists"),
    "train.epochs": setting(100, "number of epochs", range="[1, inf)"),
    "train.batch_size": setting(512, "global batch size (split evenly over ranks)", range="[1, inf)"),
    "train.amp": setting("auto", "mixed precision: on GPU auto (bf16 if supported, else fp16), bf16, fp16, off; on CPU only bf16 turns it on (bf16 autocast of the training step where the CPU computes bf16 natively: AVX512-BF16 or AMX), the others are fp32", ["auto", "bf16", "fp16", "off"]),
    "train.tf32": setting(True, "on GPU: TF32 matrix products and convolutions and cuDNN autotuning (cudnn.benchmark), as DINO's and MoCo v3's code; false: full fp32 products and cuDNN's default algorithm choice"),
    "train.channels_last": setting("auto", "convert the model and the input views to the channels_last memory format (convolutions in NHWC): auto (on a GPU under mixed precision for convolutional networks, the usual choice there; off on a CPU, where results stay bitwise those of the default layout), true, false. Float results may differ slightly from the default layout; measure with python -m bench.cpu_step (docs/performance.md)", ["auto", "true", "false"]),
    "train.compile": setting(False, "torch.compile the backbones (training step and selection forward); off by default: on CPU it did not pay (see docs/performance.md)"),
    "train.sync_bn": setting(True, "convert BatchNorm to SyncBatchNorm under DDP on GPU"),
    "hvs.enabled": setting(False, "hard view selection on (N candidates per crop slot) or off (the baseline)"),
    "hvs.mode": setting("hard", "hard (argmax, the paper), easy (argmin, App. F.2), random (N views drawn, no selection)", ["hard", "easy", "random"]),
    "hvs.max_combinations": setting(0, "compare at most K combinations, a random subset each step (0: all)", range="[0, inf)"),
    "hvs.resolution": setting(1.0, "fraction of the view size used for the selection forward (1.0, 0.75, 0.5, 0.25)", range="(0, 1]"),
    "hvs.bn_mode": setting("batch", "BatchNorm in the selection forward: batch (batch stats, running stats restored), batch_update (authors' code), running (eval-mode BN)", ["batch", "batch_update", "running"]),
    "hvs.precision": setting("fp32", "precision of the selection forward and scoring: fp32, bf16, fp16 (GPU) or auto (bf16 where the device computes it natively, else fp32); scores are compared in fp32. Default fp32; a method whose bf16 choices agree with fp32 ones on 95 % of samples or more (bench/precision.py) defaults to auto", ["auto", "fp32", "bf16", "fp16"]),
    "hvs.static_color": setting(False, "one colour jitter per image shared by all candidates during the selection; the chosen views are trained with colour jitter of their own (paper Fig. 4 right)"),
    "iou_policy.enabled": setting(False, "manual IoU policy instead of HVS (paper Table 5): redraw the first two views' crops (the pair; DINO's global crops) until their IoU <= a threshold scheduled over training"),
    "iou_policy.start": setting(0.3, "IoU threshold at the first step (paper: 0.3, 0.4, 0.1, 1.0)", range="[0, 1]"),
    "iou_policy.end": setting(0.35, "IoU threshold at the last step, linear in between (paper: 0.35, 0.6, 0.8, 0.1)", range="[0, 1]"),
    "iou_policy.alternate": setting(False, "apply the policy on even steps only, the standard augmentation on odd steps"),
    "iou_policy.max_draws": setting(1000, "pairs drawn per image at most before the run stops with an error", range="[1, inf)"),
}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(key, value):
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            value = float(value) if any(c in value for c in ".eEin") else int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config {key}={value!r}: expected a number")
    return value


def _in_range(key, value, spec):
    if spec["bounds"] is None or value is None:
        return
    lo_in, lo, hi, hi_in = spec["bounds"]
    for v in (value if isinstance(value, list) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = not math.isnan(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            raise ConfigError(f"config {key}={value!r}: must lie in {spec['range']}")


#: the words YAML 1.1 (PyYAML) reads as booleans
YAML_BOOL_WORDS = {True: ("true", "on", "yes", "y"), False: ("false", "off", "no", "n")}


def _check(key, value, spec):
    """``value`` converted to the key's type; a :class:`ConfigError` naming the
    key if it is of another type, not among the choices or out of range."""
    kind = spec["type"]
    if value is None:
        if kind == "str" and spec["default"] is not None:
            return ""  # key= on the command line: the empty string
        if spec["default"] is None or kind == "any":
            return value
        raise ConfigError(f"config {key}: a value is needed (default {spec['default']!r})")
    if kind == "str" and isinstance(value, bool) and spec["choices"]:
        # YAML reads off/on/no/yes as booleans: give a choice its spelling back (train.amp=off)
        spelled = [c for c in spec["choices"] if str(c).lower() in YAML_BOOL_WORDS[value]]
        value = spelled[0] if len(spelled) == 1 else value
    if spec["choices"] and value not in spec["choices"]:
        raise ConfigError(f"config {key}={value!r}: must be one of {spec['choices']}")
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"config {key}={value!r}: expected true or false")
    if kind in ("int", "float", "number"):
        value = _number(key, value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"config {key}={value!r}: expected a whole number")
            value = int(value)
        elif kind == "float":
            value = float(value)
    if kind == "list":
        example = f" like {key}={list(spec['default'])}" if spec["default"] else ""
        if not isinstance(value, (list, tuple)):
            if isinstance(value, dict) or spec["length"] not in (None, 1):
                raise ConfigError(f"config {key}={value!r}: expected a list{example}")
            value = [value]
        value = list(value)
        if spec["length"] is not None and len(value) != spec["length"]:
            raise ConfigError(f"config {key}={value!r}: expected {spec['length']} values{example}")
        if spec["default"] and not value:
            raise ConfigError(f"config {key}=[]: expected at least one value{example}")
        if spec["items"]:
            item_spec = {**spec, "type": spec["items"], "choices": None, "bounds": None, "default": 0}
            value = [_check(f"{key}[{i}]", v, item_spec) for i, v in enumerate(value)]
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"config {key}={value!r}: expected a string")
    _in_range(key, value, spec)
    return value


def load_yaml(path) -> dict:
    """A YAML config file as a flat ``{key: value}`` dict; a syntax error names
    the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists()
                          else f"config file {path} is not a file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return flatten(loaded)


def resolve(spec: dict, yaml_path=None, overrides=()) -> dict:
    """Defaults <- YAML file(s) <- ``key=value`` overrides; returns a nested dict.
    ``yaml_path`` is one path or a list of them, applied in order."""
    flat = {k: copy.deepcopy(s["default"]) for k, s in spec.items()}
    layers = []
    paths = yaml_path if isinstance(yaml_path, (list, tuple)) else [yaml_path]
    for path in (Path(p) for p in paths if p):
        layers.append((f"in {path}", load_yaml(path)))
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. hvs.enabled=true)")
        key, raw = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {raw!r} is not a valid value") from None
    layers.append(("on the command line", parsed))
    for where, values in layers:
        for key, value in values.items():
            if key not in spec:
                close = difflib.get_close_matches(key, list(spec), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r} {where}{hint}; see --help for the list")
            flat[key] = _check(key, value, spec[key])
    return _nest(flat)


def keys_help(spec: dict) -> str:
    lines = ["config keys (override with key=value; defaults shown):"]
    for key, s in spec.items():
        choices = f" {{{', '.join(map(str, s['choices']))}}}" if s["choices"] else ""
        choices += f" in {s['range']}" if s["range"] else ""
        lines.append(f"  {key} = {s['default']!r}{choices}\n      {s['help']}")
    return "\n".join(lines)


#: command-line flags of every entry point that stand for a config key
SHORTCUTS = {"--output-dir": "run.output_dir", "--data-dir": "data.data_dir"}


def entry_point() -> str | None:
    """How the running program was started, e.g. ``python -m simsiam.main``
    (argparse would say ``main.py``); None outside ``python -m``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else None


def build_parser(spec: dict, description: str, shortcuts: dict = SHORTCUTS) -> argparse.ArgumentParser:
    """``--config`` (YAML, repeatable), one flag per entry of ``shortcuts``
    (``--flag`` -> config key, with that key's help) and ``key=value``
    overrides; the epilog lists every key with its default."""
    parser = argparse.ArgumentParser(
        prog=entry_point(), description=description, epilog=keys_help(spec),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="YAML file from configs/ (its keys override the defaults); "
                             "repeat to layer several, later files winning")
    for flag, key in shortcuts.items():
        parser.add_argument(flag, metavar=flag[2:].replace("-", "_").upper(),
                            help=f"shortcut for {key}=...: {spec[key]['help']}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    return parser


def overrides_of(args: argparse.Namespace, shortcuts: dict = SHORTCUTS) -> list:
    """The ``key=value`` overrides of parsed arguments, shortcut flags last."""
    overrides = list(args.overrides)
    for flag, key in shortcuts.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


#: set (to anything) by ``launch.submitit``: an entry point stops once its configuration is resolved
CHECK_ONLY_ENV = "HVS_CHECK_CONFIG_ONLY"
#: what it prints then, on stdout
CHECKED_LINE = "configuration resolved; nothing run (HVS_CHECK_CONFIG_ONLY)"


def stop_if_checking() -> None:
    """End the process (status 0) here when only the configuration is being
    checked (:data:`CHECK_ONLY_ENV`): every entry point that resolves a
    configuration calls this once it did, before data, model or output."""
    import os

    if os.environ.get(CHECK_ONLY_ENV):
        print(CHECKED_LINE, flush=True)
        sys.exit(0)


def parse_args(spec: dict, description: str, argv=None) -> dict:
    """The command line of every training entry point::

        python -m simsiam.main --config configs/simsiam_small.yaml hvs.enabled=true
    """
    parser = build_parser(spec, description)
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = resolve(spec, args.config, overrides_of(args))
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    stop_if_checking()
    return cfg


def dump(cfg: dict, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
