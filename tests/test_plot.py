"""Tests of ``jaxsurro.plot``: figures from a hand-written run directory, and clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from jaxsurro import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["loss.png", "throughput.png", "buffer.png", "repetitions.png"]


def metrics_record(kind: str, time: float, batch: int, **extra: object) -> dict[str, object]:
    """One line of metrics.jsonl as ``jaxsurro.server.ensemble`` writes it."""
    record: dict[str, object] = {
        "kind": kind,
        "time": time,
        "batch": batch,
        "samples_trained": 64 * batch,
        "train_loss": 0.5 / (1 + batch),
        "received": 100 * batch,
        "received_per_s": 120.0 + batch,
        "trained_per_s": 3000.0 - batch,
        "buffer_population": min(50 * batch, 300),
        "buffer_capacity": 300,
        "duplicates": 0,
        "rejected": {"bad_shape": 1},
        "simulations": {"running": 2, "done": batch, "failed": 0},
    }
    record.update(extra)
    return record


def write_run(run_dir: Path, records: list[dict[str, object]], summary: dict[str, object] | None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def finished_records() -> list[dict[str, object]]:
    records = [metrics_record("train", 0.5 * i, 20 * i) for i in range(1, 7)]
    records[0]["train_loss"] = math.nan  # as written before the first batch's loss is fetched
    records[2] = metrics_record("validation", 1.5, 60, val_mse=0.04)
    records.append(metrics_record("validation", 3.6, 130, val_mse=0.01, buffer_population=0))
    return records


SUMMARY = {
    "repetition_histogram": {"1": 40, "2": 25, "5": 3},
    "mean_field_validation_mse": 0.02,
    "final_validation_mse": 0.01,
    "samples_trained": 8320,
}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 2000 and 400 <= width <= 3000, f"{path} is {width}x{height} pixels"
    assert pixels[..., :3].std() > 0.05, f"{path} is blank"


def test_plot_run_writes_four_readable_pngs(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), SUMMARY)
    paths = plot.plot_run(run_dir)
    assert [p.name for p in paths] == FIGURES
    assert all(p.parent == run_dir for p in paths)
    for path in paths:
        assert_png(path)


def test_out_dir_is_created_and_run_dir_left_alone(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), SUMMARY)
    out_dir = tmp_path / "figures" / "nested"
    paths = plot.plot_run(run_dir, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(FIGURES)
    assert [p.parent for p in paths] == [out_dir] * 4
    assert not list(run_dir.glob("*.png"))


def test_running_run_without_validation_or_summary_plots_what_exists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [metrics_record("train", 0.4 * i, 20 * i) for i in range(1, 4)]
    run_dir = tmp_path / "run"
    write_run(run_dir, records, summary=None)
    # The trainer is in the middle of writing its next line.
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "time": 1.6, "bat')
    paths = plot.plot_run(run_dir)
    assert "repetitions.png not written" in caplog.text
    assert [p.name for p in paths] == ["loss.png", "throughput.png", "buffer.png"]
    for path in paths:
        assert_png(path)


def test_parse_metrics_columns_and_skipped_lines() -> None:
    records = finished_records() + [{"kind": "breed", "time": 9.0}]
    text = "\n".join(json.dumps(r) for r in records) + "\n\n"
    metrics = plot.parse_metrics(text, "metrics.jsonl")
    assert metrics.batch.tolist() == [20, 40, 60, 80, 100, 120, 130]
    assert np.isnan(metrics.train_loss[0]) and metrics.train_loss[1] == pytest.approx(0.5 / 41)
    assert metrics.validation_batch.tolist() == [60, 130]
    assert metrics.val_mse.tolist() == [0.04, 0.01]
    assert metrics.buffer_capacity.tolist() == [300] * 7


def test_trailing_mean_rate_averages_over_the_window() -> None:
    time = np.array([1.0, 2.0, 3.0, 4.0])
    rate = np.array([0.0, 10.0, 0.0, 10.0])  # bursty: 10 samples every other second
    assert plot.trailing_mean_rate(time, rate, window=0.5).tolist() == rate.tolist()
    np.testing.assert_allclose(plot.trailing_mean_rate(time, rate, window=2.0), [0.0, 5.0, 5.0, 5.0])


def test_malformed_metrics_line_is_named(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), SUMMARY)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(3, "{not json\n")
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(plot.PlotInputError, match=r"metrics\.jsonl line 4 is not JSON"):
        plot.plot_run(run_dir)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"kind": "train", "time": 1.0}, r"line 1 has no 'batch' field"),
        (
            metrics_record("train", 1.0, 20, buffer_population="full"),
            r"line 1 field 'buffer_population' should be a number",
        ),
        (metrics_record("validation", 1.0, 20), r"line 1 has no 'val_mse' field"),
    ],
)
def test_incomplete_record_is_named(tmp_path: Path, record: dict[str, object], message: str) -> None:
    run_dir = write_run(tmp_path / "run", [record], SUMMARY)
    with pytest.raises(plot.PlotInputError, match=message):
        plot.plot_run(run_dir)


def test_json_array_line_is_rejected() -> None:
    with pytest.raises(plot.PlotInputError, match=r"m\.jsonl line 2 should be a JSON object, got list"):
        plot.parse_metrics(json.dumps(metrics_record("train", 1, 2)) + "\n[1, 2]\n", "m.jsonl")


def test_empty_metrics_is_an_error(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [], None)
    with pytest.raises(plot.PlotInputError, match="holds no train or validation records yet"):
        plot.plot_run(run_dir)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(plot.PlotInputError, match=r"run directory .*nowhere does not exist"):
        plot.plot_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(plot.PlotInputError, match=r"empty/metrics\.jsonl not found"):
        plot.plot_run(tmp_path / "empty")


@pytest.mark.parametrize(
    "summary_text, message",
    [
        ("{", r"summary\.json is not JSON"),
        (json.dumps({"final_validation_mse": 0.1}), r"'repetition_histogram' should be an object"),
        (json.dumps({"repetition_histogram": {"one": 3}}), r"entry 'one': 3 should map"),
        (
            json.dumps({"repetition_histogram": {"1": 3}, "mean_field_validation_mse": "low"}),
            r"'mean_field_validation_mse' should be a number",
        ),
    ],
)
def test_malformed_summary_is_named(tmp_path: Path, summary_text: str, message: str) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), None)
    (run_dir / "summary.json").write_text(summary_text)
    with pytest.raises(plot.PlotInputError, match=message):
        plot.plot_run(run_dir)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), SUMMARY)
    assert plot.main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / name) for name in FIGURES]

    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err

    (run_dir / "metrics.jsonl").write_text("garbage\n")
    assert plot.main([str(run_dir)]) == 2
    assert "metrics.jsonl line 1 is not JSON" in capsys.readouterr().err


def test_module_runs_as_a_program(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finished_records(), SUMMARY)
    done = subprocess.run(
        [sys.executable, "-m", "jaxsurro.plot", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 4
    missing = subprocess.run(
        [sys.executable, "-m", "jaxsurro.plot", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
