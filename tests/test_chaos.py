"""scripts/chaos.py at a small size: three clients and then the server killed, the run resumed and whole.

A FIFO buffer trains each sample once, so the number of batches, and with it the validation error, hardly
depends on timing: the comparison with the uninterrupted run is then a fair one at this small size.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_chaos_script_kills_clients_and_the_server_and_the_resumed_study_is_whole(tmp_path):
    small = [
        "study.n_simulations=24",
        "solver.n_steps=20",
        "solver.grid_size=16",
        "train.n_validation=4",
        "buffer.kind=fifo",
        "buffer.capacity=300",
        "buffer.watermark=0",
        "model.hidden=64",
        f"study.cache_dir='{tmp_path}/cache'",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "scripts/chaos.py",
            "--every",
            "1",
            "--workdir",
            str(tmp_path),
            *(f"--set={o}" for o in small),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("ok  ") == 4, result.stdout
    assert "killed clients [" in result.stdout and "resume time" in result.stdout
