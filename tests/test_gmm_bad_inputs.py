"""gmm-specific bad input: refused by main with exit 2 and one line, before the workdir is touched."""
import pytest

from test_bad_inputs import CONFIG, Case, run_cases

TWO_MODES = ["--config.teacher.stds=(0.1,0.1)", "--config.teacher.weights=(0.5,0.5)"]
CASES = [
    Case("means_overflow", [CONFIG, "--workdir={workdir}", "--config.teacher.means=((1e300,0.),(0.,1.))"] + TWO_MODES,
         "teacher.means must be finite and at most"),
    Case("component_too_narrow_for_float32", [CONFIG, "--workdir={workdir}", "--config.teacher.means=((0.,0.),(1e9,0.))",
                                              "--config.teacher.stds=(1e-3,1e-3)", "--config.teacher.weights=(0.5,0.5)"],
         "float32 can resolve"),
    Case("copy_batch_zero", [CONFIG, "--workdir={workdir}", "--config.init.copy_batch=0"],
         "init.copy_batch must be >= 1 when init.copy_steps > 0"),
    Case("mode_train_teacher", [CONFIG, "--workdir={workdir}", "--mode=train_teacher"], "not available for the gmm"),
    Case("mode_sample", [CONFIG, "--workdir={workdir}", "--mode=sample"], "not available for the gmm"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  return run_cases(CASES, tmp_path_factory.mktemp("gmm_bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gmm_bad_input_is_refused_without_touching_the_workdir(outcomes, case):
  proc, before, after = outcomes[case.id]
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
  assert len(lines) == 1 and lines[0].startswith("simjax: error: ") and case.expect in lines[0], proc.stderr[-2000:]
  assert "--config" in lines[0] or "--mode" in lines[0], lines[0]  # names the fix
  assert proc.stdout.strip() == "" and after == before is None, (proc.stdout[-500:], after)
