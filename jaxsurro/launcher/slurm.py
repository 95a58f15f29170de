"""The ``slurm`` backends: one ``sbatch`` job per simulation, or ``srun`` steps inside the server's allocation.

Job scripts and command lines come from pure builders (:func:`job_script`, :func:`server_script`,
:func:`step_command`); every value in a script is quoted; commands run as argument lists, never
through a shell. Slurm's answers are parsed strictly: text that does not parse raises an error
quoting it. One poll of many jobs costs one ``squeue`` call, plus one ``sacct`` call (or one
``scontrol`` call per job, on clusters without accounting) for the jobs that just left the queue.
See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from jaxsurro.launcher.commands import CommandError, Commands, Runner, describe, export_lines, write_job_script
from jaxsurro.launcher.process import ProcessGroups, job_environment
from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus

log = logging.getLogger("jaxsurro.launcher.slurm")

DEFAULT_MIN_POLL_INTERVAL = 2.0  # seconds; asking slurmctld more often only loads it
NOT_IN_ALLOCATION = (
    "slurm steps mode runs inside an allocation: submit the server with python -m jaxsurro.submit or salloc"
)

# Every job state Slurm 22.05 prints (squeue %T, sacct State, scontrol JobState=), in the common vocabulary.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "RESIZING": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "NODE_FAIL": JobState.NODE_FAIL,
}

_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?|-[A-Za-z](\S.*)?", re.DOTALL)
_SBATCH_ID = re.compile(r"^(\d+)(?:;(\S+))?$", re.MULTILINE)  # --parsable: "ID" or "ID;cluster"
_SQUEUE_LINE = re.compile(r"(\d+)\|([A-Z_]+)\|(.*)")  # squeue -o '%i|%T|%r'
_SACCT_LINE = re.compile(r"(\d+)\|([A-Z_]+(?: by \d+)?)\|(\d+):(\d+)")  # sacct -P -o JobIDRaw,State,ExitCode
_JOB_STATE = re.compile(r"(?:^|\s)JobState=(\S+)")
_EXIT_CODE = re.compile(r"(?:^|\s)ExitCode=(\d+):(\d+)")
_JOB_ID = re.compile(r"(?:^|\s)JobId=(\d+)")
_INVALID_JOB_ID = "Invalid job id specified"
_NO_ACCOUNTING = "accounting storage is disabled"
# sbatch errors that another try cannot fix: the request itself is wrong.
_PERMANENT_SBATCH = re.compile(
    r"submission failed: (Invalid|Requested node configuration is not available|Job violates|"
    r"Requested time limit|Memory specification|Node count specification)|unrecognized option|"
    r"invalid option|invalid argument|error: Invalid|unrecognized argument",
    re.IGNORECASE,
)
_SCANCEL_HARMLESS = re.compile(r"already completing or completed|Invalid job id specified")
# The #SBATCH scanner of sbatch takes any line containing these words as a heterogeneous-job separator.
_HETJOB_WORDS = ("hetjob", "packjob")
# Options the launcher sets itself: a user's copy would move the log or break the id parsing.
_SBATCH_RESERVED = {
    "--output": "-o",
    "--error": "-e",
    "--chdir": "-D",
    "--open-mode": None,
    "--parsable": None,
    "--wrap": None,
    "--array": "-a",
}
# A later #SBATCH --ntasks would win over n_ranks and leave the server's srun without processors; the
# warning signal and the requeue are how the server job resumes itself.
_SERVER_RESERVED = {**_SBATCH_RESERVED, "--ntasks": "-n", "--signal": None, "--requeue": None, "--no-requeue": None}
_RESERVED_WHY = {
    "--signal": "set launcher.warning_seconds instead",
    "--requeue": "the server job requeues itself to resume before its time limit",
    "--no-requeue": "the server job requeues itself to resume before its time limit",
}
_CHECKPOINT_GLOB = re.compile(r"[\w.-][\w.*/-]*")  # relative, and nothing the shell would read but the glob
_STEP_RESERVED = {"--jobid": None, "--output": "-o", "--error": "-e", "--input": "-i", "--pty": None, "--chdir": "-D"}


class SlurmError(CommandError):
    """Slurm refused a request or answered something this backend cannot read."""


# -- pure builders -----------------------------------------------------------------------------------
def validate_options(
    options: Sequence[str], reserved: Mapping[str, str | None] = _SBATCH_RESERVED, what: str = "sbatch"
) -> tuple[str, ...]:
    """Checks that each option is one Slurm command-line word (``--name=value`` or ``-xVALUE``)."""
    if isinstance(options, str):
        raise TypeError(
            f"{what} options must be a sequence of strings such as ['--time=00:10:00'], "
            f"got the single string {options!r}"
        )
    checked = []
    for option in options:
        if not isinstance(option, str) or any(c in option for c in "\n\r\0"):
            raise ValueError(f"{what} option {option!r} must be a string on one line")
        if not _OPTION.fullmatch(option):
            raise ValueError(
                f"{what} option {option!r} is not one command-line word: write a long option "
                f"as '--name=value' (e.g. '--partition=debug') or a short one with its value "
                f"attached (e.g. '-pdebug'), one option per string"
            )
        name = option.split("=", 1)[0] if option.startswith("--") else option[:2]
        for long_name, short_name in reserved.items():
            if name == short_name or (option.startswith("--") and len(name) > 2 and long_name.startswith(name)):
                why = _RESERVED_WHY.get(
                    long_name, "jaxsurro sets the log, working directory and task count from the run"
                )
                raise ValueError(f"{what} option {option!r} is set by jaxsurro itself ({long_name}); remove it ({why})")
        checked.append(option)
    return tuple(checked)


def job_script(job: JobSpec, options: Sequence[str] = ()) -> str:
    """The sbatch script that runs ``job``: its options as ``#SBATCH`` lines, its environment, ``exec argv``."""
    options = validate_options(options)
    if not job.argv:
        raise ValueError(f"job {job.name!r} has an empty command line; expected at least the program to run")
    lines = [
        "#!/bin/bash",
        _directive(f"--job-name={job.name}"),
        _directive(f"--output={_output_pattern(job.log_path)}"),  # stderr joins stdout when --error is unset
        _directive("--open-mode=append"),  # a retried attempt adds to the log, as the local backend does
        _directive(f"--chdir={job.cwd}"),
        *(_directive(option) for option in options),
        *export_lines(job.name, job.env),
        f"exec {shlex.join(job.argv)}",
    ]
    return "\n".join(lines) + "\n"


def server_script(
    config_path: str | os.PathLike,
    overrides: Sequence[str],
    options: Sequence[str],
    n_ranks: int,
    python: str | os.PathLike,
    workdir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    checkpoint_glob: str,
    warning_seconds: int = 0,
    job_name: str = "jaxsurro",
) -> str:
    """The sbatch script of the training server: ``n_ranks`` MPI ranks started by ``srun --mpi=pmix``.

    The server step shares its CPUs with other steps (``--overlap``) so that, in the steps mode,
    clients started as ``srun`` steps of the same allocation are never blocked by it. The server's
    log is ``RUN_DIR/server-JOBID.log``: ``run_dir`` must exist before the script is submitted.

    The job resumes its run: when ``RUN_DIR/<checkpoint_glob>`` names a checkpoint directory as it
    starts (a requeued job, or a resubmission), the server runs ``--resume``. ``warning_seconds``
    before its time limit (0: never) Slurm sends SIGUSR1 to the script, which asks the server's step
    to stop (SIGTERM: a last checkpoint, every simulation job cancelled, exit 143) and, once it did
    with a new checkpoint, requeues the job. ``scancel --signal=USR1 --batch JOBID`` does the same at
    once. (SIGTERM goes to the step through ``scancel``: srun would turn a SIGTERM of its own into a
    SIGKILL of the ranks.)
    """
    if not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be a positive integer, got {n_ranks!r}")
    if not isinstance(warning_seconds, int) or not 0 <= warning_seconds <= 65535:
        raise ValueError(
            f"warning_seconds must be an integer from 0 to 65535 (Slurm's --signal), got {warning_seconds!r}"
        )
    if not _CHECKPOINT_GLOB.fullmatch(checkpoint_glob) or ".." in checkpoint_glob.split("/"):
        raise ValueError(
            f"checkpoint_glob {checkpoint_glob!r} must be a pattern relative to the run directory, of letters, "
            "digits, '_', '.', '-', '/' and '*' (e.g. 'checkpoints/step-*')"
        )
    options = validate_options(options, _SERVER_RESERVED, "sbatch (server)")
    for override in overrides:
        if "=" not in override or "\n" in override:
            raise ValueError(f"override {override!r} is not SECTION.KEY=VALUE on one line")
    run = shlex.quote(os.fspath(run_dir))
    fresh = shlex.join([os.fspath(config_path), "--run-dir", os.fspath(run_dir)])
    command = [os.fspath(python), "-m", "jaxsurro.run"]
    settings = ["--no-progress"]
    for override in overrides:
        settings += ["--set", override]
    warning = [_directive(f"--signal=B:USR1@{warning_seconds}")] if warning_seconds else []
    lines = [
        "#!/bin/bash",
        _directive(f"--job-name={job_name}"),
        _directive(f"--ntasks={n_ranks}"),
        _directive(f"--output={_output_pattern(Path(run_dir))}/server-%j.log"),
        _directive("--open-mode=append"),  # a requeued job adds to its log
        _directive(f"--chdir={os.fspath(workdir)}"),
        _directive("--requeue"),
        *warning,
        *(_directive(option) for option in options),
        # Slurm 22.05's srun no longer reads SLURM_CPUS_PER_TASK: hand a --cpus-per-task on to the ranks.
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi',
        "# The run's newest complete checkpoint (their names sort by step), or nothing.",
        "latest_checkpoint() {",
        "  local checkpoint latest=",
        f"  for checkpoint in {run}/{checkpoint_glob}; do",
        '    if [ -d "$checkpoint" ]; then latest=$checkpoint; fi',
        "  done",
        '  echo "$latest"',
        "}",
        "# A run with a checkpoint is resumed from it: this job was requeued, or submitted again to resume.",
        "resumed_from=$(latest_checkpoint)",
        f"run=({fresh})",
        'if [ -n "$resumed_from" ]; then',
        f"  run=({run} --resume)",
        '  echo "jaxsurro: resuming the run from $resumed_from"',
        "fi",
        "# SIGUSR1 (the time-limit warning): SIGTERM to the server's step, step 0, the script's first srun.",
        "warned=0",
        "trap 'warned=1; interrupted=1; scancel --signal=TERM \"$SLURM_JOB_ID.0\"' USR1",
        f'srun --mpi=pmix --overlap --ntasks={n_ranks} {shlex.join(command)} "${{run[@]}}" {shlex.join(settings)} &',
        "server=$!",
        "interrupted=1",
        'while [ "$interrupted" = 1 ]; do  # a trapped signal ends a wait early: wait again',
        "  interrupted=0",
        '  wait "$server"; status=$?',
        "done",
        'if [ "$warned" = 1 ] && [ "$status" = 143 ] && [ "$(latest_checkpoint)" != "$resumed_from" ]; then',
        '  echo "jaxsurro: the server stopped with checkpoint $(latest_checkpoint); requeueing job $SLURM_JOB_ID"',
        '  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi',
        f'  echo "jaxsurro: the requeue failed; resume the run with python -m jaxsurro.submit --resume" {run} >&2',
        'elif [ "$warned" = 1 ]; then',
        '  echo "jaxsurro: the server ended (exit $status) without a new checkpoint after SIGUSR1; not requeued" >&2',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def step_command(job: JobSpec, options: Sequence[str], allocation: str, srun: str = "srun") -> list[str]:
    """The ``srun`` command line that runs ``job`` as one task of a new step of job ``allocation``.

    ``--exact`` gives the step only the CPUs it asks for, so concurrent client steps share the
    allocation and a step waits inside srun while none is free; the server step overlaps them.
    """
    options = validate_options(options, _STEP_RESERVED, "srun")
    if not job.argv:
        raise ValueError(f"job {job.name!r} has an empty command line; expected at least the program to run")
    if not re.fullmatch(r"\d+", allocation):
        raise ValueError(f"allocation must be a Slurm job id (digits), got {allocation!r}")
    return [srun, f"--jobid={allocation}", "--exact", "--ntasks=1", f"--job-name={job.name}", *options, "--", *job.argv]


def _directive(option: str) -> str:
    """One ``#SBATCH`` line holding ``option`` as one word for sbatch's own scanner of the script."""
    if any(c in option for c in "\n\r\0"):
        raise ValueError(f"sbatch option {option!r} spans several lines; a #SBATCH value must be on one line")
    if any(word in option.lower() for word in _HETJOB_WORDS):
        raise ValueError(
            f"sbatch option {option!r} contains {' or '.join(_HETJOB_WORDS)!s}, which sbatch reads "
            f"as a heterogeneous-job separator anywhere on a #SBATCH line; choose another name"
        )
    # sbatch groups words with ' or " like a shell but, unlike a shell, reads a backslash as an escape
    # even inside single quotes; doubling each backslash keeps it literal.
    return f"#SBATCH {shlex.quote(option).replace(chr(92), chr(92) * 2)}"


def _output_pattern(path: Path) -> str:
    """``path`` as a Slurm file-name pattern: ``%`` written ``%%`` so that Slurm does not expand it."""
    text = os.fspath(path)
    if "\\" in text:
        raise ValueError(
            f"log path {text!r} contains a backslash, which Slurm's --output drops; use a directory without backslashes"
        )
    return text.replace("%", "%%")


# -- pure parsers ------------------------------------------------------------------------------------
def slurm_state(text: str) -> JobState:
    """The common state of a Slurm state word (``CANCELLED by 0`` counts as ``CANCELLED``)."""
    word = text.split(" ", 1)[0] if text else ""
    state = SLURM_STATES.get(word)
    if state is None:
        raise SlurmError(f"unknown Slurm job state {text!r}; expected one of {', '.join(sorted(SLURM_STATES))}")
    return state


def exit_code(code: int, signal_number: int) -> int:
    """Slurm's ``ExitCode=N:S`` as one number: N, or -S when a signal ended the job (as Popen reports)."""
    return -signal_number if signal_number else code


def parse_sbatch(stdout: str) -> tuple[str, str | None]:
    """The job id (and cluster, if any) that ``sbatch --parsable`` printed."""
    matches = _SBATCH_ID.findall(stdout)
    if len(matches) != 1:
        raise SlurmError(
            f"cannot read a job id from sbatch --parsable; expected one line 'ID' or 'ID;cluster', "
            f"got stdout {stdout!r}"
        )
    job_id, cluster = matches[0]
    return job_id, cluster or None


def _table_rows(stdout: str, row: re.Pattern[str], command: str, expected: str) -> Iterator[re.Match[str]]:
    """The match of ``row`` on each line of a command's table (blank lines and ``CLUSTER:`` headers skipped);
    SlurmError quoting a line it does not match, which should have the form ``expected``."""
    for line in stdout.splitlines():
        if not line.strip() or line.startswith("CLUSTER: "):
            continue
        match = row.fullmatch(line.strip())
        if match is None:
            raise SlurmError(f"cannot read {command} line {line!r}; expected {expected}")
        yield match


def parse_squeue(stdout: str) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue -h -o '%i|%T|%r'`` (``CLUSTER:`` headers skipped)."""
    jobs = {}
    for match in _table_rows(stdout, _SQUEUE_LINE, "squeue", "'JOBID|STATE|REASON' (squeue -h -o '%i|%T|%r')"):
        slurm_state(match[2])  # an unknown state raises here, quoting it
        jobs[match[1]] = (match[2], match[3])
    return jobs


def parse_sacct(stdout: str) -> dict[str, JobStatus]:
    """``{job id: status}`` from ``sacct -n -P -X -o JobIDRaw,State,ExitCode`` (the last row of an id wins)."""
    statuses = {}
    for match in _table_rows(
        stdout, _SACCT_LINE, "sacct", "'JOBID|STATE|N:S' (sacct -n -P -X -o JobIDRaw,State,ExitCode)"
    ):
        state = slurm_state(match[2])
        code = exit_code(int(match[3]), int(match[4])) if state.is_terminal else None
        statuses[match[1]] = JobStatus(state, code)
    return statuses


def parse_scontrol(stdout: str, job_id: str | None = None) -> JobStatus:
    """The status in ``scontrol [-o] show job ID`` output (``JobState=`` and ``ExitCode=N:S``)."""
    state_match, code_match, id_match = _JOB_STATE.search(stdout), _EXIT_CODE.search(stdout), _JOB_ID.search(stdout)
    if state_match is None or code_match is None or id_match is None:
        raise SlurmError(
            f"cannot read 'scontrol show job' output; expected JobId=, JobState= and ExitCode=N:S, got {stdout!r}"
        )
    if job_id is not None and id_match[1] != job_id:
        raise SlurmError(f"scontrol answered for job {id_match[1]} when asked about job {job_id}: {stdout!r}")
    state = slurm_state(state_match[1])
    code = exit_code(int(code_match[1]), int(code_match[2])) if state.is_terminal else None
    return JobStatus(state, code)


def submit_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Slurm commands: the MPI launcher's and the enclosing job's Slurm variables removed.

    A client submitted from inside the server's job must not inherit that job's geometry
    (``SLURM_NTASKS``, ``SLURM_CPUS_PER_TASK``...), which its own ``srun`` would otherwise obey.
    """
    base = job_environment() if environ is None else dict(environ)
    return {k: v for k, v in base.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SLURMD_", "SRUN_"))}


# -- the sbatch backend ------------------------------------------------------------------------------
class SlurmScheduler:
    """One ``sbatch`` job per simulation; ``squeue`` for queued jobs, ``sacct`` or ``scontrol`` for ended ones."""

    def __init__(
        self,
        options: Sequence[str] = (),
        *,
        runner: Runner = subprocess.run,
        retries: int = 3,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        command_timeout: float = 60.0,
        min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL,
    ):
        self.options = validate_options(options)
        self.min_poll_interval = min_poll_interval  # seconds; asking slurmctld more often only loads it
        self._commands = Commands(
            SlurmError,
            runner=runner,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
            timeout=command_timeout,
            environment=submit_environment,
            not_found="run on a Slurm login or compute node, or choose another launcher.scheduler",
            unreachable="is slurmctld reachable ('scontrol ping')?",
        )
        self.accounting: bool | None = None  # None until sacct answered once; False: ask scontrol instead
        self.cluster: str | None = None  # set when sbatch reports one (multi-cluster operation)

    def submit(self, job: JobSpec) -> str:
        """Writes the job script next to the log, readable by its owner only, and submits it."""
        job = _absolute(job)
        script = job_script(job, self.options)
        script_path = job.log_path.with_name(job.log_path.stem + ".sbatch")
        if script_path == job.log_path:
            script_path = job.log_path.with_name(job.log_path.name + ".sh")
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        write_job_script(script_path, script, executable=False)  # its environment holds the run's token
        return self.submit_script(script_path, f"job {job.name!r}")

    def submit_script(self, script_path: str | os.PathLike, what: str) -> str:
        """Submits a written sbatch script with ``sbatch --parsable``; returns the job id.

        Failures another try may fix are retried; a refusal of the request itself is not, and
        neither is an sbatch that did not answer in time (it may have submitted the job).
        """
        argv = ["sbatch", "--parsable", os.fspath(script_path)]
        result = self._commands.run(
            argv,
            f"submitting {what}",
            _succeeded_or_refused,
            unsafe_to_repeat=f"the job may have been submitted: check squeue for {what} before resubmitting",
        )
        if result.returncode != 0:
            raise SlurmError(
                f"sbatch refused {what}: {describe(result)}\n"
                f"the request itself is invalid (see Slurm's message); fix the slurm options"
            )
        try:
            job_id, cluster = parse_sbatch(result.stdout)
        except SlurmError as exc:
            raise SlurmError(
                f"sbatch accepted {what} but printed no job id: {describe(result)}\n"
                f"look for the job with squeue --name and cancel it by hand"
            ) from exc
        if cluster is not None:
            if self.cluster not in (None, cluster):
                raise SlurmError(
                    f"job {job_id} went to cluster {cluster!r} but earlier jobs went to "
                    f"{self.cluster!r}; one scheduler polls one cluster: set --clusters once"
                )
            self.cluster = cluster
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of many jobs: one ``squeue`` call, then accounting for the jobs no longer queued."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        queued = self._squeue(ids)
        statuses: dict[str, JobStatus] = {}
        ended: list[str] = []
        for job_id in ids:
            if job_id not in queued:
                ended.append(job_id)
                continue
            state = slurm_state(queued[job_id][0])
            if not state.is_terminal:
                statuses[job_id] = JobStatus(state, None)
            elif state == JobState.COMPLETED:
                statuses[job_id] = JobStatus(state, 0)  # COMPLETED means exit code 0
            else:
                ended.append(job_id)  # its exit code comes from accounting or scontrol
        if ended:
            fallback = {job_id: slurm_state(queued[job_id][0]) for job_id in ended if job_id in queued}
            statuses.update(self._ended(ended, fallback))
        return {job_id: statuses[job_id] for job_id in ids}

    def cancel(self, job_ids: Sequence[str]) -> None:
        """``scancel`` on every id at once; jobs that already ended are ignored."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return
        argv = ["scancel", *self._cluster_args(), *ids]
        result = self._commands.run(
            argv, f"cancelling {len(ids)} job(s)", lambda r: r.returncode == 0 or _only_harmless_scancel_errors(r)
        )
        if result.returncode != 0:
            log.debug("scancel: some jobs had already ended: %s", result.stderr.strip())

    # -- the queries -------------------------------------------------------------------------------
    def _squeue(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        argv = ["squeue", *self._cluster_args(), "-h", "-o", "%i|%T|%r", "--states=all", f"--jobs={','.join(ids)}"]
        result = self._commands.run(argv, "listing queued jobs", _succeeded_or_invalid_id)
        if result.returncode != 0:
            return {}  # squeue refuses a list whose only id the controller forgot; ask about each below
        return parse_squeue(result.stdout)

    def _ended(self, ids: list[str], fallback: Mapping[str, JobState]) -> dict[str, JobStatus]:
        statuses: dict[str, JobStatus] = {}
        if self.accounting is not False:
            statuses = self._sacct(ids)
        for job_id in ids:
            if job_id not in statuses:
                statuses[job_id] = self._scontrol(job_id, fallback.get(job_id))
        return statuses

    def _sacct(self, ids: list[str]) -> dict[str, JobStatus]:
        argv = [
            "sacct",
            *self._cluster_args(),
            "-n",
            "-P",
            "-X",
            "-o",
            "JobIDRaw,State,ExitCode",
            f"--jobs={','.join(ids)}",
        ]
        try:  # any answer is final: on a failure scontrol, which knows recent jobs, answers instead
            result = self._commands.run(argv, "asking accounting about ended jobs", lambda r: True)
        except SlurmError as exc:
            log.warning("sacct did not answer; asking scontrol this time: %s", exc)
            return {}
        if _NO_ACCOUNTING in result.stderr + result.stdout:
            log.info("Slurm accounting is disabled; ended jobs are looked up with scontrol from now on")
            self.accounting = False
            return {}
        if result.returncode != 0:  # e.g. slurmdbd down
            log.warning("sacct failed: %s; asking scontrol this time", describe(result))
            return {}
        self.accounting = True
        found = parse_sacct(result.stdout)
        return {job_id: status for job_id, status in found.items() if job_id in ids}

    def _scontrol(self, job_id: str, fallback: JobState | None) -> JobStatus:
        argv = ["scontrol", *self._cluster_args(), "-o", "show", "job", job_id]
        result = self._commands.run(argv, f"asking about job {job_id}", _succeeded_or_invalid_id)
        if result.returncode != 0:  # purged from the controller's memory (MinJobAge)
            return JobStatus(fallback or JobState.UNKNOWN, None)
        return parse_scontrol(result.stdout, job_id)

    def _cluster_args(self) -> list[str]:
        return [f"--clusters={self.cluster}"] if self.cluster else []


def _absolute(job: JobSpec) -> JobSpec:
    """``job`` with absolute log and working-directory paths, as a batch job elsewhere needs them."""
    cwd = Path(os.path.abspath(job.cwd))
    log_path = Path(os.path.abspath(job.log_path))
    return JobSpec(job.name, tuple(job.argv), dict(job.env), log_path, cwd)


def _only_harmless_scancel_errors(result: subprocess.CompletedProcess) -> bool:
    errors = [line for line in (result.stderr + result.stdout).splitlines() if "error" in line.lower()]
    return bool(errors) and all(_SCANCEL_HARMLESS.search(line) for line in errors)


def _succeeded_or_refused(result: subprocess.CompletedProcess) -> bool:
    """A final answer of sbatch: success, or a refusal of the request itself, which another try cannot fix."""
    return result.returncode == 0 or bool(_PERMANENT_SBATCH.search(result.stderr + result.stdout))


def _succeeded_or_invalid_id(result: subprocess.CompletedProcess) -> bool:
    """A final answer of squeue or scontrol: success, or a job id the controller no longer knows."""
    return result.returncode == 0 or _INVALID_JOB_ID in result.stderr + result.stdout


# -- the srun-steps backend --------------------------------------------------------------------------
class SlurmStepScheduler:
    """Runs each client as an ``srun`` step of the server's own allocation: no queueing per simulation.

    Each step's ``srun`` is a local subprocess in its own process group; the step's output reaches
    the job's log through srun (with srun's own messages), so no shared file system is needed for logs.
    """

    min_poll_interval = 0.0  # seconds; polling looks at local srun processes only

    def __init__(self, options: Sequence[str] = (), *, srun: str = "srun", kill_grace: float = 10.0):
        self.options = validate_options(options, _STEP_RESERVED, "srun")
        allocation = os.environ.get("SLURM_JOB_ID", "")
        if not allocation:
            raise SlurmError(f"SLURM_JOB_ID is not set: {NOT_IN_ALLOCATION}")
        if not allocation.isdigit():
            raise SlurmError(f"SLURM_JOB_ID={allocation!r} is not a job id; {NOT_IN_ALLOCATION}")
        self.allocation = allocation
        self._srun = srun
        self._steps = ProcessGroups("step", kill_grace)  # srun forwards SIGTERM to its step

    def submit(self, job: JobSpec) -> str:
        job = _absolute(job)
        argv = step_command(job, self.options, self.allocation, self._srun)
        try:
            return self._steps.start(argv, job.cwd, {**submit_environment(), **job.env}, job.log_path)
        except OSError as exc:
            raise SlurmError(
                f"cannot start the srun step of job {job.name!r}: {exc} (command: {shlex.join(argv)})"
            ) from exc

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """srun's exit status is the step's: running while srun runs, then completed (0) or failed."""
        return self._steps.poll(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        """SIGTERM to each srun (srun then kills its step), SIGKILL to those still alive after the grace."""
        self._steps.cancel(job_ids)
