"""A small in-memory fake of the Google Cloud Storage JSON API, for tests without network.

It serves the two clients a gs:// training run uses:
  * TensorStore's `gcs` kvstore driver (orbax-checkpoint's array data), pointed here by
    TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING makes it skip real credentials.
  * gcsfs (etils.epath's backend for gs:// when TensorFlow is absent), and google-cloud-storage
    (orbax asks it whether a bucket has hierarchical namespace), both via STORAGE_EMULATOR_HOST.

Use in-process (a daemon thread; the env vars are set, and restored on exit, so child processes
such as `python -m simjax.main` inherit them):
    with fake_gcs.serve() as server:
      ...                  # gs://any-bucket/... works; buckets exist implicitly
      server.objects       # {"bucket/name": bytes}
or as a process: `python tests/fake_gcs.py [--port N]` prints one JSON line, the env a client needs.

Caveats: gcsfs caches directory listings (no expiry) in its filesystem instance, which etils.epath
keeps for the whole process, so a parent that listed gs://b/run does not see files a child wrote
there later (exists() is False too): read `server.objects`, or call `reset_client_caches()` first
(serve() calls it on entry and exit). TensorStore creates its auth provider once per process, so
the env must be set before the process first touches gs://. Not implemented: object versions,
ACLs, PATCH of metadata, compose, the batch API (gcsfs skips it off Google) and gRPC.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.server
import itertools
import json
import os
import re
import sys
import threading
import time
import uuid
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
  import google_crc32c  # present with gcsfs; GCS clients only check crc32c when it is there
except ImportError:  # pragma: no cover
  google_crc32c = None


def client_env(url: str) -> dict[str, str]:
  """The environment a (child) process needs to talk to the fake at `url`."""
  return {
      "TENSORSTORE_GCS_HTTP_URL": url,
      "TENSORSTORE_GCS_HTTP_VERSION": "1.1",  # plain HTTP/1.1, no h2c attempts
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-token",  # TensorStore: fixed bearer token
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (metadata server would hang)
      "FSSPEC_GCS_PROJECT": "fake-project",
      "NO_GCE_CHECK": "true",
      # gcsfs>=2026 otherwise uses ExtendedGcsFileSystem, which first asks the gRPC Storage
      # Control API for the bucket type: 60 s of failing retries against this HTTP-only fake.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


class _Obj:
  __slots__ = ("data", "generation", "metageneration", "content_type", "metadata", "created")

  def __init__(self, data, generation, content_type=None, metadata=None):
    self.data, self.generation, self.metageneration = bytes(data), generation, 1
    self.content_type = content_type or "application/octet-stream"
    self.metadata, self.created = metadata, time.time()


def _ts(t: float) -> str:  # RFC 3339 with milliseconds and Z, as GCS writes (gcsfs asserts the Z)
  return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int(t % 1 * 1000)


def _error(code: int, message: str) -> dict:
  return {"error": {"code": code, "message": message, "errors": [{"message": message}]}}


class FakeGcs:
  """The server. `objects` is a snapshot {"bucket/name": bytes}."""

  def __init__(self, host: str = "127.0.0.1", port: int = 0):
    self.store: dict[tuple[str, str], _Obj] = {}
    self._uploads: dict[str, dict] = {}  # resumable upload sessions
    self.lock = threading.RLock()
    # Generations: unique, > 0 (TensorStore rejects 0 as "Malformed StorageGeneration"), and
    # microsecond-sized like real GCS.
    self._gen = itertools.count(int(time.time() * 1e6))
    self.httpd = _Server((host, port), type("H", (_Handler,), {"gcs": self}))
    self.url = f"http://{host}:{self.httpd.server_address[1]}"
    self.env = client_env(self.url)

  @property
  def objects(self) -> dict[str, bytes]:
    with self.lock:
      return {f"{b}/{n}": o.data for (b, n), o in sorted(self.store.items())}

  def start(self) -> "FakeGcs":
    threading.Thread(target=self.httpd.serve_forever, daemon=True, name="fake-gcs").start()
    return self

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  # --- object helpers (called with the lock held) ---
  def put(self, b, name, data, q, content_type=None, metadata=None):
    code = _precondition(self.store.get((b, name)), q, write=True)
    if code:
      return code, _error(code, "Precondition Failed"), {}
    o = self.store[(b, name)] = _Obj(data, next(self._gen), content_type, metadata)
    return 200, self.meta(b, name, o), {}

  def meta(self, b, name, o) -> dict:
    qn = quote(name, safe="")
    m = {
        "kind": "storage#object", "id": f"{b}/{name}/{o.generation}", "name": name, "bucket": b,
        "selfLink": f"{self.url}/storage/v1/b/{b}/o/{qn}",
        "mediaLink": f"{self.url}/download/storage/v1/b/{b}/o/{qn}?generation={o.generation}&alt=media",
        # Decimal strings, as GCS sends int64s in JSON.
        "generation": str(o.generation), "metageneration": str(o.metageneration),
        "size": str(len(o.data)), "contentType": o.content_type, "storageClass": "STANDARD",
        "md5Hash": base64.b64encode(hashlib.md5(o.data).digest()).decode(),
        "etag": f"{o.generation:x}", "timeCreated": _ts(o.created), "updated": _ts(o.created),
        "timeStorageClassUpdated": _ts(o.created),
    }
    if google_crc32c is not None:
      m["crc32c"] = base64.b64encode(google_crc32c.value(o.data).to_bytes(4, "big")).decode()
    if o.metadata:
      m["metadata"] = o.metadata
    return m

  def bucket_meta(self, b) -> dict:
    t = _ts(0)
    return {"kind": "storage#bucket", "id": b, "name": b, "projectNumber": "0", "metageneration": "1",
            "location": "US", "storageClass": "STANDARD", "timeCreated": t, "updated": t, "etag": "CAE="}


def _precondition(o, q, write: bool):
  """HTTP status for failed if(Meta)Generation(Not)Match conditions, else None. 0 = no live object."""
  gen, mgen = (o.generation, o.metageneration) if o else (0, 0)
  for key, cur in (("ifGenerationMatch", gen), ("ifMetagenerationMatch", mgen)):
    if key in q and int(q[key]) != cur:
      return 412
  for key, cur in (("ifGenerationNotMatch", gen), ("ifMetagenerationNotMatch", mgen)):
    if key in q and o is not None and int(q[key]) == cur:
      return 412 if write else 304  # 304 "not modified" on reads, as TensorStore expects
  return None


_BUCKETS = re.compile(r"^/(?:download/)?storage/v1/b/?$")
_BUCKET = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/?$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o/?$")
_LIST = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/?$")
_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$")
# Copy-like verbs; object names are percent-encoded (with %2F), so the verb's slashes are literal.
_VERB = re.compile(r"^(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)$|^(.+)/(moveTo)/o/(.+)$")


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    # gcsfs races an object GET against a listing and drops the loser's connection: not an error.
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive: both clients pool connections
  gcs: FakeGcs

  def log_message(self, fmt, *args):
    if os.environ.get("FAKE_GCS_VERBOSE"):
      sys.stderr.write("fake_gcs: " + fmt % args + "\n")

  def _body(self) -> bytes:  # both clients send Content-Length (no chunked bodies)
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _dispatch(self):
    body = self._body()  # always drain the body, so the kept-alive connection stays in step
    u = urlsplit(self.path)
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    try:
      with self.gcs.lock:
        code, out, headers = self._route(self.command, u.path, q, body)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
      code, out, headers = 400, _error(400, f"Invalid request: {e!r}"), {}
    if isinstance(out, dict):
      out, headers = json.dumps(out).encode(), {"Content-Type": "application/json; charset=UTF-8", **headers}
    if code in (204, 304):
      out = b""
    self.send_response(code)
    for k, v in headers.items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(out)))
    self.end_headers()
    if out and self.command != "HEAD":
      self.wfile.write(out)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

  def _route(self, method, path, q, body):
    g = self.gcs
    if _BUCKETS.match(path):  # every bucket exists implicitly: creating one just says so
      if method == "POST":
        return 200, g.bucket_meta(json.loads(body)["name"]), {}
      names = sorted({b for b, _ in g.store})
      return 200, {"kind": "storage#buckets", "items": [g.bucket_meta(b) for b in names]}, {}
    if m := _BUCKET.match(path):
      return 200, g.bucket_meta(unquote(m[1])), {}
    if m := _UPLOAD.match(path):
      return self._upload(method, unquote(m[1]), q, body)
    if (m := _LIST.match(path)) and method == "GET":
      return self._list(unquote(m[1]), q)
    if m := _OBJECT.match(path):
      b, rest = unquote(m[1]), m[2]
      if (v := _VERB.match(rest)) and method == "POST":
        if v[2]:
          return self._copy(v[2], b, unquote(v[1]), unquote(v[3]), unquote(v[4]), q)
        return self._copy("moveTo", b, unquote(v[5]), b, unquote(v[7]), q)
      name = unquote(rest)
      if method in ("GET", "HEAD"):
        return self._get(b, name, q)
      if method == "DELETE":
        o = g.store.get((b, name))
        if o is None or ("generation" in q and int(q["generation"]) != o.generation):
          return 404, _error(404, f"No such object: {b}/{name}"), {}
        if code := _precondition(o, q, write=True):
          return code, _error(code, "Precondition Failed"), {}
        del g.store[(b, name)]
        return 204, b"", {}
    return 404, _error(404, f"fake_gcs: no route for {method} {path}"), {}

  def _get(self, b, name, q):
    o = self.gcs.store.get((b, name))
    if code := _precondition(o, q, write=False):
      return code, (_error(code, "Precondition Failed") if code == 412 else b""), {}
    if o is None or ("generation" in q and int(q["generation"]) != o.generation):
      return 404, _error(404, f"No such object: {b}/{name}"), {}
    if q.get("alt") != "media":
      return 200, self.gcs.meta(b, name, o), {}
    data, code, n = o.data, 200, len(o.data)
    headers = {"Content-Type": o.content_type, "ETag": f"{o.generation:x}",
               # TensorStore takes the generation of ranged reads from these headers.
               "x-goog-generation": str(o.generation), "x-goog-metageneration": str(o.metageneration),
               "x-goog-stored-content-length": str(n), "x-goog-storage-class": "STANDARD"}
    meta = self.gcs.meta(b, name, o)
    headers["x-goog-hash"] = ",".join(f"{k}={meta[j]}" for k, j in (("crc32c", "crc32c"), ("md5", "md5Hash"))
                                      if j in meta)
    rng = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers.get("Range") or "")
    if rng and (rng[1] or rng[2]) and n:  # empty objects ignore Range, as GCS does
      if not rng[1]:  # bytes=-N: the last N bytes
        start, end = max(0, n - int(rng[2])), n
      else:
        start, end = int(rng[1]), min(n, int(rng[2]) + 1) if rng[2] else n
      if start >= n or end <= start:
        return 416, _error(416, "The requested range cannot be satisfied."), {"Content-Range": f"bytes */{n}"}
      if (start, end) != (0, n):  # a whole-object range answers 200, like TensorStore's own mock
        data, code = data[start:end], 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{n}"
    return code, data, headers

  def _list(self, b, q):
    prefix, delim = q.get("prefix", ""), q.get("delimiter", "")
    start, end = q.get("startOffset", ""), q.get("endOffset", "")
    max_results = int(q.get("maxResults") or 1000)
    # Page tokens are the hex of the last key returned: URL-safe, since TensorStore appends them unencoded.
    after = bytes.fromhex(q["pageToken"]).decode() if q.get("pageToken") else None
    entries = {}  # key -> object name, or None for a "directory" prefix
    for bb, name in self.gcs.store:
      if bb != b or not name.startswith(prefix) or name < start or (end and name >= end):
        continue
      i = name.find(delim, len(prefix)) if delim else -1
      if i >= 0:
        entries[name[:i + len(delim)]] = None
      else:
        entries[name] = name
    keys = [k for k in sorted(entries) if after is None or k > after]
    page, out = keys[:max_results], {"kind": "storage#objects"}
    if items := [self.gcs.meta(b, entries[k], self.gcs.store[(b, entries[k])]) for k in page if entries[k]]:
      out["items"] = items
    if prefixes := [k for k in page if entries[k] is None]:
      out["prefixes"] = prefixes
    if len(keys) > max_results:
      out["nextPageToken"] = page[-1].encode().hex()
    return 200, out, {}

  def _upload(self, method, b, q, body):
    g, kind = self.gcs, q.get("uploadType", "media")
    ctype = self.headers.get("Content-Type")
    if kind == "media":
      return g.put(b, q["name"], body, q, ctype)
    if kind == "multipart":  # JSON metadata part, then the media part (gcsfs uses bare \n)
      sep = b"--" + re.search(r'boundary="?([^";]+)"?', ctype)[1].encode()
      first = body.index(sep)
      second = body.index(sep, first + len(sep))
      closing = body.rindex(sep + b"--")
      info = json.loads(_part_content(body[first + len(sep):second])[1])
      media_headers, data = _part_content(body[second + len(sep):closing])
      mtype = re.search(rb"(?im)^content-type:\s*(\S+)", media_headers)
      ctype = info.get("contentType") or (mtype and mtype[1].decode())
      return g.put(b, q.get("name") or info["name"], data, q, ctype, info.get("metadata"))
    if kind != "resumable":
      return 400, _error(400, f"Unsupported uploadType {kind}"), {}
    if "upload_id" not in q:  # start a session; chunks go to the Location URL
      info = json.loads(body) if body.strip() else {}
      uid = uuid.uuid4().hex
      g._uploads[uid] = {"name": q.get("name") or info["name"], "q": q, "data": bytearray(),
                         "metadata": info.get("metadata"),
                         "ctype": self.headers.get("X-Upload-Content-Type") or info.get("contentType")}
      host = self.headers.get("Host") or urlsplit(g.url).netloc
      location = f"http://{host}/upload/storage/v1/b/{quote(b, safe='')}/o?uploadType=resumable&upload_id={uid}"
      return 200, b"", {"Location": location}
    up = g._uploads.get(q["upload_id"])
    if up is None:
      return 404, _error(404, "No such upload session"), {}
    if method == "DELETE":
      del g._uploads[q["upload_id"]]
      return 499, b"", {}  # GCS's "upload cancelled"; gcsfs treats 499 as success
    cr = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", self.headers.get("Content-Range", "bytes */*").strip())
    if cr is None:
      return 400, _error(400, "Bad Content-Range"), {}
    if cr[1] is not None:
      up["data"][int(cr[1]):] = body
    if cr[3] != "*" and len(up["data"]) == int(cr[3]):
      del g._uploads[q["upload_id"]]
      return g.put(b, up["name"], up["data"], up["q"], up["ctype"], up["metadata"])
    n = len(up["data"])  # 308 "resume incomplete", with what has been persisted so far
    return 308, b"", ({"Range": f"bytes=0-{n - 1}"} if n else {})

  def _copy(self, verb, b, name, db, dname, q):
    g = self.gcs
    src = g.store.get((b, name))
    if src is None or ("sourceGeneration" in q and int(q["sourceGeneration"]) != src.generation):
      return 404, _error(404, f"No such object: {b}/{name}"), {}
    code, meta, _ = g.put(db, dname, src.data, q, src.content_type, src.metadata)
    if code != 200:
      return code, meta, {}
    if verb == "moveTo":
      del g.store[(b, name)]
    if verb == "rewriteTo":
      n = str(len(src.data))
      meta = {"kind": "storage#rewriteResponse", "totalBytesRewritten": n, "objectSize": n, "done": True,
              "resource": meta}
    return 200, meta, {}


def _part_content(part: bytes) -> tuple[bytes, bytes]:
  """(headers, content) of one multipart part: strip one line end each side, split at the blank line."""
  part = part[2:] if part.startswith(b"\r\n") else part[1:] if part.startswith(b"\n") else part
  part = part[:-2] if part.endswith(b"\r\n") else part[:-1] if part.endswith(b"\n") else part
  ends = [(i, len(s)) for s in (b"\r\n\r\n", b"\n\n") if (i := part.find(s)) >= 0]
  i, n = min(ends)
  return part[:i], part[i + n:]


def reset_client_caches():
  """Drop cached clients bound to an earlier endpoint or listing (only modules already imported)."""
  if gcsfs := sys.modules.get("gcsfs"):
    gcsfs.GCSFileSystem.clear_instance_cache()
  if backend := sys.modules.get("etils.epath.backend"):
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # epath's own gcsfs cache
  if gcs_utils := sys.modules.get("orbax.checkpoint._src.path.gcs_utils"):
    gcs_utils.get_bucket.cache_clear()


@contextlib.contextmanager
def serve(host: str = "127.0.0.1", port: int = 0):
  """Run a FakeGcs in a daemon thread; set client env vars (and fsspec's gcs defaults) meanwhile."""
  server = FakeGcs(host, port).start()
  saved_env = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  fsspec_conf = registry = None
  try:  # fsspec and gcsfs read their env vars only at import: patch this process's state too
    import fsspec.config
    import fsspec.registry
    import gcsfs.core
    fsspec_conf, registry = fsspec.config.conf, sys.modules["fsspec.registry"]._registry
    saved_gcs_conf = fsspec_conf.get("gcs")
    fsspec_conf["gcs"] = {**(saved_gcs_conf or {}), "token": "anon", "project": "fake-project"}
    saved_registry = {p: registry.get(p) for p in ("gs", "gcs")}
    registry.update(gs=gcsfs.core.GCSFileSystem, gcs=gcsfs.core.GCSFileSystem)  # not the Extended one
  except ImportError:  # pragma: no cover
    pass
  reset_client_caches()
  try:
    yield server
  finally:
    reset_client_caches()
    if fsspec_conf is not None:
      for d, saved in ((fsspec_conf, {"gcs": saved_gcs_conf}), (registry, saved_registry)):
        for k, v in saved.items():
          if v is None:
            d.pop(k, None)
          else:
            d[k] = v
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
  args = ap.parse_args(argv)
  server = FakeGcs(args.host, args.port)
  print(json.dumps(server.env), flush=True)  # one line: the env vars a client process needs
  try:
    server.httpd.serve_forever()
  except KeyboardInterrupt:
    pass


if __name__ == "__main__":
  main()
