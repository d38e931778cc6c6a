"""launch/submitit.py: the command line, the sbatch file it submits, torchrun's
variables from SLURM's, and a job that is preempted, requeued and resumes
(submitit's local executor, CPU)."""
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
import submitit
import torch

from launch import submitit as launcher  # (tests.helpers is imported where needed: the tasks import this module)

ROOT = Path(__file__).resolve().parents[1]  # where jobs are submitted from: they run there


@pytest.mark.parametrize("argv, message", [
    (["--module", "simsiam.mian"], "--module simsiam.mian: no such module in this repository"),
    (["--module", "os.path"], "--module os.path: no such module in this repository"),
    (["--module", "simsiam.model"], "--module simsiam.model: not an entry point"),
    (["--module", "simsiam.main", "--", "--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
    (["--module", "simsiam.main", "--nodes", "2"], "--nodes 2: the local executor runs on one node"),
    (["--module", "simsiam.main", "--", "--config", "configs/simsiam_small.yaml", "foo.bar=1"],
     "the entry point refuses its arguments, nothing submitted: python -m simsiam.main: error: unknown config "
     "key 'foo.bar' on the command line"),
    (["--module", "eval.knn", "--", "knn.ks=[0]"],
     "the entry point refuses its arguments, nothing submitted: eval.knn: error: config knn.ks"),
    (["--module", "simsiam.main", "--log-dir", "{file}/logs/%j"], "--log-dir {file}/logs/%j: cannot create or write "
     "{file}/logs: Not a directory"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # where jobs are submitted from
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as stop:
        launcher.main(["--executor", "local", "--log-dir", str(tmp_path / "%j"), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    message = message.replace("{file}", str(tmp_path / "file"))
    assert err.startswith(f"python -m launch.submitit: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*/*.pkl")) and not list(tmp_path.glob("%j"))  # nothing was submitted


def test_lists_the_entry_points():
    points = launcher.entry_points()
    assert {"simsiam.main", "simclr.main", "dino.main", "eval.linear"} <= set(points)
    assert "simsiam.model" not in points and not any(p.startswith(("tests.", "launch.")) for p in points)


def slurm_env(monkeypatch, procid, localid, ntasks=16, nodes=2, job_id="4242"):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in dict(SLURM_JOB_ID=job_id, SLURM_NTASKS=ntasks, SLURM_JOB_NUM_NODES=nodes,
                           SLURM_NODEID=procid // (ntasks // nodes), SLURM_PROCID=procid, SLURM_LOCALID=localid,
                           SLURM_JOB_NODELIST="gpu[07-08]").items():
        monkeypatch.setenv(key, str(value))
    return submitit.JobEnvironment()


def test_torchrun_variables_from_slurm(monkeypatch):
    env = slurm_env(monkeypatch, procid=9, localid=1)
    assert type(env).__name__ == "SlurmJobEnvironment"
    v = launcher.distributed_env(env)
    assert {k: v[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07"}
    assert 20000 <= int(v["MASTER_PORT"]) < 30000
    assert launcher.distributed_env(slurm_env(monkeypatch, procid=0, localid=0))["MASTER_PORT"] == v["MASTER_PORT"]
    assert launcher.distributed_env(slurm_env(monkeypatch, 0, 0, job_id="4243"))["MASTER_PORT"] != v["MASTER_PORT"]
    assert launcher.distributed_env(slurm_env(monkeypatch, 0, 0, ntasks=1, nodes=1)) == {}  # a plain process


def join_process_group():
    """In a task: torchrun's variables from the job, then what every entry point does (common/engine/dist.py)."""
    from common.engine import dist

    os.environ.update(launcher.distributed_env(submitit.JobEnvironment()))
    dist.init("cpu")
    try:
        return dist.rank(), dist.world(), dist.all_reduce_mean(torch.tensor([float(dist.rank())])).item()
    finally:
        dist.cleanup()


@pytest.mark.slow
def test_tasks_join_one_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.chdir(ROOT)
    executor = submitit.LocalExecutor(tmp_path)
    executor.update_parameters(tasks_per_node=2, timeout_min=3)
    assert executor.submit(join_process_group).results() == [(0, 2, 0.5), (1, 2, 0.5)]


def test_slurm_submission(monkeypatch, tmp_path, capsys):
    """A fake sbatch records the script the launcher submits."""
    monkeypatch.chdir(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {tmp_path}/job.sh; echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    logs = tmp_path / "logs" / "%j"
    launcher.main(["--module", "simsiam.main", "--nodes", "2", "--gpus-per-node", "8", "--partition", "P",
                   "--time", "4320", "--account", "A", "--mem", "400", "--log-dir", str(logs),
                   "--setup", "source venv/bin/activate", "--max-requeues", "5",
                   "--", "--config", "configs/simsiam_paper.yaml", "hvs.enabled=true"])
    out = capsys.readouterr().out
    assert "submitted simsiam.main as job 4242" in out and f"logs: {tmp_path / 'logs' / '4242'}" in out
    script = (tmp_path / "job.sh").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    expected = {"nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "partition": "P", "time": "4320",
                "account": "A", "mem": "400GB", "cpus-per-task": "10", "signal": "USR2@120",
                "job-name": "simsiam.main"}
    assert {k: flags.get(k) for k in expected} == expected
    assert "source venv/bin/activate" in script and re.search(r"^srun .* -m submitit.core._submit ", script, re.M)
    delayed = submitit.core.utils.DelayedSubmission.load(tmp_path / "logs" / "4242" / "4242_submitted.pkl")
    job = delayed.function
    assert (job.module, job.args, job.cwd) == ("simsiam.main", ["--config", "configs/simsiam_paper.yaml",
                                                                "hvs.enabled=true"], str(ROOT))
    assert isinstance(job, submitit.helpers.Checkpointable)  # submitit requeues it
    assert (delayed._timeout_min, delayed._timeout_countdown) == (4320, 5)
    again = job.checkpoint()  # what submitit pickles on preemption: the same call
    assert again.function is job and again.args == () and again.kwargs == {}


# ----------------------------------------------------------------------------
# end to end on CPU with the local executor
# ----------------------------------------------------------------------------
#: a tiny SimSiam with HVS, 32 images, 2 epochs of 4 steps, a checkpoint after every step
RUN = ["model.cifar_stem=false", "train.epochs=2", "run.ckpt_every_steps=1", "hvs.enabled=true"]


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged_steps(out) -> int:
    path = Path(out) / "log.jsonl"
    try:
        return max((json.loads(l).get("step", 0) for l in path.read_text().splitlines()[:-1]), default=0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes(tmp_path, image_root, monkeypatch):
    from common.engine import checkpoint as ckpt_io
    from common.engine.train import run
    from simsiam.method import SimSiamMethod
    from tests.helpers import TINY, read_log, tiny_cfg

    # one thread per process, here and in the job: two cores shared by several runs, and
    # the same reductions in both, so that the weights can be compared bitwise
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    job = launcher.submit(["--module", "simsiam.main", "--executor", "local", "--gpus-per-node", "0",
                           "--time", "10", "--log-dir", str(tmp_path / "logs" / "%j"),
                           "--", *TINY, *RUN, f"data.data_dir={image_root}", f"run.output_dir={out}"])
    try:
        wait_for(lambda: logged_steps(out) >= 2, 120, "the job's second step")
        signalled_at = logged_steps(out)
        # SLURM (and the local controller at a time limit) signal the tasks themselves;
        # job._interrupt() signals the local controller, which has no handler for it and dies
        controller = job._process.pid
        tasks = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        assert len(tasks) == 1
        os.kill(int(tasks[0]), signal.SIGUSR2)
        wait_for(job.done, 120, "the requeued job")
    finally:
        job.cancel()
    assert job.result() is None, job.stderr()
    stdout = job.stdout()
    assert stdout.count("simsiam.main as task 0/1") == 2, stdout  # two starts of the same command
    assert "preempted or out of time: requeued with the same command" in stdout
    resumed = re.findall(rf"resumed from {re.escape(str(out / 'checkpoint.pth'))}: epoch \d+, step (\d+)", stdout)
    # from the checkpoint of the step before the signal or later, not the end of the run
    assert len(resumed) == 1 and signalled_at - 1 <= int(resumed[0]) < 8, (signalled_at, stdout)

    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_cfg(SimSiamMethod, reference, image_root, *RUN), SimSiamMethod)
    finally:
        torch.set_num_threads(threads)
    a, b = ckpt_io.load(reference / "checkpoint.pth"), ckpt_io.load(out / "checkpoint.pth")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # as if never interrupted
    assert [(r["step"], r["loss"]) for r in read_log(reference)] == [(r["step"], r["loss"]) for r in read_log(out)]
