"""A gmm2d run with --workdir=gs://...: every file an object store keeps, resume and --overwrite included.

The store is tests/fake_gcs.py (GCS's JSON API in a thread): orbax writes checkpoints through
TensorStore, simjax's own files go through etils.epath/gcsfs, exactly as on Google Cloud Storage.
The same run in a local workdir is the reference: the object-store run must log the same rows.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("gcsfs", reason="gs:// workdirs need the [gcs] extra (gcsfs); CI installs it with [test]")
import fake_gcs  # pylint: disable=wrong-import-position

TINY = ["--config=configs/gmm2d.py", "--config.init.copy_steps=10", "--config.model.hidden=16",
        "--config.model.num_blocks=1", "--config.model.emb_features=16", "--config.batch_size=16",
        "--config.log_every=5", "--config.checkpoint_every=10", "--config.keep_checkpoints=2",
        "--config.eval.num_samples=500", "--config.eval.teacher_steps=4"]
WALL_CLOCK = {"steps_per_sec", "time"}


def run(workdir, num_steps, env, *extra):
  cmd = [sys.executable, "-m", "simjax.main", *TINY, f"--workdir={workdir}", f"--config.num_steps={num_steps}",
         *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def rows(text: str):
  return [{k: v for k, v in json.loads(l).items() if k not in WALL_CLOCK} for l in text.splitlines() if l.strip()]


def test_gmm2d_in_a_gs_workdir_runs_resumes_and_overwrites(tmp_path):
  with fake_gcs.serve() as server:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(server.env)
    wd, key = "gs://simjax-test/runs/gmm", "simjax-test/runs/gmm/"

    def files():
      return {name[len(key):]: data for name, data in server.objects.items() if name.startswith(key)}

    first = run(wd, 20, env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    stored = files()
    for name in ("config.json", "run_info.json", "metrics.jsonl", "eval/final.json", "samples/generator.npz",
                 "samples/teacher.npz", "checkpoints/20/commit_success.txt"):
      assert name in stored, f"{name} missing from the store: {sorted(stored)[:40]}"
    assert [r["step"] for r in rows(stored["metrics.jsonl"].decode())] == [5, 10, 15, 20]
    assert any(name.startswith("tensorboard/sim/events.out.tfevents.") for name in stored), sorted(stored)[:40]
    assert json.loads(stored["eval/final.json"])["generator"]["nfe"] == 1
    assert f"results in {wd}/eval/final.json" in first.stdout

    resumed = run(wd, 40, env)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "step 40/40" in out and "20 steps this run" in out, out[-2000:]
    stored = files()
    assert "checkpoints/40/commit_success.txt" in stored and "checkpoints/10/commit_success.txt" not in stored, \
        "keep_checkpoints=2 deletes old steps in the store"
    remote_rows = rows(stored["metrics.jsonl"].decode())

    changed = run(wd, 40, env, "--config.seed=7")
    assert changed.returncode == 2 and "different config" in changed.stderr, changed.stderr[-2000:]
    assert files() == stored, "a refused run leaves the store untouched"
    replaced = run(wd, 10, env, "--config.seed=7", "--overwrite")
    assert replaced.returncode == 0, (replaced.stdout + replaced.stderr)[-3000:]
    after = files()
    assert not any(name.startswith("checkpoints/40/") for name in after), "--overwrite cleared the old run"
    assert json.loads(after["config.json"])["seed"] == 7

  local = tmp_path / "local"
  reference = run(local, 40, env)
  assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
  assert remote_rows == rows((local / "metrics.jsonl").read_text()), \
      "a resumed object-store run logs exactly what an uninterrupted local run does"
