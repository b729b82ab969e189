"""Bad config values and unreadable teacher files: exit 2, one line naming the fix, the workdir untouched.

Uses the harness of test_bad_inputs.py (one subprocess per case, run concurrently). Every value here
was once accepted and failed later: a traceback after training, a NaN generator with exit 0, or a
workdir with config.json written before the refusal.
"""
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import Case, run_cases

GMM = "--config=configs/gmm2d.py"
DIGITS = "--config=configs/digits.py"


class _RunsCode:
  def __reduce__(self):
    import os  # pylint: disable=import-outside-toplevel
    return (os.system, ("echo pwned > /tmp/simjax_pwned",))


def _teacher_files(root: Path) -> dict:
  """Hostile or broken teacher files a user might pass: name -> path."""
  root.mkdir(parents=True, exist_ok=True)
  files = {}
  files["empty"] = root / "empty.pkl"
  files["empty"].write_bytes(b"")
  files["random"] = root / "random.pkl"
  files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
  full = pickle.dumps({"ema": {"not": "a network"}, "augment_pipe": None})
  files["truncated"] = root / "truncated.pkl"
  files["truncated"].write_bytes(full[: len(full) // 2])
  files["zip_not_pickle"] = root / "archive.pkl"
  with zipfile.ZipFile(files["zip_not_pickle"], "w") as z:
    z.writestr("readme.txt", "just text")
  files["pt_without_data_pkl"] = root / "weights.pt"
  with zipfile.ZipFile(files["pt_without_data_pkl"], "w") as z:
    z.writestr("archive/data/0", b"\0" * 16)
  files["unsafe"] = root / "unsafe.pkl"
  files["unsafe"].write_bytes(pickle.dumps({"ema": _RunsCode()}))
  files["object_npz"] = root / "objects.npz"
  np.savez(files["object_npz"], a=np.array([{"x": 1}], dtype=object))
  return files


def _cases(files):
  cases = [
      Case("batch_size_overflows", [GMM, "--workdir={workdir}", "--config.batch_size=100000000000"], "exceeds 2^31"),
      Case("eval_num_samples_zero", [GMM, "--workdir={workdir}", "--config.eval.num_samples=0"],
           "eval.num_samples must be >= 2"),
      Case("eval_batch_size_zero", [GMM, "--workdir={workdir}", "--config.eval.batch_size=0"],
           "eval.batch_size must be >= 1"),
      Case("eval_teacher_steps_zero", [DIGITS, "--workdir={workdir}", "--config.eval.teacher_steps=0"],
           "eval.teacher_steps must be >= 1"),
      Case("ema_rampup_nan", [GMM, "--workdir={workdir}", "--config.ema_rampup_ratio=nan"],
           "ema_rampup_ratio must be 0 (no ramp-up) or a finite value > 0"),
      Case("ema_rampup_negative", [GMM, "--workdir={workdir}", "--config.ema_rampup_ratio=-1"],
           "ema_rampup_ratio must be 0"),
      Case("teacher_ema_rampup_nan", [DIGITS, "--workdir={workdir}", "--config.teacher_train.ema_rampup_ratio=nan"],
           "teacher_train.ema_rampup_ratio"),
      Case("ema_half_life_inf", [GMM, "--workdir={workdir}", "--config.ema_half_life_images=inf"],
           "ema_half_life_images must be a finite value > 0"),
      Case("sigma_max_inf", [GMM, "--workdir={workdir}", "--config.sigma_max=inf"], "sigma_max must be > 0 and finite"),
      Case("holdout_fraction_above_one", [DIGITS, "--workdir={workdir}", "--config.data.holdout_fraction=1.5"],
           "data.holdout_fraction must lie in (0, 1)"),
      Case("huber_c_per_dim_zero", [DIGITS, "--workdir={workdir}", "--config.loss.huber_c_per_dim=0"],
           "loss.huber_c_per_dim must be a finite value > 0"),
      Case("loss_scale_zero", [DIGITS, "--workdir={workdir}", "--config.loss.generator_scale=0"],
           "loss.generator_scale must be a finite value > 0"),
      Case("loss_name_unknown", [GMM, "--workdir={workdir}", "--config.loss.name=sidd"], "loss.name to one of"),
      Case("sid_alpha_nan", [GMM, "--workdir={workdir}", "--config.loss.name=sid", "--config.loss.alpha=nan"],
           "loss.alpha must be a finite number"),
      Case("dmd_unnormalised", [GMM, "--workdir={workdir}", "--config.loss.name=dmd", "--config.loss.normalize=False"],
           "loss.name=diff_instruct"),
      Case("regression_weight_negative", [GMM, "--workdir={workdir}", "--config.loss.regression_weight=-1"],
           "loss.regression_weight must be a finite value >= 0"),
      Case("adversarial_weight_negative", [GMM, "--workdir={workdir}", "--config.adversarial.weight=-1"],
           "adversarial.weight must be a finite value >= 0"),
      Case("adversarial_start_negative", [GMM, "--workdir={workdir}", "--config.adversarial.start_images=-5"],
           "adversarial.start_images must be a finite value >= 0"),
      Case("grad_value_clip_negative", [GMM, "--workdir={workdir}", "--config.optim.fake.grad_value_clip=-1"],
           "optim.fake: optimizer grad_value_clip must be a finite value >= 0"),
      Case("f_divergence_unknown", [GMM, "--workdir={workdir}", "--config.loss.name=uni_instruct",
                                    "--config.loss.f=kl"], "loss.f to one of"),
      Case("discriminator_with_fused_call", [GMM, "--workdir={workdir}", "--config.adversarial.weight=1e-4",
                                             "--config.perf.fuse_teacher_fake=True"], "fuse_teacher_fake=False"),
      Case("discriminator_without_data", ["--config=configs/cifar10.py", "--workdir={workdir}",
                                          "--config.loss.name=uni_instruct", "--config.loss.f=forward_kl"],
           "is shown real data"),
      Case("logvar_weighting_without_edm2", [DIGITS, "--workdir={workdir}", "--config.loss.logvar_weighting=True"],
           "loss.logvar_weighting is EDM2's (its uncertainty head u(sigma)) but the teacher is EDMPrecond"),
      Case("logvar_weighting_on_gmm", [GMM, "--workdir={workdir}", "--config.loss.logvar_weighting=True"],
           "this pipeline has no EDM2 networks"),
      Case("forced_weight_normalization_on_gmm", [GMM, "--workdir={workdir}",
                                                  "--config.optim.fake.forced_weight_normalization=True"],
           "optim.fake.forced_weight_normalization is EDM2's (its magnitude-preserving layers) and this pipeline"),
      Case("teacher_forced_weight_normalization_without_edm2",
           [DIGITS, "--workdir={workdir}", "--config.teacher_train.optim.forced_weight_normalization=True"],
           "teacher_train.optim.forced_weight_normalization is EDM2's (its magnitude-preserving layers) but the "
           "teacher is EDMPrecond"),
      Case("guidance_on_gmm", [GMM, "--workdir={workdir}", "--config.teacher.guidance=2"],
           "the gmm pipeline's analytic teacher is unconditional"),
      Case("t_min_above_t_max", [GMM, "--workdir={workdir}", "--config.loss.t_min=0.9"], "0 <= t_min < t_max <= 1"),
      Case("distributed_without_a_cluster", [GMM, "--workdir={workdir}"], "jax.distributed.initialize() failed",
           env={"SIMJAX_DISTRIBUTED": "1"}),
  ]
  for name, path in files.items():
    cases.append(Case(f"teacher_{name}", [f"--config=configs/cifar10.py:{path}", "--workdir={workdir}"],
                      "the teacher checkpoint" if name != "unsafe" else "refusing to load"))
  return cases


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_values")
  cases = _cases(_teacher_files(root / "teachers"))
  results = run_cases(cases, root)
  return {c.id: (c, results[c.id]) for c in cases}


def test_each_bad_value_is_one_line_exit_2_and_leaves_the_workdir_absent(outcomes):
  failures = []
  for name, (case, (proc, before, after)) in sorted(outcomes.items()):
    lines = proc.stderr.strip().splitlines()
    ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("simjax: error: ")
          and case.expect in lines[0] and len(lines[0]) < 600 and not proc.stdout.strip() and after == before)
    if not ok:
      failures.append(f"{name}: exit {proc.returncode}, stderr {proc.stderr[-600:]!r}, workdir {after is not None}")
  assert not failures, "\n".join(failures)
  assert not Path("/tmp/simjax_pwned").exists(), "a teacher pickle ran code"
