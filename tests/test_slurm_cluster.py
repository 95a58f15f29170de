"""Smoke test of the local single-node Slurm cluster that scripts/setup_slurm.sh brings up."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SETUP_HINT = "bring the cluster up with `bash scripts/setup_slurm.sh` (as root, or with sudo)"
UP_STATES = {"idle", "mix", "alloc"}  # the node answers and accepts jobs
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
JOB_TIMEOUT = 20.0  # seconds for a tiny job to go from submission to a terminal state
MPI_PROGRAM = (
    "from mpi4py import MPI; comm = MPI.COMM_WORLD; "
    "print('rank', comm.Get_rank(), 'of', comm.Get_size(), 'sum', comm.allreduce(comm.Get_rank() + 1))"
)
EXPECTED_RANK_LINES = ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"]


def run(command: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Runs a Slurm command, failing with its output when it exits non-zero or hangs."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`{' '.join(command)}` did not finish within {timeout} s (output: {error.stdout!r}); {SETUP_HINT}")
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` exited {result.returncode}, expected 0;\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{SETUP_HINT}"
        )
    return result


def job_fields(job_id: str) -> dict[str, str]:
    """The ``Key=Value`` fields of ``scontrol -o show job``, known for MinJobAge seconds after the end."""
    line = run(["scontrol", "-o", "show", "job", job_id]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for_job_end(job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Polls the job until it reaches a terminal state; fails naming the last state after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    fields = job_fields(job_id)
    while fields.get("JobState") not in TERMINAL_STATES:
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} is still {fields.get('JobState')} ({fields.get('Reason')}) after {timeout} s, "
                f"expected it to finish"
            )
        time.sleep(0.1)  # the polling interval of a condition with a deadline, not a wait for an event
        fields = job_fields(job_id)
    return fields


def submit(script: Path) -> str:
    """Submits a batch script from its own directory and returns the bare job id."""
    output = run(["sbatch", "--parsable", f"--chdir={script.parent}", str(script)]).stdout.strip()
    match = re.fullmatch(r"(\d+)(;\S+)?", output)
    assert match, f"sbatch --parsable printed {output!r}, expected a bare job id"
    return match.group(1)


@pytest.fixture(scope="module")
def node() -> str:
    """The name of the cluster's node, after checking that Slurm is installed and the node is up."""
    if shutil.which("sinfo") is None:
        pytest.fail(f"Slurm is not installed (no `sinfo` on the PATH); {SETUP_HINT}")
    listing = run(["sinfo", "-h", "-o", "%n %t"], timeout=15).stdout.split()
    assert len(listing) == 2, f"sinfo listed {listing!r}, expected one node and its state; {SETUP_HINT}"
    name, state = listing
    assert state in UP_STATES, f"node {name} is {state!r}, expected one of {sorted(UP_STATES)}; {SETUP_HINT}"
    return name


def test_node_is_up_in_the_default_partition(node: str) -> None:
    partitions = run(["sinfo", "-h", "-o", "%P %a %D %N"]).stdout.split()
    assert partitions == ["debug*", "up", "1", node], (
        f"sinfo shows {partitions!r}, expected the default partition debug up with node {node}"
    )


def test_batch_job_completes_and_writes_its_output(node: str, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text(
        '#!/bin/bash\n#SBATCH --output=hello-%j.out\necho "hello from job $SLURM_JOB_ID on $(hostname -s)"\n'
    )
    job_id = submit(script)
    fields = wait_for_job_end(job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"job {job_id} ended {fields}"
    output = (tmp_path / f"hello-{job_id}.out").read_text()
    assert output == f"hello from job {job_id} on {node}\n"


def test_batch_job_exit_code_is_reported(node: str, tmp_path: Path) -> None:
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=fail-%j.out\nexit 3\n")
    job_id = submit(script)
    fields = wait_for_job_end(job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "3:0"), f"job {job_id} ended {fields}"


def test_srun_pmix_runs_two_mpi4py_ranks(node: str) -> None:
    result = run(["srun", "-n", "2", "--mpi=pmix", sys.executable, "-c", MPI_PROGRAM], timeout=30)
    assert sorted(result.stdout.splitlines()) == EXPECTED_RANK_LINES, (
        f"srun printed {result.stdout!r}, stderr {result.stderr!r}"
    )


def test_batch_job_runs_mpi_ranks_with_srun_pmix(node: str, tmp_path: Path) -> None:
    script = tmp_path / "mpi.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output=mpi-%j.out\n"
        f'srun --mpi=pmix {sys.executable} -c "{MPI_PROGRAM}"\n'
    )
    job_id = submit(script)
    fields = wait_for_job_end(job_id)
    output = (tmp_path / f"mpi-{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"job {job_id} ended {fields}; output: {output!r}"
    )
    assert sorted(output.splitlines()) == EXPECTED_RANK_LINES, f"job {job_id} wrote {output!r}"
