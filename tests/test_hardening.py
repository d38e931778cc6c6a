"""Faults and user mistakes (issue 12): no checkpoint is lost, one run per
folder, every bad input is one clear line before data and model are built."""
import io
import os
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from common.engine import checkpoint as ckpt_io
from common.engine.config import COMMON_SPEC, ConfigError, resolve
from common.views.data import DataError, build_dataset
from common.engine.logs import read_rows
from common.engine.runtime import Diverged, RunDir, RunError
from common.engine.train import run
from dino.method import DINOMethod
from simclr.method import SimCLRMethod
from simsiam.method import SimSiamMethod
from tests.helpers import tiny_cfg
from tests.helpers import ROOT, cli, read_log


def finite_weights(path):
    state = ckpt_io.load(path)
    return all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), state


# --- data that can be lost ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("log_every", [4, 1])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_root, log_every):
    out = tmp_path / "r"
    cfg = tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=3", "optim.lr=1e12",
                   f"run.log_every={log_every}", "run.ckpt_every_steps=1", "run.selection_log_every=0")
    with pytest.raises(Diverged, match=r"step \d+") as err:
        run(cfg, SimSiamMethod)
    assert "checkpoint" in str(err.value)
    ok, state = finite_weights(out / "checkpoint.pth")  # the checkpoint on disk is a good one
    assert ok and f"(step {state['step']})" in str(err.value)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_diverged_cli_exits_nonzero_without_traceback(tmp_path, image_root):
    r = cli("-m", "simsiam.main", "--output-dir", str(tmp_path / "r"), "--data-dir", str(image_root),
            *tiny_overrides(SimSiamMethod), "train.epochs=3", "optim.lr=1e12", "run.ckpt_every_steps=1")
    assert r.returncode == 3 and "diverged" in r.stderr and "Traceback" not in r.stderr


def tiny_overrides(method_cls):
    from tests.helpers import TINY
    spec = {**COMMON_SPEC, **method_cls.spec}
    return [o for o in TINY if o.split("=")[0] in spec]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, image_root):
    out = tmp_path / "r"
    held = RunDir(out).open()  # another run holds the folder
    try:
        with pytest.raises(RunError, match=f"{out}.*in use by another run.*pid {os.getpid()}"):
            run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1"), SimSiamMethod)
        assert not (out / "log.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        held.close()


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "r"
    code = f"from common.engine.runtime import RunDir; RunDir({str(out)!r}).open(); print('locked', flush=True); " \
           "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match="in use"):
        RunDir(out).open()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    RunDir(out).open().close()  # the OS released the lock with the process


@pytest.mark.slow
def test_stale_temporaries_are_removed_at_start(tmp_path, image_root):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".checkpoint.pth.abc123.tmp").write_bytes(b"x" * 1000)
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "run.max_steps_per_epoch=1"), SimSiamMethod)
    assert not list(out.glob(".*.tmp")) and (out / "checkpoint.pth").exists()


def test_refused_resume_and_failed_runs_write_nothing(tmp_path, image_root):
    out = tmp_path / "r"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "run.max_steps_per_epoch=1"), SimSiamMethod)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ckpt_io.CheckpointError, match="resnet34"):
        run(tiny_cfg(SimSiamMethod, out, image_root, "model.arch=resnet34"), SimSiamMethod)
    with pytest.raises(ckpt_io.CheckpointError, match=r"other layer shapes.*model.dim: 64 -> 32"):
        run(tiny_cfg(SimSiamMethod, out, image_root, "model.dim=32"), SimSiamMethod)
    with pytest.raises(ckpt_io.CheckpointError, match=r"other layer shapes.*model.cifar_stem: True -> False"):
        run(tiny_cfg(SimSiamMethod, out, image_root, "model.cifar_stem=false"), SimSiamMethod)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        run(tiny_cfg(SimSiamMethod, fresh, tmp_path / "missing"), SimSiamMethod)
    assert not fresh.exists()  # a run that never started leaves no folder


def test_a_log_line_cut_short_is_dropped_on_resume(tmp_path, image_root, capsys):
    out = tmp_path / "r"
    args = ("train.epochs=1", "run.stop_after_steps=2")
    run(tiny_cfg(SimSiamMethod, out, image_root, *args), SimSiamMethod)
    with (out / "log.jsonl").open("a") as f:
        f.write('{"type": "step", "epoch": 0, "st')  # killed while writing
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1"), SimSiamMethod)
    assert "cut short" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out) if r["type"] == "step"] == [1, 2, 3, 4]


def test_a_resume_refused_for_a_damaged_log_writes_nothing(tmp_path, image_root):
    """Every resume check passes before config.yaml is rewritten: a log damaged in the middle
    refuses the resume and leaves the folder (its config of the trained lr) as it was."""
    from common.engine.logs import LogError

    out = tmp_path / "r"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "run.stop_after_steps=2", "run.log_every=1"),
        SimSiamMethod)
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) >= 2
    lines[0] = lines[0][:10]  # a damaged line that is not the last one
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(LogError, match="log.jsonl, line 1"):
        run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "optim.lr=0.05"), SimSiamMethod)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_damaged_log_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl, line 2"):
        read_rows(path)


def test_unwritable_or_impossible_output_folder_is_found_at_start(tmp_path, image_root, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="cannot create the run folder"):
        run(tiny_cfg(SimSiamMethod, blocker / "run", image_root), SimSiamMethod)
    # root ignores permission bits, so refuse the probe write as a read-only file system would
    import builtins
    real_open = builtins.open

    def read_only(path, *a, **k):
        if ".write-test." in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", read_only)
    built = []
    monkeypatch.setattr(SimSiamMethod, "__init__", lambda *a: built.append(1))
    with pytest.raises(RunError, match="not writable"):
        run(tiny_cfg(SimSiamMethod, tmp_path / "ro", image_root), SimSiamMethod)
    assert not built and not (tmp_path / "ro").exists()


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_io.save_atomic({"a": torch.ones(2)}, path)
    real_fdopen = os.fdopen

    def full_disk(fd, mode):  # the temporary file lands on a full disk: /dev/full fails every write
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode)

    monkeypatch.setattr(ckpt_io.os, "fdopen", full_disk)
    with pytest.raises(ckpt_io.CheckpointError, match=f"the disk is full: could not write {path}"):
        ckpt_io.save_atomic({"a": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_full_disk_is_named_when_torch_wraps_the_errno(tmp_path, monkeypatch):
    """On a real file system the write fails inside torch.save's zip writer, which raises
    RuntimeError("... unexpected pos ...") while handling OSError(ENOSPC); the file closes
    without error afterwards.  The errno is found through the exception's chain."""
    import errno
    import io

    path = tmp_path / "checkpoint.pth"
    ckpt_io.save_atomic({"a": torch.ones(2)}, path)

    class FillsUp(io.RawIOBase):  # accepts 1 KiB, then every write fails as on a full disk
        def __init__(self, fd):
            os.close(fd)
            self.written = 0

        def writable(self):
            return True

        def write(self, b):
            if self.written + len(b) > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return len(b)

        def fileno(self):
            raise OSError(errno.EBADF, "no descriptor")

    monkeypatch.setattr(ckpt_io.os, "fdopen", lambda fd, mode: FillsUp(fd))
    with pytest.raises(ckpt_io.CheckpointError, match=f"the disk is full: could not write {path}"):
        ckpt_io.save_atomic({"a": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# --- bad input: one line, exit 2, before data and model -------------------------------------
@pytest.mark.parametrize("override, key", [
    ("hvs.n_views=1", "hvs.n_views"), ("hvs.max_combinations=-1", "hvs.max_combinations"),
    ("hvs.resolution=0", "hvs.resolution"), ("hvs.resolution=1.5", "hvs.resolution"),
    ("hvs.n_views=2.5", "hvs.n_views"), ("train.batch_size=0", "train.batch_size"),
    ("optim.lr=-0.1", "optim.lr"), ("train.epochs=0", "train.epochs"), ("augment.scale=[0.2]", "augment.scale"),
    ("augment.blur_p=1.5", "augment.blur_p"), ("run.log_every=0", "run.log_every"),
])
def test_values_out_of_range_are_refused_by_the_config_layer(tmp_path, override, key):
    spec = {**COMMON_SPEC, **SimSiamMethod.spec}
    with pytest.raises(ConfigError, match=f"config {key}="):
        resolve(spec, None, [override])


@pytest.mark.parametrize("method_cls, override, key", [
    (DINOMethod, "hvs.global_candidates=1", "hvs.global_candidates"), (DINOMethod, "model.drop_path=1", "model.drop_path"),
    (DINOMethod, "loss.teacher_temp=0", "loss.teacher_temp"), (SimCLRMethod, "loss.temperature=-1", "loss.temperature"),
])
def test_every_method_declares_its_ranges(method_cls, override, key):
    with pytest.raises(ConfigError, match=f"config {key}="):
        resolve({**COMMON_SPEC, **method_cls.spec}, None, [override])


@pytest.mark.slow
def test_cli_bad_values_are_one_line_with_exit_2(tmp_path):
    for override in ("hvs.n_views=1", "train.batch_size=0", "optim.lr=-1", "train.epochs=0"):
        r = cli("-m", "simsiam.main", "--output-dir", str(tmp_path / "x"), override)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and override.split("=")[0] in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch_size: [1, 2\nhvs:\n  enabled: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+, column \d+: YAML syntax error"):
        resolve(COMMON_SPEC, bad)


def test_dataset_smaller_than_one_global_batch(tmp_path, image_root):
    with pytest.raises(DataError, match=r"32 images, fewer than one global batch of train.batch_size=64"):
        run(tiny_cfg(SimSiamMethod, tmp_path / "r", image_root, "train.batch_size=64"), SimSiamMethod)


def test_truncated_archive_is_a_data_error(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for c in range(2):
            img = io.BytesIO()
            Image.new("RGB", (8, 8), (c * 100, 0, 0)).save(img, "PNG")
            info = tarfile.TarInfo(f"imagefolder/train/c{c}/0.png")
            info.size = len(img.getvalue())
            tar.addfile(info, io.BytesIO(img.getvalue()))
            tar.addfile(tarfile.TarInfo(f"imagefolder/pad{c}"), io.BytesIO())
    data = buf.getvalue()
    root = tmp_path / "data"
    root.mkdir()
    (root / "imagefolder.tar.gz").write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("HVS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="imagefolder.tar.gz: the archive is truncated or corrupt"):
        build_dataset("imagefolder", "train", str(root))


def test_checkpoint_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="is a folder, not a file"):
        ckpt_io.load(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ckpt_io.CheckpointError, match=r"is empty \(0 bytes\)"):
        ckpt_io.load(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ckpt_io.CheckpointError, match="is not a PyTorch checkpoint"):
        ckpt_io.load(tmp_path / "text.pth")
    torch.save({"a": torch.ones(100)}, tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:200])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated or damaged"):
        ckpt_io.load(tmp_path / "cut.pth")


def test_an_empty_override_of_a_string_key_is_the_empty_string():
    from eval.finetune import FINETUNE_SPEC
    assert resolve(FINETUNE_SPEC, None, ["augment.auto_augment="])["augment"]["auto_augment"] == ""
    with pytest.raises(ConfigError, match="train.epochs: a value is needed"):
        resolve(COMMON_SPEC, None, ["train.epochs="])


def test_a_preemption_signal_waits_for_the_checkpoint_write(tmp_path):
    """SIGUSR2 (SLURM's preemption warning, on which submitit's handler raises
    SystemExit) sent in the middle of a checkpoint write runs its handler only
    after the file is whole and in place."""
    import os
    import signal

    from common.engine.checkpoint import save_atomic

    seen = []
    old = signal.signal(signal.SIGUSR2, lambda *_: seen.append((tmp_path / "ckpt.pth").exists()))
    try:
        def dump(obj, f):
            os.kill(os.getpid(), signal.SIGUSR2)  # arrives while the file is being written
            assert not seen  # held back
            torch.save(obj, f)

        save_atomic({"w": torch.ones(3)}, tmp_path / "ckpt.pth", dump=dump)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert seen == [True]  # handled once, after the rename
    assert torch.equal(torch.load(tmp_path / "ckpt.pth", weights_only=True)["w"], torch.ones(3))


def test_an_evaluation_refuses_a_damaged_log_before_writing_its_config(tmp_path):
    from common.engine.logs import LogError
    from eval.engine import eval_session

    out = tmp_path / "ev"
    out.mkdir()
    (out / "config.yaml").write_text("optim:\n  lr: 0.1\n")
    (out / "log.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    cfg = {"run": {"device": "cpu", "output_dir": str(out), "seed": 0}, "train": {"batch_size": 4},
           "eval": {"checkpoint": "x"}, "optim": {"lr": 0.5}}
    with pytest.raises(LogError, match="log.jsonl, line 2"):
        with eval_session(cfg, {"fingerprint": "f"}):
            pass
    assert (out / "config.yaml").read_text() == "optim:\n  lr: 0.1\n"
