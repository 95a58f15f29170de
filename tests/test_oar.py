"""The OAR backend against real outputs recorded on OAR 2.5.9, golden job scripts, and bash itself.

Recorded outputs live in tests/recorded/oar/ (copied from a single-node OAR 2.5.9 cluster;
the .txt files end with the command's `rc=N` when it was recorded). Outputs that were not
recorded are built from a recorded one or quoted from OAR's source, and say so where used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsurro.launcher.oar import (
    OarError,
    OarScheduler,
    check_options,
    exit_status,
    job_script,
    parse_job_id,
    parse_oarstat,
    script_path,
)
from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus

HERE = Path(__file__).parent
RECORDED = HERE / "recorded" / "oar"
GOLDEN = HERE / "golden" / "oar"

# A refused submission was not recorded. This is what OAR 2.5 prints when an admission rule refuses
# a job (OAR::IO::add_micheline_job warns "Admission Rule ERROR : $@" and returns -2, which oarsub
# passes to exit(), so 254), here the stock rule against submitting as root that CLUSTERS.md met.
ADMISSION_REFUSED = (
    "",
    "Admission Rule ERROR : [ADMISSION RULE] root and oar users are not allowed to submit jobs.\n \n",
    254,
)
# OAR's user documentation (usecases, "Mixing every together") shows a failed submission printing a negative id.
NOT_ENOUGH_RESOURCES = (
    "[ADMISSION RULE] Set default walltime to 3600.\n"
    "[ADMISSION RULE] Modify resource description with type constraints\n"
    "There are not enough resources for your request\nOAR_JOB_ID=-5\n"
    "Oarsub failed: please verify your request syntax or ask for support to your admin.\n",
    "",
    0,
)


def recorded(name: str) -> tuple[str, str, int]:
    """A recorded command's (stdout, stderr, exit code); OAR's `warn` lines ("Cannot frag ...") go to stderr."""
    lines = (RECORDED / name).read_text().splitlines(keepends=True)
    rc = 0
    if lines and lines[-1].startswith("rc="):
        rc = int(lines.pop()[3:])
    stderr = "".join(line for line in lines if line.startswith("Cannot frag"))
    stdout = "".join(line for line in lines if not line.startswith("Cannot frag"))
    return stdout, stderr, rc


def recorded_json(*names: str) -> str:
    """The recorded oarstat -J answers merged into one, as one oarstat call for several ids prints them."""
    merged = {}
    for name in names:
        merged.update(json.loads((RECORDED / name).read_text()))
    return json.dumps(merged, indent=3)


def stat(*names: str) -> tuple[str, str, int]:
    return recorded_json(*names), "", 0


class FakeOar:
    """A runner with subprocess.run's signature that answers each OAR command from a queue; records calls."""

    def __init__(self, **answers: list):
        self.answers = {command: list(queue) for command, queue in answers.items()}
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, argv, **kwargs) -> subprocess.CompletedProcess:
        self.calls.append((list(argv), kwargs))
        queue = self.answers.get(argv[0])
        assert queue, f"unexpected call {argv}"
        answer = queue.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        stdout, stderr, rc = answer
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    def argvs(self, command: str | None = None) -> list[list[str]]:
        return [argv for argv, _ in self.calls if command is None or argv[0] == command]


class FakeTime:
    """An injected clock and sleep: sleeping advances the clock and is recorded, nothing waits."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scheduler(runner: FakeOar, fake_time: FakeTime | None = None, **kwargs) -> OarScheduler:
    fake_time = fake_time or FakeTime()
    return OarScheduler(runner=runner, sleep=fake_time.sleep, clock=fake_time.clock, **kwargs)


def simple_job(tmp_path: Path) -> JobSpec:
    return JobSpec(
        "heat-train-3",
        (sys.executable, "-c", "pass"),
        {"JAXSURRO_SIM_ID": "3"},
        tmp_path / "logs" / "train-00003.log",
        tmp_path,
    )


# -- the job script ----------------------------------------------------------------------------

GOLDEN_JOBS = {
    "plain": (
        JobSpec(
            "heat-train-3",
            ("/usr/bin/python3", "-m", "solvers.heat", "--steps", "100"),
            {"JAXSURRO_SIM_ID": "3", "JAXSURRO_ATTEMPT": "1"},
            Path("/home/user/runs/logs/train-00003.log"),
            Path("/home/user/runs"),
        ),
        ["-l nodes=1/core=1,walltime=00:10:00", "--project surrogates"],
    ),
    "quoting": (
        JobSpec(
            "heat study #3 (it's $HOME)",
            ("/usr/bin/python3", "-c", "import os; print(os.environ['GREETING'], \"done\")", "an arg", "$HOME"),
            {"GREETING": "hello world", "QUOTE": 'it\'s "quoted"', "DOLLAR": "$HOME and `id` and $(id)", "EMPTY": ""},
            Path("/home/user/runs/logs/train-00003.log"),
            Path("/home/user/my work/it's $x"),
        ),
        ["-l nodes=1/core=1,walltime=00:10:00", "-p gpu='YES'", "--project=surrogates"],
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_JOBS))
def test_job_script_matches_golden_file(case):
    job, options = GOLDEN_JOBS[case]
    expected = (GOLDEN / f"{case}.sh").read_text()
    assert job_script(job, options) == expected, f"job_script differs from {GOLDEN / case}.sh"
    assert job_script(job, options) == expected  # pure: the same script again, and nothing was written
    assert not job.log_path.parent.exists()


def test_quoted_values_come_back_unchanged_through_bash():
    """Every body value of the quoting case, read back by bash's own word splitting, is the original."""
    job, options = GOLDEN_JOBS["quoting"]
    body = job_script(job, options).splitlines()
    cd_line = next(line for line in body if line.startswith("cd "))
    exec_line = body[-1]
    shown = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {cd_line[3:]} {exec_line[5:]}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert shown.splitlines()[0] == str(job.cwd)
    # printf splits on its newline-terminated arguments; argv[2] holds no newline, so lines map one to one.
    assert shown.splitlines()[1:] == list(job.argv)


def test_options_are_validated_and_normalized():
    assert check_options(
        ["-l nodes=1/core=1,walltime=00:10:00", "--project=p1", "  -q  besteffort ", "--hold", "--checkpoint 60"]
    ) == ("-l nodes=1/core=1,walltime=00:10:00", "--project p1", "-q besteffort", "--hold", "--checkpoint 60")
    with pytest.raises(TypeError, match="sequence of strings"):
        check_options("-l nodes=1")
    with pytest.raises(TypeError, match="must be a string"):
        check_options(["-l nodes=1", 3])
    with pytest.raises(ValueError, match="one '#OAR' directive per line"):
        check_options(["-l nodes=1\n#OAR -q admin"])
    with pytest.raises(ValueError, match=r"--walltime is not a directive.*-l \(a value\)"):
        check_options(["--walltime 00:10:00"])
    with pytest.raises(ValueError, match="sets -O, which the oar backend sets from the job's log path"):
        check_options(["-O /tmp/out"])
    with pytest.raises(ValueError, match="sets --name"):
        check_options(["--name other"])
    with pytest.raises(ValueError, match="--checkpoint takes a number"):
        check_options(["--checkpoint soon"])
    with pytest.raises(ValueError, match="-l takes a value"):
        check_options(["-l"])
    with pytest.raises(ValueError, match="--hold takes no value"):
        check_options(["--hold 5"])
    with pytest.raises(ValueError):
        OarScheduler(["-x"])


def test_paths_oar_cannot_take_literally_are_refused():
    job, _ = GOLDEN_JOBS["plain"]
    spaced = JobSpec(job.name, job.argv, job.env, Path("/home/user/my runs/logs/a.log"), job.cwd)
    with pytest.raises(ValueError, match=r"log path '/home/user/my runs/logs/a.log' holds \[' '\]"):
        job_script(spaced)
    at = JobSpec(job.name, job.argv, job.env, Path("/home/a@b/a.log"), job.cwd)
    with pytest.raises(ValueError, match=r"holds \['@'\].*Perl"):
        job_script(at)
    relative = JobSpec(job.name, job.argv, job.env, Path("logs/a.log"), job.cwd)
    with pytest.raises(ValueError, match="must be an absolute path"):
        job_script(relative)
    bad_env = JobSpec(job.name, job.argv, {"A-B": "1"}, job.log_path, job.cwd)
    with pytest.raises(ValueError, match="'A-B' of job 'heat-train-3' is not a valid shell name"):
        job_script(bad_env)
    with pytest.raises(ValueError, match="empty argv"):
        job_script(JobSpec(job.name, (), job.env, job.log_path, job.cwd))


def test_submitted_script_runs_as_plain_bash_outside_oar(tmp_path):
    work = tmp_path / "work dir $HOME 'q'"
    work.mkdir()
    code = (
        "import json, os, sys; print(json.dumps({'cwd': os.getcwd(), 'A': os.environ['A'], "
        "'B': os.environ['B'], 'argv': sys.argv[1:]}), flush=True); print('to stderr', file=sys.stderr)"
    )
    job = JobSpec(
        "bash check",
        (sys.executable, "-c", code, "arg with space", "$HOME"),
        {"A": "x y", "B": 'it\'s $HOME `id` "q"'},
        tmp_path / "logs" / "job.log",
        work,
    )
    runner = FakeOar(oarsub=[recorded("oarsub.txt")])
    assert scheduler(runner).submit(job) == "3"
    script = script_path(job)
    assert script == tmp_path / "logs" / "job.oar.sh" and os.access(script, os.X_OK)

    result = subprocess.run(
        [str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert json.loads(lines[0]) == {
        "cwd": str(work),
        "A": "x y",
        "B": 'it\'s $HOME `id` "q"',
        "argv": ["arg with space", "$HOME"],
    }
    assert lines[1:] == ["to stderr"] and result.stderr == ""  # stderr joins stdout, as in the job's log


def test_script_stops_when_its_directory_is_missing(tmp_path):
    job = JobSpec("gone", (sys.executable, "-c", "print('ran')"), {}, tmp_path / "job.log", tmp_path / "missing")
    script = tmp_path / "job.oar.sh"
    script.write_text(job_script(job))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "ran" not in result.stdout and "missing" in result.stdout


# -- submission --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "job_id"), [("oarsub.txt", "3"), ("oarsub_long.txt", "4"), ("oarsub_fail.txt", "5")]
)  # _fail: the job that later exits 3
def test_submit_writes_the_script_and_parses_the_recorded_id(tmp_path, name, job_id):
    runner = FakeOar(oarsub=[recorded(name)])
    job = simple_job(tmp_path)
    oar = scheduler(runner, options=["-l nodes=1/core=1,walltime=00:10:00"])
    assert oar.submit(job) == job_id
    script = tmp_path / "logs" / "train-00003.oar.sh"
    [(argv, kwargs)] = runner.calls
    assert argv == ["oarsub", "-S", str(script)]
    assert kwargs["shell"] is False and kwargs["timeout"] > 0 and kwargs["cwd"] == script.parent
    assert script.read_text() == job_script(job, ["-l nodes=1/core=1,walltime=00:10:00"])
    assert os.access(script, os.X_OK)


def test_job_id_regex_takes_only_a_positive_id():
    assert parse_job_id(recorded("oarsub_long.txt")[0]) == "4"
    assert parse_job_id(NOT_ENOUGH_RESOURCES[0]) is None
    assert parse_job_id("[ADMISSION RULE] Set default walltime to 7200.\n") is None


def test_refused_submission_is_retried_with_backoff_then_reported_with_raw_output(tmp_path):
    fake_time = FakeTime()
    runner = FakeOar(oarsub=[ADMISSION_REFUSED] * 4)
    oar = scheduler(runner, fake_time, retries=3, backoff=1.0)
    with pytest.raises(OarError) as info:
        oar.submit(simple_job(tmp_path))
    assert len(runner.calls) == 4 and fake_time.sleeps == [1.0, 2.0, 4.0]
    message = str(info.value)
    assert "submitting job 'heat-train-3' failed 4 times" in message and "exited with code 254" in message
    assert f"oarsub -S {tmp_path}/logs/train-00003.oar.sh" in message
    assert "root and oar users are not allowed to submit jobs" in message


def test_negative_id_is_a_failure_and_quotes_the_output(tmp_path):
    runner = FakeOar(oarsub=[NOT_ENOUGH_RESOURCES])
    with pytest.raises(OarError, match=r"(?s)exited with code 0.*There are not enough resources.*OAR_JOB_ID=-5"):
        scheduler(runner, retries=0).submit(simple_job(tmp_path))


def test_submission_succeeds_after_a_refusal_and_a_timeout(tmp_path):
    fake_time = FakeTime()
    timeout = subprocess.TimeoutExpired(["oarsub"], 120, output=b"", stderr=b"")
    runner = FakeOar(oarsub=[ADMISSION_REFUSED, timeout, recorded("oarsub.txt")])
    assert scheduler(runner, fake_time, retries=3, backoff=0.5).submit(simple_job(tmp_path)) == "3"
    assert fake_time.sleeps == [0.5, 1.0]


def test_timeouts_are_reported_after_retries(tmp_path):
    timeout = subprocess.TimeoutExpired(["oarsub"], 120, output=None, stderr=b"still connecting")
    runner = FakeOar(oarsub=[timeout, timeout])
    with pytest.raises(OarError, match=r"(?s)did not answer within 120 s.*still connecting"):
        scheduler(runner, retries=1).submit(simple_job(tmp_path))


def test_missing_oarsub_is_reported_at_once(tmp_path):
    runner = FakeOar(oarsub=[FileNotFoundError(2, "No such file or directory", "oarsub")])
    with pytest.raises(OarError, match="run on an OAR frontend"):
        scheduler(runner, retries=3).submit(simple_job(tmp_path))
    assert len(runner.calls) == 1


# -- parsing oarstat ---------------------------------------------------------------------------


def test_recorded_states_map_to_common_states():
    def one(name: str, job_id: str, cancelled=()) -> JobStatus:
        return parse_oarstat((RECORDED / name).read_text(), [job_id], cancelled)[job_id]

    assert one("oarstat_running.json", "3") == JobStatus(JobState.RUNNING, None)
    assert one("oarstat_full_terminated.json", "3") == JobStatus(JobState.COMPLETED, 0)
    assert one("oarstat_full_exit3.json", "5") == JobStatus(JobState.FAILED, 3)  # exit_code 768: `exit 3`
    # After oardel: the full view carries the FRAG_JOB_REQUEST event, so it reads as cancelled by itself.
    assert one("oarstat_full_after_oardel.json", "4") == JobStatus(JobState.CANCELLED, None)
    # Without events an Error is a failure, unless it follows our own oardel.
    assert one("oarstat_after_oardel.json", "4") == JobStatus(JobState.FAILED, None)
    assert one("oarstat_after_oardel.json", "4", cancelled={"4"}) == JobStatus(JobState.CANCELLED, None)
    # The short view has no exit_code: terminated, exit code unknown.
    assert one("oarstat_terminated.json", "3") == JobStatus(JobState.COMPLETED, None)
    assert one("oarstat_running.json", "999") == JobStatus(JobState.UNKNOWN, None)
    assert parse_oarstat("", ["3", "4"]) == {
        "3": JobStatus(JobState.UNKNOWN, None),
        "4": JobStatus(JobState.UNKNOWN, None),
    }


def test_key_order_does_not_matter():
    entries = json.loads((RECORDED / "oarstat_full_exit3.json").read_text())
    reordered = {"5": dict(reversed(list(entries["5"].items())))}
    assert parse_oarstat(json.dumps(reordered), ["5"]) == parse_oarstat(json.dumps(entries), ["5"])
    assert parse_oarstat(json.dumps(reordered, separators=(",", ":")), ["5"])["5"] == JobStatus(JobState.FAILED, 3)


def test_exit_status_follows_wait_status_semantics():
    assert exit_status(None) is None
    assert exit_status(0) == 0
    assert exit_status(768) == 3
    assert exit_status(9) == -9  # killed by SIGKILL
    assert exit_status(11 | 0x80) == -11  # SIGSEGV with a core dump


def test_signals_and_walltime():
    entry = json.loads((RECORDED / "oarstat_full_exit3.json").read_text())
    entry["5"]["exit_code"] = 9  # built from the recording: the same job killed by SIGKILL
    killed = json.dumps(entry)
    assert parse_oarstat(killed, ["5"])["5"] == JobStatus(JobState.FAILED, -9)
    assert parse_oarstat(killed, ["5"], cancelled={"5"})["5"] == JobStatus(JobState.CANCELLED, -9)

    # Built from the recorded oardel: OAR's walltime check (sarko.pl) frags the job as user oar and adds WALLTIME.
    entry = json.loads((RECORDED / "oarstat_full_after_oardel.json").read_text())
    entry["4"]["events"][0]["description"] = "User oar requested to frag the job 4"
    entry["4"]["events"].append(
        {
            "event_id": 7,
            "job_id": 4,
            "type": "WALLTIME",
            "to_check": "NO",
            "date": 1795330073,
            "description": "[sarko] Job [4] from 1795322871 with 7200; current time=1795330072 (Elapsed)",
        }
    )
    assert parse_oarstat(json.dumps(entry), ["4"])["4"] == JobStatus(JobState.TIMEOUT, None)


def test_unreadable_answers_quote_what_oarstat_printed():
    text = (RECORDED / "oarstat_full_exit3.json").read_text()
    truncated = text[: len(text) // 2]
    with pytest.raises(OarError, match="not JSON") as info:
        parse_oarstat(truncated, ["5"])
    assert truncated in str(info.value)
    with pytest.raises(OarError, match=r"not an object of jobs keyed by id:\n\[3\]"):
        parse_oarstat("[3]", ["3"])
    odd = json.loads(text)
    odd["5"]["state"] = "Exploded"
    with pytest.raises(OarError, match=r"state 'Exploded' for job 5; expected one of \['Error', 'Finishing'"):
        parse_oarstat(json.dumps(odd), ["5"])


# -- polling -----------------------------------------------------------------------------------


def test_one_oarstat_call_for_many_jobs():
    runner = FakeOar(
        oarstat=[stat("oarstat_full_terminated.json", "oarstat_full_after_oardel.json", "oarstat_full_exit3.json")]
    )
    statuses = scheduler(runner).poll(["3", "4", "5", "999"])
    assert runner.argvs() == [["oarstat", "-f", "-J", "-j", "3", "-j", "4", "-j", "5", "-j", "999"]]
    assert runner.calls[0][1]["shell"] is False
    assert statuses == {
        "3": JobStatus(JobState.COMPLETED, 0),
        "4": JobStatus(JobState.CANCELLED, None),
        "5": JobStatus(JobState.FAILED, 3),
        "999": JobStatus(JobState.UNKNOWN, None),
    }


def test_polls_are_spaced_and_ended_jobs_are_not_asked_again():
    fake_time = FakeTime()
    runner = FakeOar(
        oarstat=[stat("oarstat_running.json"), stat("oarstat_full_terminated.json", "oarstat_full_exit3.json")]
    )
    oar = scheduler(runner, fake_time, poll_interval=5.0)
    assert oar.min_poll_interval == 5.0  # the launcher spaces its rounds by it
    assert oar.poll(["3"]) == {"3": JobStatus(JobState.RUNNING, None)}
    fake_time.now += 4.0
    assert oar.poll(["3"]) == {"3": JobStatus(JobState.RUNNING, None)}  # from the last answer
    assert len(runner.calls) == 1
    fake_time.now += 1.0
    assert oar.poll(["3", "5"]) == {"3": JobStatus(JobState.COMPLETED, 0), "5": JobStatus(JobState.FAILED, 3)}
    fake_time.now += 60.0
    assert oar.poll(["5", "3"]) == {"5": JobStatus(JobState.FAILED, 3), "3": JobStatus(JobState.COMPLETED, 0)}
    assert runner.argvs() == [["oarstat", "-f", "-J", "-j", "3"], ["oarstat", "-f", "-J", "-j", "3", "-j", "5"]]


def test_failing_oarstat_is_retried_then_reported():
    fake_time = FakeTime()
    down = ("", "DB connection error, exiting.\n", 255)  # oarstat's own message when its database is down
    runner = FakeOar(oarstat=[down, down, down])
    with pytest.raises(OarError, match=r"(?s)failed 3 times.*`oarstat -f -J -j 3` exited with code 255.*DB connection"):
        scheduler(runner, fake_time, retries=2, backoff=2.0).poll(["3"])
    assert fake_time.sleeps == [2.0, 4.0]


def test_job_ids_must_be_numbers():
    with pytest.raises(ValueError, match=r"positive integers.*\['local-1'\]"):
        scheduler(FakeOar()).poll(["3", "local-1"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        scheduler(FakeOar()).cancel("3")


# -- cancelling --------------------------------------------------------------------------------


def test_cancel_then_poll_reads_cancelled():
    runner = FakeOar(oardel=[recorded("oardel.txt")], oarstat=[stat("oarstat_after_oardel.json")])
    oar = scheduler(runner)
    oar.cancel(["4"])
    assert oar.poll(["4"]) == {"4": JobStatus(JobState.CANCELLED, None)}
    assert runner.argvs() == [["oardel", "4"], ["oarstat", "-f", "-J", "-j", "4"]]
    assert runner.calls[0][1]["shell"] is False
    # The same answer read by a scheduler that did not oardel the job (and without events): a failure.
    other = scheduler(FakeOar(oarstat=[stat("oarstat_after_oardel.json")]))
    assert other.poll(["4"]) == {"4": JobStatus(JobState.FAILED, None)}


def test_cancel_ignores_an_id_oar_no_longer_knows():
    # oardel 999 exits 1 ("not the right user"); oarstat -J -j 999 prints nothing: the job is gone.
    runner = FakeOar(oardel=[recorded("oardel_bad.txt")], oarstat=[("", "", 0)])
    scheduler(runner).cancel(["999"])
    assert runner.argvs() == [["oardel", "999"], ["oarstat", "-f", "-J", "-j", "999"]]


def test_cancel_of_several_jobs_reads_each_result():
    # Built from the two recordings, as one oardel call for both ids prints them (exit 1: one id refused).
    ok_out, _, _ = recorded("oardel.txt")
    bad_out, bad_err, bad_rc = recorded("oardel_bad.txt")
    registered, will_be_deleted = ok_out.splitlines(keepends=True)
    both = (registered + bad_out + will_be_deleted, bad_err, bad_rc)
    runner = FakeOar(oardel=[both], oarstat=[("", "", 0), stat("oarstat_after_oardel.json")])
    oar = scheduler(runner)
    oar.cancel(["4", "999"])
    assert runner.argvs() == [["oardel", "4", "999"], ["oarstat", "-f", "-J", "-j", "999"]]
    assert oar.poll(["4", "999"]) == {
        "4": JobStatus(JobState.CANCELLED, None),
        "999": JobStatus(JobState.UNKNOWN, None),
    }


def test_cancel_refused_for_a_live_job_raises_with_the_output():
    stdout, stderr, rc = recorded("oardel_bad.txt")  # the recorded refusal, for job 3 which is still running
    refusal = (stdout.replace("999", "3"), stderr.replace("999", "3"), rc)
    runner = FakeOar(oardel=[refusal], oarstat=[stat("oarstat_running.json")])
    with pytest.raises(
        OarError,
        match=r"(?s)did not cancel OAR job\(s\) 3, which are still running.*exited with "
        r"code 1.*Cannot frag 3 ; You are not the right user\.",
    ):
        scheduler(runner).cancel(["3"])


def test_cancel_accepts_a_job_already_being_killed():
    # OAR 2.5's oardel for a job already fragged: "...ERROR." then "Cannot frag N ; This job was already killed.", 6.
    already = ("Deleting the job = 4 ...ERROR.\n", "Cannot frag 4 ; This job was already killed.\n", 6)
    runner = FakeOar(oardel=[already], oarstat=[stat("oarstat_after_oardel.json")])
    oar = scheduler(runner)
    oar.cancel(["4"])
    assert oar.poll(["4"]) == {"4": JobStatus(JobState.CANCELLED, None)}
    assert runner.argvs("oardel") == [["oardel", "4"]]


def test_cancel_trusts_oardel_exiting_0_whatever_its_wording():
    # Not recorded: an oardel that words its answer differently but exits 0 has accepted every id.
    runner = FakeOar(oardel=[("Job 4 will be deleted.\n", "", 0)], oarstat=[stat("oarstat_after_oardel.json")])
    oar = scheduler(runner)
    oar.cancel(["4"])
    assert oar.poll(["4"]) == {"4": JobStatus(JobState.CANCELLED, None)}
    assert runner.argvs() == [["oardel", "4"], ["oarstat", "-f", "-J", "-j", "4"]]


def test_cancel_skips_jobs_known_to_have_ended():
    runner = FakeOar(oarstat=[stat("oarstat_full_terminated.json")])
    oar = scheduler(runner)
    oar.poll(["3"])
    oar.cancel(["3"])
    assert runner.argvs("oardel") == []


def test_oardel_that_cannot_reach_oar_is_retried_then_reported():
    fake_time = FakeTime()
    down = ("", "DB connection error, exiting.\n", 255)  # no per-job result line: oardel did not reach OAR
    runner = FakeOar(oardel=[down, down])
    with pytest.raises(OarError, match=r"(?s)cancelling 2 job\(s\) failed 2 times.*`oardel 3 4` exited with code 255"):
        scheduler(runner, fake_time, retries=1).cancel(["3", "4"])
    assert fake_time.sleeps == [1.0]
