"""The README's quick start, run as it is written: its own text, a fresh shell, a relative workdir.

The install half of command 1 (venv + pip install) is what CI (.ci/run) does on every push; here the
run half is executed verbatim from the README text, shortened only by run-length overrides appended
after it, in a directory that is not the repository, so `workdirs/digits` is relative to a fresh cwd.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Run length only (keys a resumed run may change, workdir.RESUMABLE_CHANGES): the config stays the README's.
SHORT = ("--config.teacher_train.num_steps=30 --config.teacher_train.log_every=10 "
         "--config.teacher_train.checkpoint_every=30 --config.num_steps=6 --config.log_every=3 "
         "--config.checkpoint_every=3 --config.grid_every=6 --config.eval.every=0 --config.eval.num_samples=200 "
         "--config.eval.batch_size=100 --config.eval.teacher_steps=4 --config.eval.classifier.steps=30")


def readme_commands(section: str):
  """The shell commands of the first ```bash block after `section`, continuation lines joined, comments dropped."""
  text = (REPO / "README.md").read_text()
  start = text.index(section)
  block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    line = " ".join(line.split())
    if line and not line.startswith("#"):
      commands.append(line)
  return commands


def readme_python(section: str, count: int):
  """The first `count` ```python blocks after `section`."""
  text = (REPO / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text[text.index(section):], re.S)[:count]


def fresh_shell(command: str, cwd: Path, timeout: int = 900):
  # A login-free shell with the interpreter that runs the tests first on PATH (CI's venv), nothing inherited
  # that points at the repository.
  env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(cwd)),
         "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
  if "SIMJAX_COMPILATION_CACHE" in os.environ:
    env["SIMJAX_COMPILATION_CACHE"] = os.environ["SIMJAX_COMPILATION_CACHE"]
  try:
    import simjax  # pylint: disable=import-outside-toplevel
    installed = Path(simjax.__file__).resolve().parents[1] == REPO
  except ImportError:
    installed = False
  if not installed:  # not pip-installed from this checkout: point the child at it (CI's editable install does this)
    env["PYTHONPATH"] = str(REPO)
  return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_test_command_is_the_one_ci_runs():
  quick = readme_commands("## Quick start")
  assert len(quick) == 2, quick
  ci = (REPO / ".ci" / "run").read_text()
  assert quick[1] in ci, f"README's test command {quick[1]!r} is not what .ci/run runs"
  install = quick[0].split(" && ")[:-1]
  assert any(part.startswith("pip install") and part.split()[-1].strip("'") in ci for part in install), install


def test_readme_first_command_runs_as_written_with_its_relative_workdir(tmp_path):
  quick = readme_commands("## Quick start")
  run_part = quick[0].split(" && ")[-1]
  assert run_part.startswith("python -m simjax.main") and "--workdir=workdirs/digits" in run_part, run_part
  cwd = tmp_path / "clone"
  shutil.copytree(REPO / "configs", cwd / "configs")  # the README's paths are relative to a checkout
  proc = fresh_shell(f"{run_part} {SHORT}", cwd)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  wd = cwd / "workdirs" / "digits"
  final = json.loads((wd / "eval" / "final.json").read_text())
  assert final["generator"]["frechet_distance"] > 0 and final["teacher"]["frechet_distance"] > 0
  assert (wd / "samples" / "teacher_vs_generator.png").stat().st_size > 0
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  assert f"results in {wd}" in out, out[-1000:]

  # README "Other jobs": sampling from the finished run, as written, in another fresh shell.
  sample = next(c for c in readme_commands("Other jobs:") if "--mode=sample" in c)
  assert "--workdir=workdirs/digits" in sample, sample
  proc = fresh_shell(f"{sample} {SHORT}", cwd)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  with open(wd / "samples" / "sample_generator.npz", "rb") as f:
    import numpy as np  # pylint: disable=import-outside-toplevel
    assert np.load(f)["x"].shape == (1000, 8, 8, 1)

  # README's Python examples (load_teacher, load_generator), as written, on that run, with checks of what
  # their comments promise.
  teacher_block, generator_block = readme_python("In Python, `simjax.load_teacher", 2)
  assert "simjax.load_teacher(" in teacher_block and "simjax.load_generator(" in generator_block
  checks = ("import numpy as np\nassert d.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(d)).all()\n"
            "x = np.asarray(x)\nassert x.shape == (64, 8, 8, 1) and x.dtype == np.float32 and -1 <= x.min() "
            "<= x.max() <= 1\nprint('examples ok')\n")
  (cwd / "examples.py").write_text(teacher_block + generator_block + checks)
  proc = fresh_shell("python examples.py", cwd)
  assert proc.returncode == 0 and "examples ok" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
