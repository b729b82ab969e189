"""Tests of tests/fake_gcs.py: the gs:// clients a training run uses (etils.epath over gcsfs, orbax over
TensorStore's gcs driver) work against it, in this process and in a child process given its env."""
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_gcs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _http(method, url, data=None, headers=None):
  """(status, headers, body) of one request; HTTP errors are returned, not raised."""
  req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(req, timeout=10) as r:
      return r.status, r.headers, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def test_epath_round_trip():
  from etils import epath
  with fake_gcs.serve() as server:
    run = epath.Path("gs://bucket/run")
    run.mkdir(parents=True, exist_ok=True)  # object stores have no directories: a no-op
    assert server.objects == {}
    (run / "notes.txt").write_text("hello gcs")
    big = np.random.default_rng(0).bytes(6 * 2**20 + 123)  # > gcsfs's 5 MiB block: resumable upload
    (run / "sub" / "big.bin").write_bytes(big)
    assert server.objects == {"bucket/run/notes.txt": b"hello gcs", "bucket/run/sub/big.bin": big}

    assert (run / "notes.txt").read_text() == "hello gcs"
    assert (run / "sub" / "big.bin").read_bytes() == big
    with (run / "sub" / "big.bin").open("rb") as f:  # ranged read (206)
      f.seek(5 * 2**20)
      assert f.read(1000) == big[5 * 2**20:5 * 2**20 + 1000]
    assert run.exists() and run.is_dir() and (run / "sub").is_dir()
    assert (run / "notes.txt").exists() and (run / "notes.txt").is_file() and not (run / "notes.txt").is_dir()
    assert not (run / "missing.txt").exists() and not epath.Path("gs://bucket/elsewhere").exists()
    with pytest.raises(FileNotFoundError):
      (run / "missing.txt").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "sub"]
    assert sorted(os.fspath(p) for p in run.glob("*.txt")) == ["gs://bucket/run/notes.txt"]
    assert [os.fspath(p) for p in run.glob("sub/*")] == ["gs://bucket/run/sub/big.bin"]

    (run / "notes.txt").rename(run / "moved.txt")
    (run / "moved.txt").replace(run / "replaced.txt")
    assert sorted(server.objects) == ["bucket/run/replaced.txt", "bucket/run/sub/big.bin"]
    assert (run / "replaced.txt").read_text() == "hello gcs" and not (run / "notes.txt").exists()
    (run / "replaced.txt").unlink()
    assert sorted(server.objects) == ["bucket/run/sub/big.bin"]
    (run / "keep.txt").write_text("x")
    run.rmtree()
    assert server.objects == {} and not run.exists()

    import fsspec  # gcsfs calls epath does not make: multipart upload (pipe), rewriteTo (copy)
    fs = fsspec.filesystem("gs")
    fs.pipe("bucket/p/one.bin", b"\n--line\r\n" * 3)
    fs.copy("bucket/p/one.bin", "bucket/p/two.bin")
    assert server.objects == {"bucket/p/one.bin": b"\n--line\r\n" * 3, "bucket/p/two.bin": b"\n--line\r\n" * 3}


def test_orbax_checkpoint_manager_keeps_last_two():
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  def tree(step):
    return {"w": jnp.arange(12.0).reshape(3, 4) * (step + 1), "b": {"n": jnp.full((5,), step, jnp.int32)}}

  with fake_gcs.serve() as server:
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager("gs://bucket/ckpt", options=options) as mngr:
      for step in range(3):
        mngr.save(step, args=ocp.args.StandardSave(tree(step)))
      mngr.wait_until_finished()
      assert mngr.all_steps() == [1, 2]
    names = set(server.objects)
    assert not any(n.startswith("bucket/ckpt/0/") for n in names), names  # max_to_keep deleted step 0
    # On gs:// orbax marks a finished step with commit_success.txt instead of renaming a tmp dir.
    assert {"bucket/ckpt/1/commit_success.txt", "bucket/ckpt/2/commit_success.txt"} <= names
    assert not any("tmp" in n for n in names), names
    assert any(n.startswith("bucket/ckpt/2/default/") and "/d/" in n for n in names)  # TensorStore's data

    with ocp.CheckpointManager("gs://bucket/ckpt") as fresh:  # re-discovers steps by listing
      assert fresh.all_steps() == [1, 2] and fresh.latest_step() == 2
      for step in (1, 2):
        restored = fresh.restore(step, args=ocp.args.StandardRestore(tree(0)))
        jax.tree.map(np.testing.assert_array_equal, restored, tree(step))
        assert restored["b"]["n"].dtype == jnp.int32


def test_tensorstore_kvstore_conditions_and_ranges():
  import tensorstore as ts
  with fake_gcs.serve() as server:
    kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "ts/"}).result()
    stamp = kv.write("a", b"0123456789").result()
    assert server.objects == {"bucket/ts/a": b"0123456789"}
    read = kv.read("a").result()
    assert read.state == "value" and read.value == b"0123456789" and read.stamp.generation == stamp.generation
    ranged = kv.read("a", byte_range=slice(2, 5)).result()  # generation from x-goog-generation
    assert ranged.value == b"234" and ranged.stamp.generation == stamp.generation
    assert kv.read("a", if_not_equal=stamp.generation).result().state == "unspecified"  # 304
    assert kv.read("missing").result().state == "missing"

    newer = kv.write("a", b"new", if_equal=stamp.generation).result()
    assert newer.generation not in (b"", stamp.generation)
    failed = kv.write("a", b"stale", if_equal=stamp.generation).result()  # 412: generation moved on
    assert failed.generation == b"" and server.objects["bucket/ts/a"] == b"new"

    for key in ("b/1", "b/2", "c"):
      kv.write(key, key.encode()).result()
    assert sorted(kv.list().result()) == [b"a", b"b/1", b"b/2", b"c"]
    kv.delete_range(ts.KvStore.KeyRange("b/", "b0")).result()
    kv.write("c", None).result()
    assert sorted(server.objects) == ["bucket/ts/a"]


def test_json_api_details():
  """What TensorStore parses strictly: decimal-string generations, x-goog-generation, 206/304/412, paging."""
  with fake_gcs.serve() as server:
    up = f"{server.url}/upload/storage/v1/b/bkt/o?uploadType=media&name=dir%2Fobj"
    status, _, body = _http("POST", up, b"abcdef")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "dir/obj" and meta["size"] == "6"
    gen = meta["generation"]
    assert isinstance(gen, str) and int(gen) > 0
    assert _http("POST", up + "&ifGenerationMatch=0", b"x")[0] == 412  # exists already
    obj = f"{server.url}/storage/v1/b/bkt/o/dir%2Fobj"
    status, headers, body = _http("GET", obj + "?alt=media", headers={"Range": "bytes=1-3"})
    assert (status, body, headers["Content-Range"]) == (206, b"bcd", "bytes 1-3/6")
    assert headers["x-goog-generation"] == gen
    assert _http("GET", obj + "?alt=media", headers={"Range": "bytes=-2"})[2] == b"ef"
    assert _http("GET", obj + f"?alt=media&ifGenerationNotMatch={gen}")[0] == 304
    assert _http("GET", obj + f"?ifGenerationMatch={int(gen) + 1}")[0] == 412
    assert _http("DELETE", obj + f"?ifGenerationMatch={int(gen) + 1}")[0] == 412

    for name in ("dir/p1", "dir/p2", "dir/sub/x", "other"):
      _http("POST", f"{server.url}/upload/storage/v1/b/bkt/o?uploadType=media&name={name}", b"1")
    seen, token = [], ""
    while True:
      query = f"prefix=dir/&delimiter=/&maxResults=2{token}"
      page = json.loads(_http("GET", f"{server.url}/storage/v1/b/bkt/o?{query}")[2])
      seen += [i["name"] for i in page.get("items", [])] + page.get("prefixes", [])
      if "nextPageToken" not in page:
        break
      token = "&pageToken=" + page["nextPageToken"]
    assert seen == ["dir/obj", "dir/p1", "dir/p2", "dir/sub/"]
    assert _http("DELETE", obj)[0] == 204 and _http("GET", obj)[0] == 404
    assert "bkt/dir/obj" not in server.objects


def test_child_process_uses_the_env():
  """A training job is a child process: it reaches the parent's fake through inherited env vars."""
  child = textwrap.dedent("""
      import tensorstore as ts
      from etils import epath
      epath.Path("gs://bucket/job/log.txt").write_text("from child")
      kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "job/"}).result()
      kv.write("array.bin", b"\\x01\\x02").result()
      job = epath.Path("gs://bucket/job")
      print((job / "seeded.txt").read_text(), sorted(p.name for p in job.iterdir()))
  """)
  with fake_gcs.serve() as server:
    server.store[("bucket", "job/seeded.txt")] = fake_gcs._Obj(b"seeded", 7)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "seeded ['array.bin', 'log.txt', 'seeded.txt']"
    assert server.objects["bucket/job/log.txt"] == b"from child"
    assert server.objects["bucket/job/array.bin"] == b"\x01\x02"
  assert "STORAGE_EMULATOR_HOST" not in os.environ  # restored on exit


def test_main_runs_as_a_process():
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_gcs.py"), "--port", "0"],
                          stdout=subprocess.PIPE, text=True)
  try:
    env = json.loads(proc.stdout.readline())
    url = env["STORAGE_EMULATOR_HOST"]
    assert env["TENSORSTORE_GCS_HTTP_URL"] == url and env["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
    assert _http("POST", f"{url}/upload/storage/v1/b/b/o?uploadType=media&name=k", b"v")[0] == 200
    assert _http("GET", f"{url}/storage/v1/b/b/o/k?alt=media")[2] == b"v"
  finally:
    proc.terminate()
    proc.wait(timeout=10)
