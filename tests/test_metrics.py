"""The metrics lines and the run summary built from the ranks' counters (jaxsurro.server.metrics)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurro.config import load_config
from jaxsurro.server import metrics
from jaxsurro.server.buffers import BufferStats
from jaxsurro.server.evaluation import Evaluation
from jaxsurro.server.metrics import MetricsLog, RankCounters, RatePoint
from jaxsurro.server.progress import Progress
from jaxsurro.server.receiver import ReceiverCounters
from jaxsurro.server.training_log import TrainingLog

ROOT = Path(__file__).resolve().parents[1]

# The keys that jaxsurro.plot, the tests and users' scripts read, in the order they are written.
RECORD_KEYS = [
    "kind",
    "time",
    "batch",
    "samples_trained",
    "train_loss",
    "learning_rate",
    "received",
    "received_per_s",
    "trained_per_s",
    "buffer_population",
    "buffer_capacity",
    "duplicates",
    "rejected",
    "simulations",
]
SUMMARY_KEYS = [
    "simulations_planned",
    "simulations_finished",
    "simulations_failed",
    "time_steps_per_simulation",
    "unique_samples_received",
    "expected_samples",
    "duplicates",
    "rejected",
    "batches",
    "samples_trained",
    "repetition_histogram",
    "mean_repetitions",
    "final_validation_mse",
    "incomplete_simulations",
    "received_samples_per_s",
    "trained_samples_per_s",
    "training_wall_time_s",
    "buffer",
    "server_ranks",
    "devices_per_rank",
]
SIMULATIONS = {"running": 2, "done": 3, "failed": 0}


def rank(
    received: int = 10,
    trained: int = 20,
    rejected: dict[str, int] | None = None,
    population: int = 5,
    span: float = 2.0,
    histogram: tuple[int, ...] | None = None,
    digest: str | None = None,
) -> RankCounters:
    return RankCounters(
        received=received,
        duplicates=1,
        rejected=rejected or {},
        buffer_population=population,
        samples_trained=trained,
        reception_seconds=span,
        repetition_histogram=histogram,
        parameter_digest=digest,
    )


def one_record(kind: str, ranks: list[RankCounters], **overrides) -> dict:
    arguments = dict(
        now=11.0,
        start=1.0,
        since=RatePoint(9.0, 4, 10),
        steps=7,
        train_loss=0.5,
        learning_rate=1e-3,
        buffer_capacity=100,
        simulations=SIMULATIONS,
        val_mse=0.25,
    )
    arguments.update(overrides)
    return metrics.record(kind, ranks, **arguments)


def test_aggregate_sums_the_ranks_and_merges_rejections_by_reason():
    totals = metrics.aggregate(
        [rank(rejected={"bad_token": 1}), rank(received=3, rejected={"bad_token": 2, "non_finite": 1})]
    )
    assert (totals.received, totals.samples_trained, totals.duplicates, totals.buffer_population) == (13, 40, 2, 10)
    assert totals.rejected == {"bad_token": 3, "non_finite": 1}


def test_a_train_record_has_the_documented_keys_and_rates_since_the_previous_one():
    entry = one_record("train", [rank()])
    assert list(entry) == RECORD_KEYS
    assert entry["time"] == 10.0 and entry["batch"] == 7 and entry["simulations"] == SIMULATIONS
    assert entry["received_per_s"] == pytest.approx((10 - 4) / 2.0)
    assert entry["trained_per_s"] == pytest.approx((20 - 10) / 2.0)
    assert metrics.rate_point(entry, 11.0) == RatePoint(11.0, 10, 20)
    json.dumps(entry)  # a JSON line


def test_a_validation_record_of_several_ranks_adds_val_mse_and_per_rank_counts():
    entry = one_record("validation", [rank(received=4, population=1), rank(received=6, population=2)])
    assert list(entry) == [*RECORD_KEYS, "buffer_population_per_rank", "received_per_rank", "val_mse"]
    assert entry["buffer_population_per_rank"] == [1, 2] and entry["received_per_rank"] == [4, 6]
    assert entry["val_mse"] == 0.25 and entry["received"] == 10


def test_rank_counters_from_receiver_and_buffer_snapshots():
    receiver = ReceiverCounters(
        unique_received=3,
        duplicates=1,
        bytes_received=12,
        finishes=1,
        rejected={"bad_token": 2},
        incomplete={4: (3, 10)},
        first_data_at=5.0,
        last_data_at=7.5,
        last_message_at=8.0,
    )
    buffer = BufferStats(population=2, capacity=10, received=3, unseen=1, evicted=1, drawn=4, reception_over=False)
    counters = metrics.rank_counters(
        receiver, buffer, 4, repetition_histogram=np.array([0, 2, 1]), parameter_digest="abc"
    )
    assert counters == RankCounters(3, 1, {"bad_token": 2}, 2, 4, 2.5, (0, 2, 1), "abc", ((4, 3, 10),))
    silent = receiver._replace(first_data_at=None, last_data_at=None)
    assert metrics.rank_counters(silent, buffer, 0).reception_seconds == 0.0


def summary_of(ranks: list[RankCounters], **overrides) -> dict:
    arguments = dict(
        steps=9,
        val_mse=0.125,
        wall=4.0,
        simulations_planned=6,
        simulations_finished=5,
        simulations_failed=1,
        time_steps_per_simulation=10,
        buffer_kind="reservoir",
        devices_per_rank=1,
    )
    arguments.update(overrides)
    return metrics.summary(ranks, **arguments)


def test_the_summary_of_one_rank():
    summary = summary_of([rank(received=50, trained=120, span=5.0, histogram=(0, 30, 20), digest="d0")])
    assert list(summary) == [*SUMMARY_KEYS, "parameter_digest"]
    assert summary["unique_samples_received"] == 50 and summary["expected_samples"] == 50
    assert summary["repetition_histogram"] == {"1": 30, "2": 20}
    assert summary["mean_repetitions"] == pytest.approx((30 + 40) / 50)
    assert summary["received_samples_per_s"] == pytest.approx(10.0)
    assert summary["trained_samples_per_s"] == pytest.approx(30.0)
    assert summary["server_ranks"] == 1 and summary["parameter_digest"] == "d0"
    json.dumps(summary)


def test_the_summary_of_several_ranks_merges_histograms_and_lists_each_rank():
    ranks = [
        rank(received=4, span=1.0, histogram=(1, 3), digest="same"),
        rank(received=6, span=3.0, histogram=(0, 2, 0, 4), digest="same"),
    ]
    summary = summary_of(ranks, breed_rounds=[{"round": 1}], simulations_bred=2)
    assert list(summary) == [*SUMMARY_KEYS, "ranks", "parameter_digest", "breed_rounds", "simulations_bred"]
    assert summary["repetition_histogram"] == {"0": 1, "1": 5, "3": 4}
    assert summary["received_samples_per_s"] == pytest.approx(10 / 3.0)  # over the longest reception
    assert [r["unique_samples_received"] for r in summary["ranks"]] == [4, 6]
    assert summary["server_ranks"] == 2 and summary["breed_rounds"] == [{"round": 1}]


def test_the_summary_needs_the_final_counters():
    with pytest.raises(ValueError, match="repetition histogram"):
        summary_of([rank()])


def test_parameter_digest_tells_bitwise_equal_parameters():
    params = {"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    same = {"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    assert metrics.parameter_digest(params) == metrics.parameter_digest(same)
    same["b"][0] = np.float32(1e-30)
    assert metrics.parameter_digest(params) != metrics.parameter_digest(same)


def test_metrics_log_writes_one_json_object_per_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(one_record("train", [rank()]))
    log.write(one_record("validation", [rank()]))
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "validation"]


def test_undefined_values_are_written_as_null_and_the_file_is_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(one_record("train", [rank()]) | {"train_loss": float("nan"), "learning_rate": float("inf")})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not strict JSON"))
    assert record["train_loss"] is None and record["learning_rate"] is None


def read_events(directory) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in TensorBoard event files: TFRecord framing around Event protos."""
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            scalars += [(event.step, value.tag, value.simple_value) for value in event.summary.value]
    return scalars


def test_tensorboard_event_files_hold_the_records_scalars(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tensorboard")
    first = one_record("train", [rank()]) | {"batch": 10, "train_loss": 0.5}
    log.write(first | {"train_field_loss": {"u": 0.25, "v": 0.75}})
    log.write(one_record("validation", [rank()]) | {"batch": 20, "val_mse": 0.125, "train_loss": float("nan")})
    log.close()
    scalars = read_events(tmp_path / "tensorboard")
    assert (10, "loss/train", 0.5) in scalars and (20, "loss/validation", 0.125) in scalars
    assert (10, "loss/train_u", 0.25) in scalars and (10, "loss/train_v", 0.75) in scalars
    assert not [s for s in scalars if s[0] == 20 and s[1] == "loss/train"]  # undefined values are left out


def test_a_high_rejection_rate_warns_then_stops_the_run():
    line = {"received": 94, "duplicates": 0, "rejected": {"out_of_bounds": 5, "bad_token": 1}}
    warnings, stop = metrics.rejection_alarm(line, alarm=0.01, stop=0.25, minimum=100)
    assert stop is None and len(warnings) == 1 and "out_of_bounds" in warnings[0]  # 5 %: alarm; 1 %: not above
    line = {"received": 60, "duplicates": 0, "rejected": {"out_of_bounds": 40}}
    _, stop = metrics.rejection_alarm(line, alarm=0.01, stop=0.25, minimum=100)
    assert stop is not None and "40 of 100 messages (40%) were rejected as out_of_bounds" in stop
    _, early = metrics.rejection_alarm({**line, "received": 50}, alarm=0.01, stop=0.25, minimum=100)
    assert early is None  # 90 messages: too few to stop on


def test_a_training_log_fetches_the_dispatched_steps_keeps_the_best_validation_and_writes_lines(tmp_path):
    """The online and offline loops' log: the line's loss is the mean of the steps dispatched since the
    last line, the learning rate the last one's, and the minimum validation MSE survives a worse one."""
    config = load_config(ROOT / "experiments" / "heat.toml")
    metrics_log = MetricsLog(tmp_path / "metrics.jsonl")
    log = TrainingLog(config, metrics_log, Progress(100, stream=io.StringIO(), interactive=False), interval=0.5)
    for loss, rate in ((0.4, 1e-3), (0.2, 5e-4)):
        log.wait_for_room()
        log.dispatched({"loss": jnp.float32(loss), "field_loss": jnp.array([loss]), "learning_rate": jnp.float32(rate)})
    log.validated(Evaluation(0.03, (0.03,)))
    log.validated(Evaluation(0.05, (0.05,)))
    log.fetch()
    entry = log.write(
        "validation", [rank()], steps=2, buffer_capacity=10, simulations={"running": 1, "done": 0, "failed": 0}
    )
    metrics_log.close()
    assert entry["train_loss"] == pytest.approx(0.3) and entry["learning_rate"] == pytest.approx(5e-4)
    assert (log.val_mse, log.min_val_mse) == (0.05, 0.03)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["val_mse"] == 0.05
    assert not log.due(log.since.time + 0.4) and log.due(log.since.time + 0.5)
