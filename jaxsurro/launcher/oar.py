"""The ``oar`` backend: each job is an OAR batch script submitted with ``oarsub -S``.

The job script comes from the pure :func:`job_script`; every value in its bash body is
``shlex.quote``-d. OAR itself reads the ``#OAR`` directive lines literally (OAR 2.5
``OAR::Sub::scan_script`` matches ``^#OAR\\s+(-n|--name)\\s*(.+)`` and keeps the rest of
the line as is, with no shell parsing), so quoting a directive value would put the quotes
into the value. Directive values are validated instead: the log path must be made of
characters that need no quoting, the job name is reduced to such characters, and each
user option must be one OAR's script scanner accepts, on one line.

Commands run as argument lists with ``shell=False``: ``oarsub -S SCRIPT`` (the id is the
``OAR_JOB_ID=N`` line), one ``oarstat -f -J -j ID -j ID ...`` per poll for all jobs (only the
full view carries ``exit_code``, a raw wait status), and ``oardel ID ...``. Failed commands are
retried with exponential back-off; every error quotes the command's exit code and output.
See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxsurro.launcher.commands import CommandError, Commands, Runner, describe, export_lines, write_job_script
from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus

log = logging.getLogger("jaxsurro.launcher.oar")


class OarError(CommandError):
    """An OAR command failed or answered something this backend cannot read."""


# -- the job script -------------------------------------------------------------------------

# Characters a value may hold when OAR reads it literally: shlex's "needs no quoting" set minus
# "@" and "%". OAR pastes the -O/-E paths and the job name into a Perl double-quoted string
# (OAR::Tools::get_oarexecuser_perl_script_for_oarexec), where "@name" would be interpolated,
# and replaces "%jobid%" in the -O/-E paths; it also runs `oardodo cat SCRIPT` through a shell,
# splitting the script path on spaces.
_OAR_LITERAL = re.compile(r"[A-Za-z0-9_./+,:=-]+")
_OPTION = re.compile(r"(--?[A-Za-z][A-Za-z0-9-]*)(?:(?:=|\s+)(.*))?")

# The directives OAR 2.5's script scanner accepts (OAR::Sub::scan_script), by the value each takes.
_VALUE, _NUMBER, _FLAG = "a value", "a number", "no value"
_DIRECTIVES: dict[str, str] = {
    "-l": _VALUE,
    "--resource": _VALUE,
    "-q": _VALUE,
    "--queue": _VALUE,
    "-p": _VALUE,
    "--property": _VALUE,
    "--checkpoint": _NUMBER,
    "--notify": _VALUE,
    "-t": _VALUE,
    "--type": _VALUE,
    "--project": _VALUE,
    "--hold": _FLAG,
    "-a": _NUMBER,
    "--anterior": _NUMBER,
    "--signal": _NUMBER,
    "-k": _FLAG,
    "--use-job-key": _FLAG,
    "--import-job-key-inline-priv": _VALUE,
    "-i": _VALUE,
    "--import-job-key-from-file": _VALUE,
    "-e": _VALUE,
    "--export-job-key-to-file": _VALUE,
    "-s": _VALUE,
    "--stagein": _VALUE,
    "--stagein-md5sum": _VALUE,
}
# Directives the backend sets from the JobSpec itself, or that would turn one job into several.
_RESERVED: dict[str, str] = {
    "-n": "the job's name",
    "--name": "the job's name",
    "-O": "the job's log path",
    "--stdout": "the job's log path",
    "-E": "the job's log path",
    "--stderr": "the job's log path",
    "-d": "the job's cwd",
    "--directory": "the job's cwd",
    "--array": "one JobSpec per job",
    "--array-param-file": "one JobSpec per job",
}


def check_options(options: Sequence[str]) -> tuple[str, ...]:
    """The user's OAR options as canonical ``FLAG VALUE`` directives; raises on anything OAR would refuse."""
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise TypeError(
            f"OAR options must be a sequence of strings such as ['-l nodes=1/core=1,walltime=00:10:00'], "
            f"got {options!r}; wrap a single option in a list"
        )
    directives = []
    for option in options:
        if not isinstance(option, str):
            raise TypeError(
                f"each OAR option must be a string such as '-l nodes=1', got {option!r} ({type(option).__name__})"
            )
        if any(c in option for c in "\n\r\0"):
            raise ValueError(
                f"OAR option {option!r} spans several lines; OAR reads one '#OAR' directive per line, "
                f"so give each option as its own string"
            )
        match = _OPTION.fullmatch(option.strip())
        if match is None:
            raise ValueError(
                f"OAR option {option!r} is not of the form '-FLAG VALUE' or '--flag VALUE' "
                f"(e.g. '-l nodes=1/core=1,walltime=00:10:00', '--project myproject')"
            )
        flag, value = match.group(1), (match.group(2) or "").strip()
        if flag in _RESERVED:
            raise ValueError(
                f"OAR option {option!r} sets {flag}, which the oar backend sets from "
                f"{_RESERVED[flag]}; remove it from the options"
            )
        kind = _DIRECTIVES.get(flag)
        if kind is None:
            valid = ", ".join(f"{f} ({k})" for f, k in _DIRECTIVES.items())
            raise ValueError(
                f"OAR option {option!r}: {flag} is not a directive OAR reads from a batch script; "
                f"valid ones are: {valid}"
            )
        if (kind == _FLAG and value) or (kind == _VALUE and not value) or (kind == _NUMBER and not value.isdigit()):
            raise ValueError(f"OAR option {option!r}: {flag} takes {kind}, got {value!r}")
        directives.append(f"{flag} {value}" if value else flag)
    return tuple(directives)


def oar_job_name(name: str) -> str:
    """``name`` with every character OAR cannot take literally replaced by '_' (it is only a label)."""
    return "".join(c if _OAR_LITERAL.fullmatch(c) else "_" for c in name) or "jaxsurro"


def script_path(job: JobSpec) -> Path:
    """Where the job's batch script is written: next to its log."""
    return job.log_path.with_suffix(".oar.sh")


def _oar_literal_path(path: Path, what: str) -> str:
    text = str(path)
    if not path.is_absolute():
        raise ValueError(
            f"the job's {what} {text!r} must be an absolute path: OAR resolves relative ones against "
            f"its launching directory, not the launcher's; pass Path.absolute()"
        )
    if not _OAR_LITERAL.fullmatch(text):
        bad = sorted({c for c in text if not _OAR_LITERAL.fullmatch(c)})
        raise ValueError(
            f"the job's {what} {text!r} holds {bad}, which OAR cannot take: it reads '#OAR -O/-E' paths "
            f"literally, pastes them into Perl strings and splits the script path on spaces; use a "
            f"run directory whose path has only letters, digits and _./+,:=-"
        )
    return text


def job_script(job: JobSpec, options: Sequence[str] = ()) -> str:
    """The OAR batch script of ``job``: ``#OAR`` directives, then cd, exports and exec of its argv.

    Pure: it reads no file and no environment. The script is valid bash on its own too (the
    directives are comments), so it can be run by hand outside OAR to debug a job.
    """
    if not job.argv:
        raise ValueError(f"job {job.name!r} has an empty argv; it needs at least the program to run")
    log_path = _oar_literal_path(job.log_path, "log path")
    _oar_literal_path(script_path(job), "script path")
    if not job.cwd.is_absolute():
        raise ValueError(f"the job's cwd {str(job.cwd)!r} must be an absolute path; pass Path.absolute()")
    exports = export_lines(job.name, job.env)
    lines = [
        "#!/bin/bash",
        f"#OAR -n {oar_job_name(job.name)}",
        f"#OAR -O {log_path}",
        f"#OAR -E {log_path}",
        *(f"#OAR {directive}" for directive in check_options(options)),
        "# Written by jaxsurro's oar backend for `oarsub -S`; it also runs as a plain bash script.",
        "set -e",
        "exec 2>&1  # one open file for both streams: OAR opens -O and -E separately, each from offset 0",
        f"cd {shlex.quote(str(job.cwd))}",
        *exports,
        f"exec {shlex.join(job.argv)}",
    ]
    return "\n".join(lines) + "\n"


# -- reading OAR's answers ------------------------------------------------------------------

_PENDING_STATES = frozenset({"Waiting", "Hold", "toLaunch", "toAckReservation", "Launching"})
_RUNNING_STATES = frozenset({"Running", "Finishing", "Suspended", "Resuming"})
_ERROR_STATES = frozenset({"Error", "toError"})
OAR_STATES = _PENDING_STATES | _RUNNING_STATES | _ERROR_STATES | {"Terminated"}

_JOB_ID = re.compile(r"^OAR_JOB_ID=(\d+)\s*$", re.MULTILINE)  # a failed oarsub may print OAR_JOB_ID=-5
_OARDEL_RESULT = re.compile(r"^Deleting the job = (\d+) \.\.\.(REGISTERED|ERROR)\.", re.MULTILINE)
_OARDEL_REASON = re.compile(r"^Cannot frag (\d+) ; (.*?)\s*$", re.MULTILINE)
_ALREADY_KILLED = "This job was already killed."


def exit_status(raw: int | None) -> int | None:
    """A wait status as OAR stores it (768 for ``exit 3``) turned into an exit code; -N for signal N."""
    if raw is None:
        return None
    if os.WIFEXITED(raw):
        return os.WEXITSTATUS(raw)
    if os.WIFSIGNALED(raw):
        return -os.WTERMSIG(raw)
    return raw


def _event_types(entry: Mapping[str, Any]) -> set[str]:
    events = entry.get("events") or []
    return {event.get("type") for event in events if isinstance(event, Mapping)}


def job_status(entry: Mapping[str, Any], cancelled: bool = False) -> JobStatus:
    """The common status of one job from its ``oarstat -f -J`` entry; ``cancelled``: we oardel-ed it.

    ``Error`` is TIMEOUT when OAR's walltime check (sarko) killed the job (a WALLTIME event),
    CANCELLED when we or anyone else oardel-ed it (a FRAG_JOB_REQUEST event, or ``cancelled``),
    FAILED otherwise. A ``Terminated`` job without ``exit_code`` (not the full view) counts as
    completed with an unknown exit code.
    """
    state = entry.get("state")
    raw = entry.get("exit_code")
    if raw is not None and not isinstance(raw, int):
        raise OarError(
            f"oarstat gave exit_code {raw!r} for job {entry.get('Job_Id')}; expected an integer wait status or null"
        )
    code = exit_status(raw)
    if state in _PENDING_STATES:
        return JobStatus(JobState.PENDING, None)
    if state in _RUNNING_STATES:
        return JobStatus(JobState.RUNNING, None)
    if state == "Terminated":
        if code is None or code == 0:
            return JobStatus(JobState.COMPLETED, code)
        if code < 0 and cancelled:  # killed by a signal after our oardel
            return JobStatus(JobState.CANCELLED, code)
        return JobStatus(JobState.FAILED, code)
    if state in _ERROR_STATES:
        events = _event_types(entry)
        if "WALLTIME" in events:
            return JobStatus(JobState.TIMEOUT, code)
        if cancelled or "FRAG_JOB_REQUEST" in events:
            return JobStatus(JobState.CANCELLED, code)
        return JobStatus(JobState.FAILED, code)
    raise OarError(
        f"oarstat gave state {state!r} for job {entry.get('Job_Id')}; expected one of "
        f"{sorted(OAR_STATES)}. Is this OAR 2.5 or later?"
    )


def parse_oarstat(text: str, job_ids: Iterable[str], cancelled: Iterable[str] = ()) -> dict[str, JobStatus]:
    """The status of each of ``job_ids`` from ``oarstat -f -J`` output; ids it does not list are UNKNOWN."""
    stripped = text.strip()
    try:
        data = {} if stripped in ("", "null") else json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise OarError(f"oarstat -J printed something that is not JSON ({exc}):\n{text}") from exc
    if not isinstance(data, dict) or not all(isinstance(entry, dict) for entry in data.values()):
        raise OarError(f"oarstat -J printed JSON that is not an object of jobs keyed by id:\n{text}")
    cancelled = set(cancelled)
    statuses = {}
    for job_id in job_ids:
        entry = data.get(job_id)
        statuses[job_id] = (
            JobStatus(JobState.UNKNOWN, None) if entry is None else job_status(entry, cancelled=job_id in cancelled)
        )
    return statuses


def parse_job_id(stdout: str, stderr: str = "") -> str | None:
    """The id in oarsub's ``OAR_JOB_ID=N`` line, or None when there is none."""
    match = _JOB_ID.search(stdout) or _JOB_ID.search(stderr)
    return match.group(1) if match else None


# -- the scheduler --------------------------------------------------------------------------


class OarScheduler:
    """Submits, polls and cancels OAR jobs through oarsub, oarstat and oardel.

    ``runner`` has subprocess.run's signature (tests inject recorded outputs); ``retries``
    failed calls of a command are retried after ``backoff``, 2*``backoff``, 4*``backoff``...
    seconds; ``poll_interval`` is the least time between two oarstat calls, polls in between
    answer from the last one; ``command_timeout`` bounds each command.
    """

    def __init__(
        self,
        options: Sequence[str] = (),
        *,
        runner: Runner = subprocess.run,
        retries: int = 3,
        backoff: float = 1.0,
        poll_interval: float = 5.0,
        command_timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if retries < 0 or backoff < 0 or poll_interval < 0 or command_timeout <= 0:
            raise ValueError(
                f"need retries >= 0, backoff >= 0, poll_interval >= 0 and command_timeout > 0; got "
                f"retries={retries}, backoff={backoff}, poll_interval={poll_interval}, "
                f"command_timeout={command_timeout}"
            )
        check_options(options)
        self.options = tuple(options)
        self._commands = Commands(
            OarError,
            runner=runner,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
            timeout=command_timeout,
            not_found="the oar backend needs OAR's user commands (oarsub, oarstat, oardel) "
            "on the PATH: run on an OAR frontend, or choose another scheduler",
        )
        self._poll_interval = poll_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._statuses: dict[str, JobStatus] = {}  # the last known status of each job
        self._cancelled: set[str] = set()  # jobs we oardel-ed
        self._last_query = -float("inf")  # clock() of the last oarstat call

    @property
    def min_poll_interval(self) -> float:
        """Seconds the launcher leaves between polls: oarstat is asked at most this often anyway."""
        return self._poll_interval

    # -- Scheduler interface -------------------------------------------------------------------
    def submit(self, job: JobSpec) -> str:
        """Writes the job's script next to its log, for its owner only, and submits it with ``oarsub -S``."""
        job = dataclasses.replace(job, log_path=job.log_path.absolute(), cwd=job.cwd.absolute())
        text = job_script(job, self.options)
        path = script_path(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_job_script(path, text, executable=True)  # its environment holds the run's token
        # Submitted from the log directory: OAR's launching directory must be a path it can take literally.
        result = self._commands.run(
            ["oarsub", "-S", str(path)], f"submitting job {job.name!r}", _has_job_id, cwd=path.parent
        )
        job_id = parse_job_id(result.stdout or "", result.stderr or "") or ""  # there is one: _has_job_id
        if result.returncode != 0:
            # The job is in OAR's database (oarsub printed its id before failing to notify the server, say):
            # keep it rather than submit a duplicate.
            log.warning("oarsub printed OAR_JOB_ID=%s but failed; keeping the job:\n%s", job_id, describe(result))
        with self._lock:
            self._statuses[job_id] = JobStatus(JobState.PENDING, None)
        log.debug("submitted %s as OAR job %s (script %s)", job.name, job_id, path)
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The status of every job; one oarstat call for all those whose status may have changed."""
        ids = _checked_ids(job_ids)
        with self._lock:
            fresh = self._clock() - self._last_query < self._poll_interval
            ask = [i for i in ids if i not in self._statuses or not (fresh or self._statuses[i].state.is_terminal)]
            if ask:
                argv = ["oarstat", "-f", "-J", *(arg for i in ask for arg in ("-j", i))]
                result = self._commands.run(argv, f"asking about {len(ask)} job(s)")
                self._last_query = self._clock()
                self._statuses.update(parse_oarstat(result.stdout, ask, self._cancelled))
            return {i: self._statuses[i] for i in ids}

    def cancel(self, job_ids: Sequence[str]) -> None:
        """``oardel`` on every job not known to have ended; ids OAR refuses are checked, and ignored if ended."""
        ids = _checked_ids(job_ids)
        with self._lock:
            ids = [i for i in ids if not (i in self._statuses and self._statuses[i].state.is_terminal)]
            if not ids:
                return
            result = self._commands.run(
                ["oardel", *ids], f"cancelling {len(ids)} job(s)", lambda r: _oardel_answered(r, ids)
            )
            output = f"{result.stdout or ''}\n{result.stderr or ''}"
            outcome = dict(_OARDEL_RESULT.findall(output))
            reasons = dict(_OARDEL_REASON.findall(output))
            # oardel exits non-zero when it refuses any id; a job it accepted may run for a few seconds more.
            refused = (
                []
                if result.returncode == 0
                else [i for i in ids if outcome.get(i) != "REGISTERED" and reasons.get(i) != _ALREADY_KILLED]
            )
            self._cancelled.update(i for i in ids if i not in refused)
            self._last_query = -float("inf")  # the next poll asks OAR again
            if not refused:
                return
            # oardel says "You are not the right user" for ids it does not know: ask oarstat whether they ended.
            argv = ["oarstat", "-f", "-J", *(arg for i in refused for arg in ("-j", i))]
            check = self._commands.run(argv, f"asking about {len(refused)} job(s) oardel refused")
            statuses = parse_oarstat(check.stdout, refused, self._cancelled)
            self._statuses.update(statuses)
            active = [i for i in refused if not statuses[i].state.is_terminal]
        if active:
            raise OarError(
                f"oardel did not cancel OAR job(s) {', '.join(active)}, which are still "
                f"{', '.join(statuses[i].state.value for i in active)}:\n{describe(result)}"
            )
        log.info("oardel: job(s) %s had already ended or are unknown to OAR; nothing to cancel", ", ".join(refused))


def _checked_ids(job_ids: Sequence[str]) -> list[str]:
    """The ids as distinct strings in order; raises for one that is not an OAR job id (a number)."""
    if isinstance(job_ids, str):
        raise TypeError(f"job_ids must be a sequence of ids, got the string {job_ids!r}; wrap it in a list")
    ids = list(dict.fromkeys(str(i) for i in job_ids))
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise ValueError(f"OAR job ids are positive integers (as oarsub prints them), got {bad}")
    return ids


def _has_job_id(result: subprocess.CompletedProcess) -> bool:
    """Whether oarsub printed a (positive) job id: the job is in OAR's database, whatever its exit code."""
    return parse_job_id(result.stdout or "", result.stderr or "") is not None


def _oardel_answered(result: subprocess.CompletedProcess, ids: Sequence[str]) -> bool:
    """Whether oardel reached OAR: it exited 0 or printed a result for every id."""
    answered = {i for i, _ in _OARDEL_RESULT.findall(f"{result.stdout or ''}\n{result.stderr or ''}")}
    return result.returncode == 0 or set(ids) <= answered
