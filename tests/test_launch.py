"""Tests of the launch scripts (launch/tpu_pod.py, launch/slurm_gpu.py), run as subprocesses.

No cloud and no cluster: fake `gcloud`, `sbatch`, `srun` and `python3` executables on PATH
record how they were called. The launchers run from a stand-in checkout (their own files plus
light stand-in configs that load in milliseconds); the real checkout's configs are loaded only by
the tests of the help texts' examples. A dry run must print the exact commands and call nothing; a real
run must call the fakes with exactly what the dry run printed. The remote shell snippets
(install, background run, stop) and the batch script are also executed locally with fakes, so
their quoting and plumbing are checked, not just their text.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("tpu_pod.py", "slurm_gpu.py", "launch_common.py")
TPU_POD, SLURM_GPU = "tpu_pod.py", "slurm_gpu.py"  # run from the stand-in checkout, see `launch`

# Stand-ins for configs/cifar10.py and configs/gmm2d.py with the keys the tests use; they import
# only ml_collections, so a launcher checks keys against them without importing jax.
_STAND_IN_CONFIG = '''"""Stand-in for {name} in the launcher tests."""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.teacher = ml_collections.ConfigDict({{"checkpoint": arg or ""}})
  c.batch_size = 256
  c.num_steps = 1000
  c.note = ""
  c.sample = ml_collections.ConfigDict({{"name": "samples"}})
  return c
'''
_BROKEN_CONFIG = '''def get_config(arg=None):
  raise ValueError("needs a teacher checkpoint")
'''

# Records [tool name, *argv] as one JSON line per call. gcloud answers `describe` with the next
# state of FAKE_QUEUED_STATES; any tool exits 7 when its joined argv contains FAKE_FAIL_ON.
_FAKE_TOOL = """#!{python}
import json, os, pathlib, sys
name = pathlib.Path(sys.argv[0]).name
log = pathlib.Path(os.environ["FAKE_TOOL_LOG"])
with log.open("a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "gcloud" and "describe" in sys.argv:
    states = os.environ.get("FAKE_QUEUED_STATES", "ACTIVE").split(",")
    counter = log.with_name("describe_calls")
    calls = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(calls + 1))
    print(states[min(calls, len(states) - 1)])
if name == "sbatch":
    log.with_name("submitted.sbatch").write_text(pathlib.Path(sys.argv[-1]).read_text())
    print("Submitted batch job 4242")
fail_on = os.environ.get("FAKE_FAIL_ON")
if fail_on and fail_on in " ".join(sys.argv[1:]):
    sys.exit(7)
"""

PROJECT_ZONE_NAME = ["--project=my-proj", "--zone=us-central2-b", "--name=sim-pod"]
GCLOUD_TARGET = "sim-pod --project=my-proj --zone=us-central2-b"
RUN_ARGS = ["--config=configs/cifar10.py", "--workdir=gs://my-bucket/runs/c10",
            "--config.batch_size=512"]
REPO_ARGS = ["--repo=https://github.com/example/simjax", "--ref=v0.1.0"]

INSTALL_FROM_GIT = (
    "python3 -m pip install --upgrade 'jax[tpu]>=0.10.2,<0.11' && rm -rf simjax && "
    "git clone --quiet https://github.com/example/simjax simjax && "
    "git -C simjax checkout --quiet v0.1.0 && python3 -m pip install -e './simjax[gcs,cifar10]'")
SIMJAX_MAIN = ("python3 -m simjax.main --config=configs/cifar10.py "
               "--workdir=gs://my-bucket/runs/c10 --mode=train --config.batch_size=512")
RUN_IN_BACKGROUND = (
    f"cd simjax || exit 1; SIMJAX_DISTRIBUTED=1 nohup {SIMJAX_MAIN} "
    '> "$HOME/simjax.log" 2>&1 < /dev/null & echo $! > "$HOME/simjax.pid"; '
    'echo "$(hostname): simjax started, log in $HOME/simjax.log"')
RUN_IN_FOREGROUND = (
    f"set -o pipefail; cd simjax || exit 1; SIMJAX_DISTRIBUTED=1 {SIMJAX_MAIN} "
    '2>&1 | tee "$HOME/simjax.log"')


def ssh_line(worker: str, remote_command: str) -> str:
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sim-pod", "--project=my-proj",
                       "--zone=us-central2-b", f"--worker={worker}", f"--command={remote_command}"])


@pytest.fixture(scope="session")
def stand_in_checkout(tmp_path_factory) -> Path:
    """launch/ copied from this checkout, beside stand-in configs (and one that fails to load)."""
    root = tmp_path_factory.mktemp("checkout") / "simjax"
    (root / "launch").mkdir(parents=True)
    (root / "configs").mkdir()
    for name in LAUNCHERS:
        shutil.copy(REPO_ROOT / "launch" / name, root / "launch" / name)
    for name in ("cifar10.py", "gmm2d.py"):
        (root / "configs" / name).write_text(_STAND_IN_CONFIG.format(name=f"configs/{name}"))
    (root / "configs" / "broken.py").write_text(_BROKEN_CONFIG)
    return root


@pytest.fixture
def fakes(tmp_path, stand_in_checkout):
    """A bin/ of fake tools first on PATH; `fakes.log` exists only once one of them ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "sbatch", "srun"):
        path = bin_dir / tool
        path.write_text(_FAKE_TOOL.format(python=sys.executable))
        path.chmod(0o755)

    class Fakes:
        log = tmp_path / "calls" / "tool_calls.jsonl"
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "FAKE_TOOL_LOG": str(tmp_path / "calls" / "tool_calls.jsonl")}
        cwd = tmp_path / "cwd"
        checkout = stand_in_checkout

        def calls(self) -> list[list[str]]:
            return [json.loads(line) for line in self.log.read_text().splitlines()]

    (tmp_path / "calls").mkdir()
    Fakes.cwd.mkdir()
    return Fakes()


def launch(script: str, args, fakes, python=(sys.executable,), checkout=None, **env) -> subprocess.CompletedProcess:
    """Runs launch/<script> of the stand-in checkout (or of `checkout`) with args."""
    path = (checkout or fakes.checkout) / "launch" / script
    return subprocess.run([*python, str(path), *args], capture_output=True, text=True,
                          cwd=fakes.cwd, env={**fakes.env, **env}, timeout=120)


def dry_run_lines(script: str, args, fakes) -> list[str]:
    # --dry-run goes before any `--` (after the subcommand for tpu_pod.py).
    args = [args[0], "--dry-run", *args[1:]] if script == TPU_POD else ["--dry-run", *args]
    result = launch(script, args, fakes)
    assert result.returncode == 0, result.stderr
    assert not fakes.log.exists(), "a dry run must not call any tool"
    return result.stdout.splitlines()


def remote_command(line: str) -> str:
    """The --command=... of a printed `gcloud ... ssh` line, as the worker's shell gets it."""
    (command,) = [arg for arg in shlex.split(line) if arg.startswith("--command=")]
    return command[len("--command="):]


# --------------------------------------------------------------------------- TPU pod: dry runs

def test_tpu_up_dry_run_prints_create_install_and_run_on_all_workers(fakes):
    lines = dry_run_lines(TPU_POD, ["up", *PROJECT_ZONE_NAME, "--accelerator-type=v5litepod-64",
                                    *REPO_ARGS, *RUN_ARGS], fakes)
    assert lines == [
        f"gcloud compute tpus tpu-vm create {GCLOUD_TARGET} --accelerator-type=v5litepod-64 "
        "--version=v2-alpha-tpuv5-lite",
        ssh_line("all", INSTALL_FROM_GIT),
        ssh_line("all", RUN_IN_BACKGROUND),
    ]


def test_tpu_queued_spot_one_shot_job_waits_for_active_and_deletes_with_force(fakes):
    lines = dry_run_lines(TPU_POD, ["up", *PROJECT_ZONE_NAME, "--accelerator-type=v4-32", "--queued",
                                    "--spot", "--foreground", "--delete-after", *REPO_ARGS, *RUN_ARGS],
                          fakes)
    assert lines == [
        f"gcloud compute tpus queued-resources create {GCLOUD_TARGET} --node-id=sim-pod "
        "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
        f"gcloud compute tpus queued-resources describe {GCLOUD_TARGET} '--format=value(state.state)'",
        ssh_line("all", INSTALL_FROM_GIT),
        ssh_line("all", RUN_IN_FOREGROUND),
        f"gcloud compute tpus queued-resources delete {GCLOUD_TARGET} --force --quiet",
    ]


@pytest.mark.parametrize("args, expected", [
    (["create", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot"],
     [f"gcloud compute tpus tpu-vm create {GCLOUD_TARGET} --accelerator-type=v6e-16 "
      "--version=v2-alpha-tpuv6e --spot"]),
    (["create", "--accelerator-type=v5p-128", "--queued"],
     [f"gcloud compute tpus queued-resources create {GCLOUD_TARGET} --node-id=sim-pod "
      "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5",
      f"gcloud compute tpus queued-resources describe {GCLOUD_TARGET} '--format=value(state.state)'"]),
    (["logs"], [ssh_line("0", 'tail -n 200 -F "$HOME/simjax.log"')]),
    (["logs", "--worker=all", "--lines=5", "--run-name=c10"],
     [ssh_line("all", 'tail -n 5 -F "$HOME/c10.log"')]),
    (["delete"], [f"gcloud compute tpus tpu-vm delete {GCLOUD_TARGET} --quiet"]),
    (["delete", "--queued"], [f"gcloud compute tpus queued-resources delete {GCLOUD_TARGET} --force --quiet"]),
])
def test_tpu_single_step_dry_runs(fakes, args, expected):
    command, *flags = args
    assert dry_run_lines(TPU_POD, [command, *PROJECT_ZONE_NAME, *flags], fakes) == expected


def test_tpu_run_forwards_env_overrides_and_extra_flags_quoted(fakes):
    lines = dry_run_lines(TPU_POD, ["run", *PROJECT_ZONE_NAME, "--config=configs/gmm2d.py:8",
                                    "--workdir=gs://my-bucket/gmm", "--mode=eval",
                                    "--env", "XLA_FLAGS=--xla_dump_to=/tmp/a b",
                                    "--config.sample.name=it's here", "--", "--distributed"], fakes)
    assert len(lines) == 1
    assert remote_command(lines[0]) == (
        "cd simjax || exit 1; SIMJAX_DISTRIBUTED=1 XLA_FLAGS='--xla_dump_to=/tmp/a b' nohup "
        "python3 -m simjax.main --config=configs/gmm2d.py:8 --workdir=gs://my-bucket/gmm --mode=eval "
        "'--config.sample.name=it'\"'\"'s here' --distributed "
        '> "$HOME/simjax.log" 2>&1 < /dev/null & echo $! > "$HOME/simjax.pid"; '
        'echo "$(hostname): simjax started, log in $HOME/simjax.log"')


def test_tpu_tarball_install_copies_to_all_workers_then_installs(fakes, tmp_path):
    tarball = tmp_path / "simjax.tar.gz"
    tarball.write_bytes(b"")
    lines = dry_run_lines(TPU_POD, ["install", *PROJECT_ZONE_NAME, f"--tarball={tarball}"], fakes)
    assert lines == [
        f"gcloud compute tpus tpu-vm scp {tarball} sim-pod:simjax-src.tar.gz --project=my-proj "
        "--zone=us-central2-b --worker=all",
        ssh_line("all", "python3 -m pip install --upgrade 'jax[tpu]>=0.10.2,<0.11' && rm -rf simjax && "
                        "mkdir simjax && tar -xzf simjax-src.tar.gz -C simjax --strip-components=1 && "
                        "python3 -m pip install -e './simjax[gcs,cifar10]'"),
    ]


# --------------------------------------------------------------------------- TPU pod: real runs

def test_tpu_real_run_calls_gcloud_with_exactly_the_dry_run_commands(fakes):
    args = ["up", *PROJECT_ZONE_NAME, "--accelerator-type=v5litepod-16", "--queued", "--spot",
            "--poll-seconds=0", *REPO_ARGS, *RUN_ARGS]
    printed = [shlex.split(line) for line in dry_run_lines(TPU_POD, args, fakes)]

    result = launch(TPU_POD, args, fakes, FAKE_QUEUED_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    create, describe, install, run = printed
    # The state is polled until ACTIVE (third answer), then install and run follow once each.
    assert fakes.calls() == [create, describe, describe, describe, install, run]
    assert "WAITING_FOR_RESOURCES" in result.stderr and "is ACTIVE" in result.stderr


def test_tpu_queued_resource_that_fails_stops_the_launch(fakes):
    result = launch(TPU_POD, ["up", *PROJECT_ZONE_NAME, "--accelerator-type=v4-8", "--queued",
                              "--poll-seconds=0", *REPO_ARGS, *RUN_ARGS], fakes,
                    FAKE_QUEUED_STATES="WAITING_FOR_RESOURCES,FAILED")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("tpu_pod.py: error: queued resource sim-pod is FAILED")
    assert [call[3:5] for call in fakes.calls()] == [
        ["queued-resources", "create"], ["queued-resources", "describe"], ["queued-resources", "describe"]]


def test_tpu_wait_timeout_gives_up_with_one_line(fakes):
    result = launch(TPU_POD, ["wait", *PROJECT_ZONE_NAME, "--poll-seconds=0.05", "--wait-timeout=0.2"],
                    fakes, FAKE_QUEUED_STATES="WAITING_FOR_RESOURCES")
    assert result.returncode == 1
    assert "still WAITING_FOR_RESOURCES after" in result.stderr.strip().splitlines()[-1]


def test_tpu_failed_run_still_deletes_the_tpu_with_delete_after(fakes):
    result = launch(TPU_POD, ["up", *PROJECT_ZONE_NAME, "--accelerator-type=v4-8", "--foreground",
                              "--delete-after", *REPO_ARGS, *RUN_ARGS], fakes, FAKE_FAIL_ON="simjax.main")
    assert result.returncode == 7
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("tpu_pod.py: error: command failed with exit status 7: gcloud compute tpus tpu-vm ssh")
    verbs = [call[3:5] for call in fakes.calls()]
    assert verbs == [["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "delete"]]


def test_tpu_missing_gcloud_is_reported_in_one_line(fakes, tmp_path):
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    result = launch(TPU_POD, ["delete", *PROJECT_ZONE_NAME], fakes, PATH=str(empty_bin))
    assert result.returncode == 127
    assert result.stderr.splitlines()[-1].startswith(
        "tpu_pod.py: error: command failed with exit status 127 (is it installed and on PATH?): gcloud ")


# --------------------------------------------------------------------------- TPU pod: the remote shell lines

def _fake_python(bin_dir: Path, record: Path, keep_running: bool = False) -> None:
    """A `python3` that records its argv and SIMJAX_DISTRIBUTED, prints, and maybe keeps running."""
    script = (f'#!/bin/bash\nprintf "%s\\n" "SIMJAX_DISTRIBUTED=$SIMJAX_DISTRIBUTED" "$@" >> {shlex.quote(str(record))}\n'
              'echo "hello from process 0"\n')
    if keep_running:
        script += "while :; do sleep 0.05; done\n"
    (bin_dir / "python3").write_text(script)
    (bin_dir / "python3").chmod(0o755)


def _as_worker(command: str, home: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    """Runs a remote --command the way `tpu-vm ssh` does: bash, in $HOME."""
    env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True,
                          timeout=30)


def test_tpu_remote_install_from_tarball_unpacks_and_installs_editable(fakes, tmp_path):
    source = tmp_path / "src"
    (source / "configs").mkdir(parents=True)
    (source / "setup.py").write_text("# setup\n")
    (source / "configs" / "x.py").write_text("# config\n")
    tarball = tmp_path / "simjax.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(source, arcname="simjax-0.1.0")
    lines = dry_run_lines(TPU_POD, ["install", *PROJECT_ZONE_NAME, f"--tarball={tarball}"], fakes)

    home, bin_dir, record = tmp_path / "home", tmp_path / "worker_bin", tmp_path / "python_calls"
    home.mkdir(), bin_dir.mkdir()
    _fake_python(bin_dir, record)
    (home / "simjax-src.tar.gz").write_bytes(tarball.read_bytes())  # what the scp line delivers
    (home / "simjax").mkdir()
    (home / "simjax" / "stale.py").write_text("")  # left over from an earlier install
    result = _as_worker(remote_command(lines[1]), home, bin_dir)
    assert result.returncode == 0, result.stderr
    assert (home / "simjax" / "setup.py").is_file() and (home / "simjax" / "configs" / "x.py").is_file()
    assert not (home / "simjax" / "stale.py").exists()
    calls = record.read_text().split("SIMJAX_DISTRIBUTED=\n")[1:]
    assert calls == ["-m\npip\ninstall\n--upgrade\njax[tpu]>=0.10.2,<0.11\n", "-m\npip\ninstall\n-e\n./simjax[gcs,cifar10]\n"]


def test_tpu_remote_background_run_survives_and_stop_ends_it(fakes, tmp_path):
    lines = dry_run_lines(TPU_POD, ["run", *PROJECT_ZONE_NAME, *RUN_ARGS, "--config.note=a b"], fakes)
    home, bin_dir, record = tmp_path / "home", tmp_path / "worker_bin", tmp_path / "python_calls"
    (home / "simjax").mkdir(parents=True)
    bin_dir.mkdir()
    _fake_python(bin_dir, record, keep_running=True)

    started = _as_worker(remote_command(lines[0]), home, bin_dir)  # returns while the run goes on
    assert started.returncode == 0, started.stderr
    assert "simjax started, log in" in started.stdout
    pid = int((home / "simjax.pid").read_text())
    try:
        deadline = time.monotonic() + 10
        while "hello" not in (home / "simjax.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "hello from process 0" in (home / "simjax.log").read_text()
        assert record.read_text().splitlines() == [
            "SIMJAX_DISTRIBUTED=1", "-m", "simjax.main", "--config=configs/cifar10.py",
            "--workdir=gs://my-bucket/runs/c10", "--mode=train", "--config.batch_size=512",
            "--config.note=a b"]
        os.kill(pid, 0)  # still running after the "ssh session" ended

        stop_line = dry_run_lines(TPU_POD, ["stop", *PROJECT_ZONE_NAME], fakes)[0]
        stopped = _as_worker(remote_command(stop_line), home, bin_dir)
        assert stopped.returncode == 0, stopped.stderr
        assert not (home / "simjax.pid").exists()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        try:
            os.kill(pid, 9)  # only the fake run this test started
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- TPU pod: bad arguments

@pytest.mark.parametrize("args, message", [
    (["create", "--zone=us-central2-b", "--name=t", "--accelerator-type=v4-8"], "missing --project"),
    (["create", "--project=p", "--name=t", "--accelerator-type=v4-8"], "missing --zone"),
    (["create", "--project=p", "--zone=central", "--name=t", "--accelerator-type=v4-8"], "is not a zone name"),
    (["create", "--project=p", "--zone=us-central2-b", "--accelerator-type=v4-8"], "missing --name"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=Bad_Name", "--accelerator-type=v4-8"],
     "TPU name 'Bad_Name' is invalid"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=t", "--accelerator-type=v5e-64"],
     "unknown accelerator type 'v5e-64' (v5e is called v5litepod)"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=t", "--accelerator-type=tpu64"],
     "unknown accelerator type 'tpu64'"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=t"], "missing --accelerator-type"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py",
      "--workdir=runs/x"], "workdir 'runs/x' is relative"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py",
      "--workdir=gs://"], "is not a valid gs:// path"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py"], "missing --workdir"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--workdir=/w"], "missing --config"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py", "--workdir=/w",
      "--config.lr"], "has no value"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py", "--workdir=/w",
      "--env=1BAD"], "is not NAME=VALUE"),
    (["up", "--project=p", "--zone=us-central2-b", "--name=t", "--accelerator-type=v4-8",
      "--repo=https://x/y", "--config=configs/gmm2d.py", "--workdir=/w", "--delete-after"],
     "--delete-after needs --foreground"),
    (["install", "--project=p", "--zone=us-central2-b", "--name=t"], "pass exactly one install source"),
    (["install", "--project=p", "--zone=us-central2-b", "--name=t", "--repo=github.com/x"],
     "is not a git URL"),
    (["install", "--project=p", "--zone=us-central2-b", "--name=t", "--tarball=/no/such.tar.gz"],
     "does not exist"),
    (["logs", "--project=p", "--zone=us-central2-b", "--name=t", "--config.a=1"], "only apply to run and up"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=t", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "required: COMMAND"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/gmm2d.py", "--workdir=/w",
      "--", "--dry-run"], "--dry-run after `--` would go to simjax"),
    # The config path and keys, against the checkout (here the stand-in's configs).
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10_sim.py", "--workdir=/w"],
     "config file 'configs/cifar10_sim.py' does not exist in the simjax tree "),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10_sim.py", "--workdir=/w"],
     "pass one of configs/broken.py, configs/cifar10.py, configs/gmm2d.py"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--config.training.batch_size=512"],
     "unknown config key --config.training.batch_size: configs/cifar10.py has no field 'training'"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--config.batch_sise=512"],
     "has no field 'batch_sise' (did you mean 'batch_size'?)"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--config.sample.nmae=x"],
     "has no field 'sample.nmae' (did you mean 'sample.name'?)"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--config.batch_size.x=1"],
     "has no field 'batch_size.x' ('batch_size' is a value, not a section)"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py:/t.pkl", "--workdir=/w", "--config.batch_size=8", "--",
      "--config.nope=1"], "unknown config key --config.nope"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--", "--config.nope"], "has no value"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--", "--workdir=/other"],
     "--workdir after `--` would contradict the launcher's own --workdir"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/cifar10.py", "--workdir=/w", "--", "--config=configs/gmm2d.py"],
     "--config after `--` would contradict"),
    (["run", "--project=p", "--zone=us-central2-b", "--name=t", "--config=configs/broken.py", "--workdir=/w", "--config.batch_size=1"],
     "config broken.py fails to load (ValueError: needs a teacher checkpoint)"),
    (["up", "--project=p", "--zone=us-central2-b", "--name=t", "--accelerator-type=v4-8", *REPO_ARGS,
      "--config=configs/gmm2d.py", "--workdir=gs://my-bucket/x", "--config.num_step=1"],
     "unknown config key --config.num_step"),
])
def test_tpu_bad_arguments_exit_2_with_one_line(fakes, args, message):
    result = launch(TPU_POD, args, fakes)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("tpu_pod.py: error: ") and message in result.stderr, result.stderr
    assert not fakes.log.exists()


# --------------------------------------------------------------------------- SLURM

def slurm_args(fakes) -> list[str]:
    return ["--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00",
            "--account=my-acct", f"--repo-dir={fakes.checkout}", "--script=c10.sbatch",
            "--config=configs/cifar10.py", "--workdir=/shared/runs/c10", "--config.batch_size=512"]


EXPECTED_SCRIPT = """#!/bin/bash
#SBATCH --job-name=simjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --account=my-acct
#SBATCH --chdir={repo_dir}
#SBATCH --output=slurm-%x-%j.out

# simjax: 2 node(s) x 8 GPU(s) = 16 processes, one per GPU.
set -eo pipefail
export SIMJAX_DISTRIBUTED=1
srun --gpu-bind=none --kill-on-bad-exit=1 python3 -m simjax.main --config=configs/cifar10.py \
--workdir=/shared/runs/c10 --mode=train --config.batch_size=512
"""


def test_slurm_dry_run_prints_the_batch_script_and_the_sbatch_command(fakes):
    lines = dry_run_lines(SLURM_GPU, slurm_args(fakes), fakes)
    assert lines[0] == "cat > c10.sbatch <<'SIMJAX_SBATCH_EOF'"
    assert lines[-2:] == ["SIMJAX_SBATCH_EOF", "sbatch c10.sbatch"]
    assert "\n".join(lines[1:-2]) + "\n" == EXPECTED_SCRIPT.format(repo_dir=fakes.checkout)
    assert list(fakes.cwd.iterdir()) == []  # no script written either


def test_slurm_script_runs_one_process_per_gpu():
    # Parse the directives independently of the exact text above.
    directives = dict(line.split(" ", 1)[1].lstrip("-").split("=", 1)
                      for line in EXPECTED_SCRIPT.splitlines() if line.startswith("#SBATCH "))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"
    assert "gpus-per-task" not in directives  # would hide GPU SLURM_LOCALID from JAX
    body = EXPECTED_SCRIPT.split("\n\n", 1)[1]
    assert body.index("export SIMJAX_DISTRIBUTED=1") < body.index("srun ")


def test_slurm_real_submit_matches_the_dry_run_snippet(fakes, tmp_path):
    expected = EXPECTED_SCRIPT.format(repo_dir=fakes.checkout)
    snippet = launch(SLURM_GPU, [*slurm_args(fakes), "--dry-run"], fakes).stdout
    result = launch(SLURM_GPU, slurm_args(fakes), fakes)
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 4242" in result.stdout
    assert (fakes.cwd / "c10.sbatch").read_text() == expected
    assert fakes.calls() == [["sbatch", "c10.sbatch"]]

    # Pasting the dry-run output into a shell does the same thing.
    other_cwd = tmp_path / "pasted"
    other_cwd.mkdir()
    fakes.log.unlink()
    pasted = subprocess.run(["bash", "-c", snippet], cwd=other_cwd, env=fakes.env, capture_output=True,
                            text=True, timeout=30)
    assert pasted.returncode == 0, pasted.stderr
    assert (other_cwd / "c10.sbatch").read_text() == expected
    assert fakes.calls() == [["sbatch", "c10.sbatch"]]


def test_slurm_batch_script_activates_venv_and_sruns_simjax(fakes, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export FAKE_VENV_ACTIVE=yes\n")
    result = launch(SLURM_GPU, ["--nodes=1", "--gpus-per-node=4", f"--venv={venv}",
                                "--setup=export FAKE_MODULE=cuda", "--env", "XLA_FLAGS=--a --b",
                                f"--repo-dir={fakes.checkout}", "--config=configs/gmm2d.py",
                                "--workdir=/shared/runs/gmm", "--config.sample.name=a b", "--",
                                "--distributed"], fakes)
    assert result.returncode == 0, result.stderr
    script = fakes.cwd / "simjax.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run the batch script as SLURM would on the first node (fake srun records argv + env).
    (fakes.cwd / "srun_env").unlink(missing_ok=True)
    srun = Path(fakes.env["PATH"].split(os.pathsep)[0]) / "srun"
    srun.write_text(srun.read_text() + "pathlib.Path(os.environ['FAKE_TOOL_LOG']).with_name('srun_env')"
                    ".write_text(json.dumps({k: os.environ.get(k) for k in "
                    "('SIMJAX_DISTRIBUTED', 'FAKE_VENV_ACTIVE', 'FAKE_MODULE', 'XLA_FLAGS')}))\n")
    fakes.log.unlink()
    ran = subprocess.run(["bash", str(script)], cwd=fakes.cwd, env=fakes.env, capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert fakes.calls() == [["srun", "--gpu-bind=none", "--kill-on-bad-exit=1", "python3", "-m",
                              "simjax.main", "--config=configs/gmm2d.py", "--workdir=/shared/runs/gmm",
                              "--mode=train", "--config.sample.name=a b", "--distributed"]]
    assert json.loads(fakes.log.with_name("srun_env").read_text()) == {
        "SIMJAX_DISTRIBUTED": "1", "FAKE_VENV_ACTIVE": "yes", "FAKE_MODULE": "cuda",
        "XLA_FLAGS": "--a --b"}


def test_slurm_container_and_gres_variant(fakes):
    lines = dry_run_lines(SLURM_GPU, ["--nodes=4", "--gpus-per-node=4", "--gres", "--cpus-per-task=8",
                                      "--sbatch-option=--qos=high", "--container-image=nvcr.io/nvidia/jax:25.04-py3",
                                      "--container-mounts=/data:/data", f"--repo-dir={fakes.checkout}",
                                      "--config=configs/gmm2d.py", "--workdir=gs://bucket/x"], fakes)
    script = "\n".join(lines)
    for directive in ("--nodes=4", "--ntasks-per-node=4", "--gres=gpu:4", "--cpus-per-task=8", "--qos=high"):
        assert f"#SBATCH {directive}\n" in script
    assert "--gpus-per-node" not in script
    assert ("srun --gpu-bind=none --kill-on-bad-exit=1 --container-image=nvcr.io/nvidia/jax:25.04-py3 "
            f"--container-mounts={fakes.checkout}:{fakes.checkout},/data:/data --container-workdir={fakes.checkout} "
            "python3 -m simjax.main --config=configs/gmm2d.py --workdir=gs://bucket/x --mode=train") in lines


def test_slurm_sbatch_failure_is_reported(fakes):
    result = launch(SLURM_GPU, slurm_args(fakes), fakes, FAKE_FAIL_ON="c10.sbatch")
    assert result.returncode == 7
    assert result.stderr.strip().splitlines()[-1] == (
        "slurm_gpu.py: error: command failed with exit status 7: sbatch c10.sbatch")


@pytest.mark.parametrize("change, message", [
    ({"--nodes": "0"}, "--nodes=0 must be at least 1"),
    ({"--nodes": None}, "missing --nodes"),
    ({"--gpus-per-node": None}, "missing --gpus-per-node"),
    ({"--time": "1 day"}, "is not a SLURM time"),
    ({"--workdir": "runs/c10"}, "workdir 'runs/c10' is relative"),
    ({"--config": "configs/x.yaml"}, "is not a .py file"),
    ({"--repo-dir": "simjax"}, "must be an absolute path"),
    ({"--repo-dir": "/no/such/checkout"}, "--repo-dir='/no/such/checkout' does not exist here"),
    ({"--config": "configs/cifar10_sim.py"}, "config file 'configs/cifar10_sim.py' does not exist in the simjax tree"),
    ({"--config.batch_size": None, "--config.training.batch_size": "512"},
     "unknown config key --config.training.batch_size: configs/cifar10.py has no field 'training'"),
    ({"--partition": "gpu;rm"}, "is not a SLURM name"),
    ({"--container-image": "img", "--venv": "/v"}, "exclude each other"),
    ({"--bogus": "1"}, "unrecognized arguments: --bogus=1"),
])
def test_slurm_bad_arguments_exit_2_with_one_line(fakes, change, message):
    args = dict(arg.split("=", 1) for arg in slurm_args(fakes))
    args.update(change)
    argv = [f"{flag}={value}" for flag, value in args.items() if value is not None]
    result = launch(SLURM_GPU, argv, fakes)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("slurm_gpu.py: error: ") and message in result.stderr, result.stderr
    assert not fakes.log.exists() and list(fakes.cwd.iterdir()) == []


# --------------------------------------------------------------------------- config path and keys

@pytest.mark.parametrize("script, flags", [
    (TPU_POD, ["run", "--dry-run", *PROJECT_ZONE_NAME, "--workdir=gs://my-bucket/x"]),
    (SLURM_GPU, ["--dry-run", "--nodes=1", "--gpus-per-node=8", "--workdir=/shared/runs/x"]),
])
@pytest.mark.parametrize("config_args, message", [
    (["--config=configs/cifar10_sim.py"], "config file 'configs/cifar10_sim.py' does not exist"),
    (["--config=configs/cifar10.py", "--config.training.batch_size=512"],
     "unknown config key --config.training.batch_size"),
    (["--config=configs/gmm2d.py", "--", "--config.num_stepz=5"],
     "has no field 'num_stepz' (did you mean 'num_steps'?)"),
])
def test_dry_runs_refuse_a_missing_config_file_or_key(fakes, script, flags, config_args, message):
    result = launch(script, [*flags, *config_args], fakes)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not fakes.log.exists() and list(fakes.cwd.iterdir()) == []


def test_without_ml_collections_paths_are_checked_and_keys_left_to_simjax(fakes):
    """`python -S` has no site-packages, hence no ml_collections: the launchers' bare-Python case."""
    bare = (sys.executable, "-S")
    probe = subprocess.run([*bare, "-c", "import ml_collections"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("ml_collections is importable without site-packages here; cannot test its absence")
    flags = ["run", *PROJECT_ZONE_NAME, "--dry-run", "--workdir=gs://my-bucket/x"]
    missing = launch(TPU_POD, [*flags, "--config=configs/cifar10_sim.py"], fakes, python=bare)
    assert missing.returncode == 2
    assert "config file 'configs/cifar10_sim.py' does not exist" in missing.stderr

    unchecked = launch(TPU_POD, [*flags, "--config=configs/cifar10.py", "--config.training.batch_size=1"],
                       fakes, python=bare)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "--config.training.batch_size=1" in unchecked.stdout  # forwarded; simjax will refuse it
    assert unchecked.stderr.startswith("# config keys not checked: ml_collections is not importable")
    assert not fakes.log.exists()


def _docstring_example(script: Path) -> list[str]:
    """The launcher arguments of the `Example:` in a launcher's docstring (its --help text)."""
    doc = ast.get_docstring(ast.parse(script.read_text()))
    block = doc.split("Example:\n", 1)[1].split("\n\n", 1)[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["python3", f"launch/{script.name}"], argv
    return argv[2:]


@pytest.mark.parametrize("script", [TPU_POD, SLURM_GPU])
def test_help_example_names_a_config_and_keys_of_the_real_checkout(fakes, script):
    """The --help example, run as written (it is a dry run) from this checkout: nothing refused,
    the keys checked against the real config file (loaded with its simjax imports)."""
    example = _docstring_example(REPO_ROOT / "launch" / script)
    assert "--dry-run" in example and any(arg.startswith("--config.") for arg in example)
    result = launch(script, example, fakes, checkout=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "not checked" not in result.stderr, result.stderr
    assert not fakes.log.exists()


def test_launcher_texts_name_only_configs_that_exist():
    """Every configs/<name>.py the launchers' help and messages name is a file of this checkout."""
    named = set()
    for name in LAUNCHERS:
        named |= set(re.findall(r"configs/(\w+)\.py", (REPO_ROOT / "launch" / name).read_text()))
    named.discard("NAME")  # the placeholder of configs/NAME.py
    assert {"cifar10", "gmm2d"} <= named
    assert [n for n in sorted(named) if not (REPO_ROOT / "configs" / f"{n}.py").is_file()] == []
