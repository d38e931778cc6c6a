"""Detection transfer with Detectron2 (paper Section 4, Tables 3, 7 and 13).

Fine-tunes a ResNet pretrained here (any method, baseline or HVS) end to end
as the C4 backbone of Faster R-CNN (VOC) or Mask R-CNN (COCO), with MoCo's
detection recipe, and evaluates it (VOC: AP, AP50, AP75; COCO: box and mask AP).

    # the paper's VOC07+12 row (Faster R-CNN R50-C4, batch 8, 48k steps), 8 GPUs
    python -m detection.train_net --config-file detection/configs/voc_R_50_C4_48k.yaml \\
        --checkpoint runs/paper/simsiam_hvs_s0/checkpoint.pth --data-dir /datasets --num-gpus 8 \\
        OUTPUT_DIR runs/paper/simsiam_hvs_s0/detection_voc

    # the small CPU profile: ResNet-18 (CIFAR stem) on the raccoon set, minutes on two cores
    python -m detection.train_net --config-file detection/configs/voc_small.yaml \\
        --checkpoint runs/small/simsiam_hvs_s0/checkpoint.pth --data-dir ../shared/data \\
        OUTPUT_DIR runs/small/simsiam_hvs_s0/detection_raccoon

The checkpoint is converted (``detection/convert.py``) into
``OUTPUT_DIR/backbone.pkl`` and loaded with Detectron2's matching heuristics;
``MODEL.WEIGHTS`` takes an already converted file instead.  ``--resume``
continues from ``OUTPUT_DIR/last_checkpoint``.  Several GPUs and nodes go
through Detectron2's own ``launch`` (``--num-gpus``, ``--num-machines``,
``--machine-rank``, ``--dist-url``).  Trailing ``KEY VALUE`` pairs override the
config.  Logs: ``OUTPUT_DIR/metrics.json`` (JSON lines), ``log.txt``,
``config.yaml``; results: ``OUTPUT_DIR/results.json`` and ``--output``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import weakref
from pathlib import Path

import torch

from common.engine import checkpoint as ckpt_io
from common.engine.config import ConfigError, stop_if_checking
from common.views.data import DataError
from common.engine.runtime import EXIT_DIVERGED, EXIT_USER

PROG = "python -m detection.train_net"


def get_parser():
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=__doc__)
    parser.prog = PROG
    parser.description = "Fine-tune a pretrained ResNet for detection with Detectron2 (paper Tables 3, 7, 13)."
    parser.add_argument("--checkpoint", default=None,
                        help="pretraining checkpoint of this repository (a ResNet of any method, baseline or HVS); "
                             "converted into OUTPUT_DIR/backbone.pkl. Without it, MODEL.WEIGHTS is used")
    parser.add_argument("--which", default="auto", choices=["auto", "student", "teacher"],
                        help="weights taken from --checkpoint: auto = the teacher if the method has one")
    parser.add_argument("--data-dir", default=None,
                        help="data root holding the detection sets (default $HVS_DATA_DIR); see detection/data.py")
    parser.add_argument("--output", default=None, help="also write the results JSON here")
    return parser


def setup(args):
    """The frozen config: the file, then the command line's overrides; the
    device falls back to the CPU where CUDA is absent."""
    from detectron2.config import get_cfg

    from detection.modeling import add_hvs_config

    cfg = get_cfg()
    add_hvs_config(cfg)
    if not Path(args.config_file).is_file():
        raise DataError(f"config file {args.config_file} does not exist (configs: detection/configs/*.yaml)")
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (AssertionError, KeyError, ValueError) as err:  # yacs reports bad keys and values so
        raise ConfigError(f"{args.config_file} or the overrides {' '.join(args.opts)}: {err}") from None
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.OUTPUT_DIR or cfg.OUTPUT_DIR == "./output":
        raise DataError("pass OUTPUT_DIR <folder> after the options (where checkpoints, logs and results go)")
    cfg.freeze()
    return cfg


def prepare_weights(args, cfg) -> list[str]:
    """Convert ``--checkpoint`` into ``OUTPUT_DIR/backbone.pkl`` and check that
    it fits the config's backbone; return the overrides pointing at it."""
    from detection.convert import convert, detectron2_settings, write_pkl

    if not args.checkpoint:
        stop_if_checking()
        return []
    data = convert(args.checkpoint, args.which)
    wanted = detectron2_settings(data)
    for key, value in wanted.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node != value:
            src = data["hvs"]
            stem = " (CIFAR stem)" if src["cifar_stem"] else ""
            raise ckpt_io.CheckpointError(
                f"{args.checkpoint} holds a {src['arch']}{stem}, but {args.config_file} has {key} {node!r} "
                f"where the checkpoint needs {value!r}: use a config for this backbone (the small profile's "
                "ResNet-18: detection/configs/voc_small.yaml) or pass " + " ".join(f"{k} {v}" for k, v in wanted.items()))
    stop_if_checking()  # the configuration and the weights' fit are checked: nothing written
    pkl = Path(cfg.OUTPUT_DIR) / "backbone.pkl"
    write_pkl(data, pkl)
    return ["MODEL.WEIGHTS", str(pkl)]


def build_trainer_class():
    """Detectron2's DefaultTrainer with the evaluator of each dataset's kind,
    checkpoints written atomically, and weight files (.pkl) read without
    unpickling anything but arrays."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    from detection.convert import load_pkl

    class Checkpointer(DetectionCheckpointer):
        def _load_file(self, filename):
            if filename.endswith(".pkl"):
                return load_pkl(filename)
            if filename.endswith(".pyth"):  # pycls: the weights under "model_state"
                data = self._torch_load(filename)
                if not isinstance(data, dict) or not isinstance(data.get("model_state"), dict):
                    raise ckpt_io.CheckpointError(f"MODEL.WEIGHTS {filename} holds no 'model_state' dictionary "
                                                  "(a .pyth file is read as a pycls checkpoint)")
                state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            return super()._load_file(filename)

        def load(self, path, *args, **kwargs):
            if path and "://" not in path and not Path(path).is_file():  # fvcore asserts it
                raise ckpt_io.CheckpointError(f"MODEL.WEIGHTS {path} does not exist")
            return super().load(path, *args, **kwargs)

        def _torch_load(self, f):  # weights_only=True, and a damaged or foreign file is one line naming it
            data = ckpt_io.torch_load_safely(f, "MODEL.WEIGHTS", require_zip=False)
            if not isinstance(data, dict):
                raise ckpt_io.CheckpointError(f"MODEL.WEIGHTS {f} holds a {type(data).__name__}, not a dictionary "
                                              "of weights")
            return data

        def save(self, name, **extra):
            if not self.save_dir or not self.save_to_disk:
                return
            data = {"model": self.model.state_dict(),
                    **{key: obj.state_dict() for key, obj in self.checkpointables.items()}, **extra}
            path = Path(self.save_dir) / f"{name}.pth"
            self.logger.info(f"Saving checkpoint to {path}")
            ckpt_io.save_atomic(data, path)
            self.tag_last_checkpoint(path.name)

        def tag_last_checkpoint(self, basename):
            ckpt_io.write_text_atomic(Path(self.save_dir) / "last_checkpoint", basename)

    class Trainer(DefaultTrainer):
        def build_hooks(self):
            # DefaultTrainer made a DetectionCheckpointer just before this call
            self.checkpointer = Checkpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR,
                                             trainer=weakref.proxy(self))
            return super().build_hooks()

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            kind = MetadataCatalog.get(dataset_name).evaluator_type
            if kind == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)
            if kind == "coco":
                folder = output_folder or str(Path(cfg.OUTPUT_DIR) / "inference")
                return COCOEvaluator(dataset_name, output_dir=folder)
            raise DataError(f"no evaluator for dataset {dataset_name!r} (kind {kind!r})")

    return Trainer


def results_of(cfg, config_file: str, raw: dict, seconds: float, iterations: int, source: dict | None) -> dict:
    """The results file: box (and mask) AP of the test set, and what produced them."""
    from detectron2.data import MetadataCatalog

    raw = raw or {}
    if len(cfg.DATASETS.TEST) == 1:
        raw = {cfg.DATASETS.TEST[0]: raw}
    out = {"task": "detection", "config": config_file, "iterations": cfg.SOLVER.MAX_ITER,
           "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "base_lr": cfg.SOLVER.BASE_LR,
           "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "weights": cfg.MODEL.WEIGHTS,
           "seconds": round(seconds, 1),
           "seconds_per_iter": round(seconds / iterations, 3) if iterations else None, "datasets": {}}
    for name, res in raw.items():
        entry = {"evaluator": MetadataCatalog.get(name).evaluator_type}
        entry.update({"box": res.get("bbox", {})})
        if "segm" in res:
            entry["mask"] = res["segm"]
        out["datasets"][name] = entry
    if cfg.DATASETS.TEST:  # the first test set is the one reported
        first = out["datasets"][cfg.DATASETS.TEST[0]]
        out["dataset"], out["box"] = cfg.DATASETS.TEST[0], first["box"]
        if "mask" in first:
            out["mask"] = first["mask"]
    if source:
        out.update({k: source[k] for k in ("method", "arch", "hvs", "which", "epoch", "step", "fingerprint")
                    if k in source})
        out["checkpoint"] = source.get("checkpoint")
    return out


def main(args):
    """One process of the run (Detectron2's ``launch`` calls it on every GPU)."""
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    from detection import data as det_data
    from detection.convert import load_pkl

    cfg = setup(args)
    default_setup(cfg, args)
    det_data.register_all([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST], args.data_dir)
    trainer = build_trainer_class()(cfg)
    trainer.resume_or_load(resume=args.resume)
    start_iter = trainer.start_iter
    started = time.time()
    if args.eval_only:
        raw = trainer.test(cfg, trainer.model)
    else:
        trainer.train()
        raw = trainer._last_eval_results
    seconds = time.time() - started
    if not comm.is_main_process():
        return None
    source = None
    weights = cfg.MODEL.WEIGHTS
    if weights.endswith(".pkl") and Path(weights).is_file():
        source = load_pkl(weights).get("hvs")
    results = results_of(cfg, args.config_file, raw, seconds, max(0, trainer.iter + 1 - start_iter), source)
    text = json.dumps(results, indent=2)
    ckpt_io.write_text_atomic(Path(cfg.OUTPUT_DIR) / "results.json", text)
    if args.output:
        ckpt_io.write_text_atomic(args.output, text)
    box = results.get("box", {})
    logging.getLogger("detectron2").info(
        f"{results.get('dataset')}: box AP {box.get('AP', float('nan')):.2f} AP50 {box.get('AP50', float('nan')):.2f} "
        f"AP75 {box.get('AP75', float('nan')):.2f}; {results['seconds_per_iter']} s per step "
        f"-> {Path(cfg.OUTPUT_DIR) / 'results.json'}")
    return results


def cli(argv=None):
    """Parse, convert the checkpoint, then launch (one process per GPU)."""
    from detectron2.engine import launch

    from detection.convert import ConvertError

    args = get_parser().parse_args(argv)
    try:
        if args.num_gpus > 1 and not torch.cuda.is_available():
            raise DataError(f"--num-gpus {args.num_gpus} needs CUDA; on a CPU run one process (--num-gpus 1)")
        cfg = setup(args)
        args.opts = [*args.opts, *prepare_weights(args, cfg)]
        return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,))
    except (DataError, ConfigError, ConvertError, ckpt_io.CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
    except FloatingPointError as err:  # Detectron2's check of every iteration's losses
        last = Path(cfg.OUTPUT_DIR) / "last_checkpoint"
        kept = f"the last good checkpoint, {last.read_text().strip()}, is kept" if last.is_file() else \
            "no checkpoint had been written"
        print(f"{PROG}: error: training diverged: {str(err).splitlines()[0]} ({kept}; lower SOLVER.BASE_LR?)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    cli()
