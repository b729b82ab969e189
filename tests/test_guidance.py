"""Classifier-free guidance of the teacher: the formula, condition dropout, bad input, and (slow) a
class-conditional digits teacher whose samples the digit classifier recognises better when guided."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from simjax.errors import UserError
from simjax import conditioning, config_files
from simjax.teachers import guidance


def _toy_denoise(x, sigma, labels):
  # Any function of all three inputs whose conditional and null outputs differ.
  return jnp.tanh(x) * (1.0 + sigma[:, None]) + labels @ jnp.arange(1.0, 4.0)[:, None] * x ** 2


def test_guided_is_null_plus_w_times_the_conditional_difference():
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (5, 1))
  sigma = jnp.exp(jax.random.normal(k[1], (5,)))
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 1, 0]), 3)
  d_c, d_null = _toy_denoise(x, sigma, labels), _toy_denoise(x, sigma, jnp.zeros_like(labels))
  assert float(jnp.abs(d_c - d_null).min()) > 1e-3, "the toy must make the two branches differ"
  for w in (0.0, 2.5):
    np.testing.assert_allclose(guidance.guided(_toy_denoise, w)(x, sigma, labels), d_null + w * (d_c - d_null),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guidance.guided(_toy_denoise, 2.5)(x, 0.7, labels),
                             guidance.guided(_toy_denoise, 2.5)(x, jnp.full((5,), 0.7), labels), rtol=1e-6)
  assert guidance.guided(_toy_denoise, 1.0) is _toy_denoise
  # A wrong construction (guiding towards the null branch) is told apart by the same check.
  wrong = lambda x_, s_, l_: d_c + 2.5 * (d_null - d_c)
  assert not np.allclose(wrong(x, sigma, labels), guidance.guided(_toy_denoise, 2.5)(x, sigma, labels))


def test_condition_dropout_nulls_whole_rows_at_the_given_rate():
  labels = jax.nn.one_hot(jnp.arange(20_000) % 10, 10)
  dropped = conditioning.drop(jax.random.key(1), labels, 0.2)
  nulled = np.asarray(dropped.sum(1) == 0)
  assert abs(nulled.mean() - 0.2) < 0.015
  np.testing.assert_array_equal(np.asarray(dropped)[~nulled], np.asarray(labels)[~nulled])
  assert conditioning.drop(jax.random.key(1), labels, 0.0) is labels
  assert conditioning.drop(jax.random.key(1), None, 0.5) is None


def _config(**values):
  """configs/digits.py, class-conditional, with `values` changed."""
  c = config_files.load(REPO / "configs" / "digits.py").get_config()
  c.label_dim = 10
  for key, value in values.items():
    section, name = key.split(".") if "." in key else (None, key)
    (c[section] if section else c)[name] = value
  return c


@pytest.mark.parametrize("values, message", [
    ({"teacher.guidance": float("nan")}, "finite weight"),
    ({"teacher.guidance": 2.0, "label_dim": 0}, "class-conditional teacher"),
    ({"teacher.guidance": 2.0, "perf.fuse_teacher_fake": True}, "fuse_teacher_fake"),
    ({"teacher_train.label_dropout": 1.0}, "label_dropout"),
])
def test_bad_guidance_settings_are_refused(values, message):
  with pytest.raises(UserError, match=message):
    guidance.check_config(_config(**values))
  assert guidance.check_config(_config(**{"teacher.guidance": 3.0})) == 3.0


@pytest.mark.slow
def test_guidance_sharpens_a_conditional_digits_teachers_classes(tmp_path):
  """A small class-conditional digits teacher trained with 10% null labels: the digit classifier agrees
  with the conditioning class more often on guided teacher samples (w = 3) than unguided (w = 1)."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "simjax.main", "--config=configs/digits.py", f"--workdir={wd}", "--mode=train_teacher",
         "--config.label_dim=10", "--config.teacher_train.label_dropout=0.1", "--config.teacher_train.num_steps=800"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  bench = subprocess.run([sys.executable, "benchmarks/guidance.py", f"--workdir={wd}", "--weights=1,3", "--num=1000"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert bench.returncode == 0, (bench.stdout + bench.stderr)[-3000:]
  rows = {r.get("guidance"): r for r in map(json.loads, (l for l in bench.stdout.splitlines() if l.startswith("{")))}
  assert rows[3.0]["label_accuracy"] > rows[1.0]["label_accuracy"] + 0.02, rows
  assert rows[3.0]["frechet_distance"] > rows[1.0]["frechet_distance"], "guidance trades diversity for fidelity"
