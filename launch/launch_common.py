"""Pieces shared by the simjax launchers (`tpu_pod.py`, `slurm_gpu.py`).

The launchers are scripts, run as `python3 launch/<name>.py` from a checkout of simjax; they
import this file as a sibling module and need nothing beyond the Python standard library, so
they work on a laptop or a cluster login node where simjax itself is not installed.

Before anything runs, `check_config` refuses a `--config` file that is not in the source tree.
Where ml_collections and simjax's own imports are importable by the launcher's Python (e.g. the
project's venv), it also loads the config file as simjax would and refuses a `--config.KEY` that
names no field of it; elsewhere it says on stderr that the keys are left for simjax to check.

Two habits hold throughout:
- every command is built as an argv list and run without a local shell, and `--dry-run`
  prints the same list with `shlex.join`, so the printed line is exactly what would run and
  can be pasted into a shell;
- bad input raises `UsageError` with one line saying what is wrong and how to fix it; `main`
  turns it into `<prog>: error: <message>` on stderr and exit status 2 (argparse's own code).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

USAGE_EXIT_STATUS = 2

# ml_collections override keys: dotted Python identifiers, list indices allowed (`a.b.0.c`).
_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.(?:[A-Za-z_]\w*|\d+))*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GCS_PATH = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/\S*)?")
_MODE = re.compile(r"[a-z][a-z0-9_]*")
# simjax.main flags the launchers set themselves; after `--` they would contradict the launcher's.
_LAUNCHER_OWNED_FLAGS = ("--config", "--workdir", "--mode")


class UsageError(ValueError):
    """A problem with the command line; the message is one line naming it and the fix."""


class LaunchFailed(RuntimeError):
    """The launch could not go on (not a usage error); `exit_status` is the script's status."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


class CommandFailed(LaunchFailed):
    """A launched command exited non-zero (127: not found); the script exits with its status."""

    def __init__(self, argv: Sequence[str], returncode: int):
        hint = " (is it installed and on PATH?)" if returncode == 127 else ""
        # A command killed by signal N has returncode -N; shells report that as 128 + N.
        super().__init__(f"command failed with exit status {returncode}{hint}: {shlex.join(argv)}",
                         exit_status=returncode if returncode > 0 else 128 - returncode)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors are a single line (no usage dump) with exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(USAGE_EXIT_STATUS, f"{self.prog}: error: {message} (see --help)\n")


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Separates simjax's `--config.a.b=value` overrides and anything after `--` from argv.

    argparse cannot declare a flag family like `--config.*`, so the overrides are lifted out
    first and forwarded to `simjax.main` unchanged. Returns (launcher_argv, overrides,
    passthrough), where passthrough holds the tokens after a literal `--`; `--config.*` tokens
    among those are checked like the others (see `override_keys`).
    """
    argv = list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
        if "--dry-run" in passthrough:
            # Most likely meant for the launcher; forwarding it would launch for real.
            raise UsageError("--dry-run after `--` would go to simjax, not the launcher; put it before `--`")
        for token in passthrough:
            flag = token.split("=", 1)[0]
            if flag in _LAUNCHER_OWNED_FLAGS:
                raise UsageError(f"{flag} after `--` would contradict the launcher's own {flag}; "
                                 f"pass it before `--`")
            if token.startswith("--config."):
                _check_override_syntax(token)
    rest, overrides = [], []
    for token in argv:
        if not token.startswith("--config."):
            rest.append(token)
            continue
        _check_override_syntax(token)
        overrides.append(token)
    return rest, overrides, passthrough


def _check_override_syntax(token: str) -> None:
    key, has_value, _ = token[len("--config."):].partition("=")
    if not has_value:
        raise UsageError(f"override {token!r} has no value; write it as {token}=VALUE")
    if not _OVERRIDE_KEY.fullmatch(key):
        raise UsageError(f"override {token!r} has a malformed key; use --config.section.field=VALUE")


def override_keys(*token_lists: Sequence[str]) -> list[str]:
    """The KEYs of the `--config.KEY=VALUE` tokens in token_lists, in order."""
    return [token[len("--config."):].split("=", 1)[0]
            for tokens in token_lists for token in tokens if token.startswith("--config.")]


def validate_workdir(workdir: str | None) -> str:
    """The workdir must be absolute or gs://: every host resolves it the same way."""
    if not workdir:
        raise UsageError("missing --workdir: pass --workdir=gs://BUCKET/PATH or an absolute path")
    if workdir.startswith("gs://"):
        if not _GCS_PATH.fullmatch(workdir):
            raise UsageError(f"workdir {workdir!r} is not a valid gs:// path; write gs://BUCKET/PATH")
        return workdir
    if not workdir.startswith("/"):
        raise UsageError(
            f"workdir {workdir!r} is relative; pass an absolute path (/shared/runs/x) or gs://BUCKET/PATH")
    if any(ch.isspace() for ch in workdir):
        raise UsageError(f"workdir {workdir!r} contains whitespace; choose a path without spaces")
    return workdir


def validate_config_path(config: str | None) -> str:
    """`--config=configs/NAME.py` or `configs/NAME.py:ARG` (ml_collections' config_flags syntax)."""
    if not config:
        raise UsageError("missing --config: pass --config=configs/NAME.py (relative to the simjax checkout)")
    if not config.split(":", 1)[0].endswith(".py"):
        raise UsageError(f"config {config!r} is not a .py file; pass --config=configs/NAME.py[:ARG]")
    if any(ch.isspace() for ch in config):
        raise UsageError(f"config {config!r} contains whitespace; use a path without spaces")
    return config


def check_config(config: str, keys: Sequence[str], tree: Path) -> str | None:
    """Refuses a config file missing from `tree` and override keys that name no field of it.

    config is an already validated `--config` value (path relative to the source tree `tree`,
    `:ARG` allowed); keys are the `--config.KEY` names. The file must exist (standard library
    only). The keys are checked by loading the file as simjax.main does, which needs
    ml_collections and whatever the file imports (simjax, jax) importable here; when they are
    not, nothing is refused and the returned note says so (None when all was checked).
    """
    path_text, has_arg, arg = config.partition(":")
    path = tree / path_text
    if not path.is_file():
        known = sorted(p.relative_to(tree).as_posix() for p in (tree / "configs").glob("*.py"))
        choices = f"one of {', '.join(known)}" if known else "a configs/NAME.py file"
        raise UsageError(f"config file {path_text!r} does not exist in the simjax tree {tree}; "
                         f"pass {choices}")
    if not keys:
        return None
    try:
        import ml_collections  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return (f"config keys not checked: ml_collections is not importable by {sys.executable}; "
                "simjax checks them when it starts (a Python with simjax's requirements checks them here)")
    try:
        root = _load_config(path, arg if has_arg else None, tree)
    except ImportError as error:
        return (f"config keys not checked: loading {path_text} needs {error.name or error} here; "
                "simjax checks them when it starts")
    for key in keys:
        problem = _missing_field(root, key)
        if problem:
            raise UsageError(f"unknown config key --config.{key}: {path_text} {problem}; "
                             "use a key the config file defines")
    return None


def _load_config(path: Path, arg: str | None, tree: Path):
    """get_config() of the config file, as ml_collections' config_flags calls it."""
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))  # the file imports simjax from the same tree
    spec = importlib.util.spec_from_file_location("simjax_launch_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        # Anything the file prints goes to stderr: a dry run's stdout holds only commands.
        with contextlib.redirect_stdout(sys.stderr):
            spec.loader.exec_module(module)
            if not hasattr(module, "get_config"):
                raise UsageError(f"config file {path} defines no get_config(); pass an ml_collections config file")
            return module.get_config(arg) if arg is not None else module.get_config()
    except (ImportError, UsageError):
        raise
    except Exception as error:  # pylint: disable=broad-except  # simjax would fail on it the same way
        detail = (str(error).splitlines() or [""])[0][:200]
        raise UsageError(f"config {path.name} fails to load ({type(error).__name__}: {detail}); "
                         "fix the file or its :ARG") from None


def _missing_field(root, key: str) -> str | None:
    """None if the dotted `key` names a field of the config `root`, else what is missing."""
    node, walked = root, []
    for part in key.split("."):
        name, parent = ".".join([*walked, part]), ".".join(walked)
        fields = list(node.keys()) if hasattr(node, "keys") else []
        if part not in fields:
            if walked and not fields:
                return f"has no field {name!r} ({parent!r} is a value, not a section)"
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {'.'.join([*walked, close[0]])!r}?)" if close else ""
            return f"has no field {name!r}{hint}"
        node = node[part]
        walked.append(part)
    return None


def validate_mode(mode: str) -> str:
    if not _MODE.fullmatch(mode):
        raise UsageError(f"mode {mode!r} is not a simjax mode name; pass e.g. --mode=train or --mode=eval")
    return mode


def parse_env_assignments(assignments: Sequence[str] | None) -> list[tuple[str, str]]:
    """`--env NAME=VALUE` flags -> [(NAME, VALUE)], names checked so they are safe in a shell."""
    pairs = []
    for assignment in assignments or []:
        name, has_value, value = assignment.partition("=")
        if not has_value or not _ENV_NAME.fullmatch(name):
            raise UsageError(f"--env {assignment!r} is not NAME=VALUE; write e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/x")
        pairs.append((name, value))
    return pairs


def require_positive(value: int | None, flag: str) -> int:
    if value is None:
        raise UsageError(f"missing {flag}: pass {flag}=N with N >= 1")
    if value < 1:
        raise UsageError(f"{flag}={value} must be at least 1")
    return value


def simjax_command(python: str, config: str, workdir: str, mode: str,
                   overrides: Sequence[str], passthrough: Sequence[str]) -> list[str]:
    """argv of the simjax entry point; the same on every host/process."""
    return [python, "-m", "simjax.main", f"--config={config}", f"--workdir={workdir}",
            f"--mode={mode}", *overrides, *passthrough]


class CommandRunner:
    """Runs argv lists, or, in dry-run mode, prints them one per line and runs nothing."""

    def __init__(self, dry_run: bool, out=None, err=None):
        self.dry_run = dry_run
        self._out = out or sys.stdout
        self._err = err or sys.stderr

    def note(self, message: str) -> None:
        """Progress for humans; on stderr so that a dry run's stdout stays pure commands."""
        print(f"# {message}", file=self._err, flush=True)

    def run(self, argv: Sequence[str]) -> None:
        if self.dry_run:
            print(shlex.join(argv), file=self._out, flush=True)
            return
        print(f"+ {shlex.join(argv)}", file=self._err, flush=True)
        returncode = self._call(argv, capture=False).returncode
        if returncode != 0:
            raise CommandFailed(argv, returncode)

    def output(self, argv: Sequence[str]) -> str:
        """Runs argv and returns its stripped stdout (only called when not a dry run)."""
        completed = self._call(argv, capture=True)
        if completed.returncode != 0:
            raise CommandFailed(argv, completed.returncode)
        return completed.stdout.strip()

    @staticmethod
    def _call(argv: Sequence[str], capture: bool) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(list(argv), check=False, text=True,
                                  stdout=subprocess.PIPE if capture else None)
        except FileNotFoundError:
            raise CommandFailed(argv, 127) from None


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Calls body, mapping UsageError to exit 2 and LaunchFailed to its exit status."""
    try:
        return body() or 0
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_EXIT_STATUS
    except LaunchFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
