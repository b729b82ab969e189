#!/usr/bin/env python3
"""Run simjax on several GPU nodes with SLURM: write an sbatch script and submit it.

The job starts one process per GPU: `--ntasks-per-node` equals `--gpus-per-node`, every task
sees all GPUs of its node, and `jax.distributed.initialize()` (called by simjax because the
script exports SIMJAX_DISTRIBUTED=1) reads SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_NODELIST for
the coordinator and makes task SLURM_LOCALID drive GPU number SLURM_LOCALID. That is why the
script asks for `--gpus-per-node` and runs `srun --gpu-bind=none` rather than `--gpus-per-task=1`:
with per-task binding each task sees a single GPU numbered 0 and JAX would look for GPU
SLURM_LOCALID in vain (jax-ml/jax#28194).

`--dry-run` prints, instead of submitting, a shell snippet that does exactly what the launcher
would do: write the batch script (a here-document) and run `sbatch` on it.

The config file must exist in the checkout `--repo-dir` (default: the one holding this script),
seen from where the launcher runs. When ml_collections and simjax's imports are importable by the
launcher's Python, as with the project's venv (`/shared/envs/simjax/bin/python launch/slurm_gpu.py`),
every `--config.KEY=VALUE` is also checked against the config file; with a bare `python3` the keys
are left to simjax (a note on stderr says so). A missing file, or a checked key that names no
field, exits 2 before anything is written or submitted.

Example:
  python3 launch/slurm_gpu.py --nodes=2 --gpus-per-node=8 --partition=gpu --time=24:00:00 \\
      --account=my-account --venv=/shared/envs/simjax \\
      --config=configs/cifar10.py:/shared/models/edm-cifar10-32x32-uncond-vp.pkl \\
      --workdir=/shared/runs/cifar10 --config.batch_size=512 --config.num_steps=200000 --dry-run
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from launch_common import (CommandRunner, OneLineArgumentParser, UsageError, check_config,
                           override_keys, parse_env_assignments, require_positive, run_main,
                           simjax_command, split_config_overrides, validate_config_path,
                           validate_mode, validate_workdir)

PROG = "slurm_gpu.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
HEREDOC_END = "SIMJAX_SBATCH_EOF"

# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (or UNLIMITED).
_SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
_SLURM_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,:+-]*")
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG, allow_abbrev=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="simjax --config.KEY=VALUE overrides (anywhere; KEY a field of the --config file, e.g. "
               "--config.batch_size=512) and `-- EXTRA_FLAGS` (at the end: tokens after `--` go to "
               "simjax.main unchanged, e.g. -- --overwrite) are appended to the simjax command.")
    job = parser.add_argument_group("allocation")
    job.add_argument("--nodes", type=int, help="number of nodes (required)")
    job.add_argument("--gpus-per-node", type=int,
                     help="GPUs used on each node = processes per node (required)")
    job.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    job.add_argument("--time", help="wall-clock limit, e.g. 24:00:00 or 2-00:00:00 (default: the partition's)")
    job.add_argument("--account", help="account to charge (default: yours)")
    job.add_argument("--cpus-per-task", type=int, help="CPU cores per process (default: the cluster's)")
    job.add_argument("--job-name", default="simjax", help="job name (default simjax)")
    job.add_argument("--gres", action="store_true",
                     help="request GPUs as --gres=gpu:N (older clusters) instead of --gpus-per-node=N")
    job.add_argument("--sbatch-option", action="append", metavar="OPTION",
                     help="extra `#SBATCH OPTION` line, e.g. --sbatch-option=--qos=high; repeatable")

    environment = parser.add_argument_group("environment (all optional)")
    environment.add_argument("--repo-dir", default=str(REPO_ROOT),
                             help="simjax checkout on the shared filesystem; the job runs there "
                                  "(default: the checkout holding this script)")
    environment.add_argument("--venv", help="virtual environment to activate (its bin/activate is sourced)")
    environment.add_argument("--setup", action="append", metavar="SHELL_LINE",
                             help="shell line run before srun, e.g. 'module load cuda/12.4'; repeatable")
    environment.add_argument("--container-image",
                             help="run in this container with pyxis/enroot (srun --container-image)")
    environment.add_argument("--container-mounts",
                             help="extra pyxis mounts SRC:DST[,...]; the checkout is always mounted")
    environment.add_argument("--env", action="append", metavar="NAME=VALUE",
                             help="exported before srun; repeatable")
    environment.add_argument("--python", default="python3", help="Python executable (default python3)")

    run = parser.add_argument_group("simjax")
    run.add_argument("--config", help="config file, relative to --repo-dir: configs/NAME.py[:ARG], e.g. "
                                      "configs/gmm2d.py or configs/cifar10.py:TEACHER.pkl; it must exist there (required)")
    run.add_argument("--workdir", help="absolute path on the shared filesystem, or gs://BUCKET/PATH (required)")
    run.add_argument("--mode", default="train", help="simjax --mode (default train)")

    output = parser.add_argument_group("output")
    output.add_argument("--script", default=None,
                        help="where to write the batch script (default ./JOB_NAME.sbatch)")
    output.add_argument("--output", default="slurm-%x-%j.out",
                        help="job log, relative to --repo-dir (default slurm-%%x-%%j.out)")
    output.add_argument("--dry-run", action="store_true",
                        help="print the script and the sbatch command instead of submitting")
    return parser


def validate(args) -> None:
    """Checks args in place; raises UsageError on the first problem."""
    require_positive(args.nodes, "--nodes")
    require_positive(args.gpus_per_node, "--gpus-per-node")
    if args.cpus_per_task is not None:
        require_positive(args.cpus_per_task, "--cpus-per-task")
    if args.time is not None and not _SLURM_TIME.fullmatch(args.time):
        raise UsageError(f"--time={args.time!r} is not a SLURM time; use e.g. 90, 24:00:00 or 2-00:00:00")
    for flag, value in (("--partition", args.partition), ("--account", args.account)):
        if value is not None and not _SLURM_WORD.fullmatch(value):
            raise UsageError(f"{flag}={value!r} is not a SLURM name (letters, digits, . _ , : + -)")
    if not _JOB_NAME.fullmatch(args.job_name):
        raise UsageError(f"--job-name={args.job_name!r} must be letters, digits, . _ -")
    for option in args.sbatch_option or []:
        if not option.startswith("-") or "\n" in option:
            raise UsageError(f"--sbatch-option={option!r} must be one sbatch flag like --qos=high")
    for line in args.setup or []:
        if "\n" in line:
            raise UsageError("--setup takes one shell line; repeat --setup for several lines")
    if not args.repo_dir.startswith("/") or any(ch.isspace() for ch in args.repo_dir):
        raise UsageError(f"--repo-dir={args.repo_dir!r} must be an absolute path without spaces")
    if args.venv is not None and not args.venv.startswith("/"):
        raise UsageError(f"--venv={args.venv!r} must be an absolute path (the job does not start in your cwd)")
    if args.venv and args.container_image:
        raise UsageError("--venv and --container-image exclude each other: the container brings its own Python")
    if args.container_mounts and not args.container_image:
        raise UsageError("--container-mounts needs --container-image")
    if not args.python or any(ch.isspace() for ch in args.python):
        raise UsageError(f"--python={args.python!r} must be one word, e.g. python3")
    if not args.output or any(ch.isspace() for ch in args.output):
        raise UsageError(f"--output={args.output!r} must be a file name pattern without spaces, e.g. slurm-%x-%j.out")
    validate_config_path(args.config)
    validate_workdir(args.workdir)
    validate_mode(args.mode)
    args.env = parse_env_assignments(args.env)
    args.script = args.script or f"{args.job_name}.sbatch"
    if not Path(args.repo_dir).is_dir():
        raise UsageError(f"--repo-dir={args.repo_dir!r} does not exist here; run the launcher where the "
                         "shared filesystem holding the checkout is mounted (the login node)")
    # Last: it may import the config file (and with it jax).
    args.config_note = check_config(args.config, override_keys(args.overrides, args.passthrough),
                                    Path(args.repo_dir))


def batch_script(args) -> str:
    """The sbatch script text: allocation header, environment, one srun over all tasks."""
    gpus = args.gpus_per_node
    header = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
              f"--ntasks-per-node={gpus}",  # one process per GPU
              f"--gres=gpu:{gpus}" if args.gres else f"--gpus-per-node={gpus}"]
    if args.cpus_per_task is not None:
        header.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag, value in (("--partition", args.partition), ("--time", args.time), ("--account", args.account)):
        if value is not None:
            header.append(f"{flag}={value}")
    header += [f"--chdir={args.repo_dir}", f"--output={args.output}", *(args.sbatch_option or [])]

    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in header), "",
             f"# simjax: {args.nodes} node(s) x {gpus} GPU(s) = {args.nodes * gpus} processes, one per GPU.",
             "set -eo pipefail"]
    lines += args.setup or []
    if args.venv:
        lines.append(f"source {shlex.quote(args.venv + '/bin/activate')}")
    lines.append("export SIMJAX_DISTRIBUTED=1")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in args.env]

    srun = ["srun", "--gpu-bind=none", "--kill-on-bad-exit=1"]
    if args.container_image:
        mounts = f"{args.repo_dir}:{args.repo_dir}"
        if args.container_mounts:
            mounts += f",{args.container_mounts}"
        srun += [f"--container-image={args.container_image}", f"--container-mounts={mounts}",
                 f"--container-workdir={args.repo_dir}"]
    main = simjax_command(args.python, args.config, args.workdir, args.mode,
                          args.overrides, args.passthrough)
    lines.append(shlex.join(srun + main))
    if HEREDOC_END in lines:
        raise UsageError(f"a --setup line may not be {HEREDOC_END!r} (it ends the dry-run here-document)")
    return "\n".join(lines) + "\n"


def sbatch_command(args) -> list[str]:
    return ["sbatch", args.script]


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        launcher_argv, overrides, passthrough = split_config_overrides(
            sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(launcher_argv)
        args.overrides, args.passthrough = overrides, passthrough
        validate(args)
        script = batch_script(args)
        runner = CommandRunner(dry_run=args.dry_run)
        if args.config_note:
            runner.note(args.config_note)
        if args.dry_run:
            # A pastable snippet: exactly the file the launcher would write, then sbatch.
            print(f"cat > {shlex.quote(args.script)} <<'{HEREDOC_END}'")
            print(script, end="")
            print(HEREDOC_END)
        else:
            try:
                Path(args.script).write_text(script)
            except OSError as error:
                raise UsageError(f"cannot write --script={args.script!r} ({error.strerror}); "
                                 "pass a writable path") from None
            runner.note(f"wrote {args.script}")
        runner.run(sbatch_command(args))

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
