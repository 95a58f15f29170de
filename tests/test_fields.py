"""Experiments with any fields: declared at HELLO, assembled per time step, trained on, predicted by name."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from waiting import wait_until

from jaxsurro import client, plot, protocol, surrogate
from jaxsurro.config import load_config
from jaxsurro.core.fields import split_fields
from jaxsurro.run import run
from jaxsurro.server.assembly import StepAssembler
from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.receiver import BufferSink, ExperimentMismatch, Receiver
from jaxsurro.server.trainer import Trainer, field_layout, range_scaling
from jaxsurro.table import SimState, SimulationTable

ROOT = Path(__file__).resolve().parents[1]
MIXED = {"profile": (7,), "volume": (2, 3, 4), "energy": ()}  # a 1-D, a 3-D and a scalar field


def mixed_config(tmp_path: Path):
    """An experiment declaring the three MIXED fields, float64 on the wire (its solver is never started)."""
    text = (ROOT / "experiments/burgers.toml").read_text().split("[[solver.fields]]")[0]
    for name, shape in MIXED.items():
        text += f'[[solver.fields]]\nname = "{name}"\nshape = {list(shape)}\n\n'
    text += "[solver.parameters]\na = [0.0, 1.0]\nb = [-1.0, 1.0]\n"
    path = tmp_path / "mixed.toml"
    path.write_text(text)
    return load_config(path, ["solver.n_steps=3", "train.batch_size=4", f"study.output_dir='{tmp_path}'"])


def submitted_table(n: int) -> SimulationTable:
    table = SimulationTable(np.linspace(0, 1, 2 * n).reshape(n, 2))
    for record in table:
        record.attempts, record.state = 1, SimState.SUBMITTED
    return table


def test_a_step_of_a_1d_float64_a_3d_and_a_scalar_field_is_stored_whole_and_trains(tmp_path):
    config = mixed_config(tmp_path)
    assert config.solver.sample_size == 7 + 24 + 1
    table = submitted_table(2)
    buffer = FIFOBuffer(capacity=8, watermark=0, input_dim=3, field_size=config.solver.sample_size, seed=0)
    receiver = Receiver.from_config(
        config, table, BufferSink(buffer, table, 3, config.solver.dt), protocol.new_token(), protocol.new_secret()
    )
    receiver.start()
    rng = np.random.default_rng(0)
    sent = {t: {name: rng.normal(size=shape) for name, shape in MIXED.items()} for t in range(3)}
    try:
        with client.connect(
            server=receiver.control_address,
            token=receiver.token,
            sim_id=1,
            timeout=10,
            wire_dtype="float64",
            fields=MIXED,
        ) as sim:
            for t in range(3):
                for name in reversed(MIXED):  # any order within a step
                    sim.send(name, t, sent[t][name])
        wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH")
    finally:
        receiver.stop()
    counters = receiver.counters()
    assert (counters.unique_received, counters.rejected, counters.duplicates) == (3, {}, 0)
    batch = buffer.get_batch(3, timeout=5)
    layout = field_layout(config)
    for row, sample_id in zip(batch.targets, batch.sample_ids, strict=True):
        fields = split_fields(row, layout)
        for name in MIXED:  # converted once to float32, in the experiment's order whatever the send order
            np.testing.assert_array_equal(fields[name], sent[int(sample_id) - 3][name].astype(np.float32))
    trainer = Trainer.from_config(config, range_scaling(config, -5.0, 5.0))
    step_metrics, per_sample = jax.device_get(trainer.step(batch))
    assert step_metrics["field_loss"].shape == (3,) and np.isfinite(step_metrics["loss"])
    assert per_sample.shape[0] >= 3


def test_a_declaration_that_differs_from_the_experiment_is_refused_at_hello_naming_the_field():
    table = submitted_table(1)
    receiver = Receiver(
        table=table,
        sink=BufferSink(FIFOBuffer(4, 0, 3, 8, 0), table, 2, 0.1),
        token=protocol.new_token(),
        secret=protocol.new_secret(),
        fields={"u": (4,), "dudx": (4,)},
        wire_dtype="float64",
        n_steps=2,
        host="127.0.0.1",
    )
    receiver.start()
    try:
        with pytest.raises(
            client.SimulationRejected,
            match=r"field_mismatch: field 'dudx': the client declares "
            r"\[5\] float64, the experiment expects \[4\] float64",
        ):
            client.connect(
                server=receiver.control_address,
                token=receiver.token,
                sim_id=0,
                timeout=10,
                wire_dtype="float64",
                fields={"u": 4, "dudx": 5},
            )
    finally:
        receiver.stop()
    with pytest.raises(ExperimentMismatch, match="dudx"):
        receiver.check()
    assert receiver.counters().unique_received == 0


def test_the_client_refuses_to_send_a_field_or_shape_it_did_not_declare():
    table = submitted_table(1)
    receiver = Receiver(
        table=table,
        sink=BufferSink(FIFOBuffer(4, 0, 3, 4, 0), table, 2, 0.1),
        token=protocol.new_token(),
        secret=protocol.new_secret(),
        fields={"u": (4,)},
        wire_dtype="float32",
        n_steps=2,
        host="127.0.0.1",
    )
    receiver.start()
    try:
        with client.connect(
            server=receiver.control_address, token=receiver.token, sim_id=0, timeout=10, fields={"u": (4,)}
        ) as sim:
            with pytest.raises(ValueError, match="field 'v' was not declared"):
                sim.send("v", 0, np.zeros(4))
            with pytest.raises(ValueError, match=r"declared with shape \(4,\).*shape \(5,\)"):
                sim.send("u", 0, np.zeros(5))
            sim.send("u", 0, np.zeros(4))
            sim.send("u", 1, np.ones(4))
        wait_until(lambda: receiver.counters().unique_received == 2, 10, "both steps")
    finally:
        receiver.stop()
    receiver.check()


def test_the_assembler_abandons_the_oldest_incomplete_step_when_full():
    assembler = StepAssembler({"a": 2, "b": 1}, slots=2)
    assert assembler.add(0, 0, "a", np.ones(2))[1] is None
    assert assembler.add(0, 1, "a", np.ones(2))[1] is None
    slot, abandoned = assembler.add(0, 2, "b", np.full(1, 3.0))
    assert abandoned == (0, 0, ("b",)) and assembler.pending == 2
    slot, _ = assembler.add(0, 2, "a", np.full(2, 2.0))
    assert assembler.complete(slot)
    np.testing.assert_array_equal(assembler.row(slot), [2.0, 2.0, 3.0])
    assembler.release(0, 2)
    assert assembler.drop_simulation(0) == 1 and assembler.pending == 0


def study_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"study.output_dir='{tmp_path / 'runs'}'", f"study.cache_dir='{tmp_path / 'cache'}'", *extra]


def test_the_burgers_study_trains_two_fields_and_the_saved_surrogate_predicts_them(tmp_path):
    """The README's 'Bring your own solver' experiment, a little smaller: two fields, below 5 % of the baseline."""
    config = load_config(ROOT / "experiments/burgers.toml", study_overrides(tmp_path, "study.n_simulations=60"))
    run_dir, summary = run(config, show_progress=False)
    assert summary["rejected"] == {} and summary["incomplete_simulations"] == {}
    assert summary["unique_samples_received"] == 60 * config.solver.n_steps
    assert summary["final_validation_mse"] < 0.05 * summary["mean_field_validation_mse"], summary
    assert set(summary["final_validation_field_mse"]) == {"u", "dudx"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert set(records[-1]["val_field_mse"]) == {"u", "dudx"}  # strict JSON, per-field losses logged

    model = surrogate.load(run_dir)
    fields = model.predict([[1.0, 0.15], [0.6, 0.1]], model.step_times([0, 39]))
    assert fields["u"].shape == (2, 2, 128) and fields["dudx"].shape == (2, 2, 128)
    sys.path.insert(0, str(ROOT / "solvers"))
    import burgers

    exact = list(burgers.simulate([1.0, 0.15], 128, 40, 0.05))[39][0]
    assert np.sqrt(np.mean((fields["u"][0, 1] - exact) ** 2)) < 0.05 * np.ptp(exact)

    written = {path.name for path in plot.plot_run(run_dir)}
    assert {"prediction_u.png", "prediction_dudx.png", "loss.png"} <= written

    result = subprocess.run(
        [sys.executable, "-m", "jaxsurro.predict", str(run_dir), "--validation"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    reproduced = float(result.stdout.split()[2])
    assert math.isclose(reproduced, summary["final_validation_mse"], rel_tol=0, abs_tol=1e-6), result.stdout


@pytest.mark.parametrize("mode", ["declare", "undeclared"])
def test_a_solver_sending_an_undeclared_field_stops_the_run_naming_it(tmp_path, mode):
    command = f"['{{python}}', 'tests/solvers/extra_field.py', '{{grid_size}}', '{{n_steps}}', '{{dt}}', '{mode}']"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurro.run",
            "experiments/burgers.toml",
            "--no-progress",
            f"--set=solver.command={command}",
            *(f"--set={o}" for o in study_overrides(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bogus" in result.stderr and "[[solver.fields]]" in result.stderr, result.stderr


def test_a_run_whose_values_break_the_declared_bounds_stops_instead_of_training_on_them(tmp_path):
    """Temperatures span [100, 500]; bounds of [100, 200] reject most steps as out_of_bounds: the run stops early."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurro.run",
            "experiments/heat.toml",
            "--no-progress",
            "--set=solver.fields=[{name='temperature', shape=['{grid_size}', '{grid_size}'], bounds=[100.0, 200.0]}]",
            "--set=study.n_simulations=12",
            "--set=solver.grid_size=8",
            "--set=train.n_validation=2",
            *(f"--set={o}" for o in study_overrides(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "out_of_bounds" in result.stderr and "outside its declared bounds [100.0, 200.0]" in result.stderr
