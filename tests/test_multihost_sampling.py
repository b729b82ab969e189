"""Sampling and evaluation on two processes: every process computes its share, one gather, same as one process.

A tiny class-conditional digits run (--config.label_dim=10) is trained once in one process; copies of its
workdir are then evaluated (--mode=eval) and sampled (--mode=sample) by 2 processes x 2 CPU devices and by
1 process x 1 device. 70 eval samples in global batches of 64 leave process 0 with 38 rows and process 1
with 32, so the sharded feature pass also runs with unequal shares. The samples must be distinct rows (no process's copy stacked on another's), carry
their labels (the same (x, label) pairs as one process, seed for seed), and give the same metrics.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_multihost import _env, free_port

TINY = ["--config.label_dim=10", "--config.teacher.arch.model_channels=8", "--config.teacher.arch.num_blocks=1",
        "--config.teacher.arch.attn_resolutions=()", "--config.teacher_train.num_steps=20",
        "--config.teacher_train.batch_size=32", "--config.teacher_train.log_every=10",
        "--config.teacher_train.checkpoint_every=20", "--config.batch_size=8", "--config.num_steps=2",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.grid_every=100", "--config.grid_size=2",
        "--config.eval.every=0", "--config.eval.num_samples=70", "--config.eval.batch_size=64",
        "--config.eval.teacher_steps=3", "--config.eval.classifier.steps=5", "--config.sample.num=100",
        "--config.mesh_shape=(-1,1)"]
TIMEOUT = 300
X_ATOL = 2e-4  # float32: the same rows computed in batches of 16 (per device) or 64 (one device)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "simjax.main", "--config=configs/digits.py", f"--workdir={workdir}"] + TINY + list(extra)


def _start(cmd, log, env):
  out = open(log, "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), out, log


def _wait(started):
  failed = []
  for proc, out, log in started:
    try:
      proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      proc.kill()  # only this test's own process
      proc.wait()
    out.close()
    if proc.returncode != 0:
      failed.append(f"{log.name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
  assert not failed, "\n".join(failed)
  return [log.read_text() for _, _, log in started]


def two_and_one(tmp, trained, name, *extra):
  """Runs `extra` on copies of the trained workdir: 2 processes x 2 devices, and 1 process x 1 device."""
  two, one = tmp / f"{name}_two", tmp / f"{name}_one"
  shutil.copytree(trained, two)
  shutil.copytree(trained, one)
  port = free_port()
  started = [_start(_cmd(two, *extra), tmp / f"{name}_process{i}.log",
                    _env(2, SIMJAX_DISTRIBUTED=1, SIMJAX_COORDINATOR=f"127.0.0.1:{port}", SIMJAX_NUM_PROCESSES=2,
                         SIMJAX_PROCESS_ID=i)) for i in range(2)]
  started.append(_start(_cmd(one, *extra), tmp / f"{name}_one.log", _env(1)))
  return two, one, _wait(started)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("digits_cond") / "run"
  _wait([_start(_cmd(wd, "--mode=train"), wd.parent / "train.log", _env(1))])
  return wd


def read_samples(path):
  with np.load(path) as f:
    return f["x"], f["labels"]


def assert_same_samples(two, one, num, what):
  x2, l2 = two
  x1, l1 = one
  assert x2.shape == x1.shape and x2.shape[0] == num, (what, x2.shape, x1.shape)
  assert l2.shape == (num, 10) and np.all(l2.sum(-1) == 1), (what, l2.shape)
  # Distinct rows: P stacked copies of one process's batch would repeat rows.
  flat = x2.reshape(num, -1)
  assert len(np.unique(np.round(flat, 4), axis=0)) == num, f"{what}: repeated samples"
  # Labels aligned with their samples, row by row, as one process draws them for the same seed.
  np.testing.assert_array_equal(l2, l1, err_msg=f"{what}: labels differ from one process's")
  np.testing.assert_allclose(x2, x1, atol=X_ATOL, err_msg=f"{what}: samples differ from one process's")
  # Not all one class: the labels are drawn, not a constant that would align trivially.
  assert len(np.unique(l2.argmax(-1))) > 3


def test_two_process_eval_matches_one_process(trained, tmp_path):
  two, one, logs = two_and_one(tmp_path, trained, "eval", "--mode=eval")
  for name in ("generator", "teacher"):
    assert_same_samples(read_samples(two / "samples" / f"{name}.npz"), read_samples(one / "samples" / f"{name}.npz"),
                        70, name)
  # The generator and the teacher draw from different seeds.
  assert not np.array_equal(read_samples(two / "samples" / "generator.npz")[1],
                            read_samples(two / "samples" / "teacher.npz")[1])
  final2 = json.loads((two / "eval" / "final.json").read_text())
  final1 = json.loads((one / "eval" / "final.json").read_text())
  assert set(final2) == {"generator", "teacher", "reference"}
  for source in final2:
    got, want = final2[source], final1[source]
    assert got["num_samples"] == want["num_samples"]
    np.testing.assert_allclose(got["frechet_distance"], want["frechet_distance"], rtol=1e-3, err_msg=source)
    np.testing.assert_allclose(got["class_histogram"], want["class_histogram"], atol=1.5 / got["num_samples"])
    np.testing.assert_allclose(got["label_accuracy"], want["label_accuracy"], atol=1.5 / got["num_samples"])
    assert abs(sum(got["class_histogram"]) - 1) < 1e-6
  # Progress of teacher sampling and evaluation, printed by process 0 only.
  assert "eval: teacher Heun 5 NFE: batch 2/2" in logs[0], logs[0][-2000:]
  assert "features batch" in logs[0]
  assert "teacher Heun" not in logs[1] and "features batch" not in logs[1], logs[1][-2000:]


@pytest.mark.parametrize("source", ["teacher", pytest.param("generator", marks=pytest.mark.slow)])
def test_two_process_sample_matches_one_process(trained, tmp_path, source):
  two, one, logs = two_and_one(tmp_path, trained, f"sample_{source}", "--mode=sample",
                               f"--config.sample.source={source}", "--config.sample.seed=5")
  path = f"samples/sample_{source}.npz"
  assert_same_samples(read_samples(two / path), read_samples(one / path), 100, source)
  assert "batch 2/2" in logs[0] and "batch" not in logs[1]
