"""``python -m jaxsurro.submit CONFIG``: submits the training server as a batch job, from a login node.

The server job (``launcher.server_ranks`` MPI ranks, ``launcher.server_options``) then
launches its clients through the same scheduler (``launcher.client_options``): as one
batch job each, or, with Slurm's ``launcher.slurm_mode = "steps"``, as ``srun`` steps
inside the server's own allocation. This command prints the job id and the run
directory and exits; the run directory fills as the job runs. ``--resume RUN_DIR`` submits a
server job that continues that run from its latest checkpoint. On Slurm the server job also
resumes itself: ``launcher.warning_seconds`` before its time limit it writes a checkpoint, stops
and requeues itself. See docs/architecture.md, sections "Launcher" and "Run directory".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxsurro import rundir
from jaxsurro.config import Config, add_config_arguments, config_from_args

# The launcher's backends load inside the functions that submit: a bad configuration is refused by
# main() before anything but the configuration is imported, and before a run directory exists.

SUBMIT_TIMEOUT = 120.0  # seconds sbatch or oarsub may take to answer


def prepare_run_dir(config: Config, run_dir: Path | None) -> Path:
    """An absolute run directory holding the resolved configuration the server job will read."""
    return rundir.create(config, run_dir).absolute()


# A complete checkpoint of a run directory, as a pattern relative to it (jaxsurro.server.checkpoint names them).
CHECKPOINT_GLOB = f"{rundir.CHECKPOINTS}/{rundir.CHECKPOINT_PREFIX}*"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run directory holds a complete checkpoint to resume from."""
    return any(path.is_dir() for path in run_dir.glob(CHECKPOINT_GLOB))


def server_argv(run_dir: Path, python: str, resume: bool = False) -> list[str]:
    """One server rank's command line: the run command on the resolved configuration, or resuming the run."""
    if resume:
        return [python, "-m", "jaxsurro.run", str(run_dir), "--resume", "--no-progress"]
    return [python, "-m", "jaxsurro.run", str(run_dir / rundir.CONFIG), "--no-progress", "--run-dir", str(run_dir)]


def submit_slurm(config: Config, run_dir: Path, python: str, workdir: Path) -> str:
    """Writes ``server.sbatch`` (readable by its owner only) and submits it; returns the job id.

    The script resumes the run by itself when the run directory holds a checkpoint.
    """
    from jaxsurro.launcher import slurm
    from jaxsurro.launcher.commands import write_job_script

    script = slurm.server_script(
        run_dir / rundir.CONFIG,
        [],
        config.launcher.server_options,
        config.launcher.server_ranks,
        python,
        workdir,
        run_dir,
        checkpoint_glob=CHECKPOINT_GLOB,
        warning_seconds=config.launcher.warning_seconds,
        job_name=f"{config.study.name}-server",
    )
    path = write_job_script(run_dir / "server.sbatch", script, executable=False)
    return slurm.SlurmScheduler(command_timeout=SUBMIT_TIMEOUT).submit_script(path, "the server job")


def submit_oar(config: Config, run_dir: Path, python: str, workdir: Path, resume: bool = False) -> str:
    """Submits the server through the OAR backend (mpirun over OAR's node file for several ranks)."""
    from jaxsurro.launcher import JobSpec, oar

    argv = server_argv(run_dir, python, resume)
    ranks = config.launcher.server_ranks
    if ranks > 1:
        # The node file is only known inside the job: bash expands it; every other value stays an argument.
        argv = [
            "bash",
            "-c",
            'exec mpirun -n "$0" --hostfile "$OAR_NODEFILE" --mca plm_rsh_agent oarsh "$@"',
            str(ranks),
            *argv,
        ]
    job = JobSpec(
        name=f"{config.study.name}-server", argv=tuple(argv), env={}, log_path=run_dir / "server-job.log", cwd=workdir
    )
    return oar.OarScheduler(config.launcher.server_options, command_timeout=SUBMIT_TIMEOUT).submit(job)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.submit", description=__doc__.splitlines()[0])
    add_config_arguments(
        parser, 'experiment TOML file with launcher.scheduler = "slurm" or "oar" (with --resume: RUN_DIR)'
    )
    parser.add_argument("--run-dir", type=Path, help="the run directory (default: a new one under study.output_dir)")
    parser.add_argument(
        "--resume", action="store_true", help="CONFIG is a run directory: submit a server that continues that run"
    )
    args = parser.parse_args(argv)
    if args.resume:
        if not rundir.resume_arguments(args):
            return 2
        if not has_checkpoint(args.run_dir):
            print(
                f"error: {args.run_dir / rundir.CHECKPOINTS} holds no complete checkpoint to resume from; "
                "submit the study anew with python -m jaxsurro.submit EXPERIMENT.toml",
                file=sys.stderr,
            )
            return 2
    # The server runs elsewhere: its host and memory are checked by its job (python -m jaxsurro.run).
    config = config_from_args(args, server_here=False)
    if config is None:
        return 2
    scheduler = config.launcher.scheduler
    if scheduler == "local":
        print(
            'error: launcher.scheduler is "local": run the study here with python -m jaxsurro.run, or set '
            'launcher.scheduler = "slurm" or "oar" to submit it',
            file=sys.stderr,
        )
        return 2
    run_dir = prepare_run_dir(config, args.run_dir)
    python, workdir = sys.executable, Path.cwd().absolute()
    try:
        if scheduler == "slurm":
            job_id = submit_slurm(config, run_dir, python, workdir)
        else:
            job_id = submit_oar(config, run_dir, python, workdir, args.resume)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (run_dir / rundir.SERVER_JOB_ID).write_text(f"{scheduler} {job_id}\n")
    print(f"submitted the server as {scheduler} job {job_id}" + (" to resume the run" if args.resume else ""))
    print(f"run directory: {run_dir}")
    follow, stop = ("squeue -j", "scancel") if scheduler == "slurm" else ("oarstat -j", "oardel -s SIGTERM")
    print(f"follow it with `{follow} {job_id}`; summary.json appears in the run directory at the end")
    print(f"stop it with `{stop} {job_id}`: the server then cancels its simulation jobs")
    if scheduler == "slurm" and config.launcher.warning_seconds:
        print(
            f"{config.launcher.warning_seconds} s before its time limit it writes a checkpoint and requeues itself "
            f"to resume (launcher.warning_seconds); `scancel --signal=USR1 --batch {job_id}` does so now"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
