"""The OAR backend against the live single-node OAR 2.5.9 that scripts/setup_oar.sh brings up.

Every call goes through jaxsurro.launcher.oar.OarScheduler, run as the submitting user (see live_oar.py);
root only reads OAR's own view (oarstat, oarnodes) to check what the backend reports.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_oar import NODE, UserScheduler, oar_state, oarstat, require_live_oar, resources, scratch_directory
from waiting import wait_until

JOB_TIMEOUT = 60.0  # seconds for a tiny job to end: OAR schedules every second at best, then starts it over ssh
TERMINAL = {"completed", "failed", "cancelled", "timeout", "node_fail", "unknown"}


@pytest.fixture(scope="module", autouse=True)
def live_oar() -> None:
    require_live_oar()


@pytest.fixture
def job_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from scratch_directory(request, "cluster-tests", uuid.uuid4().hex[:8])


@pytest.fixture
def scheduler(job_dir: Path) -> Iterator[UserScheduler]:
    scheduler = UserScheduler(job_dir)
    yield scheduler
    scheduler.close()


def wait_for_states(
    scheduler: UserScheduler, job_ids: list[str], done, what: str, timeout: float = JOB_TIMEOUT
) -> dict[str, tuple[str, int | None]]:
    """Polls all ``job_ids`` in each call until ``done(statuses)``; returns the last statuses."""
    last: dict[str, dict[str, tuple[str, int | None]]] = {}

    def check() -> bool:
        last["statuses"] = scheduler.poll(job_ids)
        return done(last["statuses"])

    try:
        wait_until(check, timeout, what)
    except AssertionError as error:
        raise AssertionError(
            f"{error}; the backend last said {last.get('statuses')}, OAR says { {i: oar_state(i) for i in job_ids} }"
        ) from None
    return last["statuses"]


def test_node_has_alive_resources() -> None:
    states = [(r["network_address"], r["state"]) for r in resources().values()]
    assert states and all(state == (NODE, "Alive") for state in states), f"oarnodes -J lists {states}"


def test_jobs_polled_in_one_call_report_completion_and_exit_codes(scheduler: UserScheduler, job_dir: Path) -> None:
    ok = scheduler.submit(
        "ok",
        ["bash", "-c", 'echo "hello $GREETING from $OAR_JOB_ID"'],
        job_dir,
        env={"GREETING": "with spaces & quotes'"},
    )
    failing = scheduler.submit("exit3", ["bash", "-c", "echo about to fail; exit 3"], job_dir)
    third = scheduler.submit("sleep1", ["sleep", "1"], job_dir)
    ids = [ok, failing, third]
    assert len(set(ids)) == 3 and all(i.isdigit() for i in ids), ids
    # One oarstat for the three ids, as the launcher polls every job of a study in one call.
    scheduler.poll(ids)
    assert scheduler.commands == {"oarstat": 1}, scheduler.commands

    statuses = wait_for_states(
        scheduler, ids, lambda s: all(state in TERMINAL for state, _ in s.values()), "the three jobs to end"
    )
    assert statuses == {ok: ("completed", 0), failing: ("failed", 3), third: ("completed", 0)}
    # What OAR itself stored: a raw wait status, which the backend turned into exit code 3.
    assert oarstat([failing])[failing]["exit_code"] == 768
    assert (job_dir / "ok.log").read_text() == f"hello with spaces & quotes' from {ok}\n"
    assert (job_dir / "exit3.log").read_text() == "about to fail\n"
    # The owner-only job script ran as the submitting user (OAR read it as that user too).
    assert oarstat([ok])[ok]["job_user"] == "jaxsurro-oar"
    assert oct((job_dir / "ok.oar.sh").stat().st_mode & 0o777) == oct(0o700)


def test_oardel_of_a_queued_and_of_a_running_job(scheduler: UserScheduler, job_dir: Path) -> None:
    running = scheduler.submit("long", ["sleep", "600"], job_dir)
    # Held back behind the running job by an OAR dependency (-a): it stays Waiting, whatever the free resources.
    dependent = UserScheduler(job_dir, options=[f"-a {running}"])
    try:
        queued = dependent.submit("queued", ["true"], job_dir)
        wait_for_states(
            scheduler,
            [running, queued],
            lambda s: s[running][0] == "running" and s[queued][0] == "pending",
            "the first job to run while the second waits for it",
        )
        assert oar_state(queued) == "Waiting"

        dependent.cancel([queued])
        statuses = wait_for_states(
            dependent, [queued, running], lambda s: s[queued][0] in TERMINAL, "the queued job to be cancelled"
        )
        assert statuses[queued] == ("cancelled", None)
        assert statuses[running][0] == "running"

        scheduler.cancel([running])
        statuses = wait_for_states(
            scheduler, [running], lambda s: s[running][0] in TERMINAL, "the running job to be cancelled"
        )
        assert statuses[running][0] == "cancelled"
    finally:
        dependent.close()
    # OAR's own view: oardel leads to Error, with the deletion request among the events.
    for job_id in (queued, running):
        job = oarstat([job_id])[job_id]
        assert job["state"] == "Error", job
        assert "FRAG_JOB_REQUEST" in {event["type"] for event in job["events"]}, job["events"]
    # Cancelling jobs that already ended is a no-op, without a call to oardel.
    scheduler.cancel([running])
    assert "oardel" not in scheduler.commands, scheduler.commands


def test_unknown_job_id(scheduler: UserScheduler) -> None:
    assert scheduler.poll(["987654321"]) == {"987654321": ("unknown", None)}
    # oardel refuses an id it does not know ("You are not the right user", exit 1); the backend asks
    # oarstat, which does not know it either, so there is nothing left to cancel.
    scheduler.cancel(["987654322"])
    assert scheduler.commands == {"oardel": 1, "oarstat": 1}, scheduler.commands
