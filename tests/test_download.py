"""fashion_jax.data.download and the data-source choice: verified files, a cache, fast offline errors."""

import base64
import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fashion_jax.data import download
from fashion_jax.data import idx
from fashion_jax.data import input_pipeline
from fashion_jax.support.errors import UserError
from tests.conftest import ROOT, assert_one_line_error, run_module, write_idx_folder


@contextlib.contextmanager
def serve(folder):
  """A local HTTP server over `folder`; yields its base URL and the list of paths requested."""
  requested = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      requested.append(self.path)

  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Handler, directory=folder))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/", requested
  finally:
    server.shutdown()
    server.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
  """Synthetic IDX .gz files served locally, recorded as 'fashion_mnist' with their own checksums."""
  folder = write_idx_folder(str(tmp_path / "served"))
  table = {name: (os.path.getsize(os.path.join(folder, name)),
                  download.sha256(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}
  monkeypatch.setattr(download, "tfds_checksums", lambda name: None)
  monkeypatch.setitem(download.RECORDED, "fashion_mnist", table)
  with serve(folder) as (url, requested):
    yield folder, url, requested


def _closed_port_url():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_recorded_checksums_are_tfds_own():
  """The copy used without tfds equals what the installed tfds records (a test that can fail
  when tfds changes its files)."""
  pytest.importorskip("tensorflow_datasets", reason="tfds is not installed: nothing to compare")
  for name in ("fashion_mnist", "mnist"):
    assert download.tfds_checksums(name) == download.RECORDED[name], name


def test_fetch_downloads_verifies_and_reuses_the_cache(mirror, tmp_path):
  served, url, requested = mirror
  cache = str(tmp_path / "cache")
  assert download.fetch("fashion_mnist", cache, urls=(url,)) == cache
  assert sorted(requested) == sorted("/" + n for n in os.listdir(served))
  for split in ("train", "test"):  # The IDX reader parses what came down.
    np.testing.assert_array_equal(idx.load_split(cache, split)[1], idx.load_split(served, split)[1])
  # No temporary files left (the lock file stays: one download at a time per folder).
  assert not [n for n in os.listdir(cache) if n.startswith(".") and n != download.LOCK_FILE]
  requested.clear()
  download.fetch("fashion_mnist", cache, urls=(url,))  # Offline-safe: nothing fetched again.
  assert requested == []


def test_a_damaged_cached_file_is_downloaded_again(mirror, tmp_path):
  served, url, requested = mirror
  cache = str(tmp_path / "cache")
  download.fetch("fashion_mnist", cache, urls=(url,))
  victim = os.path.join(cache, "train-labels-idx1-ubyte.gz")
  with open(victim, "r+b") as f:  # Same size, one byte changed: only the SHA-256 can tell.
    f.seek(20)
    byte = f.read(1)
    f.seek(20)
    f.write(bytes([byte[0] ^ 1]))
  requested.clear()
  download.fetch("fashion_mnist", cache, urls=(url,))
  assert requested == ["/train-labels-idx1-ubyte.gz"]
  assert download.sha256(victim) == download.sha256(os.path.join(served, "train-labels-idx1-ubyte.gz"))


def test_a_file_that_differs_from_the_record_is_never_kept(mirror, tmp_path):
  served, url, _ = mirror
  name = "t10k-labels-idx1-ubyte.gz"
  with gzip.open(os.path.join(served, name), "rb") as f:
    data = bytearray(f.read())
  data[-1] = (data[-1] + 1) % 10  # A different label: a valid IDX file, but not the recorded one.
  with gzip.open(os.path.join(served, name), "wb") as f:
    f.write(bytes(data))
  cache = str(tmp_path / "cache")
  with pytest.raises(UserError, match=r"t10k-labels.*(SHA-256|bytes).*--config.idx_dir"):
    download.fetch("fashion_mnist", cache, urls=(url,))
  assert not os.path.exists(os.path.join(cache, name))
  assert not [n for n in os.listdir(cache) if n.startswith(".") and n != download.LOCK_FILE]


def test_the_mirror_is_tried_when_the_first_address_fails(mirror, tmp_path):
  _, url, requested = mirror
  download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(_closed_port_url(), url))
  assert len(requested) == 4


@contextlib.contextmanager
def _stalling_server():
  """An address that answers, sends a little slowly, then stalls."""
  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      self.send_response(200)
      self.send_header("Content-Length", "100000")
      self.end_headers()
      for _ in range(6):
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        time.sleep(0.3)
      time.sleep(3)

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()


def test_an_address_that_answers_then_stalls_leaves_the_mirror_its_own_budget(mirror, tmp_path,
                                                                              monkeypatch):
  """The connect budget covered the first address's whole transfer: a slow first address left
  the mirror 'not tried (no address answered ...)', though one had."""
  _, url, requested = mirror
  monkeypatch.setattr(download, "TIMEOUT_S", 0.5)
  monkeypatch.setattr(download, "CONNECT_BUDGET_S", 1.0)
  with _stalling_server() as slow:
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(slow, url))
  assert len(requested) == 4


def test_unreachable_addresses_fail_fast_with_one_line(mirror, tmp_path):
  start = time.monotonic()
  with pytest.raises(UserError) as e:
    download.fetch("fashion_mnist", str(tmp_path / "cache"),
                   urls=(_closed_port_url(), _closed_port_url()))
  assert time.monotonic() - start < 15  # Refused at once: no retry loop (a loaded machine: slow).
  assert "\n" not in str(e.value) and "--config.idx_dir" in str(e.value)
  assert "FASHION_JAX_IDX_DIR" in str(e.value)
  with pytest.raises(UserError) as e:  # The variable serves Fashion-MNIST only: not named here.
    download.fetch("mnist", str(tmp_path / "cache"), urls=(_closed_port_url(),))
  assert "--config.idx_dir" in str(e.value) and "FASHION_JAX_IDX_DIR" not in str(e.value)


def test_a_hanging_name_lookup_is_bounded(mirror, tmp_path, monkeypatch):
  """getaddrinfo ignores socket timeouts; a resolver that never answers must not hang the run."""
  monkeypatch.setattr(download, "TIMEOUT_S", 0.5)
  monkeypatch.setattr(download, "CONNECT_BUDGET_S", 1.0)
  real = socket.getaddrinfo
  monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (
      time.sleep(30) if host == "hangs.invalid" else real(host, *a, **k)))
  before = set(threading.enumerate())
  start = time.monotonic()
  with pytest.raises(UserError, match="no answer for hangs.invalid"):
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=("http://hangs.invalid/",))
  assert time.monotonic() - start < 15  # The lookup hangs for 30 s.
  # Nothing left that Python waits for at exit (a pool's worker kept the process alive 30 s
  # after the error).
  assert not [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]


def test_source_order(tmp_path, monkeypatch, tiny_config):
  config = tiny_config.copy_and_resolve_references()
  assert input_pipeline.source(config).origin == "config.idx_dir"
  config.idx_dir = ""
  monkeypatch.setenv(input_pipeline.IDX_ENV, str(tmp_path))
  assert input_pipeline.source(config) == input_pipeline.Source(
      "idx", str(tmp_path), "$FASHION_JAX_IDX_DIR")
  config.dataset = "mnist"  # The variable names a Fashion-MNIST folder only.
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: False)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "c"))
  assert input_pipeline.source(config) == input_pipeline.Source(
      "download", str(tmp_path / "c" / "datasets" / "mnist"), "no TensorFlow here")
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: True)
  monkeypatch.setattr(input_pipeline, "tfds_import_error", lambda: None)
  assert input_pipeline.source(config).kind == "tfds"
  config.data_dir = "~/tfds"  # bash leaves --config.data_dir=~/tfds as it is: a folder named "~".
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert input_pipeline.source(config).location == str(tmp_path / "home" / "tfds")
  config.data_dir = ""
  # tfds installed but broken (Colab's GPU and CPU runtimes, Aug 2026: tensorflow-metadata's
  # protobuf code newer than the runtime's protobuf): the verified download, saying why.
  monkeypatch.setattr(input_pipeline, "tfds_import_error", lambda: "VersionError: protobuf")
  assert input_pipeline.source(config) == input_pipeline.Source(
      "download", str(tmp_path / "c" / "datasets" / "mnist"),
      "tensorflow-datasets cannot be imported here: VersionError: protobuf")


def test_without_tensorflow_the_data_is_downloaded_once(mirror, tmp_path, monkeypatch, tiny_config):
  """No TensorFlow: the data comes from the verified download, said so, and the next is offline."""
  served, url, requested = mirror
  monkeypatch.delenv(input_pipeline.IDX_ENV, raising=False)
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: False)
  monkeypatch.setenv(download.URL_ENV, url)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  tiny_config.idx_dir = ""
  where = input_pipeline.source(tiny_config)
  assert "verified against its recorded SHA-256" in where.describe()
  assert str(tmp_path / "cache") in where.describe()
  expected = input_pipeline.load(tiny_config.copy_and_resolve_references(), "test",
                                 input_pipeline.Source("idx", served, "test"))
  got = input_pipeline.load(tiny_config, "test", where)
  np.testing.assert_array_equal(got.images, expected.images)
  assert len(requested) == 4
  requested.clear()
  monkeypatch.setenv(download.URL_ENV, _closed_port_url())  # "Offline" now.
  assert len(input_pipeline.load(tiny_config, "train")) == 256
  assert requested == []


def _unshare_works() -> bool:
  return (shutil.which("unshare") is not None and subprocess.run(
      ["unshare", "-rn", "true"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not _unshare_works(),
                    reason="cannot make a network-less namespace here (unshare -rn)")
def test_default_command_offline_fails_in_seconds_not_minutes(tmp_path):
  """The README's main command with no network and no data: one line naming --config.idx_dir,
  in seconds (tfds alone retried for 3.5 minutes; 3-10 s here, more beside other tests). With TensorFlow this is tfds's path, without
  it the download's: the suite runs in both environments."""
  env = dict(os.environ, FASHION_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop(input_pipeline.IDX_ENV, None)
  env.pop(download.URL_ENV, None)
  start = time.monotonic()
  proc = subprocess.run(["unshare", "-rn", sys.executable, "-m",
                         "fashion_jax.main", "--config=configs/default.py",
                         f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  elapsed = time.monotonic() - start
  assert_one_line_error(proc, "--config.idx_dir", "FASHION_JAX_IDX_DIR")
  assert elapsed <= 90, elapsed


def test_idx_dir_from_the_environment(tmp_path, idx_dir):
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    "--config.num_train_steps=2", "--config.eval_every_steps=2",
                    env={input_pipeline.IDX_ENV: idx_dir})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"from IDX folder {idx_dir} ($FASHION_JAX_IDX_DIR)" in proc.stderr
  with open(tmp_path / "w" / "config.json") as f:  # The run's record says where its data came from.
    assert json.load(f)["_derived"]["data_source"] == f"IDX folder {idx_dir} ($FASHION_JAX_IDX_DIR)"
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'x'}",
                    env={input_pipeline.IDX_ENV: str(tmp_path / "missing")})
  assert_one_line_error(proc, "FASHION_JAX_IDX_DIR=", "is not a folder")


def test_processes_sharing_a_folder_download_once(tmp_path, monkeypatch):
  """Two fetches at once into one folder (a multi-process job): one downloads, the other waits
  for it and then finds the files verified."""
  active, peak, downloads = [0], [0], []
  lock = threading.Lock()
  payload = {name: bytes([i]) * 10 for i, name in enumerate(download.recorded("fashion_mnist"))}
  monkeypatch.setattr(download, "recorded", lambda name: {
      f: (len(b), hashlib.sha256(b).hexdigest()) for f, b in payload.items()})

  def slow_download(name, filename, size, sha, urls, path, via_env=False):
    with lock:
      active[0] += 1
      peak[0] = max(peak[0], active[0])
    time.sleep(0.05)
    with open(path, "wb") as f:
      f.write(payload[filename])
    downloads.append(filename)
    with lock:
      active[0] -= 1

  monkeypatch.setattr(download, "_download", slow_download)
  threads = [threading.Thread(target=download.fetch, args=("fashion_mnist", str(tmp_path)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert peak[0] == 1 and sorted(downloads) == sorted(payload)


def test_only_the_verified_bytes_are_read(mirror, tmp_path):
  """A raw (gunzipped) file beside the checked .gz -- `gunzip -k`, or someone who can write a
  shared cache -- was read instead of it; so was a .gz swapped in after `fetch` checked it."""
  served, url, _ = mirror
  cache = str(tmp_path / "cache")
  download.fetch("fashion_mnist", cache, urls=(url,))
  want = idx.load_split(served, "test")
  zeros = np.zeros((100, 28, 28), np.uint8)
  idx.write_idx(os.path.join(cache, "t10k-images-idx3-ubyte"), zeros)
  idx.write_idx(os.path.join(cache, "t10k-labels-idx1-ubyte"), np.full(100, 3, np.uint8))
  assert idx.load_split(cache, "test")[0].max() == 0  # What the IDX reader prefers: the raw file.
  got = download.load_split("fashion_mnist", download.fetch("fashion_mnist", cache, urls=(url,)),
                            "test")
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  # Swapped after the check: a same-size file with other bytes is refused, not parsed.
  labels = os.path.join(cache, "t10k-labels-idx1-ubyte.gz")
  data = bytearray(open(labels, "rb").read())
  data[-9] ^= 1
  with open(labels, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz changed after it was verified "
                     r".*run again to download it"):
    download.load_split("fashion_mnist", cache, "test")


def test_a_file_url_mirror_is_read_without_a_name_lookup(mirror, tmp_path, monkeypatch):
  served, _, _ = mirror
  monkeypatch.setenv(download.URL_ENV, "file://" + served)
  cache = str(tmp_path / "cache")
  download.fetch("fashion_mnist", cache)  # Was: "name lookup failed (...; no network?)".
  np.testing.assert_array_equal(download.load_split("fashion_mnist", cache, "train")[1],
                                idx.load_split(served, "train")[1])


def test_a_lock_file_planted_as_a_link_is_not_followed(tmp_path):
  """A link in a shared data folder made the lock open (and create) the file it points at."""
  victim = tmp_path / "someone_elses" / "file"
  victim.parent.mkdir()
  os.symlink(victim, tmp_path / download.LOCK_FILE)
  with download._locked(str(tmp_path)) as held:  # pylint: disable=protected-access
    assert not held
  assert not victim.exists()


def test_a_lock_file_planted_as_a_fifo_does_not_block(tmp_path):
  """A FIFO in a shared data folder named as the lock: the open waited for a reader, for ever."""
  os.mkfifo(tmp_path / download.LOCK_FILE)
  done = []
  thread = threading.Thread(target=lambda: done.append(_enter(download._locked(str(tmp_path)))),  # pylint: disable=protected-access
                            daemon=True)
  thread.start()
  thread.join(10)
  assert done == [False]


def _enter(manager):
  with manager as held:
    return held


@contextlib.contextmanager
def _raw_server(reply):
  """An address that answers each connection with `reply(connection)` (not necessarily HTTP)."""
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(16)
  listener.settimeout(0.2)
  done = threading.Event()

  def accept():
    while not done.is_set():
      try:
        connection, _ = listener.accept()
      except OSError:
        continue
      def answer(c=connection):
        with c, contextlib.suppress(OSError):
          c.recv(4096)
          reply(c)
      threading.Thread(target=answer, daemon=True).start()

  threading.Thread(target=accept, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
  finally:
    done.set()
    listener.close()


def _not_http(c):  # Another service on the port (an ssh banner).
  c.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


def _chunked_cut_off(c):
  c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 100)


@pytest.mark.parametrize("reply, says", [(_not_http, "not an HTTP server .it answered 'SSH-2.0"),
                                         (_chunked_cut_off, "the transfer was cut off .IncompleteRead.")])
def test_an_address_that_is_not_http_or_is_cut_off_is_a_failed_address(mirror, tmp_path, reply,
                                                                         says):
  """http.client's errors (BadStatusLine, IncompleteRead) are not OSErrors: they were a traceback,
  and the mirror was never tried."""
  _, url, requested = mirror
  with _raw_server(reply) as bad:
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(bad, url))
    assert len(requested) == 4
    with pytest.raises(UserError, match=f"ubyte.gz\\): {bad}t10k-images-idx3-ubyte.gz: {says}") as e:
      download.fetch("fashion_mnist", str(tmp_path / "other"), urls=(bad,))
    assert "\n" not in str(e.value) and "\r" not in str(e.value)


def test_downloaded_files_have_the_umasks_mode(mirror, tmp_path):
  """mkstemp's 0600 locked other users out of a shared data_dir."""
  _, url, _ = mirror
  cache = str(tmp_path / "cache")
  umask = os.umask(0o022)
  try:
    download.fetch("fashion_mnist", cache, urls=(url,))
  finally:
    os.umask(umask)
  for name in download.recorded("fashion_mnist"):
    assert os.stat(os.path.join(cache, name)).st_mode & 0o777 == 0o644, name


def test_local_write_failures_are_the_folders_not_the_addresses(mirror, tmp_path, monkeypatch):
  """A read-only or full cache was blamed on the address ('could not download ...: Read-only
  file system'), the mirror tried, and a full disk advised --workdir and checkpoints."""
  _, url, requested = mirror
  cache = str(tmp_path / "cache")
  with monkeypatch.context() as patch, pytest.raises(UserError) as e:
    patch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    download.fetch("fashion_mnist", cache, urls=(url, url))
  assert str(e.value).startswith(f"cannot write the data folder {cache} (Read-only file system)")
  assert "FASHION_JAX_CACHE_DIR" in str(e.value) and "--config.data_dir" in str(e.value)
  assert len(requested) == 1  # No other address would do better.
  requested.clear()
  real_open = open

  def full_on_close(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if mode != "xb":  # Only the download's own file.
      return f
    close = f.close
    def fail():
      close()
      raise OSError(errno.ENOSPC, "No space left on device")
    f.close = fail
    return f

  monkeypatch.setattr(download, "open", full_on_close, raising=False)
  with pytest.raises(UserError, match=f"no space left to download into {cache} .*free some space"
                     ) as e:
    download.fetch("fashion_mnist", cache, urls=(url, url))
  assert "--workdir" not in str(e.value) and len(requested) == 1
  assert not [n for n in os.listdir(cache) if n.startswith(".") and n != download.LOCK_FILE]


def test_an_unreadable_cached_file_is_named(mirror, tmp_path, monkeypatch):
  """A cached file this user cannot read (another user's, in a shared data_dir) was taken for a
  damaged one and downloaded again, on every run."""
  _, url, requested = mirror
  cache = str(tmp_path / "cache")
  download.fetch("fashion_mnist", cache, urls=(url,))
  requested.clear()
  real = download.sha256
  denied = os.path.join(cache, "train-images-idx3-ubyte.gz")
  monkeypatch.setattr(download, "sha256", lambda path: (_ for _ in ()).throw(
      PermissionError(errno.EACCES, "Permission denied")) if path == denied else real(path))
  with pytest.raises(UserError, match=f"cannot read the cached {denied} \\(Permission denied; "
                     "owned by .*chmod a\\+r.*FASHION_JAX_CACHE_DIR"):
    download.fetch("fashion_mnist", cache, urls=(url,))
  assert requested == []


def test_a_transfer_has_a_deadline(mirror, tmp_path, monkeypatch):
  """A byte every 0.1 s (under the per-read timeout) held the download for as long as it came."""
  monkeypatch.setattr(download, "TRANSFER_FLOOR_S", 0.5, raising=False)

  def trickle(c):
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(40):
      c.sendall(b"x")
      time.sleep(0.1)

  start = time.monotonic()
  with _raw_server(trickle) as slow, pytest.raises(UserError, match=r"too slow: \d+ of \d+ bytes"):
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(slow,))
  assert time.monotonic() - start < 3.5  # The trickle goes on for 4 s.


def test_a_process_waiting_for_another_says_so(mirror, tmp_path, caplog):
  """A process waiting for another's download said nothing (for minutes, on a slow link)."""
  _, url, _ = mirror
  cache = tmp_path / "cache"
  cache.mkdir()
  with open(cache / download.LOCK_FILE, "w") as holder:
    fcntl.flock(holder, fcntl.LOCK_EX)  # Another process, downloading.
    with caplog.at_level(logging.INFO, logger="absl"):
      waiting = threading.Thread(target=download.fetch, args=("fashion_mnist", str(cache), (url,)))
      waiting.start()
      deadline = time.monotonic() + 120  # (5 s was short on a loaded machine: the line came
      while time.monotonic() < deadline:  # after the lock was freed, and the test failed.)
        if any("waiting for another process downloading into" in r.getMessage()
               for r in caplog.records):
          break
        time.sleep(0.05)
      fcntl.flock(holder, fcntl.LOCK_UN)
      waiting.join()
  assert any(r.getMessage() == f"waiting for another process downloading into {cache}"
             for r in caplog.records)


def test_a_file_system_without_locks_downloads_unlocked(mirror, tmp_path, monkeypatch, caplog):
  """flock failing with ENOLCK (some NFS and FUSE mounts) was a traceback."""
  _, url, requested = mirror

  def no_locks(*args):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level(logging.WARNING, logger="absl"):
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(url,))
  assert len(requested) == 4
  assert any("No locks available" in r.getMessage() for r in caplog.records)


def test_a_folder_where_a_download_goes_is_named(mirror, tmp_path):
  """It was "does not match its recorded size; downloading it again", then "cannot write the
  data folder (Is a directory)", advising another folder for one that is writable."""
  _, url, requested = mirror
  cache = tmp_path / "cache"
  (cache / "train-labels-idx1-ubyte.gz").mkdir(parents=True)
  with pytest.raises(UserError, match=f"^{cache}/train-labels-idx1-ubyte.gz is a folder, where "
                     "the download keeps train-labels-idx1-ubyte.gz; move it away$"):
    download.fetch("fashion_mnist", str(cache), urls=(url,))


def test_temporary_files_of_a_stopped_download_are_removed(mirror, tmp_path):
  """A download stopped by SIGTERM or kill left its temporary file (up to 26 MB) for ever."""
  _, url, _ = mirror
  cache = tmp_path / "cache"
  cache.mkdir()
  stale = cache / ".train-images-idx3-ubyte.gz.k1ll3d00"  # mkstemp's names, and today's.
  stale.write_bytes(b"x" * 1000)
  old = time.time() - download.STALE_S - 1
  os.utime(stale, (old, old))
  live = cache / ".t10k-images-idx3-ubyte.gz.0ther0ne"  # Another machine's, written just now.
  live.write_bytes(b"x" * 1000)
  download.fetch("fashion_mnist", str(cache), urls=(url,))
  assert not stale.exists() and live.exists()
  # One a run stopped, where a later run (within STALE_S) got the file: it had stayed for good,
  # as only a missing file's name was swept.
  stale.write_bytes(b"x" * 1000)
  os.utime(stale, (old, old))
  download.fetch("fashion_mnist", str(cache), urls=(url,))
  assert not stale.exists() and (cache / "train-images-idx3-ubyte.gz").exists()


def test_another_users_lock_file_is_taken_read_only(tmp_path, monkeypatch):
  """A shared data folder where another user's download left its lock file (0644): this user
  could not open it for writing, so downloaded unlocked beside that user's download."""
  (tmp_path / download.LOCK_FILE).touch()
  os.chmod(tmp_path / download.LOCK_FILE, 0o444)  # (Root ignores modes: as seen by a user.)
  real_open = os.open

  def as_another_user(path, flags, *args):
    if path.endswith(download.LOCK_FILE) and flags & (os.O_WRONLY | os.O_RDWR):
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, flags, *args)

  monkeypatch.setattr(download.os, "open", as_another_user)
  with download._locked(str(tmp_path)) as held:  # pylint: disable=protected-access
    assert held


def test_the_data_url_variable_is_named(monkeypatch, tmp_path):
  """A value with no scheme said 'unknown url type', and no error named the variable."""
  for value in ("127.0.0.1:8000", str(tmp_path)):
    monkeypatch.setenv(download.URL_ENV, value)
    with pytest.raises(UserError, match=f"FASHION_JAX_DATA_URL='{value}' is not an http://, "
                       "https:// or file:// address"):
      download.fetch("fashion_mnist", str(tmp_path / "cache"))
  monkeypatch.setenv(download.URL_ENV, _closed_port_url())
  with pytest.raises(UserError, match=r"refused; the address is \$FASHION_JAX_DATA_URL's: fix it"):
    download.fetch("fashion_mnist", str(tmp_path / "cache"))
  # A relative folder written file://data/: 'data' was looked up as a host ('no network?').
  monkeypatch.setenv(download.URL_ENV, "file://data/fashion/")
  monkeypatch.setattr(download.network, "look_up", lambda *a: pytest.fail(f"looked up {a}"))
  with pytest.raises(UserError, match="FASHION_JAX_DATA_URL='file://data/fashion/' is a file:// "
                     "address with a host name; a local folder is file:///ABSOLUTE/PATH/"):
    download.fetch("fashion_mnist", str(tmp_path / "cache"))


@contextlib.contextmanager
def _serve_with(folder, check):
  """A local HTTP server over `folder` that answers 403 where `check(handler)` is false (a mirror
  that wants a password, a proxy); yields its base URL and the paths it was asked for."""
  requested = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      requested.append(self.path)
      if not check(self):
        self.send_error(403)
        return
      self.path = "/" + self.path.rsplit("/", 1)[-1].split("?")[0]  # (A proxy's full URL.)
      super().do_GET()

  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Handler, directory=folder))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield f"127.0.0.1:{server.server_address[1]}", requested
  finally:
    server.shutdown()
    server.server_close()


def test_a_mirror_with_a_password_in_its_url_is_used_and_never_shown(mirror, tmp_path,
                                                                      monkeypatch, caplog):
  """FASHION_JAX_DATA_URL=https://user:password@host/path/ went to urllib whole: it took
  'user:password@host' for the host name, said 'name lookup failed (...; no network?)', and the
  error printed the password."""
  served, _, _ = mirror
  good = "Basic " + base64.b64encode(b"alice:s3 cret").decode()
  with _serve_with(served, lambda h: h.headers.get("Authorization") == good) as (host, asked):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(download.URL_ENV, f"http://alice:s3%20cret@{host}/data/?token=t0ken")
    cache = str(tmp_path / "cache")
    download.fetch("fashion_mnist", cache)
    assert len(asked) == 4 and all(p.endswith("?token=t0ken") for p in asked), asked
    monkeypatch.setenv(download.URL_ENV, f"http://alice:wr0ng@{host}/data/?token=t0ken")
    with pytest.raises(UserError, match=f"http://\\*\\*\\*@{host}/data/t10k-images-idx3-ubyte.gz"
                       r"\?\*\*\*: HTTP 403") as e:
      download.fetch("fashion_mnist", str(tmp_path / "other"))
  for secret in ("s3", "wr0ng", "t0ken"):
    assert secret not in str(e.value) and secret not in caplog.text, secret


def test_an_address_reached_through_a_proxy_is_not_looked_up_here(mirror, tmp_path, monkeypatch):
  """Behind an HTTP proxy (a network whose resolver knows no outside name) the download looked
  the host up itself first: 'name lookup failed (...; no network?)', the proxy never asked; so
  did the check before tfds's own download (a direct connection)."""
  served, _, _ = mirror
  for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  absent = "http://fashion-mirror.invalid/data/"
  with _serve_with(served, lambda h: h.path.startswith(absent)) as (proxy, asked):
    monkeypatch.setenv("http_proxy", f"http://{proxy}")
    monkeypatch.setattr(download.network, "look_up", lambda *a: pytest.fail(f"looked up {a}"))
    download.fetch("fashion_mnist", str(tmp_path / "cache"), urls=(absent,))
    assert sorted(asked) == sorted(absent + n for n in os.listdir(served))
    monkeypatch.setitem(download.URLS, "fashion_mnist", (absent,))
    download.check_reachable("fashion_mnist")  # (tfds's requests go through the proxy too.)


def test_a_mirror_whose_path_has_spaces_or_accents_as_typed(mirror, tmp_path, monkeypatch):
  """http.client refused such a URL: "URL can't contain control characters" (a space), "'ascii'
  codec can't encode character" (an é); file:// URLs took them. Encoded ones still work."""
  served, _, _ = mirror
  shutil.copytree(served, tmp_path / "www" / "my data é")
  with serve(str(tmp_path / "www")) as (url, requested):
    for i, folder in enumerate(("my data é", "my%20data%20%C3%A9")):
      monkeypatch.setenv(download.URL_ENV, f"{url}{folder}/")
      download.fetch("fashion_mnist", str(tmp_path / f"cache{i}"))
  assert len(requested) == 8 and requested[0].startswith("/my%20data%20%C3%A9/"), requested


@pytest.mark.parametrize("password", ["s3cr#tt0k", "ab12/cd34", "wh4t?zq9"])
def test_a_password_with_a_character_its_url_must_encode_is_never_shown(password, tmp_path,
                                                                         monkeypatch):
  """A password's '#', '/' or '?' as typed ended what urlsplit took for the host ('alice:s3cr'):
  the error printed the whole URL, password included, after looking 'alice' up (or sending it to
  a proxy). It is refused first, the password hidden."""
  monkeypatch.setenv(download.URL_ENV, f"https://alice:{password}@mirror.example/fm/")
  monkeypatch.setattr(download.network, "look_up", lambda *a: pytest.fail(f"looked up {a}"))
  with pytest.raises(UserError, match=r"^FASHION_JAX_DATA_URL='https://\*\*\*@mirror.example/fm/' "
                     "has no HOST.:PORT.; percent-encode") as e:
    download.fetch("fashion_mnist", str(tmp_path / "cache"))
  for secret in password.replace("#", " ").replace("/", " ").replace("?", " ").split():
    assert secret not in str(e.value), (secret, str(e.value))
  # A port-like start ('123') parses: the part after the '/' is not shown either.
  assert download.shown("https://alice:123/abc@mirror.example/fm/x.gz") == (
      "https://***@mirror.example/fm/x.gz")
