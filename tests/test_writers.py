"""Writers produce readable files; the progress logger computes the right speeds."""

import json
import logging
import struct
import subprocess
import sys

import numpy as np
import pytest

from stagejax.runtime import writers
from tests.conftest import REPO


def _read_events(path):
    """Parses a TFRecord-framed event file (length, crc, payload, crc) with tensorboardX's proto."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
    return events


def test_jsonl_contents_and_append_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = writers.JsonlWriter(path)
    w.write_scalars(10, {"loss": np.float32(1.5), "accuracy": np.array(0.25)})
    w.close()
    # A resumed run opens a new writer on the same file: lines are appended.
    w2 = writers.JsonlWriter(path)
    w2.write_scalars(20, {"loss": 0.5})
    w2.close()

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2
    assert records[0]["step"] == 10 and records[0]["loss"] == 1.5
    assert records[0]["accuracy"] == 0.25
    assert isinstance(records[0]["wall_time"], float)
    assert records[1]["step"] == 20 and records[1]["loss"] == 0.5
    assert records[1]["wall_time"] >= records[0]["wall_time"]
    with pytest.raises(ValueError, match="reserved"):
        w2.write_scalars(30, {"step": 1.0})


def test_tensorboard_event_file_is_readable(tmp_path):
    w = writers.TensorBoardWriter(tmp_path / "tb")
    w.write_scalars(3, {"train/loss": 2.5})
    w.write_scalars(4, {"train/loss": np.float32(2.0)})
    w.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars = []
    for event in _read_events(files[0]):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.append((event.step, value.tag, value.simple_value))
    assert scalars == [(3, "train/loss", 2.5), (4, "train/loss", 2.0)]


def test_tensorboard_writer_never_imports_torch(tmp_path):
    """tensorboardX imports torch when it is installed (3.4 s per training start); the
    writer keeps it out, and torch still imports normally afterwards."""
    code = (
        "import sys; from stagejax.runtime import writers; "
        f"writers.TensorBoardWriter({str(tmp_path)!r}).close(); "
        "print('torch' in sys.modules, sys.modules.get('torch', 0) is None)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "False"]


def test_multiwriter_and_create_writers(tmp_path):
    w = writers.create_writers(tmp_path, just_logging=False)
    w.write_scalars(1, {"x": 1.0})
    w.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["x"] == 1.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    other = tmp_path / "other"
    w = writers.create_writers(other, just_logging=True)  # non-zero process
    w.write_scalars(1, {"x": 1.0})
    w.close()
    assert not other.exists()
    assert [type(x) for x in w.writers] == [writers.ConsoleWriter]


def test_console_writer_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger=writers.__name__):
        writers.ConsoleWriter().write_scalars(7, {"b": 2.0, "a": np.float32(0.5)})
    assert [r.getMessage() for r in caplog.records] == ["[7] a=0.5, b=2"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_logger_with_fake_clock():
    clock = FakeClock()
    progress = writers.ProgressLogger(
        total_steps=100, global_batch_size=12, every_steps=5, window=10, clock=clock
    )
    # Step 1 took 30 s (compilation): the first call only starts the clock.
    clock.now += 30.0
    assert progress(1) == {}
    durations = {2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}
    out = None
    for step in range(2, 6):
        clock.now += durations[step]
        out = progress(step)
        if step < 5:
            assert out == {}  # not a logging step
    assert out["steps_per_sec"] == pytest.approx(2.0)
    assert out["images_per_sec"] == pytest.approx(24.0)
    assert out["eta_seconds"] == pytest.approx(95 * 0.5)

    # An evaluation pause of 60 s in one interval does not move the median.
    for step in range(6, 11):
        clock.now += 60.0 if step == 7 else 0.25
        out = progress(step)
    # intervals: 4 x 0.5, 4 x 0.25, 1 x 60 -> median 0.5
    assert out["steps_per_sec"] == pytest.approx(2.0)
    assert out["eta_seconds"] == pytest.approx(90 * 0.5)


def test_progress_logger_sparse_calls_and_last_step():
    clock = FakeClock()
    progress = writers.ProgressLogger(
        total_steps=25, global_batch_size=4, every_steps=10, clock=clock
    )
    assert progress(0) == {}  # e.g. the loop calls it only at logging steps
    clock.now += 20.0  # 10 steps in 20 s
    out = progress(10)
    assert out["steps_per_sec"] == pytest.approx(0.5)
    assert out["images_per_sec"] == pytest.approx(2.0)
    assert out["eta_seconds"] == pytest.approx(30.0)
    clock.now += 10.0
    out = progress(25)  # last step logs even off the every_steps grid
    assert out["eta_seconds"] == 0.0
    assert out["steps_per_sec"] == pytest.approx(0.75)  # median of 2 s/step and 2/3 s/step
    assert progress(25) == {}  # no duplicate line for the same step
