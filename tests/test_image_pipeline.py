"""The image pipeline end to end on the embedded digits, with tiny networks.

One module-scoped run: train a tiny EDM teacher, distill it for one SIM step (the generator's start),
evaluate, then continue the same run and evaluate again. Tests read what that run wrote.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from tensorboard_events import scalars_and_images

TINY = ["--config.teacher.arch.model_channels=16", "--config.teacher.arch.num_blocks=1",
        "--config.teacher.arch.attn_resolutions=()", "--config.teacher_train.num_steps=300",
        "--config.teacher_train.batch_size=64", "--config.teacher_train.log_every=50",
        "--config.teacher_train.checkpoint_every=300", "--config.batch_size=32", "--config.log_every=20",
        "--config.checkpoint_every=40", "--config.grid_every=40", "--config.eval.num_samples=400",
        "--config.eval.batch_size=200", "--config.eval.teacher_steps=6", "--config.eval.classifier.steps=150",
        "--config.optim.generator.lr=1e-4", "--config.optim.fake.lr=4e-4", "--config.eval.every=0"]
SIM_STEPS = 120


def main(workdir, *args, check=True):
  cmd = [sys.executable, "-m", "simjax.main", "--config=configs/digits.py", f"--workdir={workdir}"] + TINY + list(args)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("digits")
  main(wd, "--config.num_steps=1")
  start = json.loads((wd / "eval" / "final.json").read_text())
  proc = main(wd, f"--config.num_steps={SIM_STEPS}", f"--config.eval.every={SIM_STEPS // 2}",
              "--config.eval.periodic_samples=200")
  return wd, start, json.loads((wd / "eval" / "final.json").read_text()), proc


def read_jsonl(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_teacher_training_lowers_dsm_loss(run):
  wd, _, _, _ = run
  rows = read_jsonl(wd / "teacher" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(50, 301, 50))
  first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-2:]])
  assert last < 0.8 * first, (first, last)
  assert (wd / "teacher" / "final" / "arch.json").exists()


def test_periodic_evaluation_rows_carry_step_stage_and_time(run):
  wd, _, _, _ = run
  rows = read_jsonl(wd / "eval" / "periodic.jsonl")
  assert [r["step"] for r in rows] == [SIM_STEPS // 2, SIM_STEPS], rows
  for r in rows:
    assert r["stage"] == "sim" and isinstance(r["time"], float) and r["num_samples"] == 200, r
    assert np.isfinite(r["frechet_distance"]) and r["frechet_distance"] > 0, r
  assert rows[0]["time"] < rows[1]["time"]


def test_distillation_lowers_frechet_distance_from_the_generators_start(run):
  _, start, final, proc = run
  assert set(final) == {"generator", "teacher", "reference"}
  assert final["generator"]["nfe"] == 1 and final["teacher"]["nfe"] == 11 and final["reference"]["nfe"] == 0
  assert final["generator"]["step"] == SIM_STEPS and start["generator"]["step"] == 1
  assert final["generator"]["frechet_distance"] < 0.85 * start["generator"]["frechet_distance"], (start, final)
  for source in final.values():
    assert len(source["class_histogram"]) == 10 and abs(sum(source["class_histogram"]) - 1) < 1e-6
  # The teacher stage was not redone when the run continued.
  assert "[teacher]" not in proc.stdout


def test_sidas_adversarial_term_runs_end_to_end_on_the_digits(run, tmp_path):
  """SiDA (sid at alpha 1 + the adversarial term) on the digits' real data, from the run's teacher: the fake
  score is trained as the discriminator too (disc_loss), the generator gains the adversarial term (adv_loss),
  and distillation still lowers the generator's Frechet distance from its start as the plain run's does."""
  wd, start, _, _ = run
  main(tmp_path, f"--config.num_steps={SIM_STEPS}", "--config.teacher.kind=checkpoint",
       f"--config.teacher.checkpoint={wd / 'teacher' / 'final'}", "--config.loss.name=sid", "--config.loss.alpha=1.0",
       "--config.adversarial.weight=1e-3", "--config.checkpoint_every=120", "--config.grid_every=120")
  final = json.loads((tmp_path / "eval" / "final.json").read_text())
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "gen_loss" in r]
  assert [r["step"] for r in rows] == list(range(20, SIM_STEPS + 1, 20))
  assert all(r["step_ok"] == 1 and np.isfinite(r["disc_loss"]) and r["adv_loss"] > 0 for r in rows), rows
  assert final["generator"]["step"] == SIM_STEPS
  assert final["generator"]["frechet_distance"] < 0.85 * start["generator"]["frechet_distance"], (start, final)


def test_contract_files(run):
  wd, _, _, _ = run
  for name in ("generator", "teacher"):
    with np.load(wd / "samples" / f"{name}.npz") as f:
      x = f["x"]
      assert x.shape == (400, 8, 8, 1) and x.dtype == np.float32
      assert x.min() >= -1.0 and x.max() <= 1.0
  for png in ("teacher_vs_generator.png", "generator.png", "teacher.png", f"grid_step{SIM_STEPS - 40:07d}.png"):
    assert (wd / "samples" / png).stat().st_size > 200, png
  info = json.loads((wd / "generator" / "generator.json").read_text())
  assert info["sigma_init"] == 2.5 and info["step"] == SIM_STEPS
  rows = read_jsonl(wd / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1] + list(range(20, SIM_STEPS + 1, 20))
  # TensorBoard: both stages' numbers, the training grids and the final side-by-side.
  teacher_scalars, _ = scalars_and_images(wd / "tensorboard" / "teacher")
  assert sorted(teacher_scalars["loss"]) == list(range(50, 301, 50))
  scalars, images = scalars_and_images(wd / "tensorboard" / "sim")
  assert sorted(scalars["gen_loss"]) == [r["step"] for r in rows]
  assert images["samples/generator_grid"] == list(range(40, SIM_STEPS + 1, 40))
  assert images["samples/teacher_vs_generator"] == [1, SIM_STEPS]
  assert SIM_STEPS in scalars["eval/generator_frechet_distance"]
  assert sorted(scalars["eval/periodic_frechet_distance"]) == [SIM_STEPS // 2, SIM_STEPS]


def test_generator_sampling_is_deterministic_given_the_seed(run):
  wd, _, _, _ = run
  outs = []
  for seed in (3, 3, 4):
    main(wd, "--mode=sample", "--config.sample.num=64", f"--config.sample.seed={seed}", f"--config.num_steps={SIM_STEPS}")
    with np.load(wd / "samples" / "sample_generator.npz") as f:
      outs.append(f["x"])
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  assert outs[0].shape == (64, 8, 8, 1)
  # The Python API draws the same images as --mode=sample (same seed, same batch size: eval.batch_size=200).
  import simjax
  gen = simjax.load_generator(wd)
  assert gen.step == SIM_STEPS and gen.data_shape == (8, 8, 1) and gen.label_dim == 0
  np.testing.assert_allclose(gen.sample(64, seed=4, batch_size=200), outs[2], atol=1e-6)


def test_teacher_sampler_is_deterministic(run):
  wd, _, _, _ = run
  from simjax.teachers import edm_checkpoints
  from simjax import config_files
  from simjax.pipelines import image_eval
  teacher = edm_checkpoints.load_teacher(wd / "teacher" / "final")
  cfg = config_files.load(REPO / "configs" / "digits.py").get_config()  # the run's: EDM's sigmas, no guidance
  cfg.eval.teacher_steps = 4
  a, _ = image_eval.teacher_samples(teacher.module, teacher.params, 16, 16, 0, cfg)
  b, _ = image_eval.teacher_samples(teacher.module, teacher.params, 16, 16, 0, cfg)
  c, _ = image_eval.teacher_samples(teacher.module, teacher.params, 16, 16, 1, cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
