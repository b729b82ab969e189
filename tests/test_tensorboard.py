"""TensorBoard events: every metrics row's numbers, images, and a resume that TensorBoard shows exactly."""
import json

import numpy as np
import pytest

from simjax import tensorboard
from simjax.training import loop as loop_lib
from tensorboard_events import read_events, scalars_and_images


def rows(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_metric_rows_go_to_tensorboard_and_a_resume_purges_what_the_killed_run_logged(tmp_path):
  writer = loop_lib.MetricWriter(tmp_path, stage="sim")
  writer.truncate_after(0)  # a fresh stage, as open_stage does
  for step in (10, 20, 30):
    writer.write(step, {"gen_loss": np.float32(step), "nonfinite": "nan", "flag": True})
  tensorboard.image(tmp_path, "sim", 30, "samples/grid", np.full((4, 6, 3), 200, np.uint8))
  tensorboard.close_all()  # the killed run: its rows past the checkpoint at 20 are stale

  writer = loop_lib.MetricWriter(tmp_path, stage="sim")
  writer.truncate_after(20)  # restored from the checkpoint at step 20
  for step in (30, 40):
    writer.write(step, {"gen_loss": np.float32(-step)})
  tensorboard.close_all()

  got = rows(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in got] == [10, 20, 30, 40]
  assert {r["stage"] for r in got} == {"sim"} and all(isinstance(r["time"], float) for r in got)
  logdir = tmp_path / "tensorboard" / "sim"
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert len(files) == 2, files
  scalars, images = scalars_and_images(logdir)
  assert scalars["gen_loss"] == {10: 10.0, 20: 20.0, 30: -30.0, 40: -40.0}, scalars
  assert set(scalars) == {"gen_loss"}, "strings and flags stay in metrics.jsonl"
  assert images == {"samples/grid": []}, "the killed run's image at step 30 is past the purge"
  # Without the purge the stale step-30 value and image are what the first file holds.
  first = [(v.tag, v.simple_value) for e in read_events(files[0]) for v in e.summary.value if e.step == 30]
  assert first == [("gen_loss", 30.0), ("samples/grid", 0.0)], first


def test_images_are_logged_per_stage(tmp_path):
  tensorboard.image(tmp_path, "teacher", 5, "samples/grid", np.zeros((8, 8, 3), np.uint8))
  tensorboard.close_all()
  _, images = scalars_and_images(tmp_path / "tensorboard" / "teacher")
  assert images == {"samples/grid": [5]}


def test_an_object_store_workdir_gets_the_events_copied_whole_at_sync(tmp_path, monkeypatch):
  written = {}
  monkeypatch.setattr(tensorboard.storage, "is_remote", lambda path: True)
  monkeypatch.setattr(tensorboard.storage, "atomic_write_bytes", lambda path, data: written.__setitem__(str(path), data))
  board = tensorboard.StageWriter("gs://bucket/run", "sim")
  board.scalars(7, {"gen_loss": 1.5})
  board.sync()
  assert list(written) and all(k.startswith("gs://bucket/run/tensorboard/sim/events.out.tfevents.") for k in written)
  board.close()
  (name, data), = written.items()
  local = tmp_path / name.rsplit("/", 1)[1]
  local.write_bytes(data)
  assert scalars_and_images(tmp_path)[0] == {"gen_loss": {7: 1.5}}


@pytest.fixture(autouse=True)
def _no_open_writers():
  yield
  tensorboard.close_all()
