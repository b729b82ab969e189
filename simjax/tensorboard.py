"""TensorBoard event files for a run: every logged scalar and every sample image, per stage.

Events go to `workdir/tensorboard/<stage>/` (stage 'teacher' or 'sim'), written by process 0 only:
  tensorboard --logdir workdirs/digits/tensorboard

A resumed run opens a new events file with TensorBoard's purge step set to the step after the
restored checkpoint, so the viewer drops what the killed run logged past it (metrics.jsonl is cut
back the same way). On an object store (gs://) the events are written to a local directory and each
file is copied whole into the workdir at `sync()` (before every checkpoint) and at close.
"""
import atexit
import importlib
import numbers
import os
import shutil
import tempfile
import threading
import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np
from etils import epath

from simjax import storage

SUBDIR = "tensorboard"


class StageWriter:
  """The events of one stage; the file is created lazily, at the first scalar or image."""

  def __init__(self, workdir, stage: str):
    # tensorboardX's package import pulls in torch where it is installed (~3 s here): paid now, before a
    # training loop starts, not at its first logged step, where it would stall the host while the device idles.
    importlib.import_module("tensorboardX.summary")
    self.target = epath.Path(workdir) / SUBDIR / stage
    self.remote = storage.is_remote(self.target)
    self.purge_step: Optional[int] = None
    self._writer = None
    self._local_dir = None

  def _open(self):
    """The events file, written synchronously (tensorboardX's own writer queues events on a thread,
    so its flush would not make them durable before a checkpoint)."""
    if self._writer is None:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=import-outside-toplevel
      from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
      if self.remote:
        self._local_dir = tempfile.mkdtemp(prefix="simjax-tb-")
        logdir = self._local_dir
      else:
        self.target.mkdir(parents=True, exist_ok=True)
        logdir = os.fspath(self.target)
      # The default name has one-second resolution: a resume within the same second would reopen (and
      # truncate) the killed run's file. TensorBoard reads files in name order, which this keeps.
      self._writer = EventsWriter(os.path.join(logdir, "events"), f".{time.time_ns()}")
      if self.purge_step is not None:  # what TensorBoard reads as "drop earlier events from this step on"
        self._writer.write_event(event_pb2.Event(step=self.purge_step, wall_time=time.time(),
                                                 session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    return self._writer

  def _write(self, step: int, summary, walltime: Optional[float]):
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    self._open().write_event(event_pb2.Event(step=int(step), wall_time=walltime or time.time(), summary=summary))

  def resume_at(self, step: int):
    """Events past `step` (a killed run's, after its last checkpoint) are dropped by the viewer."""
    self.purge_step = int(step) + 1 if step else None
    if self._writer is not None:  # reopened so the purge is recorded in the next events file
      self.close()

  def scalars(self, step: int, row: dict, walltime: Optional[float] = None):
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    for key, value in row.items():
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        continue  # strings ("nan"), lists and flags are in metrics.jsonl only
      self._write(step, summary.scalar(key, float(value)), walltime)

  def image(self, step: int, tag: str, image):
    """`image`: a PIL image or a uint8 array [H, W, C]."""
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.uint8)
    self._write(step, summary.image(tag, pixels, dataformats="HWC"), None)

  def sync(self):
    if self._writer is None:
      return
    self._writer.flush()
    if self.remote:
      for name in sorted(os.listdir(self._local_dir)):
        with open(os.path.join(self._local_dir, name), "rb") as f:
          storage.atomic_write_bytes(self.target / name, f.read())

  def close(self):
    if self._writer is None:
      return
    self.sync()
    self._writer.close()
    self._writer = None
    if self._local_dir:
      shutil.rmtree(self._local_dir, ignore_errors=True)


_WRITERS: Dict[Tuple[str, str], StageWriter] = {}
_LOCK = threading.Lock()


def for_stage(workdir, stage: str) -> Optional[StageWriter]:
  """The one writer of (workdir, stage) in this process; None on processes other than 0."""
  if jax.process_index() != 0:
    return None
  with _LOCK:
    key = (os.fspath(workdir), stage)
    if key not in _WRITERS:
      _WRITERS[key] = StageWriter(workdir, stage)
    return _WRITERS[key]


def image(workdir, stage: str, step: int, tag: str, picture):
  """One image of (workdir, stage) at `step`, from process 0 (a no-op elsewhere)."""
  writer = for_stage(workdir, stage)
  if writer is not None:
    writer.image(step, tag, picture)


def scalars(workdir, stage: str, step: int, row: dict):
  """The numbers of `row` as scalars of (workdir, stage) at `step`, from process 0 (a no-op elsewhere)."""
  writer = for_stage(workdir, stage)
  if writer is not None:
    writer.scalars(step, row)


def close_all():
  with _LOCK:
    writers = list(_WRITERS.values())
    _WRITERS.clear()
  for writer in writers:
    writer.close()


atexit.register(close_all)
