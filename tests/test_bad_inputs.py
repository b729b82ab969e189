"""Bad input to `simjax.main`: one line on stderr naming the problem and the fix, exit status 2, and
the workdir untouched (absent stays absent; an existing one keeps every byte and mtime).

Each case is one process of its own (forked from one that has imported the heavy dependencies: run_cases).
They run concurrently in a module fixture (most stop at flag parsing
or validation, before any compile: ~1-3 s each). To add a case (e.g. the image teacher's missing
checkpoint or wrong resolution), append a `Case` to CASES; `setup` may prepare the workdir.
"""
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import pytest

from conftest import REPO

CONFIG = "--config=configs/gmm2d.py"


class Case(NamedTuple):
  id: str
  args: Sequence[str]           # after `python -m simjax.main`; "{workdir}" is filled in
  expect: str                   # a substring of the one error line
  setup: Optional[Callable[[Path], None]] = None  # builds the workdir before the run (else it is absent)
  env: Optional[dict] = None
  in_workdir: bool = False      # run with the workdir as the current directory (an empty --workdir means it)


def gmm2d_config_json(**overrides) -> str:
  """config.json as `workdir.prepare` writes it for configs/gmm2d.py (plus overrides)."""
  sys.path.insert(0, str(REPO / "configs"))
  try:
    import gmm2d  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = gmm2d.get_config()
  for key, value in overrides.items():
    config[key] = value
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n"


def another_run(wd: Path):
  wd.mkdir()
  (wd / "config.json").write_text(gmm2d_config_json(seed=7))
  (wd / "metrics.jsonl").write_text('{"step": 100, "gen_loss": -1.0}\n')
  (wd / "checkpoints" / "100").mkdir(parents=True)


def foreign_files(wd: Path):
  wd.mkdir()
  (wd / "notes.txt").write_text("my thesis, not a simjax run\n")


def unfinished_checkpoint_only(wd: Path):
  """A run killed during its first checkpoint write: nothing to evaluate."""
  wd.mkdir()
  (wd / "config.json").write_text(gmm2d_config_json())
  (wd / "checkpoints" / "5.orbax-checkpoint-tmp").mkdir(parents=True)


def a_file(wd: Path):
  wd.write_text("not a directory\n")


def same_run_with(name: str, data: bytes):
  """A resumable run of this config whose record `name` holds `data`."""
  def setup(wd: Path):
    wd.mkdir()
    (wd / "config.json").write_text(gmm2d_config_json())
    (wd / "checkpoints" / "100").mkdir(parents=True)
    (wd / name).write_bytes(data)
  return setup


_HELD_LOCKS = []  # descriptors kept open for the module's life: the lock another run holds


def locked_by_another_run(wd: Path):
  import fcntl  # pylint: disable=import-outside-toplevel
  wd.mkdir()
  (wd / "config.json").write_text(gmm2d_config_json())
  fd = os.open(wd / ".simjax.lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  _HELD_LOCKS.append(fd)


def no_gcsfs(root: Path) -> dict:
  """An environment in which `import gcsfs` fails, as on a machine without the [gcs] extra."""
  (root / "gcsfs").mkdir(parents=True, exist_ok=True)
  (root / "gcsfs" / "__init__.py").write_text('raise ImportError("No module named \'gcsfs\'")\n')
  return {"PYTHONPATH": str(root)}


ABS_CONFIG = f"--config={REPO / 'configs' / 'gmm2d.py'}"


TWO_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

CASES = [
    # Flags and config overrides (ml_collections / absl parse errors).
    Case("unknown_config_key", [CONFIG, "--workdir={workdir}", "--config.bogus=1"], "unknown config key --config.bogus"),
    Case("misspelt_config_key", [CONFIG, "--workdir={workdir}", "--config.batchsize=64"], "did you mean 'batch_size'"),
    Case("nested_unknown_key", [CONFIG, "--workdir={workdir}", "--config.optim.generator.lrate=1e-3"],
         "unknown config key --config.optim.generator.lrate"),
    Case("int_field_given_text", [CONFIG, "--workdir={workdir}", "--config.batch_size=abc"], "--config.batch_size=abc"),
    Case("bool_field_given_text", [CONFIG, "--workdir={workdir}", "--config.loss.normalize=maybe"],
         "--config.loss.normalize=maybe"),
    Case("unknown_flag", [CONFIG, "--workdir={workdir}", "--learning_rate=1"], "Unknown command line flag 'learning_rate'"),
    Case("missing_config_file", ["--config=configs/no_such_config.py", "--workdir={workdir}"],
         "could not load --config=configs/no_such_config.py"),
    Case("config_lacks_a_key", [f"--config={REPO / 'tests' / 'fixtures' / 'config_without_eval.py'}",
                                "--workdir={workdir}"], "the config has no key 'eval'"),
    Case("missing_workdir_flag", [CONFIG], "--workdir"),
    Case("unknown_mode", [CONFIG, "--workdir={workdir}", "--mode=finetune"], "--mode"),
    # Inconsistent settings (pipeline.validate).
    Case("non_positive_sigma_init", [CONFIG, "--workdir={workdir}", "--config.sigma_init=0"], "sigma_init must be > 0"),
    Case("negative_learning_rate", [CONFIG, "--workdir={workdir}", "--config.optim.generator.lr=-1e-4"], "lr must be > 0"),
    Case("sigma_min_above_sigma_max", [CONFIG, "--workdir={workdir}", "--config.sigma_min=100.0"],
         "sigma_min (100.0) must be below sigma_max"),
    Case("batch_not_divisible_by_devices", [CONFIG, "--workdir={workdir}", "--config.batch_size=3"],
         "batch_size=3 is not divisible by the 2 devices", env=TWO_CPU_DEVICES),
    Case("mixture_shapes_mismatch", [CONFIG, "--workdir={workdir}", "--config.teacher.means=((0.,1.),(1.,0.))"],
         "teacher.stds must have one entry per component"),
    # The workdir.
    Case("workdir_holds_another_config", [CONFIG, "--workdir={workdir}"], "holds a run with a different config (seed)",
         setup=another_run),
    Case("workdir_holds_foreign_files", [CONFIG, "--workdir={workdir}"], "holds no simjax run", setup=foreign_files),
    Case("workdir_is_a_file", [CONFIG, "--workdir={workdir}"], "is a file, not a directory", setup=a_file),
    Case("eval_without_workdir", [CONFIG, "--workdir={workdir}", "--mode=eval"], "no checkpoint"),
    Case("eval_with_only_an_unfinished_checkpoint", [CONFIG, "--workdir={workdir}", "--mode=eval"], "no checkpoint",
         setup=unfinished_checkpoint_only),
    # --overwrite clears only a simjax run; an empty --workdir (the current directory) is refused outright.
    Case("overwrite_a_directory_that_is_no_run", [CONFIG, "--workdir={workdir}", "--overwrite"], "holds no simjax run",
         setup=foreign_files),
    Case("empty_workdir_with_overwrite", [ABS_CONFIG, "--workdir=", "--overwrite"], "--workdir is empty",
         setup=foreign_files, in_workdir=True),
    Case("workdir_under_a_file", [CONFIG, "--workdir={workdir}/run"], "is a file", setup=a_file),
    # A directory no user may write into, root included (tests often run as root, whom mode bits do not stop).
    Case("unwritable_workdir", [CONFIG, "--workdir=/proc/1/simjax_run"], "is not writable"),
    Case("metrics_log_not_utf8", [CONFIG, "--workdir={workdir}"], "not UTF-8",
         setup=same_run_with("metrics.jsonl", b'{"step": 1}\n\xff\xfe\x00garbage\n')),
    Case("config_json_not_an_object", [CONFIG, "--workdir={workdir}"], "not an object",
         setup=same_run_with("config.json", b"[1, 2, 3]\n")),
    Case("two_runs_in_one_workdir", [CONFIG, "--workdir={workdir}"], "another simjax run is using",
         setup=locked_by_another_run),
    Case("object_store_without_gcsfs", [CONFIG, "--workdir=gs://bucket/run"], "pip install 'simjax[gcs]'"),
    Case("unsupported_url_scheme", [CONFIG, "--workdir=s3://bucket/run"], "not supported"),
]


def snapshot(path: Path):
  """Every entry under `path` with its kind, bytes (hashed) and mtime; None if absent."""
  if not path.exists():
    return None
  if path.is_file():
    return {".": ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)}
  out = {".": ("dir", None, path.stat().st_mtime_ns)}
  for p in sorted(path.rglob("*")):
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    out[str(p.relative_to(path))] = ("file" if p.is_file() else "dir", digest, p.stat().st_mtime_ns)
  return out


def _case_env(case: Case, root: Path) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(case.env or {})
  if case.id == "object_store_without_gcsfs":
    env.update(no_gcsfs(root / case.id / "site"))
  if case.in_workdir:
    env["PYTHONPATH"] = str(REPO)  # simjax itself, from a directory that is not the repository
  return env


def _prepare(case: Case, root: Path):
  """(workdir, its snapshot, the command's arguments) with the case's setup done."""
  wd = root / case.id / "workdir"
  wd.parent.mkdir(parents=True)
  if case.setup:
    case.setup(wd)
  return wd, snapshot(wd), [a.format(workdir=wd) for a in case.args]


def run_case(case: Case, root: Path):
  """(the finished `python -m simjax.main` process, the workdir's snapshot before, after)."""
  wd, before, args = _prepare(case, root)
  proc = subprocess.run([sys.executable, "-m", "simjax.main"] + args, cwd=wd if case.in_workdir else REPO,
                        env=_case_env(case, root), capture_output=True, text=True, timeout=300)
  return proc, before, snapshot(wd)


# Runs cases as `python -m simjax.main` does, each in a process of its own, forked from one that has already
# imported simjax's heavy dependencies (JAX, flax, orbax, SciPy: ~2-4 s of CPU a process otherwise). No
# backend is started and simjax.main (its flags) is not imported before the fork. The absl flags of modules
# imported before it (absl.testing's and chex's --test_* flags) are also known to the child's parser; no case
# uses them. Reads one JSON request a line, answers one line per finished case.
_FORKING_RUNNER = r"""
import json, os, runpy, signal, sys, traceback
sys.path[0] = sys.argv[1]
import jax, flax.linen, optax, orbax.checkpoint, scipy.stats
import simjax.pipelines.gmm, simjax.pipelines.image, simjax.pipelines.text_to_image
assert not jax._src.xla_bridge._backends, "a backend started before the fork"
requests = [json.loads(line) for line in sys.stdin]
running, parallel = {}, int(sys.argv[2])
while requests or running:
  while requests and len(running) < parallel:
    req = requests.pop(0)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      signal.alarm(300)
      for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
      os.chdir(req["cwd"])
      os.environ.clear(); os.environ.update(req["env"])
      sys.argv = [req["main"]] + req["args"]
      code = 0
      try:
        runpy.run_module("simjax.main", run_name="__main__", alter_sys=True)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
          print(e.code, file=sys.stderr)
      except BaseException:
        traceback.print_exc(); code = 1
      sys.stdout.flush(); sys.stderr.flush()
      os._exit(code)
    running[pid] = req["id"]
  pid, status = os.wait()
  print(json.dumps({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def run_cases(cases: Sequence[Case], root: Path, parallel: int = 3):
  """{case id: run_case's triple} for many cases, most forked from one process (see _FORKING_RUNNER): those
  with their own environment or working directory run as plain subprocesses."""
  own_process = [c for c in cases if c.env or c.in_workdir or c.id == "object_store_without_gcsfs"]
  forked = [c for c in cases if c not in own_process]
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    plain = {c.id: pool.submit(run_case, c, root) for c in own_process}
    prepared, lines = {}, []
    for c in forked:
      wd, before, args = _prepare(c, root)
      prepared[c.id] = (wd, before, args)
      lines.append(json.dumps({"id": c.id, "args": args, "cwd": str(REPO), "env": _case_env(c, root),
                               "main": str(REPO / "simjax" / "main.py"), "stdout": str(wd.parent / "stdout"),
                               "stderr": str(wd.parent / "stderr")}))
    runner = subprocess.run([sys.executable, "-c", _FORKING_RUNNER, str(REPO), str(parallel)], cwd=REPO,
                            input="\n".join(lines) + "\n", capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, timeout=1200)
    assert runner.returncode == 0, runner.stderr[-3000:]
    out = {}
    for line in runner.stdout.splitlines():
      done = json.loads(line)
      wd, before, args = prepared[done["id"]]
      out[done["id"]] = (subprocess.CompletedProcess(args, done["returncode"], (wd.parent / "stdout").read_text(),
                                                     (wd.parent / "stderr").read_text()), before, snapshot(wd))
    assert sorted(out) == sorted(prepared), runner.stderr[-3000:]
    out.update({k: f.result() for k, f in plain.items()})
  return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  return run_cases(CASES, tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_without_touching_the_workdir(outcomes, case):
  proc, before, after = outcomes[case.id]
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
  assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr[-2000:]}"
  assert lines[0].startswith("simjax: error: ") and case.expect in lines[0], lines[0]
  assert len(lines[0]) < 400 and "Traceback" not in proc.stderr
  assert proc.stdout.strip() == "", proc.stdout[-1000:]
  assert after == before, "the workdir must be left exactly as it was"


def test_error_lines_say_how_to_fix(outcomes):
  """Every message points at a fix: a flag or config key to set, or a workdir choice."""
  hints = ("--config", "--workdir", "--overwrite", "--mode", "--helpfull", "set ", "make it", "normalise", "pass ",
           "give it", "train first", "point --workdir")
  for case in CASES:
    line = outcomes[case.id][0].stderr.strip()
    assert any(h in line for h in hints), f"{case.id}: no fix in {line!r}"
