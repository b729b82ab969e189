"""The step loop every trainer shares: metrics, checkpoints, preemption, the non-finite stop, progress.

Inside the loop nothing waits on the device except at the logging interval, where the metrics of
that step are copied to the host asynchronously and written one step later.
"""
import json
import logging
import math
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Tuple

import jax
import numpy as np
from etils import epath


class NonFiniteError(RuntimeError):
  pass


class MetricWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir, filename="metrics.jsonl"):
    self.path = epath.Path(workdir) / filename
    self.enabled = jax.process_index() == 0

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_json(v) for k, v in metrics.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def truncate_after(self, step: int):
    """Drops rows past `step` (left by a run killed after logging but before its next checkpoint),
    so a resumed run's log equals an uninterrupted one."""
    if not self.enabled or not self.path.exists():
      return
    rows = [l for l in self.path.read_text().splitlines() if l.strip()]
    kept = []
    for l in rows:
      try:
        if json.loads(l)["step"] <= step:
          kept.append(l)
      except (ValueError, KeyError):
        break  # a torn last line from a kill mid-write
    self.path.write_text("".join(l + "\n" for l in kept))


def _to_json(v):
  v = np.asarray(v)
  if v.ndim == 0:
    x = v.item()
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)
  return v.tolist()


class PreemptionFlag:
  """SIGTERM/SIGINT set a flag the loop polls; the loop then checkpoints and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    logging.warning("received signal %d: checkpointing and exiting", signum)
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_loop(*, state, step_fn: Callable[[int], Callable], consts, num_steps: int, checkpointer, writer: MetricWriter,
             log_every: int, max_nonfinite_streak: int, stage: str,
             hooks: Sequence[Tuple[int, Callable]] = (), progress_keys: Sequence[str] = ()) -> Tuple[object, str]:
  """Runs steps until `num_steps`; returns (state, 'done' | 'preempted').

  step_fn(step) returns the compiled step for that step number (e.g. without the generator update
  during a warm-up); hooks are (every, fn(step, state)) run after the step that reaches a multiple.
  """
  step = int(jax.device_get(state.step))
  start_step, t_start = step, time.time()
  t_log, step_log = t_start, step
  pending: Optional[Tuple[int, dict, float]] = None
  is_main = jax.process_index() == 0

  def flush():
    nonlocal pending
    if pending is None:
      return
    p_step, p_metrics, p_rate = pending
    pending = None
    host = jax.device_get(p_metrics)
    host["steps_per_sec"] = p_rate
    writer.write(p_step, host)
    if int(host.get("nonfinite_streak", 0)) >= max_nonfinite_streak:
      raise NonFiniteError(
          f"{stage}: {max_nonfinite_streak} consecutive steps had a non-finite loss or gradient (up to step {p_step}); "
          "the last good checkpoint is kept. Lower the learning rate or check the teacher, then resume.")
    if is_main:
      done = p_step - start_step
      eta = (num_steps - p_step) / max(p_rate, 1e-9)
      shown = " ".join(f"{k}={float(host[k]):.4g}" for k in progress_keys if k in host)
      print(f"[{stage}] step {p_step}/{num_steps} ({100 * p_step / max(num_steps, 1):.1f}%) {shown} "
            f"| {p_rate:.2f} steps/s | ETA {format_duration(eta)} | {done} steps this run", flush=True)

  with PreemptionFlag() as preempt:
    while step < num_steps:
      state, metrics = step_fn(step)(state, consts)
      step += 1
      flush()  # the previous log step's metrics are on the host by now
      if step % log_every == 0 or step == num_steps:
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        for v in jax.tree.leaves(metrics):
          v.copy_to_host_async()
        pending = (step, metrics, rate)
      if step % checkpointer.interval == 0 or step == num_steps:
        flush()  # never checkpoint past an unnoticed non-finite stop
        checkpointer.save(step, state, force=True)
      for every, hook in hooks:
        if every and step % every == 0:
          hook(step, state)
      if preempt.requested or checkpointer.reached_preemption(step):
        flush()
        checkpointer.save(step, state, force=True)
        checkpointer.wait()
        logging.warning("%s: preempted at step %d; checkpoint saved", stage, step)
        return state, "preempted"
    flush()
  checkpointer.wait()
  if is_main:
    print(f"[{stage}] finished {num_steps} steps in {format_duration(time.time() - t_start)}", flush=True)
  sys.stdout.flush()
  return state, "done"
