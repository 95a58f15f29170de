"""Tests of ``scripts/compare_breed.py`` on hand-written run directories: statistics, figures, command line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from matplotlib import image

from jaxsurro.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_breed.py"
EXPERIMENT = ROOT / "experiments" / "heat_breed.toml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("T0", "T1", "T2", "T3", "T4")


def load_script() -> ModuleType:
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("compare_breed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_breed"] = module
    spec.loader.exec_module(module)
    return module


compare = load_script()


def metrics_record(kind: str, batch: int, **extra: object) -> dict[str, object]:
    """One line of metrics.jsonl as the trainer writes it."""
    record: dict[str, object] = {
        "kind": kind,
        "time": 0.1 * batch,
        "batch": batch,
        "train_loss": 0.5 / (1 + batch),
        "received_per_s": 100.0,
        "trained_per_s": 3000.0,
        "buffer_population": 300,
        "buffer_capacity": 2000,
    }
    record.update(extra)
    return record


def write_run(
    run_dir: Path,
    parameters: np.ndarray,
    bred: list[int],
    val_mse: list[float],
    states: list[str] | None = None,
    final: float | None = None,
    baseline: float = 0.05,
) -> Path:
    """A run directory with the three files the comparison reads."""
    run_dir.mkdir(parents=True)
    records = []
    for i, mse in enumerate(val_mse):
        records.append(metrics_record("train", 100 * i + 50))
        records.append(metrics_record("validation", 100 * (i + 1), val_mse=mse))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    states = states or ["completed"] * len(parameters)
    header = [
        "sim_id",
        *NAMES,
        "state",
        "attempts",
        "job_id",
        "submitted_at",
        "started_at",
        "ended_at",
        "exit_code",
        "steps_finished",
        "generation",
        "bred",
        "parent",
        "score",
        "error",
    ]
    lines = [",".join(header)]
    for j, (row, is_bred, state) in enumerate(zip(parameters, bred, states, strict=True)):
        lines.append(
            ",".join(
                [
                    str(j),
                    *(repr(float(v)) for v in row),
                    state,
                    "1",
                    str(1000 + j),
                    "",
                    "",
                    "",
                    "0",
                    "50",
                    str(int(is_bred)),
                    str(is_bred),
                    "3" if is_bred else "-1",
                    "0.5",
                    "",
                ]
            )
        )
    (run_dir / "simulations.csv").write_text("\n".join(lines) + "\n")
    summary = {
        "final_validation_mse": val_mse[-1] if final is None else final,
        "mean_field_validation_mse": baseline,
        "repetition_histogram": {"1": 10},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def two_runs(runs_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Random and a Breed run; Breed's bred points are more spread out than its uniform ones."""
    rng = np.random.default_rng(3)
    random_parameters = rng.uniform(100.0, 500.0, size=(40, 5))
    breed_parameters = rng.uniform(100.0, 500.0, size=(40, 5))
    bred = np.arange(40) % 3 == 0
    breed_parameters[bred, 0] = 100.0  # a cold initial state next to hot walls: a large deviation
    breed_parameters[bred, 1:] = 480.0
    write_run(runs_dir / "random", random_parameters, [0] * 40, [0.04, 0.01, 0.004])
    write_run(runs_dir / "breed", breed_parameters, bred.astype(int).tolist(), [0.05, 0.008, 0.003])
    return random_parameters, breed_parameters, bred


def assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 2000 and 400 <= width <= 3000, f"{path} is {width}x{height} pixels"
    assert pixels[..., :3].std() > 0.05, f"{path} is blank"
    return width, height


def test_deviation_is_the_population_std_of_each_simulations_parameters() -> None:
    parameters = np.array(
        [
            [100.0, 100.0, 100.0, 100.0, 500.0],  # mean 180, variance 128000 / 5
            [300.0, 300.0, 300.0, 300.0, 300.0],
            [100.0, 200.0, 300.0, 400.0, 500.0],
        ]
    )
    deviation = compare.parameter_deviation(parameters)
    np.testing.assert_allclose(deviation, [160.0, 0.0, np.sqrt(20000.0)], rtol=1e-12)
    np.testing.assert_allclose(deviation, np.std(parameters, axis=1, ddof=0), rtol=1e-12)
    assert not np.allclose(deviation, np.std(parameters, axis=1, ddof=1))  # ddof = 0, not the sample std


def test_deviation_rejects_a_single_parameter() -> None:
    with pytest.raises(ValueError, match=r"\[n_simulations, n_parameters >= 2\], got shape \(4, 1\)"):
        compare.parameter_deviation(np.ones((4, 1)))


def test_read_simulations_keeps_completed_rows_and_their_bred_flags(tmp_path: Path) -> None:
    parameters = np.arange(20.0).reshape(4, 5) * 10 + 100
    write_run(
        tmp_path / "run", parameters, [0, 1, 1, 0], [0.1], states=["completed", "completed", "failed", "completed"]
    )
    simulations = compare.read_simulations(tmp_path / "run" / "simulations.csv")
    assert simulations.names == NAMES
    np.testing.assert_array_equal(simulations.parameters, parameters[[0, 1, 3]])
    np.testing.assert_array_equal(simulations.bred, [False, True, False])
    assert simulations.n_not_completed == 1


def test_deviation_stats_are_the_means_of_each_group(tmp_path: Path) -> None:
    random_parameters, breed_parameters, bred = two_runs(tmp_path)
    stats = compare.deviation_stats(
        compare.read_simulations(tmp_path / "random" / "simulations.csv"),
        compare.read_simulations(tmp_path / "breed" / "simulations.csv"),
    )
    breed_std = np.std(breed_parameters, axis=1)
    assert stats.breed_bred == pytest.approx(breed_std[bred].mean(), rel=1e-12)
    assert stats.breed_bred == pytest.approx(np.std([100.0, 480, 480, 480, 480]), rel=1e-12)
    assert stats.breed_uniform == pytest.approx(breed_std[~bred].mean(), rel=1e-12)
    assert stats.breed_all == pytest.approx(breed_std.mean(), rel=1e-12)
    assert stats.random_all == pytest.approx(np.std(random_parameters, axis=1).mean(), rel=1e-12)
    assert (stats.n_bred, stats.n_uniform) == (int(bred.sum()), int((~bred).sum()))
    assert stats.breed_bred > stats.breed_uniform


def test_deviation_figure_marks_each_groups_mean(tmp_path: Path) -> None:
    _, breed_parameters, bred = two_runs(tmp_path)
    random_run = compare.read_simulations(tmp_path / "random" / "simulations.csv")
    breed_run = compare.read_simulations(tmp_path / "breed" / "simulations.csv")
    figure = compare.deviation_figure(random_run, breed_run)
    left, right = figure.axes
    stats = compare.deviation_stats(random_run, breed_run)
    marked = [[line.get_xdata()[0] for line in axes.lines] for axes in (left, right)]
    np.testing.assert_allclose(marked[0], [stats.breed_uniform, stats.breed_bred], rtol=1e-12)
    np.testing.assert_allclose(marked[1], [stats.random_all, stats.breed_all], rtol=1e-12)
    legend = [text.get_text() for text in left.get_legend().get_texts()]
    assert legend == [
        f"uniform points (n = {stats.n_uniform}, mean {stats.breed_uniform:.1f})",
        f"bred points (n = {stats.n_bred}, mean {stats.breed_bred:.1f})",
    ]


def test_from_runs_writes_both_pngs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    random_parameters, breed_parameters, bred = two_runs(tmp_path / "runs")
    out = tmp_path / "figures"
    assert compare.main(["--from-runs", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["breed_deviation.png", "breed_validation.png"]
    assert assert_png(out / "breed_validation.png") == (800, 500)
    assert assert_png(out / "breed_deviation.png") == (1600, 500)
    rows = {line[:40].strip(): line[40:].split() for line in printed.splitlines() if line.startswith(("mean", "final"))}
    breed_std = np.std(breed_parameters, axis=1)
    assert rows["mean deviation, Breed uniform points"] == [f"{breed_std[~bred].mean():.2f}", str((~bred).sum())]
    assert rows["mean deviation, Breed bred points"] == [f"{breed_std[bred].mean():.2f}", str(bred.sum())]
    assert rows["mean deviation, Random run"] == [f"{np.std(random_parameters, axis=1).mean():.2f}", "40"]
    assert rows["mean deviation, Breed run"] == [f"{breed_std.mean():.2f}", "40"]
    assert rows["final validation MSE, Random"] == ["0.004"]
    assert rows["final validation MSE, Breed"] == ["0.003"]
    assert rows["mean-field baseline MSE"] == ["0.05"]


def test_validation_figure_draws_both_curves_and_one_baseline(tmp_path: Path) -> None:
    two_runs(tmp_path)
    runs = {name: compare.read_run(tmp_path / name) for name in ("random", "breed")}
    axes = compare.validation_figure(runs).axes[0]
    curves = [line for line in axes.lines if line.get_linestyle() == "-"]
    np.testing.assert_allclose(curves[0].get_ydata(), [0.04, 0.01, 0.004])
    np.testing.assert_allclose(curves[1].get_xdata(), [100, 200, 300])
    baselines = [line for line in axes.lines if line.get_linestyle() == "--"]
    assert len(baselines) == 1 and baselines[0].get_ydata()[0] == pytest.approx(0.05)
    assert axes.get_yscale() == "log"


def test_missing_run_directory_exits_2_and_says_how_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    two_runs(tmp_path)
    (tmp_path / "breed" / "summary.json").unlink()
    assert compare.main(["--from-runs", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "breed/summary.json not found" in capsys.readouterr().err
    assert compare.main(["--from-runs", "--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "run without --from-runs to produce it" in capsys.readouterr().err


def test_bad_bred_value_names_the_line(tmp_path: Path) -> None:
    write_run(tmp_path / "run", np.full((2, 5), 200.0), [0, 1], [0.1])
    path = tmp_path / "run" / "simulations.csv"
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    fields[-4] = "yes"  # the bred column
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(compare.CompareInputError, match=r"line 3: bred is 'yes', expected 0 or 1"):
        compare.read_simulations(path)


def test_existing_run_directories_are_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "breed").mkdir()
    with pytest.raises(compare.CompareInputError, match=r"already exist.*--from-runs"):
        compare.run_both(EXPERIMENT, [], tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "breed"]


def test_experiment_runs_breed_and_its_random_counterpart_differs_only_in_the_sampler() -> None:
    breed = load_config(EXPERIMENT)
    random = load_config(EXPERIMENT, ["sampler.kind=uniform"])
    assert breed.sampler.kind == "breed" and random.sampler.kind == "uniform"
    assert (breed.breed.period, breed.breed.window, breed.breed.min_finished) == (100, 50, 10)
    assert (breed.breed.sigma, breed.breed.r_start, breed.breed.r_end, breed.breed.r_cycles) == (5.0, 0.5, 0.9, 3.0)
    assert breed.study.n_simulations == 200
    breed_dict, random_dict = to_dict(breed), to_dict(random)
    breed_dict.pop("sampler"), random_dict.pop("sampler")
    assert breed_dict == random_dict


def test_help_runs_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    for option in ("--set", "--runs-dir", "--out", "--from-runs"):
        assert option in result.stdout
