"""TensorBoard events on resume: a killed run's tail is hidden, not doubled.

TensorBoard itself is not installed here; the events are read back with
tensorboardX's own protobufs. What TensorBoard does with them is its
documented rule: a ``SessionLog.START`` at step T in a newer file hides
every older event at steps >= T (tensorboardX's ``purge_step``).
"""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from rebll_jax import reporting


def _events(path):
  """Every Event of one TFRecord file (length, crc, data, crc)."""
  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event()
      event.ParseFromString(f.read(length))
      f.read(4)
      events.append(event)
  return events


def test_a_resumed_writer_hides_the_killed_runs_tail(tmp_path):
  first = reporting.Writer(str(tmp_path))
  for step in range(1, 6):  # killed after step 5, last checkpoint at 3
    first.write(step, {"loss": float(step)})
  first.close()
  resumed = reporting.Writer(str(tmp_path), resumed_step=3)
  for step in (4, 5):
    resumed.write(step, {"loss": 10.0 + step})
  resumed.close()
  files = sorted(glob.glob(os.path.join(tmp_path, "tensorboard", "*")),
                 key=os.path.getmtime)
  assert len(files) == 2
  old, new = (_events(f) for f in files)
  starts = [e.step for e in new if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [4]  # TensorBoard hides old events from step 4 on
  assert [e.step for e in old if e.summary.value] == [1, 2, 3, 4, 5]
  assert [(e.step, e.summary.value[0].simple_value) for e in new
          if e.summary.value] == [(4, 14.0), (5, 15.0)]
