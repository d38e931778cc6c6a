"""Reading the selection logs of a training run, and writing analysis results.

Every run trained with ``run.selection_log_every > 0`` writes, every K steps,
``RUN/selection/rank{r}_steps{a:08d}-{b:08d}.npz`` (:class:`common.engine.logs.SelectionLog`)
holding for n logged steps of rank r::

    step [n], index [n, B], params [n, B, V, P], combos [n, C, S],
    scores [n, B, C], choice [n, B], param_names [P]

:func:`load_selection` reads them all into one :class:`SelectionData`, in two
levels:

* per *block*: one logged step of the ranks that compared the same
  combinations (normally all ranks of a step: they draw the same subset)::

      step [n], combos [n, C, S], pairs [n, K, 2], combo_pair [n, C]

* per *sample*, flattened over blocks, ranks and batch (in step, then rank
  order)::

      block [M], index [M], params [M, V, P], scores [M, C], choice [M]

The parameter columns are put in the order of :data:`common.views.augment.PARAM_NAMES`
whatever their order in the file; a column the file lacks (a log of an older
version) is NaN, unless the pair metrics need it
(:data:`analysis.metrics.COLUMNS_USED`): then the file is refused.

**Pairs.**  Every analysis looks at the *pair* of views of each combination in
slots 0 and 1: for SimSiam and SimCLR (S = 2) the combination is that pair; for
DINO and iBOT (S = 2 + n_local) slots 0 and 1 are the two global crops, and
the local crops are left out.  ``pairs[b]`` lists the distinct (slot 0, slot 1)
candidate pairs among the combinations of block b (padded with -1 to K, the
largest count), and ``combo_pair[b, c]`` the pair of combination c.  For pair
methods ``pairs`` are the combinations themselves, K = C.

A step of one rank that appears in two files (a run that resumed from a
checkpoint older than its last flush logs some steps again) is read from the
newer file only.

The second half of this module writes results: JSON with
:func:`write_json` (atomic, NaN as null), PNG figures (:func:`new_figure`,
:func:`save_figure`) and the command-line wrapper :func:`run_cli` shared by
the analyses (user errors: one line, exit code 2).
"""
from __future__ import annotations

import math
import re
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from analysis.metrics import COLUMNS_USED
from common.views.augment import PARAM_NAMES


class AnalysisError(ValueError):
    """A user error (no logs, a damaged log, a run that cannot answer the
    question asked); the message names the path and says what to do."""


ARRAYS = ("step", "index", "params", "combos", "scores", "choice")
FILE_NAME = re.compile(r"rank(\d+)_steps(\d+)-(\d+)\.npz$")
PAIR_DEFINITIONS = {
    "pair": "the two views of each compared pair (slots 0 and 1 of each combination)",
    "multicrop": "the two global crops of each combination (slots 0 and 1); the local crops are left out, "
                 "and combinations with the same global crops count as one pair",
}


@dataclass
class SelectionData:
    """The selection logs of one run.  Block-level arrays are indexed by block
    (``step``, ``combos``, ``pairs``, ``combo_pair``); sample-level arrays by
    sample (``block``, ``index``, ``params``, ``scores``, ``choice``)."""

    run_dir: Path
    files: list
    config: Optional[dict]
    step: np.ndarray        # [n] training step of every block
    combos: np.ndarray      # [n, C, S] candidate index of every slot of every compared combination
    pairs: np.ndarray       # [n, K, 2] distinct (slot 0, slot 1) pairs of the block, padded with -1
    combo_pair: np.ndarray  # [n, C] row of ``pairs`` of every combination
    block: np.ndarray       # [M] block of every sample
    index: np.ndarray       # [M] dataset index
    params: np.ndarray      # [M, V, P] augmentation parameters of every candidate view
    scores: np.ndarray      # [M, C] per-sample loss of every combination (NaN: not computed)
    choice: np.ndarray      # [M] chosen row of ``combos``
    param_names: tuple = field(default=PARAM_NAMES)

    @property
    def n_samples(self) -> int:
        return len(self.block)

    @property
    def n_views(self) -> int:
        return self.params.shape[1]

    @property
    def method(self) -> Optional[str]:
        """The SSL method from ``config.yaml`` (None without one)."""
        return (self.config or {}).get("method") or None

    @property
    def layout(self) -> str:
        """``pair`` (2 slots: SimSiam, SimCLR) or ``multicrop`` (DINO, iBOT)."""
        return "pair" if self.combos.shape[2] == 2 else "multicrop"

    @property
    def pair_definition(self) -> str:
        return PAIR_DEFINITIONS[self.layout]

    @property
    def has_scores(self) -> bool:
        return bool(np.isfinite(self.scores).any())

    @property
    def selection(self) -> str:
        """How the views were chosen: ``hard``, ``easy`` or ``random`` (HVS),
        ``iou_policy`` (the manual IoU policy, Table 5), ``baseline`` (neither);
        from ``config.yaml``, else guessed from the logs (``scored`` then
        stands for hard or easy)."""
        cfg = self.config or {}
        hvs, policy = cfg.get("hvs"), cfg.get("iou_policy")
        if isinstance(policy, dict) and policy.get("enabled"):
            return "iou_policy"
        if isinstance(hvs, dict) and "enabled" in hvs:
            return str(hvs.get("mode", "hard")) if hvs["enabled"] else "baseline"
        if self.pairs.shape[1] == 1:
            return "baseline"
        return "scored" if self.has_scores else "random"

    @property
    def sample_step(self) -> np.ndarray:
        """[M] training step of every sample."""
        return self.step[self.block]

    @property
    def sample_pairs(self) -> np.ndarray:
        """[M, K, 2] the distinct compared pairs of every sample (-1: padding)."""
        return self.pairs[self.block]

    @property
    def chosen_pair(self) -> np.ndarray:
        """[M] row of :attr:`sample_pairs` that the chosen combination uses."""
        return self.combo_pair[self.block, self.choice]

    def subset(self, rows: np.ndarray) -> "SelectionData":
        """The same run with only the samples ``rows`` (block arrays kept)."""
        return replace(self, block=self.block[rows], index=self.index[rows], params=self.params[rows],
                       scores=self.scores[rows], choice=self.choice[rows])


# --- reading ----------------------------------------------------------------

def distinct_pairs(combos: np.ndarray):
    """(pairs [n, K, 2], combo_pair [n, C]) for combinations [n, C, S]: the
    distinct (slot 0, slot 1) pairs of every block, in order of first
    appearance, padded with -1; and the pair of every combination."""
    n, C = combos.shape[:2]
    per_block, combo_pair = [], np.empty((n, C), np.int64)
    for b in range(n):
        seen: dict = {}
        for c, pair in enumerate(map(tuple, combos[b, :, :2].tolist())):
            combo_pair[b, c] = seen.setdefault(pair, len(seen))
        per_block.append(list(seen))
    K = max(len(p) for p in per_block)
    pairs = np.full((n, K, 2), -1, np.int64)
    for b, p in enumerate(per_block):
        pairs[b, :len(p)] = p
    return pairs, combo_pair


def _read_file(path: Path) -> dict:
    """The arrays of one log file, checked for shape and range, parameter
    columns in :data:`PARAM_NAMES` order."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*ARRAYS, "param_names") if k not in z.files]
            if missing:
                raise AnalysisError(f"{path} is not a selection log: it has no {', '.join(missing)}")
            arrays = {k: z[k] for k in (*ARRAYS, "param_names")}
    except AnalysisError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise AnalysisError(f"{path} is damaged ({type(e).__name__}: {e}); the run was probably stopped while "
                            "writing it: delete it to analyse the other files") from None
    step, index, params, combos, scores, choice = (arrays[k] for k in ARRAYS)
    n = step.shape[0] if step.ndim == 1 else -1
    ok = (n >= 1 and index.ndim == 2 and index.shape[0] == n and index.shape[1] >= 1 and params.ndim == 4
          and params.shape[:2] == index.shape and combos.ndim == 3 and combos.shape[0] == n
          and combos.shape[1] >= 1 and combos.shape[2] >= 2 and scores.shape == (*index.shape, combos.shape[1])
          and choice.shape == index.shape and params.shape[3] == len(arrays["param_names"]))
    if not ok:
        shapes = ", ".join(f"{k} {list(arrays[k].shape)}" for k in ARRAYS)
        raise AnalysisError(f"{path} is damaged: its arrays do not fit together ({shapes}, "
                            f"{len(arrays['param_names'])} param_names)")
    if combos.min() < 0 or combos.max() >= params.shape[2] or choice.min() < 0 or choice.max() >= combos.shape[1]:
        raise AnalysisError(f"{path} is damaged: a combination names a view outside 0..{params.shape[2] - 1} "
                            f"or a choice a row outside 0..{combos.shape[1] - 1}")
    names = [str(s) for s in arrays["param_names"]]
    absent = [k for k in COLUMNS_USED if k not in names]
    if absent:
        raise AnalysisError(f"{path} lacks the parameter columns {absent} (it has {names}): written by another "
                            "version of common.views.augment?")
    params = params.astype(np.float32, copy=False)
    columns = [params[..., names.index(k)] if k in names else np.full(params.shape[:3], np.nan, np.float32)
               for k in PARAM_NAMES]
    arrays["params"] = np.stack(columns, axis=-1)
    return arrays


def _read_config(run_dir: Path) -> Optional[dict]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        print(f"warning: {path} could not be read ({type(e).__name__}); going on without the run's config",
              file=sys.stderr)
        return None
    return cfg if isinstance(cfg, dict) else None


def selection_files(run_dir) -> list:
    """The run's ``selection/*.npz``, sorted; AnalysisError when there are none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run folder {run_dir} does not exist")
    files = sorted((run_dir / "selection").glob("*.npz"))
    if not files:
        raise AnalysisError(f"{run_dir} has no selection/*.npz: train with run.selection_log_every > 0")
    return files


def load_selection(run_dir) -> SelectionData:
    """All selection logs of ``run_dir`` (and its ``config.yaml`` when there is
    one) as one :class:`SelectionData`.  Raises :class:`AnalysisError` naming
    the path for a folder without logs, a damaged file, or files that disagree
    on the number of views, combinations or slots."""
    run_dir = Path(run_dir)
    files = selection_files(run_dir)
    latest: dict = {}  # (rank, step) -> (mtime, file number, row)
    loaded, duplicates = [], 0
    for f_no, path in enumerate(files):
        arrays = _read_file(path)
        if loaded and arrays["params"].shape[2:] + arrays["combos"].shape[1:] != (
                loaded[0]["params"].shape[2:] + loaded[0]["combos"].shape[1:]):
            raise AnalysisError(
                f"{path} and {files[0]} disagree on the number of views, parameters, combinations or slots "
                f"(params {list(arrays['params'].shape)} vs {list(loaded[0]['params'].shape)}, combos "
                f"{list(arrays['combos'].shape)} vs {list(loaded[0]['combos'].shape)}): are they of one run?")
        loaded.append(arrays)
        match = FILE_NAME.search(path.name)
        rank, mtime = (int(match.group(1)) if match else 0), path.stat().st_mtime
        for row, s in enumerate(arrays["step"].tolist()):
            key = (rank, int(s))
            if key in latest:
                duplicates += 1
                if latest[key][:2] > (mtime, f_no):
                    continue
            latest[key] = (mtime, f_no, row)
    if duplicates:
        print(f"warning: {run_dir}: {duplicates} step(s) were logged twice by the same rank (a resumed run); "
              "the newer file is used", file=sys.stderr)

    # group ranks per step; ranks that compared other combinations form their own block
    groups: dict = {}
    for (rank, s), (_, f_no, row) in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        combos = loaded[f_no]["combos"][row]
        groups.setdefault((s, combos.tobytes()), (combos, []))[1].append((f_no, row))
    step, combos, block, parts = [], [], [], {k: [] for k in ("index", "params", "scores", "choice")}
    for b, ((s, _), (c, members)) in enumerate(groups.items()):
        step.append(s)
        combos.append(c)
        for f_no, row in members:
            for k in parts:
                parts[k].append(loaded[f_no][k][row])
            block.append(np.full(len(loaded[f_no]["index"][row]), b, np.int64))
    combos = np.stack(combos).astype(np.int64)
    pairs, combo_pair = distinct_pairs(combos)
    return SelectionData(
        run_dir=run_dir, files=files, config=_read_config(run_dir), step=np.array(step, np.int64),
        combos=combos, pairs=pairs, combo_pair=combo_pair, block=np.concatenate(block),
        index=np.concatenate(parts["index"]).astype(np.int64), params=np.concatenate(parts["params"]),
        scores=np.concatenate(parts["scores"]).astype(np.float64),
        choice=np.concatenate(parts["choice"]).astype(np.int64))


def run_summary(data: SelectionData) -> dict:
    """What every result JSON says about the run it read."""
    return {"run": str(data.run_dir), "method": data.method, "selection": data.selection,
            "pair_definition": data.pair_definition, "n_samples": data.n_samples,
            "n_steps": int(len(np.unique(data.step))),
            "n_views": data.n_views, "n_combinations": int(data.combos.shape[1]), "n_files": len(data.files)}


# --- writing results ----------------------------------------------------------

def jsonable(obj):
    """``obj`` with numpy scalars and arrays as Python numbers and lists, and
    NaN or infinite floats as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    from common.engine.checkpoint import write_json_atomic

    write_json_atomic(path, jsonable(obj))


def new_figure(width: float = 6.0, height: float = 4.0):
    """(figure, axes) drawn off-screen (no pyplot, no GUI backend, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig, path) -> str:
    """Save ``fig`` as PNG at ``path``; returns the path as a string."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def run_cli(parser, analyse: Callable, argv=None) -> int:
    """Parse ``argv`` with ``parser``, call ``analyse(args)``; an
    :class:`AnalysisError` prints ``error: ...`` on one line and returns 2."""
    args = parser.parse_args(argv)
    try:
        analyse(args)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
