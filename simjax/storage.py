"""Where a run's files live, a local directory or an object store (gs://), and how each is written safely.

A local workdir is resolved once to an absolute path: orbax refuses relative checkpoint paths, and a
run that changes directory must not write elsewhere. Object stores have neither append nor rename,
but writing one object is atomic: every file is written whole (`atomic_write_bytes`), and append-only
logs are kept in memory and rewritten whole (`TextLog`).
"""
import contextlib
import errno
import fcntl
import io
import os
import re
import time
import uuid

import numpy as np
from etils import epath

from simjax.errors import UserError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
LOCK_NAME = ".simjax.lock"


def is_remote(path) -> bool:
  return bool(_SCHEME.match(str(path)))


def resolve_workdir(raw) -> str:
  """The workdir as every writer will see it: absolute for local paths, unchanged for gs://."""
  text = (raw or "").strip()
  if not text:
    raise UserError("--workdir is empty (it would mean the current directory); pass a directory of its own, "
                       "e.g. --workdir=workdirs/digits.")
  match = _SCHEME.match(text)
  if not match:
    return os.path.abspath(os.path.expanduser(text))
  if match.group(1).lower() != "gs":
    raise UserError(f"--workdir={raw}: {match.group(1)}:// is not supported; use a local directory or gs://BUCKET/PATH.")
  if text.rstrip("/") == "gs:" or len(text.rstrip("/")) <= len("gs://"):
    raise UserError(f"--workdir={raw} names no bucket; pass gs://BUCKET/PATH.")
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel,unused-import  # epath's gs:// backend
  except ImportError:
    raise UserError(f"--workdir={raw} needs gcsfs for gs:// paths; install it with pip install 'simjax[gcs]' "
                       "(or pip install gcsfs), then rerun.") from None
  return text.rstrip("/")


def check_local_writable(path: str):
  """Raises UserError if a run could not create and write `path` (checked before anything is written)."""
  if is_remote(path):
    return
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise UserError(f"--workdir={path} cannot be created: {probe} is a file; point --workdir at a directory.")
  if not os.access(probe, os.W_OK | os.X_OK):
    why = "is on a read-only filesystem" if _read_only(probe) else "is not writable by this user"
    raise UserError(f"--workdir={path} cannot be written: {probe} {why}; choose a writable --workdir.")


def _read_only(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


@contextlib.contextmanager
def atomic_writer(path):
  """Yields a binary file that becomes `path` whole when the block ends, or never if it raises: a reader
  never sees part of it. Locally the bytes stream to `<name>.tmp` (a shard can be GBs: no in-memory copy),
  renamed at the end; on an object store they are buffered and written as one object (atomic on GCS).
  A file belongs to one writer, so the temp name is never shared; a killed run's is overwritten."""
  path = epath.Path(path)
  if is_remote(path):
    buf = io.BytesIO()
    yield buf
    path.write_bytes(buf.getvalue())
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  try:
    with tmp.open("wb") as f:
      yield f
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def atomic_write_bytes(path, data: bytes):
  with atomic_writer(path) as f:
    f.write(data)


def atomic_write_npz(path, **arrays):
  """np.savez to `path` through atomic_writer."""
  with atomic_writer(path) as f:
    np.savez(f, **arrays)


@contextlib.contextmanager
def staged_directory(path, *, replace: bool = False):
  """Yields a staging directory beside `path` that becomes `path` whole when the block ends, or vanishes
  if it raises: readers never see half a directory. replace=True swaps out an existing `path` (locally
  by two renames; on an object store, which has no rename, the copy is not atomic)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  staging.mkdir()  # honours the umask (tempfile.mkdtemp would make it private)
  try:
    yield staging
    if replace and path.exists():
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      path.rename(old)
      staging.rename(path)
      old.rmtree()
    else:
      if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty `path` is replaced (the caller has checked it is empty)
      staging.rename(path)
  except BaseException:
    if staging.exists():
      staging.rmtree()
    raise


def append_line(path, line: str):
  """Appends one line to a text file now (rare writes: on an object store the whole file is rewritten)."""
  log = TextLog(path)
  log.append(line)
  log.sync()


class TextLog:
  """An append-only text file (metrics.jsonl): appended in place locally; on an object store the lines
  are held in memory and the file is rewritten whole at `sync()` (and at most every `sync_seconds`)."""

  def __init__(self, path, sync_seconds: float = 30.0):
    self.path = epath.Path(path)
    self.remote = is_remote(self.path)
    self.sync_seconds = sync_seconds
    self._text = None  # remote only: the whole file as last synced plus new lines
    self._dirty = False
    self._last_sync = time.monotonic()

  def read(self) -> str:
    if self._text is not None:
      return self._text
    return self.path.read_bytes().decode() if self.path.exists() else ""

  def append(self, line: str):
    if not self.remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self.path.open("a") as f:
        f.write(line)
      return
    if self._text is None:
      self._text = self.read()
    self._text += line
    self._dirty = True
    if time.monotonic() - self._last_sync > self.sync_seconds:
      self.sync()

  def replace(self, text: str):
    """Rewrites the whole file atomically (e.g. cut back to a restored step)."""
    atomic_write_bytes(self.path, text.encode())
    if self.remote:
      self._text, self._dirty = text, False

  def sync(self):
    """Makes every appended line durable (a no-op locally, where appends already are)."""
    if self.remote and self._dirty:
      atomic_write_bytes(self.path, self._text.encode())
      self._dirty = False
    self._last_sync = time.monotonic()


class WorkdirLock:
  """An exclusive lock on a local workdir for the life of this process (flock: a killed run's lock goes
  with it). Object stores offer no such lock; one run per gs:// workdir is the user's to keep."""

  def __init__(self):
    self._fd = None

  def acquire(self, workdir: str):
    if is_remote(workdir) or self._fd is not None:
      return
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"--workdir={workdir} cannot be written ({e.strerror}); choose a writable --workdir.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(f"another simjax run is using --workdir={workdir}; wait for it to finish, stop it, or "
                           "use another --workdir.") from None
      raise UserError(f"--workdir={workdir} cannot be locked ({e.strerror}); use a local --workdir that "
                         "supports file locks.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd  # held until the process exits


LOCK = WorkdirLock()
