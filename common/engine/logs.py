"""JSON-lines logs, console progress with an ETA, and the selection log."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JsonLog:
    """Appends one JSON object per line.  On resume, rows past the resumed step
    are dropped so that the file reads as one uninterrupted run; a last line
    cut short (the process killed while writing it) is dropped with a
    warning.  The file is rewritten atomically."""

    def __init__(self, path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.exists():
            keep = [json.dumps(r) for r in read_rows(self.path) if r.get("step", 0) <= resume_step]
            from common.engine.checkpoint import write_text_atomic

            write_text_atomic(self.path, "".join(r + "\n" for r in keep))

    def write(self, **row) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class LogError(ValueError):
    """A damaged log file; the message names the file and line."""


def read_rows(path) -> list:
    """The rows of a JSON-lines log.  A last line cut short is dropped with a
    warning; a damaged line before it is an error naming the file and line."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"warning: {path}: dropped its last line, cut short ({len(line)} characters): the run "
                      "was stopped while writing it", file=sys.stderr, flush=True)
                continue
            raise LogError(f"{path}, line {number}: not a JSON object; the log is damaged") from None
    return rows


class Progress:
    """Console progress over a known number of steps."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.time()

    def eta(self, done: int) -> float:
        rate = (time.time() - self.t0) / max(1, done - self.start)
        return rate * (self.total - done)

    def print(self, done: int, text: str) -> None:
        if self.enabled:
            print(f"[{done}/{self.total} ETA {fmt_time(self.eta(done))}] {text}", file=sys.stderr, flush=True)


class SelectionLog:
    """Buffers, every K steps, the per-view augmentation parameters, the scores
    of all compared combinations and the choice, then writes them to one
    compressed ``.npz`` per flush (``selection/rank{r}_steps{a}-{b}.npz``)::

        step [n], index [n, B], params [n, B, V, P], combos [n, C, S],
        scores [n, B, C], choice [n, B]   (+ param_names)

    Runs without a selection (the baseline, the IoU policy) log the parameters
    of the views they train on, with one combination (all V views, in order),
    chosen by every sample, and NaN scores."""

    def __init__(self, folder, rank: int, param_names):
        self.folder, self.rank, self.param_names = Path(folder), rank, list(param_names)
        self.rows: list = []

    def add(self, step, index, params, selection) -> None:
        if selection is None:
            V = params.shape[1]
            self.rows.append({"step": step, "index": index.numpy(), "params": params.numpy(),
                              "combos": np.arange(V)[None], "choice": np.zeros(len(index), np.int64),
                              "scores": np.full((len(index), 1), np.nan, np.float32)})
            return
        scores = selection.scores
        self.rows.append({
            "step": step, "index": index.numpy(), "params": params.numpy(),
            "combos": selection.combos.cpu().numpy(), "choice": selection.choice.cpu().numpy(),
            "scores": (scores.cpu().numpy() if scores is not None
                       else np.full((len(index), len(selection.combos)), np.nan, np.float32)),
        })

    def flush(self) -> None:
        if not self.rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        a, b = self.rows[0]["step"], self.rows[-1]["step"]
        arrays = {k: np.stack([r[k] for r in self.rows]) for k in self.rows[0]}
        path = self.folder / f"rank{self.rank}_steps{a:08d}-{b:08d}.npz"
        tmp = path.with_name(path.name + ".tmp")  # a kill during the write leaves no truncated log
        with open(tmp, "wb") as f:
            np.savez_compressed(f, param_names=np.array(self.param_names), **arrays)
        os.replace(tmp, path)
        self.rows = []
