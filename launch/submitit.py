"""Submit any entry point of this repository to a SLURM cluster with submitit.

    python -m launch.submitit --module simsiam.main --nodes 2 --gpus-per-node 8 --partition P \\
        --time 4320 -- --config configs/simsiam_paper.yaml hvs.enabled=true

Everything after ``--`` is the entry point's own command line, exactly as for
``python -m simsiam.main`` (or ``torchrun ... -m simsiam.main``).  Run it from
the repository root: the job runs in the folder it was submitted from, so
relative paths (configs, ``run.output_dir``) mean the same there.

Processes: one SLURM task per GPU.  Each task gets the variables torchrun
would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR: the
job's first node, MASTER_PORT: from the job id), which ``common/engine/dist.py``
reads to join the process group, and runs the entry point in-process as
``python -m <module> <args>`` would.  A single task sets none of them and runs
as one plain process.

Preemption and time limit: SLURM sends USR2 ``--signal-delay`` seconds before
the end (and on preemption where the cluster is set up to); submitit then
requeues the job with the same command (``--max-requeues`` times after a time
limit, always after a preemption).  A training run re-run with the same
command resumes from ``<run.output_dir>/checkpoint.pth``, so the requeued job
continues where the last checkpoint left it: it loses the steps since then.
Training checkpoints at every epoch end and every ``run.ckpt_every_steps``
steps (the paper configs: 1000); set the latter so that a preemption costs
little.

Before submitting, the entry point's configuration is resolved here, as the
job would resolve it, and nothing else is run (``python -m MODULE ARGS`` with
``HVS_CHECK_CONFIG_ONLY`` set): an unknown key or a bad value is refused with
the entry point's own line instead of failing on the cluster.  ``--log-dir``
is created (up to its ``%j`` part) and checked for writing.

``--executor local`` runs the same job on this machine (one node, one task per
GPU, one CPU task without GPUs), for debugging and the tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import submitit

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m launch.submitit"
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)


class LaunchError(ValueError):
    """A problem with the command line the user can fix (one line, exit status 2)."""


# ----------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------
def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit an entry point of this repository (a module and its own arguments,\n"
                    "given after --) to SLURM with submitit: one task per GPU, requeued on\n"
                    "preemption and time-out, resuming from the run's checkpoint.",
        epilog=f"usage of the entry point's arguments: python -m MODULE --help\n\n"
               f"example:\n  {PROG} --module dino.main --nodes 2 --gpus-per-node 8 --partition P "
               f"--time 4320 \\\n      -- --config configs/dino_paper.yaml hvs.enabled=true")
    job = parser.add_argument_group("what to run")
    job.add_argument("--module", required=True, metavar="MODULE",
                     help="entry point to run, as for python -m: simsiam.main, simclr.main, dino.main, ibot.main, "
                          "eval.linear, ...")
    res = parser.add_argument_group("resources (sbatch)")
    res.add_argument("--nodes", type=at_least(1), default=1, help="number of nodes to request (default: %(default)s)")
    res.add_argument("--gpus-per-node", type=at_least(0), default=8,
                     help="GPUs to request on each node; one task per GPU, 0: one CPU task (default: %(default)s)")
    res.add_argument("--partition", help="partition to submit to (default: the cluster's default)")
    res.add_argument("--time", type=at_least(1), default=4320, metavar="MINUTES",
                     help="time limit of one job in minutes; longer runs are requeued (default: %(default)s, 72 h)")
    res.add_argument("--account", help="account to charge (sbatch --account)")
    res.add_argument("--qos", help="quality of service (sbatch --qos)")
    res.add_argument("--constraint", help="node features, e.g. a GPU type (sbatch --constraint)")
    res.add_argument("--cpus-per-task", type=at_least(1), default=10,
                     help="CPU cores per task, i.e. per GPU; the paper configs' loaders use data.num_workers=10 "
                          "(default: %(default)s)")
    res.add_argument("--mem", type=at_least(1), metavar="GB",
                     help="memory per node in GB (sbatch --mem; default: the partition's default)")
    sub = parser.add_argument_group("submission")
    sub.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                     help="slurm: sbatch; local: run on this machine, one node (default: %(default)s)")
    sub.add_argument("--job-name", help="SLURM job name (default: the module)")
    sub.add_argument("--log-dir", default="runs/submitit/%j",
                     help="folder of submitit's files and the tasks' logs; %%j is the job id "
                          "(default: %(default)s)")
    sub.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                     help="shell line run on the node before the job, e.g. 'source venv/bin/activate' "
                          "(repeatable; default: the job runs this Python, %s)" % sys.executable)
    sub.add_argument("--signal-delay", type=at_least(0), default=120, metavar="SECONDS",
                     help="SLURM signals the job this long before its time limit (default: %(default)s)")
    sub.add_argument("--max-requeues", type=at_least(0), default=3,
                     help="requeue after a time limit at most this often; preemptions do not count "
                          "(default: %(default)s)")
    return parser


def parse(argv) -> tuple:
    """(launcher arguments, the entry point's arguments): split at the first ``--``."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return build_parser().parse_args(argv[:cut]), argv[cut + 1:]


def entry_points() -> list:
    """The modules of this repository that can be run, e.g. ``simsiam.main``."""
    return [f"{p.parent.name}.{p.stem}" for p in sorted(ROOT.glob("*/*.py"))
            if p.parent.name not in ("tests", "launch") and MAIN_GUARD.search(p.read_text(errors="ignore"))]


def check_module(name: str) -> None:
    """``name`` is a module of this repository with a ``__main__`` block."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve() if spec is not None and spec.has_location else None  # not a built-in
    if origin is None or ROOT not in origin.parents or not origin.is_file():
        raise LaunchError(f"--module {name}: no such module in this repository; "
                          f"entry points: {', '.join(entry_points())}")
    if not MAIN_GUARD.search(origin.read_text(errors="ignore")):
        raise LaunchError(f"--module {name}: not an entry point (it has no __main__ block); "
                          f"entry points: {', '.join(entry_points())}")


def check_configs(args: list) -> None:
    """Every ``--config`` file exists here, before the job waits in the queue."""
    for i, a in enumerate(args):
        path = (args[i + 1] if a == "--config" and i + 1 < len(args)
                else a.split("=", 1)[1] if a.startswith("--config=") else None)
        if path is not None and not Path(path).is_file():
            raise LaunchError(f"--config {path}: no such file (relative to {os.getcwd()}, where the job runs)")


#: what the source of an entry point holds when it resolves a configuration through common/engine/config.py
#: and so stops there when only checking (common.engine.config.stop_if_checking)
RESOLVES_CONFIG = re.compile(r"from common\.engine\.train import main|parse_cli\(|parse_eval_args\(|prepare_weights\(")


def resolves_config(module: str) -> bool:
    return bool(RESOLVES_CONFIG.search(Path(importlib.util.find_spec(module).origin).read_text(errors="ignore")))


def check_entry_config(module: str, args: list, timeout: float = 600) -> None:
    """Resolve the entry point's configuration here, as the job would, and
    stop there (``python -m MODULE ARGS`` with
    :data:`common.engine.config.CHECK_ONLY_ENV` set: nothing is built or written):
    an unknown key or a bad value is refused before the job waits in the
    queue, with the entry point's own line.  Entry points that resolve no
    configuration of this repository (the analyses) are not run."""
    from common.engine.config import CHECK_ONLY_ENV, CHECKED_LINE

    if not resolves_config(module):
        return
    env = {**os.environ, CHECK_ONLY_ENV: "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"python -m {module} did not resolve its configuration within {timeout:.0f} s") from None
    if proc.returncode == 0 and CHECKED_LINE in proc.stdout:
        return
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    why = (errors or lines or [f"exit status {proc.returncode}"])[-1].strip()
    raise LaunchError(f"the entry point refuses its arguments, nothing submitted: {why}")


def check_log_dir(log_dir: str) -> None:
    """``--log-dir`` can be created and written (up to its first part holding
    a ``%`` pattern, which submitit fills in per job)."""
    parts = Path(log_dir).absolute().parts
    fixed = Path(*parts[:next((i for i, p in enumerate(parts) if "%" in p), len(parts))])
    try:
        fixed.mkdir(parents=True, exist_ok=True)
        probe = fixed / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LaunchError(f"--log-dir {log_dir}: cannot create or write {fixed}: {err.strerror or err}") from None


# ----------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------
def distributed_env(env) -> dict:
    """torchrun's variables for this task, from a ``submitit.JobEnvironment``
    (SLURM's SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST);
    empty for a single task."""
    if env.num_tasks == 1:
        return {}
    job_digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    port = os.environ.get("MASTER_PORT") or str(20000 + int(job_digits) % 10000)  # same job, same port
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes), "MASTER_ADDR": env.hostnames[0],
            "MASTER_PORT": port}


def watch_preemption() -> dict:
    """Wrap the handler submitit installed for its preemption signal, so that
    the exit it raises to requeue the job is told apart from the entry point's
    own exit status.  Returns a dict whose ``signalled`` turns True."""
    state = {"signalled": False}
    sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    requeue = signal.getsignal(sig)

    def handler(signum, frame):
        state["signalled"] = True
        if callable(requeue):
            requeue(signum, frame)
    signal.signal(sig, handler)
    return state


class EntryPoint(submitit.helpers.Checkpointable):
    """``python -m <module> <args>`` as one submitit task, in ``cwd``.

    Checkpointable: on preemption or time-out submitit pickles the same call
    again and requeues it; the entry point resumes from its run folder."""

    def __init__(self, module: str, args: list, cwd: str):
        self.module, self.args, self.cwd = module, list(args), cwd

    def __call__(self):
        os.chdir(self.cwd)
        env = submitit.JobEnvironment()
        os.environ.update(distributed_env(env))
        print(f"{self.module} as task {env.global_rank}/{env.num_tasks} on {env.hostname} "
              f"(job {env.job_id}, pid {os.getpid()})", flush=True)
        preemption = watch_preemption()
        argv = sys.argv
        sys.argv = [self.module, *self.args]
        try:
            runpy.run_module(self.module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if preemption["signalled"]:
                raise  # submitit's exit after requeueing the job
            if stop.code not in (None, 0):  # the entry point's error: a result, not a crash, for job.result()
                raise RuntimeError(f"python -m {self.module} exited with status {stop.code}: "
                                   "its message is in this task's log") from None
        finally:
            sys.argv = argv

    def checkpoint(self, *args, **kwargs):
        print(f"{self.module}: preempted or out of time: requeued with the same command, "
              "which resumes from the run folder's checkpoint.pth", flush=True)
        return super().checkpoint(*args, **kwargs)


# ----------------------------------------------------------------------------
# submission
# ----------------------------------------------------------------------------
def make_executor(args: argparse.Namespace):
    """The submitit executor of the parsed arguments."""
    folder = Path(args.log_dir).absolute()
    tasks = max(1, args.gpus_per_node)
    both = dict(timeout_min=args.time, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node)
    if args.executor == "local":
        if args.nodes != 1:
            raise LaunchError(f"--nodes {args.nodes}: the local executor runs on one node")
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(**both, signal_delay_s=args.signal_delay, setup=args.setup)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=args.max_requeues)
    except RuntimeError as err:  # no srun here
        raise LaunchError(f"{err} (--executor local runs the job on this machine)") from None
    slurm = dict(partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                 mem=f"{args.mem}GB" if args.mem else None, setup=args.setup or None)
    executor.update_parameters(
        job_name=args.job_name or args.module, nodes=args.nodes, ntasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node or None, cpus_per_task=args.cpus_per_task, time=args.time,
        signal_delay_s=args.signal_delay, **{k: v for k, v in slurm.items() if v is not None})
    return executor


def submit(argv) -> "submitit.Job":
    """Check a command line (launcher arguments, ``--``, the entry point's), submit the job, return it."""
    return launch(*parse(argv))


def launch(args: argparse.Namespace, entry_args: list) -> "submitit.Job":
    check_module(args.module)
    check_configs(entry_args)
    check_entry_config(args.module, entry_args)
    check_log_dir(args.log_dir)
    executor = make_executor(args)
    try:
        return executor.submit(EntryPoint(args.module, entry_args, os.getcwd()))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LaunchError(f"submission failed: {first}") from None


def main(argv=None) -> None:
    args, entry_args = parse(sys.argv[1:] if argv is None else argv)
    try:
        job = launch(args, entry_args)
    except LaunchError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"submitted {args.module} as job {job.job_id}", flush=True)
    print(f"logs: {job.paths.folder} (task 0: {job.paths.stdout.name}, {job.paths.stderr.name})", flush=True)


if __name__ == "__main__":
    from launch import submitit as launcher  # jobs pickle launch.submitit.EntryPoint, not __main__'s

    launcher.main()
