#!/usr/bin/env python3
"""Run simjax on a Cloud TPU VM or TPU pod slice, driving `gcloud` from your machine.

Subcommands (each takes --project, --zone, --name and --dry-run):
  create   create the TPU VM (`tpu-vm create`), or with --queued a queued resource
           (`queued-resources create`, optionally --spot) and wait until it is ACTIVE
  wait     wait for a queued resource to become ACTIVE
  install  on every worker: install jax[tpu], fetch simjax (git clone of --repo at --ref, or
           --tarball copied with `tpu-vm scp --worker=all`) and `pip install -e` it
  run      on every worker (`--worker=all`): `SIMJAX_DISTRIBUTED=1 python3 -m simjax.main ...`
           under nohup, output to ~/RUN_NAME.log (or --foreground: streamed here)
  logs     follow ~/RUN_NAME.log on one worker (default 0, the process that logs)
  stop     stop the background run on every worker
  delete   delete the TPU VM (or with --queued the queued resource and its TPU)
  up       create [+ wait] + install + run; with --foreground --delete-after, a one-shot job

`--dry-run` prints every command, one per line, shell-quoted and exact, and runs nothing.
simjax's `--config.KEY=VALUE` overrides go anywhere on the `run`/`up` command line; tokens
after `--` are appended to the simjax command (`python3 -m simjax.main ...`) unchanged.

`--config` names a file of the simjax tree (configs/cifar10.py, configs/cifar10_cond.py,
configs/digits.py, configs/gmm2d.py); it must exist in the checkout holding this script, which
should be the commit the workers install. The launcher itself needs only the standard library:
when ml_collections and simjax's imports (jax) are importable here too (the project's venv),
every `--config.KEY` is also checked against the config file; otherwise a note on stderr says
the keys are left to simjax on the workers. A missing file, or a checked key that names no
field, exits 2 before any gcloud call.

Example:
  python3 launch/tpu_pod.py up --project=my-proj --zone=us-west4-a --name=sim-v5e \\
      --accelerator-type=v5litepod-64 --queued --spot \\
      --repo=https://github.com/ORG/simjax --ref=main \\
      --config=configs/cifar10.py:gs://my-bucket/edm-cifar10-32x32-uncond-vp.pkl \\
      --workdir=gs://my-bucket/sim/cifar10 --config.batch_size=512 --config.num_steps=200000 --dry-run

gcloud syntax follows the Cloud SDK reference for `compute tpus tpu-vm` and
`compute tpus queued-resources` (checked against Cloud SDK 528).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

from launch_common import (CommandRunner, LaunchFailed, OneLineArgumentParser, UsageError,
                           check_config, override_keys, parse_env_assignments, run_main,
                           simjax_command, split_config_overrides, validate_config_path,
                           validate_mode, validate_workdir)

PROG = "tpu_pod.py"
# The checkout holding this script: --config must name one of its files.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Default TPU software (runtime) version for JAX per generation, from the Cloud TPU
# "TPU software versions" page (PyTorch and JAX table).
RUNTIME_VERSION_BY_GENERATION = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
_ACCELERATOR_TYPE = re.compile(r"(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)")
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_SIMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CLONE_URL = re.compile(r"(https?|ssh|git)://\S+|git@\S+:\S+")

# Matches setup.py's jax pin; libtpu comes with the jax[tpu] extra from PyPI.
DEFAULT_JAX_REQUIREMENT = "jax[tpu]>=0.10.2,<0.11"
# Name of the copied --tarball on each worker (in the login directory).
REMOTE_TARBALL = "simjax-src.tar.gz"
# Queued-resource states from which the request will never become ACTIVE by itself.
_QUEUED_DEAD_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


# --------------------------------------------------------------------------- commands

def _gcloud_tpus(group: str, verb: str, args) -> list[str]:
    return ["gcloud", "compute", "tpus", group, verb, args.name,
            f"--project={args.project}", f"--zone={args.zone}"]


def create_command(args) -> list[str]:
    if args.queued:
        # The queued resource and its single node share the name, so every later
        # `tpu-vm ssh NAME` reaches the node without a lookup.
        argv = _gcloud_tpus("queued-resources", "create", args) + [
            f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
            f"--runtime-version={args.runtime_version}"]
    else:
        argv = _gcloud_tpus("tpu-vm", "create", args) + [
            f"--accelerator-type={args.accelerator_type}", f"--version={args.runtime_version}"]
    return argv + (["--spot"] if args.spot else [])


def describe_queued_state_command(args) -> list[str]:
    return _gcloud_tpus("queued-resources", "describe", args) + ["--format=value(state.state)"]


def delete_command(args) -> list[str]:
    if args.queued:
        # --force also deletes the TPU node the request created.
        return _gcloud_tpus("queued-resources", "delete", args) + ["--force", "--quiet"]
    return _gcloud_tpus("tpu-vm", "delete", args) + ["--quiet"]


def ssh_command(args, worker: str, remote_command: str) -> list[str]:
    return _gcloud_tpus("tpu-vm", "ssh", args) + [f"--worker={worker}", f"--command={remote_command}"]


def install_commands(args) -> list[list[str]]:
    """Copy (for --tarball) and install on all workers; the checkout lands in ~/REMOTE_DIR.

    simjax is installed editable from a full source tree (not `pip install git+URL`) because
    `--config=configs/NAME.py` names a file of the checkout, which a wheel would not contain.
    """
    python, tree = shlex.quote(args.python), args.remote_dir
    steps = [f"{python} -m pip install --upgrade {shlex.quote(args.jax_requirement)}",
             f"rm -rf {tree}"]
    commands = []
    if args.tarball:
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", args.tarball,
                         f"{args.name}:{REMOTE_TARBALL}", f"--project={args.project}",
                         f"--zone={args.zone}", "--worker=all"])
        steps += [f"mkdir {tree}",
                  f"tar -xzf {REMOTE_TARBALL} -C {tree} --strip-components=1"]
    else:
        steps += [f"git clone --quiet {shlex.quote(args.repo)} {tree}",
                  f"git -C {tree} checkout --quiet {shlex.quote(args.ref)}"]
    steps.append(f"{python} -m pip install -e './{tree}[gcs,cifar10]'")  # gcsfs for gs:// workdirs, tfds for CIFAR-10
    commands.append(ssh_command(args, "all", " && ".join(steps)))
    return commands


def _simjax_env_and_main(args) -> tuple[str, str]:
    """(`NAME=VALUE ...` assignments, quoted simjax command) for a remote shell line."""
    env = " ".join(f"{name}={shlex.quote(value)}"
                   for name, value in [("SIMJAX_DISTRIBUTED", "1"), *args.env])
    main = shlex.join(simjax_command(args.python, args.config, args.workdir, args.mode,
                                     args.overrides, args.passthrough))
    return env, main


def run_command(args) -> list[str]:
    """The same simjax command on every worker; jax.distributed finds its peers itself."""
    env, main = _simjax_env_and_main(args)
    log, pid = f'"$HOME/{args.run_name}.log"', f'"$HOME/{args.run_name}.pid"'
    enter = f"cd {args.remote_dir} || exit 1"
    if args.foreground:
        remote = f"set -o pipefail; {enter}; {env} {main} 2>&1 | tee {log}"
    else:
        # Every stream redirected, so ssh returns at once and the run outlives the session.
        remote = (f"{enter}; {env} nohup {main} > {log} 2>&1 < /dev/null & echo $! > {pid}; "
                  f'echo "$(hostname): simjax started, log in $HOME/{args.run_name}.log"')
    return ssh_command(args, "all", remote)


def logs_command(args) -> list[str]:
    return ssh_command(args, args.worker, f'tail -n {args.lines} -F "$HOME/{args.run_name}.log"')


def stop_command(args) -> list[str]:
    # Kill only if the recorded pid is still a simjax process (pids get reused).
    pid = f'"$HOME/{args.run_name}.pid"'
    remote = (f'if [ -f {pid} ] && grep -qa simjax.main "/proc/$(cat {pid})/cmdline" 2>/dev/null; '
              f'then kill "$(cat {pid})" && echo "$(hostname): stopped"; fi; rm -f {pid}')
    return ssh_command(args, "all", remote)


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    common = parent()
    common.add_argument("--project", help="Google Cloud project ID (required)")
    common.add_argument("--zone", help="zone of the TPU, e.g. us-central2-b (required)")
    common.add_argument("--name", help="name of the TPU VM / queued resource (required)")
    common.add_argument("--dry-run", action="store_true",
                        help="print every command, one per line, exactly; run nothing")

    queue_wait = parent()
    queue_wait.add_argument("--poll-seconds", type=float, default=30.0,
                            help="seconds between state checks of a queued resource (default 30)")
    queue_wait.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                            help="give up waiting for ACTIVE after this long (default: wait forever)")

    create = parent()
    create.add_argument("--accelerator-type", help="e.g. v5litepod-64, v4-32, v5p-128, v6e-256 (required)")
    create.add_argument("--runtime-version",
                        help="TPU software version (default by generation: "
                             + ", ".join(f"{g}: {v}" for g, v in RUNTIME_VERSION_BY_GENERATION.items()) + ")")
    create.add_argument("--queued", action="store_true",
                        help="request a queued resource and wait until it is ACTIVE")
    create.add_argument("--spot", action="store_true", help="Spot (preemptible, cheaper) capacity")

    delete = parent()
    delete.add_argument("--queued", action="store_true",
                        help="the TPU came from a queued resource: delete it with --force")

    remote = parent()
    remote.add_argument("--remote-dir", default="simjax",
                        help="simjax source tree on each worker, under the login directory (default simjax)")
    remote.add_argument("--python", default="python3", help="Python on the workers (default python3)")

    install = parent()
    install.add_argument("--repo", help="git URL to clone on each worker, e.g. https://github.com/ORG/simjax")
    install.add_argument("--ref", default=None, help="branch, tag or commit of --repo (default main)")
    install.add_argument("--tarball",
                         help="local .tar.gz of the source tree with one top folder (git archive "
                              "--prefix=simjax/ ...), copied to every worker instead of --repo")
    install.add_argument("--jax-requirement", default=DEFAULT_JAX_REQUIREMENT,
                         help=f"pip requirement installed first (default {DEFAULT_JAX_REQUIREMENT!r})")

    run_name = parent()
    run_name.add_argument("--run-name", default="simjax",
                          help="log ~/RUN_NAME.log and pid ~/RUN_NAME.pid on each worker (default simjax)")

    run = parent()
    run.add_argument("--config", help="config file of the simjax tree: configs/NAME.py[:ARG], e.g. configs/gmm2d.py "
                                      "or configs/cifar10.py:gs://BUCKET/TEACHER.pkl; it must exist in this checkout")
    run.add_argument("--workdir", help="gs://BUCKET/PATH (needed on a multi-host slice) or an absolute path")
    run.add_argument("--mode", default="train", help="simjax --mode (default train)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="extra environment variable for simjax; repeatable")
    run.add_argument("--foreground", action="store_true",
                     help="stream the output of all workers here and wait for the end")

    parser = OneLineArgumentParser(
        prog=PROG, allow_abbrev=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run/up forward simjax --config.KEY=VALUE overrides (KEY a field of the --config file, "
               "e.g. --config.batch_size=512) and the tokens after `--` to simjax.main "
               "(e.g. -- --overwrite).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineArgumentParser)
    commands.required = True

    def add(name: str, help_text: str, parents: list) -> None:
        commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents],
                            allow_abbrev=False)

    add("create", "create the TPU VM, or a queued resource (--queued) and wait until ACTIVE",
        [create, queue_wait])
    add("wait", "wait until a queued resource is ACTIVE", [queue_wait])
    add("install", "install jax[tpu] and simjax on all workers", [install, remote])
    add("run", "run simjax on all workers (--worker=all) with SIMJAX_DISTRIBUTED=1", [run, run_name, remote])
    add("logs", "follow the log of a background run", [run_name])
    add("stop", "stop the background run on all workers", [run_name])
    add("delete", "delete the TPU VM (or, with --queued, the queued resource)", [delete])
    add("up", "create [+ wait] + install + run", [create, queue_wait, install, remote, run, run_name])
    commands.choices["logs"].add_argument("--worker", default="0",
                                          help="worker whose log to follow: 0 (default), N or all")
    commands.choices["logs"].add_argument("--lines", type=int, default=200,
                                          help="lines of history before following (default 200)")
    commands.choices["up"].add_argument("--delete-after", action="store_true",
                                        help="with --foreground: delete the TPU when the run ends, even on failure")
    return parser


def _check_simple_name(value: str, flag: str) -> str:
    if not _SIMPLE_NAME.fullmatch(value):
        raise UsageError(f"{flag}={value!r} must be a plain name (letters, digits, . _ -), not a path")
    return value


def validate(args) -> None:
    """Checks the arguments of args.command in place; raises UsageError on the first problem."""
    if not args.project:
        raise UsageError("missing --project: pass --project=YOUR_GCP_PROJECT_ID")
    if not args.zone:
        raise UsageError("missing --zone: pass the TPU's zone, e.g. --zone=us-central2-b")
    if not _ZONE.fullmatch(args.zone):
        raise UsageError(f"zone {args.zone!r} is not a zone name; pass e.g. --zone=us-central2-b")
    if not args.name:
        raise UsageError("missing --name: pass --name=NAME for the TPU (lowercase letters, digits, -)")
    if not _TPU_NAME.fullmatch(args.name):
        raise UsageError(f"TPU name {args.name!r} is invalid; use lowercase letters, digits and -, "
                         "starting with a letter, at most 63 characters")
    command = args.command
    if (args.overrides or args.passthrough) and command not in ("run", "up"):
        raise UsageError(f"--config.* overrides and `-- FLAGS` only apply to run and up, not {command}")
    if command in ("create", "up"):
        _validate_accelerator(args)
    if command in ("create", "wait", "up"):
        if args.poll_seconds < 0:
            raise UsageError("--poll-seconds must not be negative")
        if args.wait_timeout is not None and args.wait_timeout <= 0:
            raise UsageError("--wait-timeout must be positive (seconds)")
    if command in ("install", "up"):
        _validate_install(args)
    if command in ("install", "run", "up"):
        _check_simple_name(args.remote_dir, "--remote-dir")
        if not args.python or any(ch.isspace() for ch in args.python):
            raise UsageError(f"--python={args.python!r} must be one word, e.g. python3")
    if command in ("run", "logs", "stop", "up"):
        _check_simple_name(args.run_name, "--run-name")
    if command in ("run", "up"):
        validate_config_path(args.config)
        validate_workdir(args.workdir)
        validate_mode(args.mode)
        args.env = parse_env_assignments(args.env)
        if command == "up" and args.delete_after and not args.foreground:
            raise UsageError("--delete-after needs --foreground (a background run would lose its TPU)")
    if command == "logs":
        if not (args.worker == "all" or args.worker.isdigit()):
            raise UsageError(f"--worker={args.worker!r} must be a worker number or all")
        if args.lines < 0:
            raise UsageError("--lines must not be negative")
    if command in ("run", "up"):
        # Last: it may import the config file (and with it jax).
        args.config_note = check_config(args.config, override_keys(args.overrides, args.passthrough), REPO_ROOT)


def _validate_accelerator(args) -> None:
    if not args.accelerator_type:
        raise UsageError("missing --accelerator-type: pass e.g. --accelerator-type=v5litepod-64")
    match = _ACCELERATOR_TYPE.fullmatch(args.accelerator_type)
    if not match:
        hint = " (v5e is called v5litepod)" if args.accelerator_type.startswith("v5e") else ""
        raise UsageError(
            f"unknown accelerator type {args.accelerator_type!r}{hint}; expected GENERATION-SIZE with "
            f"GENERATION one of {', '.join(RUNTIME_VERSION_BY_GENERATION)}, e.g. v5litepod-64 or v4-32")
    if args.runtime_version is None:
        args.runtime_version = RUNTIME_VERSION_BY_GENERATION[match.group(1)]
    elif not _SIMPLE_NAME.fullmatch(args.runtime_version):
        raise UsageError(f"--runtime-version={args.runtime_version!r} is not a version name, "
                         "e.g. v2-alpha-tpuv5-lite")


def _validate_install(args) -> None:
    if bool(args.repo) == bool(args.tarball):
        raise UsageError("pass exactly one install source: --repo=GIT_URL [--ref=REF] or --tarball=FILE.tar.gz")
    if args.tarball:
        if args.ref is not None:
            raise UsageError("--ref goes with --repo; a --tarball is installed as it is")
        if not args.tarball.endswith((".tar.gz", ".tgz")):
            raise UsageError(f"--tarball={args.tarball!r} must be a .tar.gz or .tgz file")
        if ":" in args.tarball or args.tarball.startswith("-"):
            raise UsageError(f"--tarball={args.tarball!r} starts with '-' or contains ':', which gcloud scp "
                             "misreads; rename it or prefix ./")
        if not Path(args.tarball).is_file():
            raise UsageError(f"--tarball={args.tarball!r} does not exist; make it with "
                             "`git archive --format=tar.gz --prefix=simjax/ -o simjax.tar.gz HEAD`")
    else:
        if not _CLONE_URL.fullmatch(args.repo):
            raise UsageError(f"--repo={args.repo!r} is not a git URL the workers can clone "
                             "(https://..., ssh://... or git@host:path)")
        args.ref = args.ref or "main"
        if args.ref.startswith("-") or any(ch.isspace() for ch in args.ref):
            raise UsageError(f"--ref={args.ref!r} is not a branch, tag or commit")


# --------------------------------------------------------------------------- actions

def wait_until_active(runner: CommandRunner, args) -> None:
    """Polls the queued resource until ACTIVE; the dry run prints the poll command once."""
    argv = describe_queued_state_command(args)
    if runner.dry_run:
        runner.run(argv)
        return
    started = time.monotonic()
    while True:
        state = runner.output(argv) or "NOT_VISIBLE_YET"
        if state == "ACTIVE":
            runner.note(f"queued resource {args.name} is ACTIVE")
            return
        if state in _QUEUED_DEAD_STATES:
            raise LaunchFailed(f"queued resource {args.name} is {state}; inspect it with "
                               f"`{shlex.join(argv[:-1])}` and delete it with `{PROG} delete --queued`")
        waited = time.monotonic() - started
        if args.wait_timeout is not None and waited >= args.wait_timeout:
            raise LaunchFailed(f"queued resource {args.name} is still {state} after {waited:.0f}s; "
                               f"it stays queued: `{PROG} wait` to keep waiting, `{PROG} delete --queued` to cancel")
        runner.note(f"queued resource {args.name} is {state}; next check in {args.poll_seconds:g}s")
        time.sleep(args.poll_seconds)


def create(runner: CommandRunner, args) -> None:
    runner.run(create_command(args))
    if args.queued:
        wait_until_active(runner, args)


def install(runner: CommandRunner, args) -> None:
    for argv in install_commands(args):
        runner.run(argv)


def run(runner: CommandRunner, args) -> None:
    if not args.workdir.startswith("gs://"):
        runner.note("warning: a local --workdir is separate on every worker; "
                    "a multi-host slice needs gs:// for checkpoints")
    runner.run(run_command(args))
    if not args.foreground and not runner.dry_run:
        runner.note(f"follow the log with: {PROG} logs --project={args.project} "
                    f"--zone={args.zone} --name={args.name}")


def up(runner: CommandRunner, args) -> None:
    create(runner, args)
    try:
        install(runner, args)
        run(runner, args)
    finally:
        # The TPU bills until deleted, so a failed install or run deletes it too.
        if args.delete_after:
            runner.run(delete_command(args))


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        launcher_argv, overrides, passthrough = split_config_overrides(
            sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(launcher_argv)
        args.overrides, args.passthrough = overrides, passthrough
        validate(args)
        runner = CommandRunner(dry_run=args.dry_run)
        if getattr(args, "config_note", None):
            runner.note(args.config_note)
        if args.command == "create":
            create(runner, args)
        elif args.command == "wait":
            wait_until_active(runner, args)
        elif args.command == "install":
            install(runner, args)
        elif args.command == "run":
            run(runner, args)
        elif args.command == "logs":
            runner.run(logs_command(args))
        elif args.command == "stop":
            runner.run(stop_command(args))
        elif args.command == "delete":
            runner.run(delete_command(args))
        elif args.command == "up":
            up(runner, args)

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
