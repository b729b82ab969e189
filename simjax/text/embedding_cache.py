"""Training prompts tokenized and encoded once into sharded embedding files, streamed back while distilling.

A text-to-image distillation needs its prompts' encoder outputs, not the encoder: `build_cache` runs the
(possibly 4.7B-parameter T5) encoder over the prompts once, and training reads the results with
`load_cache` (every shard) or `CacheWindows` (a few shards at a time), so the encoder never shares
memory with the teacher and generator.

    out_dir/cache.json                  the manifest (read_manifest): num_prompts, shard_size, num_shards,
                                        max_length, text_dim, dtype, prompts_sha256, encoder_id, tokenizer
    out_dir/shard-00000-of-00010.npz    prompts [0, shard_size), ... in the order given

Each shard is an uncompressed .npz (read with allow_pickle=False) of R = shard_size rows (the last
shard: the rest) with L = max_length, D = text_dim:
    emb      [R, L, D]  the encoder's output as `dtype`: float16, float32, or bfloat16 stored as its uint16
                        bit pattern (.npy has no bfloat16); always read back as float32
    mask     [R, L]     uint8 0/1 (the tokenizer's mask > 0.5); read back as float32
    index    [R]        int64 global prompt ids, k * shard_size + row
    prompts  [R]        the texts, a numpy unicode array (which cannot keep a prompt's trailing NULs)

Writes are whole or absent: a shard goes to `<name>.tmp` and is renamed over its final name (on gs://,
which has no rename, it is one object write), the manifest likewise (storage.atomic_write_bytes), so a
killed run leaves no half shard under a final name. A rerun into the same out_dir skips every shard
that is present and checks out (its zip directory, index, prompts, mask and emb's header and size are
read; emb's data is not, so a flipped byte inside it shows only when load_cache reads it) and encodes the
rest; an existing manifest that disagrees with the build (other prompts, encoder, tokenizer, max_length,
shard_size or dtype) is refused before anything is written.

Multi-host: process p of P encodes shards k with k % P == p, and process 0 writes the manifest (the
others compute the same dict and return it); every process must call build_cache, then meet at a
barrier before reading. encode_fn runs on this process's devices alone: processes call it different
numbers of times, so it must not be a computation over every host's devices.
"""
import hashlib
import json
import math
import time
import zipfile
from typing import Callable, List, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from etils import epath

from simjax import storage
from simjax.errors import UserError

MANIFEST = "cache.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
_STORED = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}
_SHARD_KEYS = ("emb", "mask", "index", "prompts")
# Manifest fields a rebuild into the same out_dir must match (text_dim follows from the encoder).
_MUST_MATCH = ("format_version", "prompts_sha256", "encoder_id", "tokenizer", "max_length", "shard_size", "dtype")


def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}.npz"


# ----------------------------------------------------------------------------------------------
# Prompts

def read_prompts(source, field: str = "text", data_dir: str = "") -> List[str]:
  """The prompts of a .txt file (one a line, trailing whitespace stripped, blank lines skipped), a .jsonl
  file (the text under `field` of each line's object) or `tfds:NAME/SPLIT` (the text under `field` of
  each example; a list of texts gives one prompt each). `field` may name a nested field with dots
  (`captions.text`). Local paths or gs://."""
  source = str(source)
  if source.startswith("tfds:"):
    prompts = _tfds_prompts(source, field, data_dir)
  else:
    path = epath.Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
      raise UserError(f"prompts {source}: unknown kind {suffix or '(no suffix)'}; give a .txt file (one prompt a "
                      "line), a .jsonl file (one JSON object a line) or tfds:NAME/SPLIT.")
    if not path.is_file():
      raise UserError(f"prompts file {source} does not exist; check the path.")
    try:
      text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"prompts file {source} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    prompts = _txt_prompts(text) if suffix == ".txt" else _jsonl_prompts(text, source, field)
  if not prompts:
    raise UserError(f"{source} holds no prompts; give a source with at least one.")
  return prompts


def _txt_prompts(text: str) -> List[str]:
  # split("\n"), not splitlines(): a prompt may hold form feeds or U+2028, which splitlines breaks on.
  return [line.rstrip() for line in text.split("\n") if line.strip()]


def _jsonl_prompts(text: str, source: str, field: str) -> List[str]:
  prompts = []
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    where = f"{source} line {number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where} is not JSON ({e.msg}); each line must be one object with the prompt under "
                      f"{field!r}.") from None
    if not isinstance(record, dict):
      raise UserError(f"{where} is a JSON {type(record).__name__}, not an object; each line must be one object "
                      f"with the prompt under {field!r}.")
    prompts.extend(_texts(_lookup(record, field, where), field, where))
  return prompts


def _tfds_prompts(source: str, field: str, data_dir: str) -> List[str]:
  name, _, split = source[len("tfds:"):].rpartition("/")
  if not name or not split:
    raise UserError(f"{source}: expected tfds:NAME/SPLIT, e.g. tfds:coco_captions/train.")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # slow, and only for tfds:
  except ImportError:
    raise UserError(f"{source} needs tensorflow_datasets: pip install tensorflow-datasets array_record, or give "
                    "a .txt / .jsonl file.") from None
  try:
    examples = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises many kinds for a dataset it cannot open
    reason = (str(e).strip().splitlines() or [""])[0]
    raise UserError(f"{source}: tfds cannot open {name} split {split} ({type(e).__name__}: {reason}); prepare it "
                    "(tfds build, array_record format) or pass the data_dir that holds it.") from e
  prompts = []
  for i, example in enumerate(examples):
    where = f"{source} example {i}"
    prompts.extend(_texts(_lookup(example, field, where), field, where))
  return prompts


def _lookup(record, field: str, where: str):
  """record[field], a dotted field descending into nested dicts (and across lists of them)."""
  def get(node, path):
    if isinstance(node, dict) and path in node:
      return node[path]
    if isinstance(node, (list, tuple)):
      return [get(item, path) for item in node]
    head, dot, rest = path.partition(".")
    if dot and isinstance(node, dict) and head in node:
      return get(node[head], rest)
    raise KeyError(path)
  try:
    return get(record, field)
  except KeyError:
    raise UserError(f"{where} has no field {field!r} (its fields: {_field_names(record)}); set the prompt field "
                    "to one of them.") from None


def _field_names(record, limit: int = 20) -> str:
  """The (dotted) fields a record has, for an error message."""
  names = []
  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict) and value:
        walk(value, f"{prefix}{key}.")
      else:
        names.append(f"{prefix}{key}")
  if isinstance(record, dict):
    walk(record, "")
  shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
  return shown or "none"


def _texts(value, field: str, where: str) -> List[str]:
  """A field's value as prompts: a text, or each text of a (nested) list or array of them."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return [text for item in value for text in _texts(item, field, where)]
  if isinstance(value, bytes):
    try:
      return [value.decode("utf-8")]
    except UnicodeDecodeError:
      raise UserError(f"{where}: {field!r} holds bytes that are not UTF-8; re-encode the captions as UTF-8.") from None
  if isinstance(value, str):
    return [value]
  raise UserError(f"{where}: {field!r} holds a {type(value).__name__}, not text; set the prompt field to a "
                  "text field.")


# ----------------------------------------------------------------------------------------------
# Building

def prompts_sha256(prompts: Sequence[str]) -> str:
  """The manifest's fingerprint of the prompt list (order included)."""
  return hashlib.sha256(json.dumps(list(prompts)).encode("ascii")).hexdigest()


def build_cache(prompts, encode_fn: Callable, tokenizer, out_dir, *, max_length: int, shard_size: int = 1024,
                batch_size: int = 64, dtype: str = "float16", encoder_id: str = "",
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                progress: Optional[Callable[[str], None]] = print) -> dict:
  """Encodes `prompts` into out_dir's shards (this process's share), resuming a killed build; returns the manifest.

  tokenizer(texts, max_length) -> (ids int32 [B, L], mask float32 [B, L]); encode_fn(ids, mask) -> [B, L, D]
  (numpy or jax). encode_fn always gets B = min(batch_size, shard_size) rows (a shard's last batch is
  padded with copies of its last row, whose outputs are dropped), so a jitted encoder compiles once;
  text_dim is probed with one such batch (prompt 0, repeated) when no manifest is there yet."""
  prompts = _check_prompts(prompts)
  max_length, shard_size, batch_size = (_positive(v, name) for v, name in (
      (max_length, "max_length"), (shard_size, "shard_size"), (batch_size, "batch_size")))
  if dtype not in DTYPES:
    raise UserError(f"dtype={dtype!r}: the embedding cache stores one of {DTYPES}.")
  p = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < count:
    raise UserError(f"process_index={p} with process_count={count}: the index must be in [0, count).")
  say = progress or (lambda line: None)
  out = epath.Path(out_dir)
  num = len(prompts)
  wanted = {"format_version": FORMAT_VERSION, "num_prompts": num, "shard_size": shard_size,
            "num_shards": math.ceil(num / shard_size), "max_length": max_length, "dtype": dtype,
            "prompts_sha256": prompts_sha256(prompts), "encoder_id": str(encoder_id),
            "tokenizer": type(tokenizer).__name__}
  batch = min(batch_size, shard_size)
  existing = _existing_manifest(out)
  if existing is not None:
    _check_agrees(existing, wanted, out)
    manifest = {**wanted, "text_dim": int(existing["text_dim"])}
  else:
    manifest = {**wanted, "text_dim": _probe_dim(encode_fn, tokenizer, prompts[0], max_length, batch)}
    if p == 0:
      storage.atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

  n = manifest["num_shards"]
  prefix = "[embed]" if count == 1 else f"[embed {p}/{count}]"
  mine = list(range(p, n, count))
  todo = []
  for k in mine:
    problem = _shard_problem(out, k, manifest, prompts)
    if problem:
      todo.append(k)
      if problem != "missing":
        say(f"{prefix} {out / shard_name(k, n)} is unusable ({problem}); encoding it again")
  if len(todo) < len(mine):
    say(f"{prefix} {len(mine) - len(todo)} of this process's {len(mine)} shards are already in {out}; "
        f"encoding {len(todo)}")
  start, encoded = time.perf_counter(), 0
  for k in todo:
    arrays = _encode_shard(k, prompts, encode_fn, tokenizer, manifest, batch, out)
    storage.atomic_write_npz(out / shard_name(k, n), **arrays)
    encoded += len(arrays["index"])
    rate = encoded / max(time.perf_counter() - start, 1e-9)
    say(f"{prefix} shard {k + 1}/{n} (prompts {min((k + 1) * shard_size, num)}/{num}) {rate:.0f} prompts/s")
  return manifest


def _check_prompts(prompts) -> List[str]:
  if isinstance(prompts, (str, bytes)):
    raise UserError("prompts must be a list of texts, not one text; wrap it as [text].")
  prompts = list(prompts)
  if not prompts:
    raise UserError("no prompts to encode; give at least one.")
  for i, text in enumerate(prompts):
    if not isinstance(text, str):
      raise UserError(f"prompts[{i}] is a {type(text).__name__}, not str; pass the prompts as texts.")
  return prompts


def _positive(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f"{name}={value!r}: it must be a positive integer.")
  return int(value)


def _existing_manifest(out) -> Optional[dict]:
  return read_manifest(out) if (out / MANIFEST).exists() else None


def _check_agrees(existing: dict, wanted: dict, out):
  """UserError naming every manifest field this build would change."""
  diffs = []
  for key in _MUST_MATCH:
    if existing.get(key) == wanted[key]:
      continue
    if key == "prompts_sha256":
      diffs.append(f"other prompts ({existing.get('num_prompts')} there, sha256 {str(existing.get(key))[:12]}; "
                   f"{wanted['num_prompts']} here, sha256 {wanted[key][:12]})")
    else:
      diffs.append(f"{key}={existing.get(key)!r} there, {wanted[key]!r} here")
  if diffs:
    raise UserError(f"the embedding cache {out} was built differently: {'; '.join(diffs)}; use another out_dir, "
                    f"or delete {out} to rebuild it.")


def _padded(ids, mask, rows: int):
  """ids, mask grown to `rows` rows with copies of their last row."""
  extra = rows - len(ids)
  if extra <= 0:
    return ids, mask
  return (np.concatenate([ids, np.repeat(ids[-1:], extra, 0)]), np.concatenate([mask, np.repeat(mask[-1:], extra, 0)]))


def _tokenize(tokenizer, texts, max_length: int):
  ids, mask = tokenizer(texts, max_length)
  ids, mask = np.asarray(ids), np.asarray(mask)
  if ids.shape != (len(texts), max_length) or mask.shape != ids.shape:
    raise ValueError(f"the tokenizer gave ids {ids.shape} and mask {mask.shape} for {len(texts)} texts at "
                     f"max_length={max_length}; it must give [N, max_length] for both.")
  return ids, mask


def _run_encoder(encode_fn, ids, mask) -> np.ndarray:
  emb = np.asarray(encode_fn(ids, mask), np.float32)
  if emb.ndim != 3 or emb.shape[:2] != ids.shape:
    raise ValueError(f"encode_fn gave {emb.shape} for ids {ids.shape}; it must give [B, L, D].")
  return emb


def _probe_dim(encode_fn, tokenizer, prompt: str, max_length: int, batch: int) -> int:
  ids, mask = _padded(*_tokenize(tokenizer, [prompt], max_length), batch)
  return int(_run_encoder(encode_fn, ids, mask).shape[-1])


def _encode_shard(k: int, prompts, encode_fn, tokenizer, manifest: dict, batch: int, out) -> dict:
  size, length, dim, dtype = manifest["shard_size"], manifest["max_length"], manifest["text_dim"], manifest["dtype"]
  lo, hi = k * size, min((k + 1) * size, len(prompts))
  ids, mask = _tokenize(tokenizer, prompts[lo:hi], length)
  emb = np.empty((hi - lo, length, dim), _STORED[dtype])
  for b in range(0, hi - lo, batch):
    rows = min(batch, hi - lo - b)
    got = _run_encoder(encode_fn, *_padded(ids[b:b + rows], mask[b:b + rows], batch))[:rows]
    if got.shape[-1] != dim:
      raise UserError(f"the text encoder gives {got.shape[-1]}-wide embeddings but the cache {out} holds "
                      f"{dim}-wide ones; use another out_dir, or delete {out} to rebuild it.")
    if not np.isfinite(got).all():
      raise UserError(f"the text encoder returned non-finite embeddings for prompts {lo + b}..{lo + b + rows - 1}; "
                      "check its checkpoint and compute dtype (float16 overflows T5).")
    emb[b:b + rows] = _to_stored(got, dtype, out)
  return {"emb": emb, "mask": (mask > 0.5).astype(np.uint8), "index": np.arange(lo, hi, dtype=np.int64),
          "prompts": np.array(prompts[lo:hi], dtype=str)}


def _to_stored(x: np.ndarray, dtype: str, out) -> np.ndarray:
  if dtype == "float32":
    return x
  if dtype == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).view(np.uint16)
  with np.errstate(over="ignore"):
    y = x.astype(np.float16)
  if not np.isfinite(y).all():
    raise UserError(f"embeddings reach {np.abs(x).max():.4g}, beyond float16's 65504; build with "
                    f"dtype='bfloat16' or 'float32' (into another out_dir, or delete {out}).")
  return y


def _from_stored(a: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    return a.view(ml_dtypes.bfloat16).astype(np.float32)
  return a.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Reading

def read_manifest(out_dir) -> dict:
  """out_dir's cache.json; UserError if there is none or it is not one."""
  path = epath.Path(out_dir) / MANIFEST
  if not path.exists():
    raise UserError(f"no embedding cache at {out_dir} ({MANIFEST} is missing); run the embedding step "
                    "(build_cache) first.")
  try:
    manifest = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is not JSON ({e}); delete {out_dir} and rerun the embedding step.") from None
  need = set(_MUST_MATCH) | {"num_prompts", "num_shards", "text_dim"}
  if not isinstance(manifest, dict) or not need <= set(manifest):
    raise UserError(f"{path} is not an embedding cache manifest (it lacks {sorted(need - set(manifest or {}))}); "
                    f"delete {out_dir} and rerun the embedding step.")
  return manifest


def is_complete(out_dir) -> bool:
  """Whether out_dir holds a manifest and every shard it lists (by presence: shards appear only whole)."""
  try:
    manifest = read_manifest(out_dir)
  except UserError:
    return False
  return not _missing_shards(epath.Path(out_dir), manifest, range(manifest["num_shards"]))


def _missing_shards(out, manifest: dict, shards) -> List[int]:
  # One listing, then exists() for what it lacks: gcsfs caches listings, and another host may have
  # written a shard since this process listed the folder.
  n = manifest["num_shards"]
  try:
    listed = {p.name for p in out.iterdir()}
  except (FileNotFoundError, NotADirectoryError):
    listed = set()
  return [k for k in shards if shard_name(k, n) not in listed and not (out / shard_name(k, n)).exists()]


def _shard_rows(manifest: dict, k: int) -> int:
  return min(manifest["shard_size"], manifest["num_prompts"] - k * manifest["shard_size"])


def _read_member(zf, key: str) -> np.ndarray:
  with zf.open(key + ".npy") as f:
    return np.lib.format.read_array(f, allow_pickle=False)


def _member_header(zf, key: str):
  """(shape, dtype) of one .npy member, and whether its size fits them (its data is not read)."""
  with zf.open(key + ".npy") as f:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    data_start = f.tell()
  fits = zf.getinfo(key + ".npy").file_size == data_start + math.prod(shape) * dtype.itemsize
  return shape, dtype, fits


def _read_shard(path, manifest: dict, k: int, prompts: Optional[Sequence[str]] = None, with_emb: bool = True):
  """Shard k's arrays as stored, after checking them against the manifest (and `prompts` if given);
  ValueError saying what is wrong. with_emb=False checks emb's header and size but leaves its data."""
  rows, length, dim = _shard_rows(manifest, k), manifest["max_length"], manifest["text_dim"]
  stored = _STORED[manifest["dtype"]]
  with path.open("rb") as f, zipfile.ZipFile(f) as zf:
    names = sorted(zf.namelist())
    if names != sorted(key + ".npy" for key in _SHARD_KEYS):
      raise ValueError(f"it holds {names}")
    arrays = {key: _read_member(zf, key) for key in ("index", "mask", "prompts")}
    if with_emb:
      arrays["emb"] = _read_member(zf, "emb")
      emb_shape, emb_dtype, fits = arrays["emb"].shape, arrays["emb"].dtype, True
    else:
      emb_shape, emb_dtype, fits = _member_header(zf, "emb")
  start = k * manifest["shard_size"]
  if not np.array_equal(arrays["index"], np.arange(start, start + rows)):
    raise ValueError(f"its index is not prompts {start}..{start + rows - 1}")
  if arrays["mask"].shape != (rows, length) or arrays["mask"].dtype != np.uint8:
    raise ValueError(f"its mask is {arrays['mask'].dtype}{list(arrays['mask'].shape)}, not uint8{[rows, length]}")
  if tuple(emb_shape) != (rows, length, dim) or emb_dtype != stored or not fits:
    raise ValueError(f"its emb is {emb_dtype}{list(emb_shape)}{'' if fits else ' (truncated)'}, not "
                     f"{stored}{[rows, length, dim]}")
  if arrays["prompts"].shape != (rows,):
    raise ValueError(f"it holds {arrays['prompts'].shape} prompts, not ({rows},)")
  if prompts is not None:
    expected = np.array(prompts[start:start + rows], dtype=str)  # stored form: trailing NULs dropped alike
    if arrays["prompts"].tolist() != expected.tolist():
      raise ValueError("its prompts are not this build's")
  return arrays


def _shard_problem(out, k: int, manifest: dict, prompts) -> str:
  """'' if shard k is present and fits this build, else why not ('missing', or what is wrong)."""
  try:
    _read_shard(out / shard_name(k, manifest["num_shards"]), manifest, k, prompts, with_emb=False)
  except FileNotFoundError:
    return "missing"
  except Exception as e:  # pylint: disable=broad-except  # whatever is wrong with it, encoding it again fixes it
    return f"{type(e).__name__}: {e}"
  return ""


def _incomplete(out, missing: List[int], n: int) -> UserError:
  more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
  shown = ", ".join(shard_name(k, n) for k in missing[:5]) + more
  return UserError(f"the embedding cache {out} is incomplete: {len(missing)} of {n} shards missing ({shown}); "
                   "rerun the embedding step to finish it.")


def load_cache(out_dir, shards: Optional[Sequence[int]] = None):
  """(cond, prompts) of `shards` (default: all) in that order: cond = {'emb': float32 [M, L, D], 'mask':
  float32 [M, L]}, prompts the M texts. UserError if a shard is missing or unreadable."""
  out = epath.Path(out_dir)
  manifest = read_manifest(out)
  n = manifest["num_shards"]
  shards = list(range(n)) if shards is None else [int(k) for k in shards]
  bad = [k for k in shards if not 0 <= k < n]
  if bad:
    raise UserError(f"shards {bad} are not in the cache {out}, which has shards 0..{n - 1}.")
  missing = _missing_shards(out, manifest, sorted(set(shards)))
  if missing:
    raise _incomplete(out, missing, n)
  rows = sum(_shard_rows(manifest, k) for k in shards)
  emb = np.empty((rows, manifest["max_length"], manifest["text_dim"]), np.float32)
  mask = np.empty((rows, manifest["max_length"]), np.float32)
  prompts, at = [], 0
  for k in shards:
    path = out / shard_name(k, n)
    try:
      arrays = _read_shard(path, manifest, k)
    except Exception as e:  # pylint: disable=broad-except  # any failure here is a damaged file
      raise UserError(f"shard {path} is unreadable ({type(e).__name__}: {e}); delete it and rerun the embedding "
                      "step to encode it again.") from None
    r = len(arrays["index"])
    emb[at:at + r] = _from_stored(arrays["emb"], manifest["dtype"])
    mask[at:at + r] = arrays["mask"]
    prompts.extend(arrays["prompts"].tolist())
    at += r
  return {"emb": emb, "mask": mask}, prompts


class CacheWindows:
  """The cache streamed as windows of `shards_per_window` shards, for a pool of prompts that changes
  every so many training steps without holding every embedding in memory.

  Epoch e = w // num_windows_per_epoch visits the shards in the order numpy.random.default_rng([seed, e])
  .permutation(num_shards); window w is the next shards_per_window shards of that order, their rows
  concatenated. When shards_per_window does not divide num_shards, the epoch's last window is topped up
  with the first shards of the same order, so every prompt is in each epoch at least once (a few
  twice). Every window has `rows_per_window` rows (shards_per_window * shard_size, or num_prompts if the
  window is the whole cache): one holding the short last shard is padded by repeating its own rows from
  the first, so a jitted step never sees a new shape. window(w) reads only its shards and depends only
  on (out_dir's contents, seed, w), so a resumed training replays the same windows."""

  def __init__(self, out_dir, shards_per_window: int, seed: int):
    self.out_dir = epath.Path(out_dir)
    self.manifest = read_manifest(self.out_dir)
    n = self.manifest["num_shards"]
    spw = shards_per_window
    if isinstance(spw, bool) or not isinstance(spw, (int, np.integer)) or not 1 <= spw <= n:
      raise UserError(f"shards_per_window={shards_per_window!r} but the cache {out_dir} has {n} shards; use 1..{n} "
                      "(or load_cache for all of them).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise UserError(f"seed={seed!r}: the window order needs a non-negative integer seed.")
    missing = _missing_shards(self.out_dir, self.manifest, range(n))
    if missing:
      raise _incomplete(self.out_dir, missing, n)
    self.shards_per_window, self.seed = int(spw), int(seed)
    self.num_windows_per_epoch = math.ceil(n / spw)
    self.rows_per_window = min(spw * self.manifest["shard_size"], self.manifest["num_prompts"])

  def window_shards(self, w: int) -> List[int]:
    """The shards of window w, in the order their rows appear."""
    if int(w) != w or w < 0:
      raise ValueError(f"window {w!r}: windows are numbered 0, 1, ...")
    epoch, i = divmod(int(w), self.num_windows_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.manifest["num_shards"])
    spw = self.shards_per_window
    group = order[i * spw:(i + 1) * spw]
    group = np.concatenate([group, order[:spw - len(group)]])
    return [int(k) for k in group]

  def window(self, w: int):
    """(cond, prompts) of window w: rows_per_window rows (see the class doc)."""
    cond, prompts = load_cache(self.out_dir, self.window_shards(w))
    if len(prompts) < self.rows_per_window:
      idx = np.arange(self.rows_per_window) % len(prompts)
      cond = {key: value[idx] for key, value in cond.items()}
      prompts = [prompts[i] for i in idx]
    return cond, prompts
