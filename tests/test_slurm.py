"""The Slurm backends without a cluster: golden job scripts, and real recorded Slurm answers replayed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_until

from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus
from jaxsurro.launcher.slurm import (
    SLURM_STATES,
    SlurmError,
    SlurmScheduler,
    SlurmStepScheduler,
    job_script,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_squeue,
    server_script,
    slurm_state,
    step_command,
    submit_environment,
    validate_options,
)

HERE = Path(__file__).parent
RECORDED = HERE / "recorded" / "slurm"
GOLDEN = HERE / "golden" / "slurm"


def recorded(name: str) -> tuple[str, int]:
    """A recorded answer and its exit status (a last line ``rc=N``; none means 0)."""
    text = (RECORDED / name).read_text()
    lines = text.rstrip("\n").split("\n")
    if lines and lines[-1].startswith("rc="):
        return "\n".join(lines[:-1]) + "\n", int(lines[-1][3:])
    return text, 0


class Replay:
    """A ``runner`` answering each command, in order, from a script of (program, rc, stdout, stderr)."""

    def __init__(self, *answers: tuple[str, int, str, str] | tuple[str, BaseException]):
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, argv, **kwargs):
        assert kwargs["capture_output"] and kwargs["text"] and kwargs["timeout"] > 0, kwargs
        assert not kwargs.get("shell"), "Slurm commands must run as argument lists, without a shell"
        assert self.answers, f"unexpected command {argv}"
        answer = self.answers.pop(0)
        assert argv[0] == answer[0], f"expected a {answer[0]} call, got {argv}"
        self.calls.append(list(argv))
        self.envs.append(kwargs["env"])
        if isinstance(answer[1], BaseException):
            raise answer[1]
        return subprocess.CompletedProcess(argv, answer[1], answer[2], answer[3])

    def done(self) -> bool:
        return not self.answers


def answer(program: str, name: str, stream: str = "stdout") -> tuple[str, int, str, str]:
    """The recorded file ``name`` as the answer of ``program`` on ``stream``."""
    text, rc = recorded(name)
    return (program, rc, text, "") if stream == "stdout" else (program, rc, "", text)


def scheduler(runner: Replay, sleeps: list[float] | None = None, **kwargs) -> SlurmScheduler:
    return SlurmScheduler(runner=runner, sleep=(sleeps if sleeps is not None else []).append, **kwargs)


def plain_job(tmp_path: Path) -> JobSpec:
    return JobSpec(
        "heat-sim-3",
        ("/opt/venv/bin/python", "-m", "solvers.heat", "--steps", "100"),
        {"JAXSURRO_SIM_ID": "3", "JAXSURRO_SERVER": "tcp://10.0.0.1:5555"},
        Path("/scratch/run/logs/sim-00003.log"),
        Path("/scratch/run"),
    )


def quoting_job() -> JobSpec:
    return JobSpec(
        'it\'s "$HOME" job',
        ("python", "-c", "print('a b', \"$x\")", "back\\slash", "*"),
        {"MESSAGE": 'it\'s $HOME & "more"; `date`', "EMPTY": "", "PATH_WITH_SPACE": "/a b/c"},
        Path("/scratch/my run/100% done/sim-1.log"),
        Path("/scratch/my run"),
    )


# -- pure builders ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, job, options",
    [
        ("plain", plain_job(Path("/")), ["--time=00:10:00", "--partition=debug", "-c2"]),
        ("quoting", quoting_job(), ["--comment=a 'quoted' $VALUE", "--constraint=x\\y"]),
    ],
)
def test_job_script_matches_golden(name, job, options):
    assert job_script(job, options) == (GOLDEN / f"{name}.sh").read_text()


def test_server_script_matches_golden():
    script = server_script(
        "experiments/heat.toml",
        ["study.name=my study", "training.lr=1e-3", "x.y=$HOME"],
        ["--time=02:00:00", "--cpus-per-task=4", "--gres=gpu:1"],
        2,
        "/opt/my venv/bin/python",
        "/home/user/project",
        "/scratch/runs/heat 1",
        checkpoint_glob="checkpoints/step-*",
        warning_seconds=300,
    )
    assert script == (GOLDEN / "server.sh").read_text()


# The server script's resume and requeue, run by bash with stand-ins for srun, scancel and scontrol that record
# their arguments. The stand-in srun waits until scancel signals its step (a FIFO), then, as the server does on
# SIGTERM, writes a checkpoint ($NEW_CHECKPOINT, when set) and exits with 143.
FAKE_SERVER_COMMANDS = {
    "srun": 'echo "srun $*" >> "$CALLS"\nread -r _ < "$STEP"\n[ -z "$NEW_CHECKPOINT" ] || mkdir -p "$NEW_CHECKPOINT"\n'
    "exit 143",
    "scancel": 'echo "scancel $*" >> "$CALLS"\necho stop > "$STEP"',
    "scontrol": 'echo "scontrol $*" >> "$CALLS"',
}


def run_warned_server(tmp_path: Path, new_checkpoint: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The server script of ``tmp_path/run`` under bash, sent SIGUSR1 once its srun runs; its result and the calls."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    for name, body in FAKE_SERVER_COMMANDS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    os.mkfifo(tmp_path / "step")
    script = tmp_path / "server.sbatch"
    script.write_text(
        server_script(run_dir / "config.toml", [], [], 1, "python", tmp_path, run_dir, checkpoint_glob="ckpt/step-*")
    )
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "CALLS": str(calls),
        "STEP": str(tmp_path / "step"),
        "NEW_CHECKPOINT": str(run_dir / "ckpt" / "step-000000009") if new_checkpoint else "",
    }
    process = subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: calls.exists() and "srun" in calls.read_text(), 10, "the server's srun to start")
        process.send_signal(signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), calls.read_text().splitlines()


def test_a_warned_server_stops_its_step_then_requeues_the_job_once_it_wrote_a_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    result, calls = run_warned_server(tmp_path, new_checkpoint=True)
    assert calls == [
        f"srun --mpi=pmix --overlap --ntasks=1 python -m jaxsurro.run {tmp_path}/run/config.toml --run-dir "
        f"{tmp_path}/run --no-progress",
        "scancel --signal=TERM 42.0",  # to the server's step: srun would SIGKILL the ranks on a SIGTERM of its own
        "scontrol requeue 42",
    ]
    assert result.returncode == 0 and "requeueing job 42" in result.stdout, result


def test_a_server_job_with_a_checkpoint_resumes_and_is_not_requeued_without_a_newer_one(tmp_path):
    (tmp_path / "run" / "ckpt" / "step-000000005").mkdir(parents=True)
    (tmp_path / "run" / "ckpt" / ".step-000000007.partial").mkdir()  # being written: not a checkpoint yet
    result, calls = run_warned_server(tmp_path, new_checkpoint=False)
    assert calls == [
        f"srun --mpi=pmix --overlap --ntasks=1 python -m jaxsurro.run {tmp_path}/run --resume --no-progress",
        "scancel --signal=TERM 42.0",
    ]
    assert f"resuming the run from {tmp_path}/run/ckpt/step-000000005" in result.stdout
    assert result.returncode == 143 and "without a new checkpoint after SIGUSR1; not requeued" in result.stderr


def test_quoted_sbatch_lines_read_back_as_one_word_each():
    """Each #SBATCH line splits, under sbatch's rules (quotes group, backslash escapes everywhere), to one word."""
    job = quoting_job()
    options = ["--comment=a 'quoted' $VALUE", "--constraint=x\\y"]
    directives = [
        line[len("#SBATCH ") :] for line in job_script(job, options).splitlines() if line.startswith("#SBATCH ")
    ]
    assert [sbatch_word(d) for d in directives] == [
        f"--job-name={job.name}",
        "--output=/scratch/my run/100%% done/sim-1.log",
        "--open-mode=append",
        "--chdir=/scratch/my run",
        *options,
    ]


def sbatch_word(text: str) -> str:
    """The one argument sbatch's script scanner (_get_argument in sbatch/opt.c) reads from ``text``."""
    word, quote, escaped, i = [], None, False, 0
    while i < len(text):
        c = text[i]
        i += 1
        if escaped:
            word.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif quote:
            if c == quote:
                quote = None
            else:
                word.append(c)
        elif c in "'\"":
            quote = c
        else:
            assert not c.isspace() and c != "#", f"{text!r} is not one word for sbatch"
            word.append(c)
    assert quote is None and not escaped, f"{text!r} leaves a quote or escape open"
    return "".join(word)


def test_step_command_is_one_exact_task_of_the_allocation():
    job = quoting_job()
    assert step_command(job, ["--mpi=pmix", "--cpus-per-task=2"], "1234") == [
        "srun",
        "--jobid=1234",
        "--exact",
        "--ntasks=1",
        f"--job-name={job.name}",
        "--mpi=pmix",
        "--cpus-per-task=2",
        "--",
        *job.argv,
    ]


@pytest.mark.parametrize(
    "option, message",
    [
        ("-p debug", "one command-line word"),
        ("--partition debug", "one command-line word"),
        ("partition=debug", "one command-line word"),
        ("--time=1:00\n#SBATCH --mem=1", "on one line"),
        ("--output=/tmp/x.log", "set by jaxsurro itself"),
        ("--out=/tmp/x.log", "set by jaxsurro itself"),
        ("-o/tmp/x.log", "set by jaxsurro itself"),
        ("--chdir=/tmp", "set by jaxsurro itself"),
        ("--array=0-3", "set by jaxsurro itself"),
    ],
)
def test_invalid_sbatch_options_are_refused_with_the_fix(option, message):
    with pytest.raises(ValueError, match=message):
        validate_options([option])
    with pytest.raises(ValueError, match=message):
        SlurmScheduler([option])


def test_options_must_be_a_sequence_and_server_owns_its_task_count_warning_and_requeue():
    def server(overrides=(), options=(), n_ranks=1, **kwargs):
        kwargs = {"checkpoint_glob": "checkpoints/step-*"} | kwargs
        return server_script("c.toml", overrides, options, n_ranks, "python", "/w", "/w/run", **kwargs)

    with pytest.raises(TypeError, match="sequence of strings"):
        validate_options("--time=1:00")
    with pytest.raises(ValueError, match="set by jaxsurro itself"):
        server(options=["--ntasks=4"], n_ranks=2)
    with pytest.raises(ValueError, match="positive integer"):
        server(n_ranks=0)
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        server(overrides=["training.lr"])
    with pytest.raises(ValueError, match=r"\(--signal\); remove it \(set launcher.warning_seconds instead\)"):
        server(options=["--signal=B:USR1@60"])
    for option in ("--requeue", "--no-requeue"):
        with pytest.raises(ValueError, match="requeues itself"):
            server(options=[option])
    with pytest.raises(ValueError, match="from 0 to 65535"):
        server(warning_seconds=70000)
    for glob in ("/abs/step-*", "../step-*", "step-$(id)", "a b/step-*"):
        with pytest.raises(ValueError, match="relative to the run directory"):
            server(checkpoint_glob=glob)
    assert "#SBATCH --signal" not in server(warning_seconds=0) and "#SBATCH --requeue" in server(warning_seconds=0)
    assert "#SBATCH --signal=B:USR1@90\n" in server(warning_seconds=90)
    assert validate_options(["--ntasks-per-node=2", "-c4", "--exclusive"]) == (
        "--ntasks-per-node=2",
        "-c4",
        "--exclusive",
    )


def test_job_script_refuses_what_sbatch_or_bash_would_misread(tmp_path):
    job = plain_job(tmp_path)
    with pytest.raises(ValueError, match="not a valid shell name"):
        job_script(JobSpec(job.name, job.argv, {"BAD-NAME": "1"}, job.log_path, job.cwd))
    with pytest.raises(ValueError, match="heterogeneous-job separator"):
        job_script(JobSpec("my-hetjob", job.argv, {}, job.log_path, job.cwd))
    with pytest.raises(ValueError, match="backslash"):
        job_script(JobSpec(job.name, job.argv, {}, Path("/tmp/a\\b/x.log"), job.cwd))
    with pytest.raises(ValueError, match="empty command line"):
        job_script(JobSpec(job.name, (), {}, job.log_path, job.cwd))


def test_submit_environment_drops_the_enclosing_jobs_and_mpi_launchers_variables():
    environ = {
        "PATH": "/bin",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "5",
        "SRUN_CPUS_PER_TASK": "4",
        "SBATCH_ACCOUNT": "proj",
        "HOME": "/home/u",
    }
    assert submit_environment(environ) == {
        "PATH": "/bin",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "SBATCH_ACCOUNT": "proj",
        "HOME": "/home/u",
    }


# -- parsers on every recorded answer --------------------------------------------------------------
def test_parse_sbatch_on_recorded_answers():
    assert parse_sbatch(recorded("sbatch_parsable.txt")[0]) == ("7", None)
    assert parse_sbatch("7;alpha\n") == ("7", "alpha")
    with pytest.raises(SlurmError, match="Submitted batch job 6"):  # the answer without --parsable
        parse_sbatch(recorded("sbatch.txt")[0])


def test_parse_squeue_on_recorded_answers():
    assert parse_squeue(recorded("squeue_running.txt")[0]) == {
        "11": ("PENDING", "JobHeldUser"),
        "9": ("RUNNING", "None"),
        "10": ("RUNNING", "None"),
    }
    assert parse_squeue(recorded("squeue_states_all.txt")[0]) == {
        "40": ("CANCELLED", "None"),
        "38": ("COMPLETED", "None"),
        "39": ("FAILED", "NonZeroExitCode"),
        "36": ("PENDING", "JobHeldUser"),
        "37": ("RUNNING", "None"),
        "41": ("TIMEOUT", "TimeLimit"),
    }
    with pytest.raises(SlurmError, match="JOBID PARTITION"):  # the default format is not ours: quoted, refused
        parse_squeue(recorded("squeue_default.txt")[0])
    # NODE_FAIL: no recording exists; the line is built in the recorded '%i|%T|%r' format.
    assert parse_squeue("12|NODE_FAIL|None\n") == {"12": ("NODE_FAIL", "None")}
    with pytest.raises(SlurmError, match="'13|MELTED|None'"):
        parse_squeue("13|MELTED|None\n")


@pytest.mark.parametrize(
    "name, status",
    [
        ("scontrol_failed.txt", JobStatus(JobState.FAILED, 3)),  # the multi-line form
        ("scontrol_cancelled.txt", JobStatus(JobState.CANCELLED, -15)),
        ("scontrol_oneline_failed.txt", JobStatus(JobState.FAILED, 3)),
        ("scontrol_oneline_running.txt", JobStatus(JobState.RUNNING, None)),
        ("scontrol_oneline_completed.txt", JobStatus(JobState.COMPLETED, 0)),
        ("scontrol_oneline_cancelled.txt", JobStatus(JobState.CANCELLED, -15)),
        ("scontrol_oneline_timeout.txt", JobStatus(JobState.TIMEOUT, -15)),
    ],
)
def test_parse_scontrol_on_recorded_answers(name, status):
    assert parse_scontrol(recorded(name)[0]) == status


def test_parse_scontrol_node_failure_and_mismatches():
    # NODE_FAIL: no recording exists; built from the recorded one-line form with only JobState changed.
    line = recorded("scontrol_oneline_failed.txt")[0].replace("JobState=FAILED", "JobState=NODE_FAIL")
    assert parse_scontrol(line, "8") == JobStatus(JobState.NODE_FAIL, 3)
    with pytest.raises(SlurmError, match="asked about job 9"):
        parse_scontrol(line, "9")
    with pytest.raises(SlurmError, match="Invalid job id specified"):
        parse_scontrol(recorded("squeue_unknown.txt")[0])


def test_parse_sacct_lines():
    # No recording with accounting exists (the recorded cluster has none): the lines are in the documented
    # format of `sacct -n -P -X -o JobIDRaw,State,ExitCode`.
    assert parse_sacct("8|FAILED|3:0\n9|CANCELLED by 0|0:15\n10|COMPLETED|0:0\n11|RUNNING|0:0\n") == {
        "8": JobStatus(JobState.FAILED, 3),
        "9": JobStatus(JobState.CANCELLED, -15),
        "10": JobStatus(JobState.COMPLETED, 0),
        "11": JobStatus(JobState.RUNNING, None),
    }
    with pytest.raises(SlurmError, match="Slurm accounting storage is disabled"):
        parse_sacct(recorded("sacct_noaccounting.txt")[0])


@pytest.mark.parametrize(
    "text, state",
    [
        ("PENDING", JobState.PENDING),
        ("CONFIGURING", JobState.PENDING),
        ("REQUEUED", JobState.PENDING),
        ("RESIZING", JobState.PENDING),
        ("RUNNING", JobState.RUNNING),
        ("COMPLETING", JobState.RUNNING),
        ("SUSPENDED", JobState.RUNNING),
        ("COMPLETED", JobState.COMPLETED),
        ("FAILED", JobState.FAILED),
        ("OUT_OF_MEMORY", JobState.FAILED),
        ("BOOT_FAIL", JobState.FAILED),
        ("DEADLINE", JobState.FAILED),
        ("PREEMPTED", JobState.FAILED),
        ("CANCELLED", JobState.CANCELLED),
        ("CANCELLED by 0", JobState.CANCELLED),
        ("TIMEOUT", JobState.TIMEOUT),
        ("NODE_FAIL", JobState.NODE_FAIL),
    ],
)
def test_slurm_states_map_onto_the_common_ones(text, state):
    assert slurm_state(text) == state


def test_unknown_state_is_refused_naming_the_known_ones():
    with pytest.raises(SlurmError, match="'MELTED'.*NODE_FAIL"):
        slurm_state("MELTED")
    assert set(SLURM_STATES) >= {"PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


# -- submit ----------------------------------------------------------------------------------------
def test_submit_writes_a_private_script_next_to_the_log_and_runs_sbatch_parsable(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")  # as inside the server's own job
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    job = JobSpec("sim-1", ("solver", "--x", "a b"), {"A": "1"}, tmp_path / "logs" / "sim-1.log", tmp_path)
    runner = Replay(answer("sbatch", "sbatch_parsable.txt"))
    slurm = scheduler(runner, options=["--time=00:05:00"])
    assert slurm.submit(job) == "7"
    script = tmp_path / "logs" / "sim-1.sbatch"
    assert runner.calls == [["sbatch", "--parsable", str(script)]]
    assert script.read_text() == job_script(job, ["--time=00:05:00"])
    assert stat.S_IMODE(script.stat().st_mode) == 0o600  # the environment holds the run's token
    assert "SLURM_NTASKS" not in runner.envs[0] and "OMPI_COMM_WORLD_RANK" not in runner.envs[0]
    assert runner.envs[0]["PATH"] == os.environ["PATH"]


def test_submit_quotes_sbatchs_refusal_without_retrying_it(tmp_path):
    runner = Replay(answer("sbatch", "sbatch_badpartition.txt", "stderr"))
    sleeps: list[float] = []
    with pytest.raises(SlurmError) as error:
        scheduler(runner, sleeps, options=["--partition=nope"]).submit(job_in(tmp_path))
    message = str(error.value)
    assert "invalid partition specified: nope" in message
    assert "Batch job submission failed: Invalid partition name specified" in message
    assert "exited with code 1" in message and "sbatch --parsable" in message
    assert sleeps == [] and runner.done()


def job_in(tmp_path: Path) -> JobSpec:
    return JobSpec("sim-2", ("true",), {}, tmp_path / "sim-2.log", tmp_path)


def test_submit_retries_transient_failures_with_doubling_pauses(tmp_path):
    busy = ("sbatch", 1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n")
    runner = Replay(busy, busy, answer("sbatch", "sbatch_parsable.txt"))
    sleeps: list[float] = []
    assert scheduler(runner, sleeps, backoff=0.5).submit(job_in(tmp_path)) == "7"
    assert sleeps == [0.5, 1.0] and runner.done()


def test_submit_reports_after_the_last_retry(tmp_path):
    busy = ("sbatch", 1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n")
    runner = Replay(busy, busy, busy, busy)
    sleeps: list[float] = []
    with pytest.raises(SlurmError, match=r"failed 4 times(.|\n)*Socket timed out(.|\n)*scontrol ping"):
        scheduler(runner, sleeps, retries=3, backoff=1.0).submit(job_in(tmp_path))
    assert sleeps == [1.0, 2.0, 4.0] and runner.done()


def test_submit_does_not_retry_a_hung_sbatch_that_may_have_submitted(tmp_path):
    runner = Replay(("sbatch", subprocess.TimeoutExpired(["sbatch"], 60.0)))
    sleeps: list[float] = []
    with pytest.raises(SlurmError, match="check squeue"):
        scheduler(runner, sleeps).submit(job_in(tmp_path))
    assert sleeps == [] and runner.done()


def test_submit_without_slurm_says_so(tmp_path):
    runner = Replay(("sbatch", FileNotFoundError(2, "No such file or directory", "sbatch")))
    with pytest.raises(SlurmError, match="'sbatch' is not on the PATH"):
        scheduler(runner).submit(job_in(tmp_path))


def test_submit_refuses_an_unreadable_id_without_resubmitting(tmp_path):
    runner = Replay(answer("sbatch", "sbatch.txt"))  # 'Submitted batch job 6' although --parsable was asked
    with pytest.raises(SlurmError, match="printed no job id(.|\n)*Submitted batch job 6"):
        scheduler(runner).submit(job_in(tmp_path))
    assert runner.done()


# -- poll ------------------------------------------------------------------------------------------
def test_poll_asks_squeue_once_for_many_jobs():
    runner = Replay(answer("squeue", "squeue_running.txt"))
    statuses = scheduler(runner).poll(["9", "10", "11"])
    assert statuses == {
        "9": JobStatus(JobState.RUNNING, None),
        "10": JobStatus(JobState.RUNNING, None),
        "11": JobStatus(JobState.PENDING, None),
    }
    assert runner.calls == [["squeue", "-h", "-o", "%i|%T|%r", "--states=all", "--jobs=9,10,11"]]


def test_poll_without_accounting_asks_scontrol_about_ended_jobs_once_each():
    runner = Replay(
        answer("squeue", "squeue_running.txt"),  # 8, 12 and 13 have left the queue
        # On the recorded cluster sacct printed this on stderr and exited 1 (the shared recording omits both).
        ("sacct", 1, "", recorded("sacct_noaccounting.txt")[0]),
        answer("scontrol", "scontrol_oneline_failed.txt"),
        answer("scontrol", "squeue_unknown.txt", "stderr"),  # purged after MinJobAge: same message, exit 1
        ("scontrol", 0, recorded("scontrol_oneline_timeout.txt")[0].replace("JobId=41", "JobId=13"), ""),
    )
    slurm = scheduler(runner)
    statuses = slurm.poll(["9", "8", "11", "12", "13"])
    assert statuses == {
        "9": JobStatus(JobState.RUNNING, None),
        "8": JobStatus(JobState.FAILED, 3),
        "11": JobStatus(JobState.PENDING, None),
        "12": JobStatus(JobState.UNKNOWN, None),
        "13": JobStatus(JobState.TIMEOUT, -15),
    }
    assert list(statuses) == ["9", "8", "11", "12", "13"]
    assert runner.calls[1] == ["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,State,ExitCode", "--jobs=8,12,13"]
    assert runner.calls[2:] == [["scontrol", "-o", "show", "job", job_id] for job_id in ("8", "12", "13")]
    assert slurm.accounting is False and runner.done()
    # Detected once: the next poll goes straight to scontrol.
    runner.answers = [answer("squeue", "squeue_running.txt"), answer("scontrol", "scontrol_oneline_failed.txt")]
    assert slurm.poll(["8"]) == {"8": JobStatus(JobState.FAILED, 3)}
    assert [call[0] for call in runner.calls[-2:]] == ["squeue", "scontrol"] and runner.done()


def test_no_accounting_answer_on_stdout_is_recognised_too():
    runner = Replay(
        ("squeue", 0, "", ""),
        answer("sacct", "sacct_noaccounting.txt"),
        answer("scontrol", "scontrol_oneline_failed.txt"),
    )
    slurm = scheduler(runner)
    assert slurm.poll(["8"]) == {"8": JobStatus(JobState.FAILED, 3)}
    assert slurm.accounting is False


def test_poll_reads_terminal_states_from_squeue_and_exit_codes_from_scontrol():
    cancelled = recorded("scontrol_oneline_cancelled.txt")[0]
    runner = Replay(
        answer("squeue", "squeue_states_all.txt"),
        ("sacct", 1, "", "Slurm accounting storage is disabled\n"),  # as sacct answered on the recorded cluster
        ("scontrol", 0, recorded("scontrol_oneline_failed.txt")[0].replace("JobId=8", "JobId=39"), ""),
        ("scontrol", 0, cancelled, ""),
        answer("scontrol", "scontrol_oneline_timeout.txt"),
    )
    statuses = scheduler(runner).poll(["36", "37", "38", "39", "40", "41"])
    assert statuses == {
        "36": JobStatus(JobState.PENDING, None),
        "37": JobStatus(JobState.RUNNING, None),
        "38": JobStatus(JobState.COMPLETED, 0),
        "39": JobStatus(JobState.FAILED, 3),
        "40": JobStatus(JobState.CANCELLED, -15),
        "41": JobStatus(JobState.TIMEOUT, -15),
    }
    assert runner.done()


def test_poll_with_accounting_asks_sacct_once_and_scontrol_only_for_what_it_lacks():
    runner = Replay(
        ("squeue", 0, "9|RUNNING|None\n", ""),
        # No recording with accounting exists: sacct lines in the documented -P format (see test_parse_sacct_lines).
        ("sacct", 0, "8|FAILED|3:0\n12|NODE_FAIL|0:0\n", ""),
        ("scontrol", 0, recorded("scontrol_oneline_cancelled.txt")[0].replace("JobId=40", "JobId=14"), ""),
    )
    slurm = scheduler(runner)
    assert slurm.poll(["8", "9", "12", "14"]) == {
        "8": JobStatus(JobState.FAILED, 3),
        "9": JobStatus(JobState.RUNNING, None),
        "12": JobStatus(JobState.NODE_FAIL, 0),
        "14": JobStatus(JobState.CANCELLED, -15),
    }
    assert slurm.accounting is True and runner.calls[-1] == ["scontrol", "-o", "show", "job", "14"]


def test_poll_of_one_forgotten_job_survives_squeues_refusal():
    runner = Replay(
        answer("squeue", "squeue_unknown.txt", "stderr"),
        ("sacct", 1, "", "Slurm accounting storage is disabled\n"),
        answer("scontrol", "squeue_unknown.txt", "stderr"),
    )
    sleeps: list[float] = []
    assert scheduler(runner, sleeps).poll(["99"]) == {"99": JobStatus(JobState.UNKNOWN, None)}
    assert sleeps == [] and runner.done()


def test_poll_retries_an_unreachable_controller_then_reports():
    down = ("squeue", 1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    runner = Replay(down, down, answer("squeue", "squeue_running.txt"))
    sleeps: list[float] = []
    assert scheduler(runner, sleeps, retries=2).poll(["9"]) == {"9": JobStatus(JobState.RUNNING, None)}
    assert sleeps == [1.0, 2.0]
    runner.answers = [down, down, down]
    with pytest.raises(SlurmError, match="failed 3 times(.|\n)*Unable to contact slurm controller"):
        scheduler(runner, sleeps, retries=2).poll(["9"])


def test_poll_of_nothing_asks_nothing():
    runner = Replay()
    assert scheduler(runner).poll([]) == {}


def test_min_poll_interval_for_the_launcher():
    assert SlurmScheduler().min_poll_interval == 2.0
    assert SlurmScheduler(min_poll_interval=0.5).min_poll_interval == 0.5


def test_a_reported_cluster_is_named_in_later_commands(tmp_path):
    runner = Replay(("sbatch", 0, "7;alpha\n", ""), ("squeue", 0, "7|RUNNING|None\n", ""), ("scancel", 0, "", ""))
    slurm = scheduler(runner)
    assert slurm.submit(job_in(tmp_path)) == "7"
    slurm.poll(["7"])
    slurm.cancel(["7"])
    assert runner.calls[1][:2] == ["squeue", "--clusters=alpha"]
    assert runner.calls[2] == ["scancel", "--clusters=alpha", "7"]


# -- cancel ----------------------------------------------------------------------------------------
def test_cancel_is_one_scancel_for_all_jobs_and_ignores_ended_ones():
    gone = (
        "scancel",
        1,
        "",
        "scancel: error: Kill job error on job id 8: Job/step already completing or completed\n"
        "scancel: error: Kill job error on job id 99: Invalid job id specified\n",
    )
    runner = Replay(gone)
    sleeps: list[float] = []
    scheduler(runner, sleeps).cancel(["8", "9", "99", "9"])
    assert runner.calls == [["scancel", "8", "9", "99"]] and sleeps == []
    scheduler(runner).cancel([])
    assert len(runner.calls) == 1


def test_cancel_reports_a_real_failure_after_retries():
    down = ("scancel", 1, "", "scancel: error: Kill job error on job id 8: Unable to contact slurm controller\n")
    runner = Replay(down, down)
    with pytest.raises(SlurmError, match="Unable to contact slurm controller"):
        scheduler(runner, retries=1).cancel(["8"])


# -- srun steps ------------------------------------------------------------------------------------
FAKE_SRUN = """#!/bin/sh
# Stands in for srun: records its options and the environment it got, then runs the command after '--'.
log=$(dirname "$0")/srun-calls.txt
echo "$* | SLURM_NTASKS=${SLURM_NTASKS:-unset} SLURM_JOB_ID=${SLURM_JOB_ID:-unset}" >> "$log"
while [ "$1" != "--" ]; do shift; done
shift
exec "$@"
"""


@pytest.fixture
def fake_srun(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the server step's own geometry, which a client must not inherit
    path = tmp_path / "srun"
    path.write_text(FAKE_SRUN)
    path.chmod(0o755)
    return path


def step_job(tmp_path: Path, name: str, code: str, env=None) -> JobSpec:
    return JobSpec(name, (sys.executable, "-c", code), env or {}, tmp_path / "logs" / f"{name}.log", tmp_path)


def test_steps_need_an_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(
        SlurmError, match="runs inside an allocation: submit the server with python -m jaxsurro.submit or salloc"
    ):
        SlurmStepScheduler()


def test_steps_run_complete_fail_and_cancel(tmp_path, fake_srun):
    steps = SlurmStepScheduler(["--mpi=pmix"], srun=str(fake_srun), kill_grace=5.0)
    assert steps.min_poll_interval == 0.0
    ok = steps.submit(step_job(tmp_path, "ok", "import os; print('V =', os.environ['V'])", {"V": "a b"}))
    bad = steps.submit(step_job(tmp_path, "bad", "raise SystemExit(3)"))
    slow = steps.submit(step_job(tmp_path, "slow", "import time; time.sleep(60)"))
    assert ok.startswith("step-")
    wait_until(lambda: all(s.state.is_terminal for s in steps.poll([ok, bad]).values()), 20, "two steps to end")
    assert steps.poll([ok, bad, slow, "step-9-1"]) == {
        ok: JobStatus(JobState.COMPLETED, 0),
        bad: JobStatus(JobState.FAILED, 3),
        slow: JobStatus(JobState.RUNNING, None),
        "step-9-1": JobStatus(JobState.UNKNOWN, None),
    }
    steps.cancel([slow, ok])
    assert steps.poll([slow]) == {slow: JobStatus(JobState.CANCELLED, -15)}
    assert (tmp_path / "logs" / "ok.log").read_text() == "V = a b\n"
    calls = (tmp_path / "srun-calls.txt").read_text().splitlines()  # in the order the three sruns started
    assert len(calls) == 3
    ok_call = next(call for call in calls if "--job-name=ok " in call)
    assert ok_call.startswith("--jobid=4242 --exact --ntasks=1 --job-name=ok --mpi=pmix -- ")
    assert ok_call.endswith("| SLURM_NTASKS=unset SLURM_JOB_ID=unset")  # the allocation is named, not inherited


def test_step_cancel_kills_an_srun_that_ignores_sigterm(tmp_path, fake_srun):
    steps = SlurmStepScheduler(srun=str(fake_srun), kill_grace=0.2)
    ready = tmp_path / "ready"
    code = (
        f"import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    stubborn = steps.submit(step_job(tmp_path, "stubborn", code))
    wait_until(ready.exists, 20, "the step to ignore SIGTERM")
    steps.cancel([stubborn])
    assert steps.poll([stubborn]) == {stubborn: JobStatus(JobState.CANCELLED, -9)}


def test_step_that_cannot_start_says_which_command(tmp_path, fake_srun):
    steps = SlurmStepScheduler(srun=str(tmp_path / "no-such-srun"))
    with pytest.raises(SlurmError, match="cannot start the srun step of job 'x'"):
        steps.submit(step_job(tmp_path, "x", "pass"))
