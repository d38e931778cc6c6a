"""Run configuration: a method's defaults, overlaid by a YAML file from
``configs/``, overlaid by ``key.sub=value`` overrides from the command line.

Every key has a default and a help text; unknown keys and values of the wrong
type are refused with an error that names them.  The resolved configuration is
saved beside every run (``config.yaml``) and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _spec(default, help_text, choices=None):
    return {"default": default, "help": help_text, "choices": choices}


#: Keys shared by every method: (default, help[, choices]).
COMMON_SPEC = {
    "method": _spec("", "SSL method (set by the entry point)"),
    "run.output_dir": _spec("runs/default", "folder for config.yaml, log.jsonl, checkpoints and selection logs"),
    "run.seed": _spec(0, "seed of model init, data order, augmentations and selection"),
    "run.device": _spec("auto", "auto (cuda if available), cpu or cuda", ["auto", "cpu", "cuda"]),
    "run.log_every": _spec(10, "write a JSON line and a console progress line every K steps"),
    "run.ckpt_every_steps": _spec(0, "also checkpoint every K steps inside an epoch (0: only at epoch ends)"),
    "run.selection_log_every": _spec(100, "every K steps log per-view augmentation params, all combination scores and the choice (0: never)"),
    "run.stop_after_steps": _spec(0, "checkpoint and exit after K steps in total, as if preempted (0: run to the end); re-run the command to resume"),
    "run.max_steps_per_epoch": _spec(0, "cut each epoch after K steps, for smoke tests (0: full epochs)"),
    "data.dataset": _spec("cifar10", "cifar10 | cifar100 | tiny-imagenet-100 | imagenet | imagefolder | flowers102 | food101 | inat21 | inat21-mini"),
    "data.data_dir": _spec(None, "data root (default: env HVS_DATA_DIR); may hold the offline archives"),
    "data.subset": _spec(0, "train on a class-stratified subset: N images (int) or a fraction (float); 0: all"),
    "data.num_workers": _spec(2, "DataLoader worker processes per rank"),
    "data.download": _spec(False, "let torchvision download the dataset (CIFAR, Flowers102, Food101, iNat21) where a network exists"),
    "train.epochs": _spec(100, "number of epochs"),
    "train.batch_size": _spec(512, "global batch size (split evenly over ranks)"),
    "train.amp": _spec("auto", "mixed precision on GPU: auto (bf16 if supported, else fp16), bf16, fp16, off; always off on CPU", ["auto", "bf16", "fp16", "off"]),
    "train.sync_bn": _spec(True, "convert BatchNorm to SyncBatchNorm under DDP on GPU"),
    "hvs.enabled": _spec(False, "hard view selection on (N candidates per crop slot) or off (the baseline)"),
    "hvs.n_views": _spec(4, "candidate views per image (paper: 4)"),
    "hvs.mode": _spec("hard", "hard (argmax, the paper), easy (argmin, App. F.2), random (N views drawn, no selection)", ["hard", "easy", "random"]),
    "hvs.max_combinations": _spec(0, "compare at most K combinations, a random subset each step (0: all)"),
    "hvs.resolution": _spec(1.0, "fraction of the view size used for the selection forward (1.0, 0.75, 0.5, 0.25)"),
    "hvs.bn_mode": _spec("batch", "BatchNorm in the selection forward: batch (batch stats, running stats restored), batch_update (authors' code), running (eval-mode BN)", ["batch", "batch_update", "running"]),
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


def _check(key, value, spec):
    default = spec["default"]
    if spec["choices"] and value not in spec["choices"]:
        raise ConfigError(f"config {key}={value!r}: must be one of {spec['choices']}")
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config {key}={value!r}: expected true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key}={value!r}: expected a number")
        if isinstance(default, float):
            return float(value)
        return value  # ints may become floats where a fraction makes sense (data.subset)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {key}={value!r}: expected a list like {list(default)}")
        return list(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config {key}={value!r}: expected a string")
    return value


def resolve(spec: dict, yaml_path=None, overrides=()) -> dict:
    """Defaults <- YAML file(s) <- ``key=value`` overrides; returns a nested dict.
    ``yaml_path`` is one path or a list of them, applied in order."""
    flat = {k: copy.deepcopy(s["default"]) for k, s in spec.items()}
    layers = []
    paths = yaml_path if isinstance(yaml_path, (list, tuple)) else [yaml_path]
    for path in (Path(p) for p in paths if p):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        layers.append((f"in {path}", flatten(loaded)))
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. hvs.enabled=true)")
        key, raw = item.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
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
        lines.append(f"  {key} = {s['default']!r}{choices}\n      {s['help']}")
    return "\n".join(lines)


#: command-line flags of every entry point that stand for a config key
SHORTCUTS = {"--output-dir": "run.output_dir", "--data-dir": "data.data_dir"}


def build_parser(spec: dict, description: str, shortcuts: dict = SHORTCUTS) -> argparse.ArgumentParser:
    """``--config`` (YAML, repeatable), one flag per entry of ``shortcuts``
    (``--flag`` -> config key, with that key's help) and ``key=value``
    overrides; the epilog lists every key with its default."""
    parser = argparse.ArgumentParser(
        description=description, epilog=keys_help(spec),
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


def parse_args(spec: dict, description: str, argv=None) -> dict:
    """The command line of every training entry point::

        python -m simsiam.main --config configs/simsiam_small.yaml hvs.enabled=true
    """
    parser = build_parser(spec, description)
    args = parser.parse_intermixed_args(argv)
    try:
        return resolve(spec, args.config, overrides_of(args))
    except ConfigError as err:
        parser.error(str(err))


def dump(cfg: dict, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
