"""Tests of simjax.text.embedding_cache: reading prompts, building the sharded cache (resume, multi-host,
refusals), loading it whole and as training windows; a fake encoder, and one tiny Flax T5."""
import json
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from simjax.errors import UserError
from simjax.text import embedding_cache as ec
from simjax.text.tokenizers import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_gcs  # noqa: E402

L = 12
PROMPTS = [f"prompt number {i}" + "!" * (i % 3) for i in range(22)]  # 22 rows: shards of 4 leave a short last one


def fake_encode(ids, mask):
  return np.repeat(ids[..., None].astype(np.float32), 4, -1) * mask[..., None]


class Encoder:
  """fake_encode that counts its calls, records the batch shapes, and raises on call `fail_at`."""

  def __init__(self, fail_at=None):
    self.calls, self.shapes, self.fail_at = 0, [], fail_at

  def __call__(self, ids, mask):
    self.calls += 1
    self.shapes.append(ids.shape)
    if self.calls == self.fail_at:
      raise RuntimeError("encoder killed")
    return fake_encode(ids, mask)


def build(out, prompts=PROMPTS, encoder=None, **kw):
  kw = {"max_length": L, "shard_size": 4, "batch_size": 4, "encoder_id": "fake", "process_index": 0,
        "process_count": 1, "progress": None, **kw}
  return ec.build_cache(prompts, encoder or Encoder(), ByteTokenizer(), str(out), **kw)


def snapshot(folder):
  return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def shard_files(folder):
  return sorted(p.name for p in Path(folder).glob("shard-*.npz"))


def assert_same_cache(a, b):
  (ca, pa), (cb, pb) = ec.load_cache(a), ec.load_cache(b)
  assert pa == pb
  np.testing.assert_array_equal(ca["emb"], cb["emb"])
  np.testing.assert_array_equal(ca["mask"], cb["mask"])


# ----------------------------------------------------------------------------------------------
# read_prompts

def test_read_txt(tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("a red fox  \r\n\n   \n  leading kept\t\nlast")
  assert ec.read_prompts(f) == ["a red fox", "  leading kept", "last"]


def test_read_jsonl(tmp_path):
  f = tmp_path / "p.jsonl"
  lines = [{"text": "one", "id": 1}, {"text": ["two", "three"]}, {}, {"text": "four "}]
  f.write_text("\n".join("" if not r else json.dumps(r) for r in lines) + "\n")
  assert ec.read_prompts(f) == ["one", "two", "three", "four "]
  g = tmp_path / "nested.jsonl"
  g.write_text(json.dumps({"meta": {"caption": "deep"}}) + "\n" + json.dumps({"meta.caption": "dotted key"}))
  assert ec.read_prompts(g, field="meta.caption") == ["deep", "dotted key"]


def test_read_jsonl_errors(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"caption": "x", "id": 2}) + "\n")
  with pytest.raises(UserError, match=r"p\.jsonl line 2 has no field 'text' \(its fields: caption, id\)"):
    ec.read_prompts(f)
  f.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
  with pytest.raises(UserError, match=r"p\.jsonl line 3 is not JSON"):
    ec.read_prompts(f)
  f.write_text('["a list"]\n')
  with pytest.raises(UserError, match="line 1 is a JSON list, not an object"):
    ec.read_prompts(f)
  f.write_text(json.dumps({"text": 3}) + "\n")
  with pytest.raises(UserError, match="line 1: 'text' holds a int, not text"):
    ec.read_prompts(f)


@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n  \n", "holds no prompts"),
    ("empty.jsonl", "", "holds no prompts"),
    ("prompts.csv", "a,b", "unknown kind .csv"),
    ("prompts", "a", r"unknown kind \(no suffix\)"),
    ("latin1.txt", b"caf\xe9", "is not UTF-8"),
])
def test_read_file_errors(tmp_path, name, content, match):
  f = tmp_path / name
  if content is not None:
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(UserError, match=match) as e:
    ec.read_prompts(f)
  assert "\n" not in str(e.value)


def test_read_tfds(monkeypatch):
  import tensorflow_datasets as tfds
  calls = []
  examples = [{"image/id": 1, "captions": {"text": np.array([b"a dog", "caf\u00e9".encode()], dtype=object),
                                          "id": np.array([1, 2])}},
              {"image/id": 2, "captions": {"text": np.array([b"a cat"], dtype=object), "id": np.array([3])}}]

  def fake_data_source(name, *, split, data_dir):
    calls.append((name, split, data_dir))
    return examples
  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  assert ec.read_prompts("tfds:coco_captions/train", field="captions.text") == ["a dog", "caf\u00e9", "a cat"]
  assert ec.read_prompts("tfds:coco_captions/2017/train[:10]", "captions.text", "/data") == ["a dog", "caf\u00e9",
                                                                                            "a cat"]
  assert calls == [("coco_captions", "train", None), ("coco_captions/2017", "train[:10]", "/data")]
  with pytest.raises(UserError, match=r"example 0 has no field 'text' \(its fields: image/id, captions.text, "
                                      r"captions.id\)"):
    ec.read_prompts("tfds:coco_captions/train")
  with pytest.raises(UserError, match="expected tfds:NAME/SPLIT"):
    ec.read_prompts("tfds:coco_captions")
  examples[:] = []
  with pytest.raises(UserError, match="holds no prompts"):
    ec.read_prompts("tfds:coco_captions/train", field="captions.text")

  def broken(name, *, split, data_dir):
    raise FileNotFoundError("no such dataset\nsecond line")
  monkeypatch.setattr(tfds, "data_source", broken)
  with pytest.raises(UserError, match=r"tfds cannot open nope split train \(FileNotFoundError: no such dataset\)") as e:
    ec.read_prompts("tfds:nope/train")
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# build_cache

def test_build_files_and_contents(tmp_path):
  enc = Encoder()
  lines = []
  manifest = build(tmp_path, encoder=enc, batch_size=3, progress=lines.append)
  assert shard_files(tmp_path) == [f"shard-{k:05d}-of-00006.npz" for k in range(6)]
  assert json.loads((tmp_path / "cache.json").read_text()) == manifest
  assert {k: manifest[k] for k in ("num_prompts", "shard_size", "num_shards", "max_length", "text_dim", "dtype",
                                   "encoder_id", "tokenizer")} == {
      "num_prompts": 22, "shard_size": 4, "num_shards": 6, "max_length": L, "text_dim": 4, "dtype": "float16",
      "encoder_id": "fake", "tokenizer": "ByteTokenizer"}
  assert manifest["prompts_sha256"] == ec.prompts_sha256(PROMPTS) != ec.prompts_sha256(PROMPTS[::-1])
  # Every call the same shape (one compile): the probe, then 2 per full shard and 1 for the last (2 rows).
  assert set(enc.shapes) == {(3, L)} and enc.calls == 1 + 5 * 2 + 1
  assert len(lines) == 6 and lines[2].startswith("[embed] shard 3/6 (prompts 12/22) ") and lines[2].endswith(
      " prompts/s")
  with np.load(tmp_path / "shard-00005-of-00006.npz") as z:
    assert sorted(z.files) == ["emb", "index", "mask", "prompts"]
    assert (z["emb"].dtype, z["mask"].dtype, z["index"].dtype) == (np.float16, np.uint8, np.int64)
    assert z["index"].tolist() == [20, 21] and z["prompts"].tolist() == PROMPTS[20:]
  cond, prompts = ec.load_cache(tmp_path)
  ids, mask = ByteTokenizer()(PROMPTS, L)
  assert prompts == PROMPTS and cond["emb"].dtype == np.float32 and cond["mask"].dtype == np.float32
  np.testing.assert_array_equal(cond["emb"], fake_encode(ids, mask))  # byte ids are exact in float16
  np.testing.assert_array_equal(cond["mask"], mask)
  part, part_prompts = ec.load_cache(tmp_path, shards=[5, 1])
  assert part_prompts == PROMPTS[20:] + PROMPTS[4:8]
  np.testing.assert_array_equal(part["emb"], cond["emb"][np.r_[20:22, 4:8]])
  assert ec.is_complete(tmp_path) and ec.read_manifest(tmp_path) == manifest
  with pytest.raises(UserError, match=r"shards \[6\] are not in the cache"):
    ec.load_cache(tmp_path, shards=[6])


@pytest.mark.parametrize("dtype, stored", [("float16", np.float16), ("bfloat16", np.uint16), ("float32", np.float32)])
def test_deterministic(tmp_path, dtype, stored):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(ByteTokenizer.vocab_size, 5)).astype(np.float32)
  encode = lambda ids, mask: table[ids] * mask[..., None]
  for d in ("a", "b"):
    ec.build_cache(PROMPTS, encode, ByteTokenizer(), str(tmp_path / d), max_length=L, shard_size=8, batch_size=3,
                   dtype=dtype, process_index=0, process_count=1, progress=None)
  assert_same_cache(tmp_path / "a", tmp_path / "b")
  with np.load(tmp_path / "a" / "shard-00000-of-00003.npz") as z:
    assert z["emb"].dtype == stored
  cond, _ = ec.load_cache(tmp_path / "a")
  ids, mask = ByteTokenizer()(PROMPTS, L)
  tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 0}[dtype]
  np.testing.assert_allclose(cond["emb"], encode(ids, mask), rtol=tol, atol=tol)


def test_resume_after_a_killed_build(tmp_path):
  with pytest.raises(RuntimeError, match="encoder killed"):
    build(tmp_path / "run", encoder=Encoder(fail_at=3))  # call 1 probes, 2 encodes shard 0, 3 dies in shard 1
  assert shard_files(tmp_path / "run") == ["shard-00000-of-00006.npz"]
  assert not list((tmp_path / "run").glob("*.tmp")) and not ec.is_complete(tmp_path / "run")
  again, lines = Encoder(), []
  build(tmp_path / "run", encoder=again, progress=lines.append)
  assert again.calls == 5  # shards 1..5, one batch each; no probe (the manifest has text_dim)
  assert lines[0].startswith("[embed] 1 of this process's 6 shards are already in") and len(lines) == 6
  build(tmp_path / "once")
  assert_same_cache(tmp_path / "run", tmp_path / "once")
  done = Encoder()
  build(tmp_path / "run", encoder=done)
  assert done.calls == 0 and ec.is_complete(tmp_path / "run")


def test_damaged_shards_are_encoded_again(tmp_path):
  build(tmp_path / "ref")
  build(tmp_path / "run")
  shard1, shard2 = (tmp_path / "run" / f"shard-0000{k}-of-00006.npz" for k in (1, 2))
  shard1.write_bytes(shard1.read_bytes()[:-100])  # truncated: the zip directory is gone
  data = bytearray(shard2.read_bytes())
  shard2.write_bytes(bytes(data[:len(data) // 2]) + b"\0" * (len(data) - len(data) // 2))  # same size, garbage tail
  shard3 = tmp_path / "run" / "shard-00003-of-00006.npz"  # a sound zip whose emb.npy lost its last bytes
  with zipfile.ZipFile(shard3) as z:
    members = {name: z.read(name) for name in z.namelist()}
  with zipfile.ZipFile(shard3, "w") as z:
    for name, data in members.items():
      z.writestr(name, data[:-8] if name == "emb.npy" else data)
  assert ec.is_complete(tmp_path / "run")  # presence only: shards never appear half-written on their own
  with pytest.raises(UserError, match=r"shard .*shard-00001-of-00006\.npz is unreadable .*delete it and rerun"):
    ec.load_cache(tmp_path / "run")
  enc, lines = Encoder(), []
  build(tmp_path / "run", encoder=enc, progress=lines.append)
  assert enc.calls == 3
  assert sum("is unusable" in line for line in lines) == 3
  assert "(truncated)" in next(line for line in lines if "shard-00003" in line)
  assert_same_cache(tmp_path / "run", tmp_path / "ref")


def test_wrong_rows_in_a_shard_are_encoded_again(tmp_path):
  """A shard from another build (same name) is not taken for this one's."""
  build(tmp_path / "other", prompts=[p.upper() for p in PROMPTS], encoder_id="x")
  build(tmp_path / "run")
  (tmp_path / "run" / "shard-00003-of-00006.npz").write_bytes(
      (tmp_path / "other" / "shard-00003-of-00006.npz").read_bytes())
  enc = Encoder()
  build(tmp_path / "run", encoder=enc)
  assert enc.calls == 1
  assert ec.load_cache(tmp_path / "run", shards=[3])[1] == PROMPTS[12:16]


def test_multihost_split(tmp_path):
  build(tmp_path / "single")
  out = tmp_path / "multi"
  build(out, process_index=1, process_count=2)
  assert shard_files(out) == [f"shard-0000{k}-of-00006.npz" for k in (1, 3, 5)]
  assert not (out / "cache.json").exists() and not ec.is_complete(out)  # the manifest is process 0's
  with pytest.raises(UserError, match="no embedding cache at .*cache.json is missing"):
    ec.load_cache(out)
  manifest = build(out, process_index=0, process_count=2)
  assert manifest == ec.read_manifest(tmp_path / "single")
  assert len(shard_files(out)) == 6 and ec.is_complete(out)
  assert_same_cache(out, tmp_path / "single")


def test_multihost_process_zero_first(tmp_path):
  lines = []
  build(tmp_path, process_index=0, process_count=2, progress=lines.append)
  assert shard_files(tmp_path) == [f"shard-0000{k}-of-00006.npz" for k in (0, 2, 4)]
  assert lines[0].startswith("[embed 0/2] shard 1/6 ")
  assert (tmp_path / "cache.json").exists() and not ec.is_complete(tmp_path)
  message = (r"incomplete: 3 of 6 shards missing \(shard-00001-of-00006\.npz, shard-00003-of-00006\.npz, "
             r"shard-00005-of-00006\.npz\); rerun the embedding step to finish it")
  with pytest.raises(UserError, match=message):
    ec.load_cache(tmp_path)
  with pytest.raises(UserError, match=message):
    ec.CacheWindows(tmp_path, 2, 0)
  assert ec.load_cache(tmp_path, shards=[0, 4])[1] == PROMPTS[0:4] + PROMPTS[16:20]  # present shards load
  enc = Encoder()
  build(tmp_path, encoder=enc, process_index=1, process_count=2)
  assert enc.calls == 3 and ec.is_complete(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"prompts": PROMPTS[:-1]}, r"other prompts \(22 there, sha256 \w{12}; 21 here"),
    ({"prompts": PROMPTS[::-1]}, "other prompts"),
    ({"encoder_id": "t5-xxl"}, "encoder_id='fake' there, 't5-xxl' here"),
    ({"max_length": L + 1}, f"max_length={L} there, {L + 1} here"),
    ({"shard_size": 8}, "shard_size=4 there, 8 here"),
    ({"dtype": "bfloat16"}, "dtype='float16' there, 'bfloat16' here"),
])
def test_manifest_mismatch_refused_before_writing(tmp_path, change, match):
  build(tmp_path, process_index=0, process_count=2)  # half a cache: the rerun would write the other half
  before = snapshot(tmp_path)
  enc = Encoder()
  with pytest.raises(UserError, match=match + ".*; use another out_dir, or delete .* to rebuild it") as e:
    build(tmp_path, encoder=enc, **change)
  assert "\n" not in str(e.value)
  assert enc.calls == 0 and snapshot(tmp_path) == before


def test_bad_arguments(tmp_path):
  for kw, match in [({"prompts": []}, "no prompts"), ({"prompts": "one"}, "not one text"),
                    ({"prompts": ["a", 3]}, r"prompts\[1\] is a int"), ({"dtype": "int8"}, "dtype='int8'"),
                    ({"shard_size": 0}, "shard_size=0"), ({"batch_size": 2.5}, "batch_size=2.5"),
                    ({"process_index": 2, "process_count": 2}, "process_index=2")]:
    with pytest.raises(UserError, match=match):
      build(tmp_path, **kw)
  assert not tmp_path.joinpath("cache.json").exists()
  with pytest.raises(UserError, match="beyond float16's 65504.*dtype='bfloat16'"):
    build(tmp_path / "big", encoder=lambda ids, mask: fake_encode(ids, mask) * 1e3)
  with pytest.raises(UserError, match="non-finite embeddings for prompts 0..3"):
    build(tmp_path / "nan", encoder=lambda ids, mask: np.full(ids.shape + (4,), np.nan, np.float32))
  assert not list((tmp_path / "big").glob("shard-*")) and not list((tmp_path / "big").glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# CacheWindows

def test_windows_cover_each_epoch(tmp_path):
  prompts = PROMPTS[:20] + ["x", "y", "z", "w"]  # 24: six full shards
  build(tmp_path, prompts=prompts)
  windows = ec.CacheWindows(tmp_path, 2, seed=7)
  assert windows.num_windows_per_epoch == 3 and windows.rows_per_window == 8
  full, _ = ec.load_cache(tmp_path)
  epochs = []
  for e in range(2):
    seen = []
    for w in range(3 * e, 3 * e + 3):
      cond, texts = windows.window(w)
      assert cond["emb"].shape == (8, L, 4) and cond["mask"].shape == (8, L) and cond["emb"].dtype == np.float32
      rows = [prompts.index(t) for t in texts]
      np.testing.assert_array_equal(cond["emb"], full["emb"][rows])
      seen += texts
    assert sorted(seen) == sorted(prompts)  # every prompt exactly once per epoch
    epochs.append(seen)
  assert epochs[0] != epochs[1]
  again = ec.CacheWindows(str(tmp_path), 2, seed=7)
  for w in (0, 4, 11):
    a, b = windows.window(w), again.window(w)
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0]["emb"], b[0]["emb"])
  assert [ec.CacheWindows(tmp_path, 2, seed=8).window_shards(w) for w in range(3)] != [
      windows.window_shards(w) for w in range(3)]


def test_windows_with_a_short_last_shard(tmp_path):
  build(tmp_path)  # shards of 4, 4, 4, 4, 4, 2
  windows = ec.CacheWindows(tmp_path, 4, seed=0)
  assert windows.num_windows_per_epoch == 2 and windows.rows_per_window == 16
  for e in range(3):
    shards = windows.window_shards(2 * e) + windows.window_shards(2 * e + 1)
    assert set(shards) == set(range(6)) and len(set(windows.window_shards(2 * e + 1))) == 4
    seen = set()
    for w in (2 * e, 2 * e + 1):
      cond, texts = windows.window(w)
      assert cond["emb"].shape == (16, L, 4) and len(texts) == 16
      if 5 in windows.window_shards(w):  # 14 real rows, then its first two again
        assert texts[14:] == texts[:2]
        np.testing.assert_array_equal(cond["emb"][14:], cond["emb"][:2])
      seen |= set(texts)
    assert seen == set(PROMPTS)
  whole = ec.CacheWindows(tmp_path, 6, seed=0)
  assert whole.rows_per_window == 22 and sorted(whole.window(0)[1]) == sorted(PROMPTS)


def test_window_reads_only_its_shards(tmp_path):
  build(tmp_path)
  windows = ec.CacheWindows(tmp_path, 2, seed=3)
  expected = windows.window(5)
  needed = windows.window_shards(5)
  for p in tmp_path.glob("shard-*.npz"):
    if int(p.name[6:11]) not in needed:
      p.unlink()
  got = windows.window(5)
  assert got[1] == expected[1]
  np.testing.assert_array_equal(got[0]["emb"], expected[0]["emb"])


def test_windows_bad_arguments(tmp_path):
  build(tmp_path)
  for spw in (0, 7, 1.5):
    with pytest.raises(UserError, match=f"shards_per_window={spw!r} but the cache .* has 6 shards; use 1..6"):
      ec.CacheWindows(tmp_path, spw, 0)
  with pytest.raises(UserError, match="seed=-1"):
    ec.CacheWindows(tmp_path, 2, -1)
  with pytest.raises(UserError, match="no embedding cache"):
    ec.CacheWindows(tmp_path / "nowhere", 2, 0)


# ----------------------------------------------------------------------------------------------
# A jax encoder, and gs://

def test_tiny_t5_encoder(tmp_path):
  from simjax.networks.t5 import T5Encoder
  model = T5Encoder(vocab_size=ByteTokenizer.vocab_size, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
  ids0, mask0 = ByteTokenizer()(PROMPTS[:2], L)
  params = model.init(jax.random.key(0), ids0, mask0)
  traces = []

  @jax.jit
  def encode(ids, mask):
    traces.append(ids.shape)
    return model.apply(params, ids, mask)
  manifest = ec.build_cache(PROMPTS[:10], encode, ByteTokenizer(), str(tmp_path), max_length=L, shard_size=4,
                            batch_size=3, dtype="bfloat16", encoder_id="tiny-t5", process_index=0, process_count=1,
                            progress=None)
  assert manifest["text_dim"] == 8 and traces == [(3, L)]  # probe and every batch: one compiled shape
  cond, prompts = ec.load_cache(tmp_path)
  ids, mask = ByteTokenizer()(PROMPTS[:10], L)
  want = np.asarray(model.apply(params, ids, mask))
  assert prompts == PROMPTS[:10] and cond["emb"].shape == (10, L, 8)
  np.testing.assert_allclose(cond["emb"], want, rtol=1e-2, atol=1e-2)
  assert np.abs(cond["emb"] - want).max() > 0  # bfloat16 storage rounds
  np.testing.assert_array_equal(cond["mask"], mask)


def test_gcs_round_trip(tmp_path):
  with fake_gcs.serve() as server:
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:6]))
    from etils import epath
    epath.Path("gs://bucket/prompts.txt").write_bytes((tmp_path / "p.txt").read_bytes())
    prompts = ec.read_prompts("gs://bucket/prompts.txt")
    assert prompts == PROMPTS[:6]
    build("gs://bucket/cache", prompts=prompts)
    assert sorted(server.objects) == ["bucket/cache/cache.json", "bucket/cache/shard-00000-of-00002.npz",
                                      "bucket/cache/shard-00001-of-00002.npz", "bucket/prompts.txt"]
    assert ec.is_complete("gs://bucket/cache")
    enc = Encoder()
    build("gs://bucket/cache", prompts=prompts, encoder=enc)
    assert enc.calls == 0
    cond, got = ec.load_cache("gs://bucket/cache")
  build(tmp_path / "local", prompts=prompts)
  local, local_prompts = ec.load_cache(tmp_path / "local")
  assert got == local_prompts
  np.testing.assert_array_equal(cond["emb"], local["emb"])
