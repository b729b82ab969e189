"""The step loop every trainer shares: metrics, checkpoints, preemption, the non-finite stop, progress.

Inside the loop nothing waits on the device except at the logging interval, where the metrics of
that step are copied to the host asynchronously and written one step later.
"""
import collections
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import storage, tensorboard


class NonFiniteError(RuntimeError):
  pass


class MetricWriter:
  """One JSON object per logged step in workdir/metrics.jsonl (process 0 only), through `storage.TextLog`:
  appended locally, rewritten whole on an object store at `sync()` (before every checkpoint). Every row
  carries its `stage` and wall-clock `time` (Unix seconds); its numbers also go to TensorBoard
  (workdir/tensorboard/<stage>/, simjax/tensorboard.py)."""

  def __init__(self, workdir, filename="metrics.jsonl", stage: str = "sim"):
    self.log = storage.TextLog(epath.Path(workdir) / filename)
    self.path = self.log.path
    self.stage = stage
    self.enabled = jax.process_index() == 0
    self.tensorboard = tensorboard.for_stage(workdir, stage)  # None off process 0, like `enabled`

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    now = time.time()
    row = {"step": int(step), "stage": self.stage, "time": round(now, 3)}
    row.update({k: _to_json(v) for k, v in metrics.items()})
    self.log.append(json.dumps(row) + "\n")
    self.tensorboard.scalars(step, {k: v for k, v in row.items() if k not in ("step", "time")}, walltime=now)

  def sync(self):
    if self.enabled:
      self.log.sync()
      self.tensorboard.sync()

  def truncate_after(self, step: int):
    """Drops rows past `step` (left by a run killed after logging but before its next checkpoint),
    so a resumed run's log equals an uninterrupted one (TensorBoard: a purge from step + 1)."""
    if not self.enabled:
      return
    self.tensorboard.resume_at(step)
    if not self.path.exists():
      return
    text = self.log.read()
    kept = []
    for l in text.splitlines():
      try:
        if json.loads(l)["step"] <= step:
          kept.append(l)
      except (ValueError, KeyError, TypeError):
        break  # a torn last line from a kill mid-write
    new_text = "".join(l + "\n" for l in kept)
    if new_text != text:  # rewritten atomically: a kill here must not lose the rows we keep
      self.log.replace(new_text)


def _to_json(v):
  v = np.asarray(v)
  if v.ndim == 0:
    x = v.item()
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)
  return v.tolist()


class Preempted(BaseException):
  """SIGTERM/SIGINT outside the step loop (setup, evaluation): nothing to save, so unwind and exit 0.

  A BaseException, like KeyboardInterrupt, so that `except Exception` in fallback code (e.g. the
  checkpoint restore) does not mistake it for a bad file.
  """


class PreemptionFlag:
  """SIGTERM/SIGINT handling for a single-process run.

  Inside `deferred()` (the step loop) a signal only sets `requested`; the loop finishes its step,
  checkpoints and returns 'preempted'. Elsewhere the handler raises `Preempted`. A second signal
  ends the process at once (checkpoints are atomic, so this loses at most the unsaved steps).
  Multi-host runs leave SIGTERM to JAX's preemption service (`Checkpointer.reached_preemption`),
  which picks one step for every host; a local flag could stop the hosts at different steps.
  Used as a context manager it installs the handlers and defers (the old behaviour).
  """

  def __init__(self):
    self.requested = False
    self.signum = None
    self._old = {}
    self._defer_depth = 0

  @property
  def installed(self) -> bool:
    return bool(self._old)

  def _handler(self, signum, frame):
    del frame
    if self.requested:  # the user insists: die now, with the signal's own exit status
      logging.warning("second signal %d: exiting without a checkpoint", signum)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.requested, self.signum = True, signum
    if self._defer_depth:
      logging.warning("received signal %d: checkpointing after this step and exiting", signum)
    else:
      raise Preempted(signum)

  def install(self):
    if threading.current_thread() is threading.main_thread() and not self._old:
      signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
      for sig in signals:
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def uninstall(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  @contextlib.contextmanager
  def deferred(self):
    """Signals only set the flag inside this block; installs the handlers for its duration if needed."""
    owns = not self.installed
    if owns:
      self.install()
    self._defer_depth += 1
    try:
      yield self
    finally:
      self._defer_depth -= 1
      if owns:  # nobody outside acts on the flag: the next loop in this process starts afresh
        self.uninstall()
        self.requested, self.signum = False, None

  def __enter__(self):
    self._ctx = self.deferred()
    return self._ctx.__enter__()

  def __exit__(self, *exc):
    self._ctx.__exit__(*exc)
    return False


# The process's one flag: main installs it for the whole run; run_loop defers inside it.
PREEMPTION = PreemptionFlag()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StreakWatch:
  """Checks the non-finite streak of every step without waiting on the device.

  Each step's streak counter starts copying to the host as soon as the step is dispatched; counters that
  have arrived (`is_ready`) are read for free, so a streak over the limit stops the run within a step or
  two of reaching it, and the loop never blocks for it (log and checkpoint steps still check exactly).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.pending = collections.deque()

  def add(self, step: int, streak):
    if streak is None:
      return
    streak = jnp.copy(streak)  # its own buffer: the metrics dict may be donated or dropped
    streak.copy_to_host_async()
    self.pending.append((step, streak))

  def longest_arrived(self):
    """(step, streak) of the longest streak among the counters that have arrived, or None."""
    worst = None
    while self.pending and self.pending[0][1].is_ready():
      step, streak = self.pending.popleft()
      value = int(streak)
      if worst is None or value > worst[1]:
        worst = (step, value)
    return worst


def run_loop(*, state, step_fn: Callable[[int], Callable], consts, num_steps: int, checkpointer, writer: MetricWriter,
             log_every: int, max_nonfinite_streak: int, stage: str,
             hooks: Sequence[Tuple[int, Callable]] = (), progress_keys: Sequence[str] = ()) -> Tuple[object, str]:
  """Runs steps until `num_steps`; returns (state, 'done' | 'preempted').

  step_fn(step) returns the compiled step for that step number (e.g. without the generator update
  during a warm-up); consts are its frozen inputs, or consts(step) gives them (same shapes every step, e.g. a
  window of streamed prompt embeddings that is a function of the step, so a resumed run replays); hooks are (every, fn(step, state)) run after the step that reaches a multiple.

  Guarantees that make a killed run resume exactly: every metrics row up to a step is written
  before that step's checkpoint starts, so cutting the log back to the restored step
  (`MetricWriter.truncate_after`) reproduces an uninterrupted log; and no checkpoint is started
  for a state past `max_nonfinite_streak` skipped steps in a row (NonFiniteError instead). The streak is
  watched at every step (`StreakWatch`), so a run stops within a step or two of reaching the limit.
  """
  step = int(jax.device_get(state.step))
  start_step, t_start = step, time.time()
  eta_base = []  # (time, step) once the first step is compiled: the ETA excludes start-up and compilation
  t_log, step_log = t_start, step
  pending: Optional[Tuple[int, dict, float, object]] = None
  is_main = jax.process_index() == 0
  watch = StreakWatch(max_nonfinite_streak)

  def check_finite(at_step: int, longest_streak: int):
    if longest_streak >= max_nonfinite_streak:
      writer.sync()
      checkpointer.wait()  # let the last good save finish before naming it
      last = checkpointer.latest_step()
      raise NonFiniteError(
          f"{stage}: {longest_streak} consecutive steps had a non-finite loss or gradient (by step {at_step}; "
          f"limit max_nonfinite_streak={max_nonfinite_streak}); the last good checkpoint (step {last}) is kept. "
          "Lower the learning rate or check the teacher, then rerun to resume from it.")

  def flush():
    nonlocal pending
    if pending is None:
      return
    p_step, p_metrics, p_rate, p_longest = pending
    pending = None
    host = jax.device_get(p_metrics)
    host["steps_per_sec"] = p_rate
    writer.write(p_step, host)
    check_finite(p_step, max(int(host.get("nonfinite_streak", 0)), int(jax.device_get(p_longest))))
    if is_main:
      done = p_step - start_step
      # ETA from the mean rate since this run's step was compiled (compilation and start-up are not in
      # it); single intervals are jumpy because of hooks and checkpoints.
      t0, s0 = eta_base if eta_base else (t_start, start_step)
      mean_rate = (p_step - s0) / max(time.time() - t0, 1e-9) if p_step > s0 else p_rate
      eta = (num_steps - p_step) / max(mean_rate, 1e-9)
      shown = " ".join(f"{k}={float(host[k]):.4g}" for k in progress_keys if k in host)
      print(f"[{stage}] step {p_step}/{num_steps} ({100 * p_step / max(num_steps, 1):.1f}%) {shown} "
            f"| {p_rate:.2f} steps/s | ETA {format_duration(eta)} | {done} steps this run", flush=True)

  def longest_streak(s):
    # A device-side copy: `s` itself is donated to the next step before the host reads this.
    nonfinite = getattr(s, "nonfinite", None)
    return jnp.copy(nonfinite["max_streak"]) if nonfinite else jnp.zeros((), jnp.int32)

  def stop_for_preemption(s):
    flush()
    check_finite(step, int(jax.device_get(longest_streak(s))))
    writer.sync()
    checkpointer.save(step, s, force=True)  # a no-op if this step was just checkpointed
    checkpointer.wait()
    logging.warning("%s: preempted at step %d; checkpoint saved", stage, step)
    if is_main:
      print(f"[{stage}] preempted at step {step}: checkpoint saved; rerun the same command to resume", flush=True)
    return s, "preempted"

  with PREEMPTION.deferred() as preempt:
    if preempt.requested:  # signalled before the loop (an earlier stage): nothing new to save
      return state, "preempted"
    while step < num_steps:
      compiled = step_fn(step)  # the first call of a stage compiles its step
      if not eta_base:  # the ETA's and the first rate's clock start after compilation
        eta_base.extend([time.time(), step])
        t_log, step_log = eta_base
      state, metrics = compiled(state, consts(step) if callable(consts) else consts)
      step += 1
      watch.add(step, metrics.get("nonfinite_streak") if isinstance(metrics, dict) else None)
      arrived = watch.longest_arrived()
      if arrived is not None and arrived[1] >= max_nonfinite_streak:
        flush()  # the log up to here, then this step's row, so the log shows the streak that stopped the run
        if isinstance(metrics, dict):
          host = jax.device_get(metrics)
          host["steps_per_sec"] = (step - step_log) / max(time.time() - t_log, 1e-9)
          writer.write(step, host)
        check_finite(*arrived)
      flush()  # the previous log step's metrics are on the host by now
      if step % log_every == 0 or step == num_steps:
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        longest = longest_streak(state)
        for v in jax.tree.leaves((metrics, longest)):
          v.copy_to_host_async()
        pending = (step, metrics, rate, longest)
      if step % checkpointer.interval == 0 or step == num_steps:
        flush()  # never checkpoint past an unnoticed non-finite stop
        check_finite(step, int(jax.device_get(longest_streak(state))))  # the save waits for this step anyway
        writer.sync()  # the log up to this step is durable before its checkpoint starts
        checkpointer.save(step, state, force=True)
      for every, hook in hooks:
        if every and step % every == 0:
          hook(step, state)
      if preempt.requested or checkpointer.reached_preemption(step):
        return stop_for_preemption(state)
    flush()
    writer.sync()
    checkpointer.wait()
    if preempt.requested:  # signalled while the last save finished: stop before evaluation
      return stop_for_preemption(state)
  if is_main:
    print(f"[{stage}] finished {num_steps} steps in {format_duration(time.time() - t_start)}", flush=True)
  sys.stdout.flush()
  return state, "done"
