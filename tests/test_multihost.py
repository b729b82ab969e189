"""Multi-host runs of the real entry point: 2 processes x 2 CPU devices == 1 process x 4 devices.

Each process is `python -m simjax.main` with SIMJAX_DISTRIBUTED=1 and the coordinator variables read by
`mesh.maybe_initialize_distributed`; cross-process CPU collectives use gloo (jax 0.10.2's default
`jax_cpu_collectives_implementation`). The two-process run stores its parameters FSDP-sharded across
*both* processes (mesh (1, 4)), so its checkpoint can only be whole if both processes wrote their shards;
the checkpoint then resumes in one process with another device count and layout, and continues exactly
as the uninterrupted run.

An audit hook (sys.addaudithook, no change to simjax) records every file each process opens for
writing in the workdir, to show that only process 0 writes metrics, eval and samples.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

SMALL = ["--config.init.copy_steps=0", "--config.model.hidden=32", "--config.model.num_blocks=1",
         "--config.model.emb_features=16", "--config.batch_size=32", "--config.log_every=2",
         "--config.checkpoint_every=2", "--config.keep_checkpoints=5", "--config.fsdp_min_size=256",
         "--config.optim.generator.lr=1e-3", "--config.optim.fake.lr=1e-3", "--config.eval.num_samples=256",
         "--config.eval.batch_size=128", "--config.eval.teacher_steps=4", "--config.eval.num_projections=16"]
TIMEOUT = 600
GRAD_RTOL = 1e-4     # Adam moments (b1 = 0: mu is the averaged gradient), relative to the tree's largest entry
PARAM_RTOL = 2e-3    # parameter/EMA differences, relative to how far the parameters moved in 2 steps
METRIC_RTOL = 1e-4

# `python -m simjax.main` with an audit hook that lists the files this process writes under the workdir.
RUN_MAIN_AUDITED = r"""
import atexit, os, runpy, sys
root = os.path.realpath(os.environ["SIMJAX_TEST_WATCH"])
writes = set()
def relative(path):
  try:
    p = os.path.realpath(os.fsdecode(path))
  except (TypeError, ValueError):
    return None
  return os.path.relpath(p, root) if p == root or p.startswith(root + os.sep) else None
def hook(event, args):
  if event == "open":
    path, mode, flags = args
    writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
               else isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    paths = [path] if writing and not isinstance(path, int) else []
  elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
    paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
  else:
    return
  for p in paths:
    rel = relative(p)
    if rel is not None:
      writes.add(rel)
sys.addaudithook(hook)
def dump():
  with open(os.environ["SIMJAX_TEST_WRITE_LOG"], "w") as f:
    f.write("\n".join(sorted(writes)))
atexit.register(dump)
sys.argv = ["simjax.main"] + sys.argv[1:]
runpy.run_module("simjax.main", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
  try:
    import portpicker  # pylint: disable=import-outside-toplevel
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _env(devices: int, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  for key in ("SIMJAX_DISTRIBUTED", "SIMJAX_COORDINATOR", "SIMJAX_NUM_PROCESSES", "SIMJAX_PROCESS_ID"):
    env.pop(key, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


class Run:
  """One `simjax.main` process (its output goes to files, so a chatty process never blocks on a pipe)."""

  def __init__(self, name, workdir, steps, devices, *extra, env_extra=None, audit_log=None):
    self.name, self.workdir = name, workdir
    self.log = workdir.parent / f"{name}.log"
    args = [f"--config=configs/gmm2d.py", f"--workdir={workdir}", f"--config.num_steps={steps}"] + SMALL + list(extra)
    env = _env(devices, **(env_extra or {}))
    if audit_log is not None:
      env.update(SIMJAX_TEST_WATCH=str(workdir), SIMJAX_TEST_WRITE_LOG=str(audit_log))
      cmd = [sys.executable, "-c", RUN_MAIN_AUDITED] + args
    else:
      cmd = [sys.executable, "-m", "simjax.main"] + args
    workdir.parent.mkdir(parents=True, exist_ok=True)
    self._out = open(self.log, "w")
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True)

  def output(self):
    return self.log.read_text()

  def finish(self, deadline):
    try:
      self.proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      self.proc.kill()  # only this run's own process
      self.proc.wait()
    finally:
      self._out.close()
    return self.proc.returncode


def wait_all(runs, timeout=TIMEOUT):
  deadline = time.time() + timeout
  codes = [r.finish(deadline) for r in runs]
  failed = [(r, c) for r, c in zip(runs, codes) if c != 0]
  if failed:
    raise AssertionError("\n".join(f"{r.name} exited {c}:\n{r.output()[-4000:]}" for r, c in failed))


def two_process_run(tmp, workdir, steps, *extra):
  port = free_port()
  return [Run(f"process{i}", workdir, steps, 2, *extra, audit_log=tmp / f"writes_process{i}.txt",
              env_extra=dict(SIMJAX_DISTRIBUTED=1, SIMJAX_COORDINATOR=f"127.0.0.1:{port}", SIMJAX_NUM_PROCESSES=2,
                             SIMJAX_PROCESS_ID=i))
          for i in range(2)]


def read_checkpoint(workdir, step):
  """The saved TrainState of `step` as numpy arrays, restored onto this process's one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = workdir / "checkpoints" / str(step) / "default"
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def _max_abs(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree) if np.size(x))


def _diff(a, b):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _adam(opt_state):
  """mu and nu of the one Adam state inside a restored optax chain (a nest of lists and dicts)."""
  found = []
  def walk(x):
    if isinstance(x, dict) and "mu" in x and "nu" in x:
      found.append((x["mu"], x["nu"]))
    elif isinstance(x, dict):
      for v in x.values():
        walk(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        walk(v)
  walk(opt_state)
  assert len(found) == 1, f"expected one Adam state, found {len(found)}"
  return found[0]


def assert_states_close(got, want, baseline, label):
  """Same step, params/EMA within float32 reduction error of `want`, Adam moments likewise."""
  assert int(got["step"]) == int(want["step"]), (label, got["step"], want["step"])
  moved = _max_abs(_diff(want["params"], baseline["params"]))
  assert moved > 1e-4, f"{label}: parameters barely moved ({moved}); the comparison would prove nothing"
  for key in ("params", "ema"):
    err = _max_abs(_diff(got[key], want[key]))
    assert err <= PARAM_RTOL * moved, f"{label}: {key} differ by {err} (parameters moved {moved})"
  for name in ("generator", "fake"):
    for got_m, want_m in zip(_adam(got["opt_state"][name]), _adam(want["opt_state"][name])):
      err = _max_abs(_diff(got_m, want_m))
      assert err <= GRAD_RTOL * _max_abs(want_m), f"{label}: {name} Adam moment differs by {err}"
  assert {k: int(v) for k, v in got["nonfinite"].items()} == {"streak": 0, "max_streak": 0, "total": 0}


def read_metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def assert_metrics_close(got_rows, want_rows, label):
  want = {r["step"]: r for r in want_rows}
  for row in got_rows:
    for key in ("fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"):
      a, b = row[key], want[row["step"]][key]
      assert abs(a - b) <= METRIC_RTOL * max(abs(b), 1e-6), (label, row["step"], key, a, b)


def test_two_processes_match_one_process_and_resume_on_one_device(tmp_path):
  two_hosts, one_host, resumed = tmp_path / "two_hosts", tmp_path / "one_host", tmp_path / "resumed"
  # 2 processes x 2 devices with the parameters FSDP-sharded over all 4 devices (both processes),
  # next to 1 process x 4 devices with replicated parameters; run side by side to save time.
  runs = two_process_run(tmp_path, two_hosts, 4, "--config.mesh_shape=(1,4)")
  runs.append(Run("one_host", one_host, 6, 4, "--mode=train"))
  wait_all(runs)
  out0, out1 = runs[0].output(), runs[1].output()
  assert "step 4/4" in out0 and "step 4/4" not in out1, "only process 0 reports progress"

  # Process 0 alone writes the run's files; both write (their shards of) the checkpoint.
  writes = [set(filter(None, (tmp_path / f"writes_process{i}.txt").read_text().splitlines())) for i in range(2)]
  outside_checkpoints = [{w for w in ws if not w.startswith("checkpoints")} for ws in writes]
  assert {"metrics.jsonl", "eval", "samples"} <= {w.split(os.sep)[0].split(".tmp")[0] for w in outside_checkpoints[0]}, \
      writes[0]
  assert not outside_checkpoints[1], f"process 1 wrote {sorted(outside_checkpoints[1])}"
  assert [r["step"] for r in read_metrics(two_hosts)] == [2, 4]  # one row per step: no second writer
  final = json.loads((two_hosts / "eval" / "final.json").read_text())
  assert final["generator"]["step"] == 4 and final["generator"]["nfe"] == 1
  sharding = json.loads((two_hosts / "checkpoints" / "4" / "default" / "_sharding").read_text())
  assert any("fsdp" in json.dumps(v) for v in sharding.values()), "the two-process run did not shard its parameters"

  # Same parameters, optimizer state, EMA and logged metrics as one process with 4 devices.
  one_host_2, one_host_4 = read_checkpoint(one_host, 2), read_checkpoint(one_host, 4)
  assert_states_close(read_checkpoint(two_hosts, 4), one_host_4, one_host_2, "2 processes vs 1 process at step 4")
  assert_metrics_close(read_metrics(two_hosts), read_metrics(one_host), "2 processes vs 1 process")

  # The FSDP-sharded two-process checkpoint restores into one process with 1 device and continues.
  shutil.copytree(two_hosts, resumed)
  run = Run("resumed", resumed, 6, 1, "--config.mesh_shape=(1,1)", "--mode=train")
  wait_all([run])
  assert "2 steps this run" in run.output(), run.output()[-2000:]
  assert [r["step"] for r in read_metrics(resumed)] == [2, 4, 6]
  assert_states_close(read_checkpoint(resumed, 6), read_checkpoint(one_host, 6), one_host_4,
                      "resumed on 1 device vs uninterrupted 4-device run at step 6")
  assert_metrics_close(read_metrics(resumed), read_metrics(one_host), "resumed vs uninterrupted")


@pytest.mark.slow
def test_two_processes_replicated_parameters_match_one_process_and_resume_on_eight_devices(tmp_path):
  """The default mesh (-1, 1) across two processes (every parameter on all 4 devices); resume on 8 devices."""
  two_hosts, one_host, resumed = tmp_path / "two_hosts", tmp_path / "one_host", tmp_path / "resumed"
  runs = two_process_run(tmp_path, two_hosts, 4)
  runs.append(Run("one_host", one_host, 6, 4, "--mode=train"))
  wait_all(runs)
  assert_states_close(read_checkpoint(two_hosts, 4), read_checkpoint(one_host, 4), read_checkpoint(one_host, 2),
                      "replicated: 2 processes vs 1 process")
  with np.load(two_hosts / "samples" / "generator.npz") as f:
    assert f["x"].shape == (256, 2) and np.all(np.isfinite(f["x"]))
  shutil.copytree(two_hosts, resumed)
  wait_all([Run("resumed", resumed, 6, 8, "--config.mesh_shape=(4,2)")])
  assert_states_close(read_checkpoint(resumed, 6), read_checkpoint(one_host, 6), read_checkpoint(one_host, 4),
                      "resumed on 8 devices (FSDP 2) vs uninterrupted 4-device run")
  assert json.loads((resumed / "eval" / "final.json").read_text())["generator"]["step"] == 6
