"""Reads TensorBoard event files back the way the viewer does (tests only; no TensorFlow needed)."""
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_events(path):
  """Every Event in one TFRecord events file, in order."""
  data, events, at = Path(path).read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    record = data[at + 12:at + 12 + length]  # after the length and its CRC
    at += 12 + length + 4  # and the record's CRC
    event = event_pb2.Event()
    event.ParseFromString(record)
    events.append(event)
  return events


def scalars_and_images(logdir):
  """{tag: {step: value}} and {tag: [steps]} as TensorBoard shows them: files in order, a purge step
  (a SessionLog START at step s) dropping what earlier files logged at steps >= s."""
  scalars, images = {}, {}
  for path in sorted(Path(logdir).glob("events.out.tfevents.*")):  # name order, as TensorBoard reads them
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START and event.step:
        for series in scalars.values():
          for step in [s for s in series if s >= event.step]:
            del series[step]
        for steps in images.values():
          steps[:] = [s for s in steps if s < event.step]
      for value in event.summary.value:
        if value.HasField("image"):
          images.setdefault(value.tag, []).append(event.step)
        elif value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars, images
