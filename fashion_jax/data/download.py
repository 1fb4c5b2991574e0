"""Fashion-MNIST (and MNIST) without TensorFlow: the four files tfds uses, checksum-verified.

tensorflow-datasets cannot prepare these data sets without TensorFlow: with
tfds 4.9.10 on Python 3.13 and no TensorFlow (Colab's TPU runtime), `fashion_mnist`'s
`download_and_prepare` first fails importing `importlib_resources` (which the
runtime lacks), and with it installed, extracting the first download fails with
"No module named 'tensorflow'" (tfds's extractor and the MNIST builders read
through `tf.io.gfile`). So where TensorFlow is missing, this module downloads
the same four IDX files from the same address tfds uses (then one mirror),
checks each against the size and SHA-256 that tfds itself records for it
(read from the installed tfds; the copy below when tfds is not installed),
and keeps them in a cache, so the next run is offline. The project's IDX
reader parses them, as it parses any IDX folder.

Files are verified every time they are used (60 ms for Fashion-MNIST), so a
damaged or substituted file in the cache is never read; it is downloaded
again. `load_split` parses the very bytes it checked, and only the recorded
.gz names: a raw (gunzipped) file beside them, or a file swapped in after the
check, is never read. A file is written under a temporary name and renamed when verified,
so processes sharing a cache never see half a file.

Offline, the first file fails within seconds (a bounded name lookup and
connect, one try per address, no retry loop), with one line naming
`--config.idx_dir` and `FASHION_JAX_IDX_DIR`. An address that answers has a
deadline for the whole file (a trickle would otherwise hold it forever), and
any failure of an address (refused, not HTTP, cut off, wrong bytes) moves on to
the next. A failure to write the cache folder is not the address's: it stops at
once, with one line naming the folder.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import importlib.util
import os
import pwd
import secrets
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from absl import logging
import numpy as np

from fashion_jax.data import idx
from fashion_jax.support.errors import UserError
from fashion_jax.support import network
from fashion_jax.support import paths
from fashion_jax.support.network import shown  # The URLs in messages and logs.

# The addresses tfds downloads from (its builders' URL), then a mirror of the same files.
URLS = {
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/",
              "https://ossci-datasets.s3.amazonaws.com/mnist/"),
}
# Size and SHA-256 of each file, as tfds 4.9.10 records them (url_checksums/<name>.txt). Used
# only when tfds is not installed; tests/test_download.py checks that they equal tfds's.
RECORDED = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz":
            (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz":
            (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz":
            (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
    "mnist": {
        "train-images-idx3-ubyte.gz":
            (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz":
            (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz":
            (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz":
            (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
}
URL_ENV = "FASHION_JAX_DATA_URL"  # A mirror (base URL) to use instead of the addresses above.
CONNECT_BUDGET_S = 10.0  # All name lookups and connects of one file together, when offline.
TIMEOUT_S = 5.0  # One name lookup, connect or read.
# The whole of one file from an address that answered: at least this slow a rate, and this long.
MIN_RATE = 50e3  # Bytes per second.
TRANSFER_FLOOR_S = 120.0
_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20
# Training's flag for an IDX folder; `evaluate` names its own (--idx_dir) in these messages.
IDX_FLAG_HINT = "--config.idx_dir=FOLDER holding the four IDX files"
# Where $FASHION_JAX_IDX_DIR is not read (MNIST, a --data_dir), only the flag.
FLAG_HINT = f"without network access pass {IDX_FLAG_HINT}"
OFFLINE_HINT = f"{FLAG_HINT} (or set FASHION_JAX_IDX_DIR=FOLDER once)"


def offline_hint(name: str) -> str:
  """What to do offline: $FASHION_JAX_IDX_DIR serves Fashion-MNIST only (it was suggested for
  MNIST too, where it is ignored)."""
  return OFFLINE_HINT if name == "fashion_mnist" else FLAG_HINT


def tfds_checksums(name: str) -> dict[str, tuple[int, str]] | None:
  """{file name: (size, sha256)} from the installed tfds's records, or None (tfds not installed).

  Read from the package's files without importing tfds (which can take seconds).
  """
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None:
    return None
  for root in spec.submodule_search_locations or ():
    path = os.path.join(root, "url_checksums", f"{name}.txt")
    if os.path.isfile(path):
      table = {}
      with open(path, encoding="utf-8") as f:
        for line in f:
          fields = line.split()
          if len(fields) >= 3 and not line.startswith("#"):
            url, size, sha = fields[:3]
            table[os.path.basename(urllib.parse.urlparse(url).path)] = (int(size), sha)
      return table
  return None


def recorded(name: str) -> dict[str, tuple[int, str]]:
  """What each file must be: tfds's own records when tfds is installed, else the copy here."""
  return tfds_checksums(name) or RECORDED[name]


def default_folder(name: str, data_dir: str = "") -> str:
  """`<data_dir>/<name>/idx` when a data dir is configured, else the user's cache."""
  if data_dir:
    return os.path.join(os.path.expanduser(data_dir), name, "idx")
  return str(paths.cache_root() / "datasets" / name)


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      digest.update(block)
  return digest.hexdigest()


def _verified(path: str, size: int, sha: str) -> bool:
  try:
    return os.path.getsize(path) == size and sha256(path) == sha
  except PermissionError as e:  # Not a damaged file (it was downloaded again, over and over).
    raise UserError(f"cannot read the cached {path} ({e.strerror}; owned by {_owner(path)}); "
                    "make it readable by you (chmod a+r), or set "
                    f"{paths.CACHE_ENV} or --config.data_dir to a folder of your own") from e
  except OSError:
    return False


def _owner(path: str) -> str:
  try:
    uid = os.stat(path).st_uid
  except OSError:
    return "another user"
  try:
    return pwd.getpwuid(uid).pw_name
  except KeyError:
    return f"uid {uid}"


LOCK_FILE = ".fashion_jax-download.lock"  # Stays in the folder (removing it would race).


def fetch(name: str, folder: str, urls: tuple[str, ...] | None = None) -> str:
  """Makes `folder` hold the four verified files of data set `name`; returns the folder.

  Downloads only what is missing or does not match its checksum. Raises
  UserError (one line) when a file cannot be had.
  """
  if name not in URLS:
    raise UserError(f"no download source for data set {name!r}; use one of {', '.join(URLS)}, "
                    "or pass --config.idx_dir=FOLDER")
  via_env = urls is None and bool(os.environ.get(URL_ENV))
  if urls is None:
    mirror = os.environ.get(URL_ENV, "").strip()  # (A newline from $(cat file) too.)
    if mirror and urllib.parse.urlsplit(mirror).scheme.lower() not in _SCHEMES:
      raise UserError(f"{URL_ENV}={shown(mirror)!r} is not an http://, https:// or file:// "
                      "address; set it to a base URL such as http://HOST:PORT/PATH/ or "
                      "file:///FOLDER/, or unset it")
    if mirror.lower().startswith("file:") and urllib.parse.urlsplit(mirror).netloc not in (
        "", "localhost"):  # (Its 'host' was looked up: "name lookup failed ... no network?".)
      raise UserError(f"{URL_ENV}={shown(mirror)!r} is a file:// address with a host name; a "
                      "local folder is file:///ABSOLUTE/PATH/ (three slashes)")
    try:  # urlsplit took "user:pa" for HOST:PORT, a password's '/', '?' or '#' not %-encoded.
      urllib.parse.urlsplit(mirror).port  # pylint: disable=expression-not-assigned
    except ValueError:  # (The rest went to the name lookup, the proxy and the messages.)
      raise UserError(f"{URL_ENV}={shown(mirror)!r} has no HOST[:PORT]; percent-encode a '/', "
                      "'?' or '#' in its password (%2F, %3F, %23)") from None
    urls = (mirror,) if mirror else URLS[name]
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the data folder {folder!r} ({e.strerror}); set "
                    f"{paths.CACHE_ENV} or --config.data_dir to a folder you can write") from e
  # Several processes sharing the folder (a multi-process job) download once: the others wait,
  # then find the files verified.
  with _locked(folder) as held:
    for filename, (size, sha) in recorded(name).items():
      path = os.path.join(folder, filename)
      if held:  # Nobody else is writing: a temporary file of this name is a stopped download's
        _remove_stale(folder, filename)  # (also once the file is there: a later run's got it).
      if os.path.isdir(path):  # (It was "downloading it again", then "cannot write the folder".)
        raise UserError(f"{path} is a folder, where the download keeps {filename}; move it away")
      if os.path.exists(path):
        if _verified(path, size, sha):
          continue
        logging.warning("%s does not match its recorded size and SHA-256; downloading it again",
                        path)
      _download(name, filename, size, sha, urls, path, via_env=via_env)
  return folder


def _locked(folder: str):
  """The folder's download lock (paths.exclusive); yields whether it is held, and says so before
  waiting for another process."""
  return paths.exclusive(os.path.join(folder, LOCK_FILE),
                         waiting=f"waiting for another process downloading into {folder}")


STALE_S = 12 * TIMEOUT_S  # A live download writes at least once a read timeout, or fails.


def _remove_stale(folder: str, filename: str) -> None:
  """Removes the temporary files (`.NAME.xxxx`) of downloads that were stopped (SIGTERM, kill):
  those unchanged for STALE_S, so that one another process writes unlocked (another machine on
  an NFS mount whose locks are local) is never one of them."""
  prefix = f".{filename}."
  try:
    names = [n for n in os.listdir(folder) if n.startswith(prefix)]
  except OSError:
    return
  for n in names:
    path = os.path.join(folder, n)
    with contextlib.suppress(OSError):
      if time.time() - os.lstat(path).st_mtime > STALE_S:
        os.remove(path)
        logging.info("removed %s, left by a download that was stopped", path)


def load_split(name: str, folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of the data set `fetch` made `folder` hold, parsed from the bytes checked here.

  Reads each of the split's two recorded .gz files once, checks the bytes against the size
  and SHA-256 recorded for the file, and parses those same bytes.
  """
  table = recorded(name)
  arrays = []
  for base, ndim in zip(idx.FILES[split], (3, 1)):
    path = os.path.join(folder, base + ".gz")
    size, sha = table[base + ".gz"]
    try:
      with open(path, "rb") as f:
        data = f.read(size + 1)
    except OSError as e:
      raise UserError(f"cannot read {path} ({e.strerror}); run again to download it") from e
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
      raise UserError(f"{path} changed after it was verified (another program is writing the "
                      f"data folder {folder!r}?); run again to download it")
    arrays.append(idx.parse_idx(data, path, ndim))
  return idx.checked_split(*arrays, *(os.path.join(folder, base + ".gz")
                                      for base in idx.FILES[split]))


def check_reachable(name: str) -> None:
  """Raises the offline UserError within seconds unless tfds's download host answers.

  For tfds's own download, which otherwise retries an unreachable host for minutes.
  """
  if name not in URLS:
    return  # Another tfds data set: tfds knows where it lives.
  parsed = urllib.parse.urlparse(URLS[name][0])
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  if _proxied(URLS[name][0]):  # tfds (requests) goes through it too: no direct connection here.
    return
  try:
    _resolve(URLS[name][0], TIMEOUT_S)
    with socket.create_connection((parsed.hostname, port), timeout=TIMEOUT_S):
      return
  except OSError as e:
    raise UserError(f"cannot download {name} through tensorflow-datasets: {parsed.hostname}: "
                    f"{_reason(e)}; " + offline_hint(name)) from e


def _download(name: str, filename: str, size: int, sha: str, urls, path: str,
              via_env: bool = False) -> None:
  failures = []
  deadline = time.monotonic() + CONNECT_BUDGET_S
  for base in urls:
    url = _file_url(base, filename)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      failures.append(f"{shown(url)}: not tried (no address answered within "
                      f"{CONNECT_BUDGET_S:g}s)")
      continue
    try:
      _resolve(url, min(TIMEOUT_S, remaining))
      logging.info("downloading %s (%.1f MB) from %s", filename, size / 1e6, shown(url))
      _download_one(url, size, sha, path, min(TIMEOUT_S, max(remaining, 1.0)))
      return
    except _Answered as e:  # It answered, then failed: the next address gets a budget of its own.
      failures.append(f"{shown(url)}: {_reason(e.__cause__ or e)}")
      deadline = time.monotonic() + CONNECT_BUDGET_S
    # HTTPException: not HTTP at all (BadStatusLine), a transfer cut off; not an OSError.
    except (OSError, ValueError, http.client.HTTPException) as e:
      failures.append(f"{shown(url)}: {_reason(e)}")
  source = (f"the address is ${URL_ENV}'s: fix it, or unset it for the default addresses; "
            if via_env else "")
  raise UserError(f"could not download {name} ({filename}): {'; '.join(failures)}; {source}"
                  + offline_hint(name))


def _file_url(base: str, filename: str) -> str:
  """`filename` in the folder `base` (a query, such as a token, kept after it)."""
  parts = urllib.parse.urlsplit(base)
  return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + filename))


def _request(url: str) -> urllib.request.Request:
  """The GET of `url`: its user:password@ (urllib took it for part of the host name) sent as
  Basic authorization to that host only (not after a redirect); its path percent-encoded."""
  parts, safe = urllib.parse.urlsplit(url), "/%:@!$&'()*+,;=~"  # (What is encoded stays so.)
  # A space or a letter such as 'é' as typed (http.client refused: "URL can't contain control
  # characters", "'ascii' codec can't encode"), percent-encoded as UTF-8.
  request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(
      netloc=parts.netloc.rpartition("@")[2], path=urllib.parse.quote(parts.path, safe),
      query=urllib.parse.quote(parts.query, safe + "?"))), headers={"User-Agent": "fashion_jax"})
  if "@" in parts.netloc:
    user = urllib.parse.unquote(parts.username or "") + ":" + urllib.parse.unquote(
        parts.password or "")
    request.add_unredirected_header("Authorization",
                                    "Basic " + base64.b64encode(user.encode()).decode())
  return request


def _proxied(url: str) -> bool:
  """Whether $http_proxy/$https_proxy (not $no_proxy) sends `url` through a proxy, which looks
  its host up itself (a network whose own resolver knows no outside name)."""
  parts, proxies = urllib.parse.urlsplit(url), urllib.request.getproxies_environment()
  return (parts.scheme in proxies and parts.hostname is not None
          and not urllib.request.proxy_bypass_environment(parts.hostname, proxies))


def _resolve(url: str, timeout: float) -> None:
  """The name lookup, bounded (network.look_up); a file:// mirror has no name to look up, nor
  has an address reached through a proxy here."""
  parts = urllib.parse.urlsplit(url)
  if parts.hostname is not None and parts.scheme != "file" and not _proxied(url):
    network.look_up(parts.hostname, None, timeout)


class _Answered(Exception):
  """An address answered, then the transfer failed (a stall, a wrong file): its cause says how."""


def _download_one(url: str, size: int, sha: str, path: str, timeout: float) -> None:
  """Errors of the address propagate (`_Answered` once it answered); a failure to write the
  folder is a UserError: no other address would do better."""
  limit = max(TRANSFER_FLOOR_S, size / MIN_RATE)
  # An opener of its own: urlopen's is built once, with the proxies of its first call.
  with urllib.request.build_opener().open(_request(url), timeout=timeout) as response:
    deadline = time.monotonic() + limit
    folder = os.path.dirname(path)
    # The same prefix as the mkstemp names before (`_remove_stale` finds both); open(), not
    # mkstemp: the umask's permissions (mkstemp's 0600 locked others out of a shared data_dir).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}")
    try:
      with open(tmp, "xb") as out:  # Closing flushes: a full disk can show here.
        _transfer(response, out, size, sha, deadline, limit)
      os.replace(tmp, path)
    except OSError as e:  # _transfer raises the address's failures as _Answered.
      raise _cannot_write(folder, e) from e
    finally:
      with contextlib.suppress(OSError):
        if os.path.exists(tmp):
          os.remove(tmp)


def _cannot_write(folder: str, e: OSError) -> UserError:
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return UserError(f"no space left to download into {folder} ({e.strerror}); free some space "
                     f"there, or set {paths.CACHE_ENV} or --config.data_dir to a folder on "
                     "another disk")
  return UserError(f"cannot write the data folder {folder} ({e.strerror or e}); set "
                   f"{paths.CACHE_ENV} or --config.data_dir to a folder you can write")


def _transfer(response, out, size: int, sha: str, deadline: float, limit: float) -> None:
  """Copies the response to `out`, checking its size and SHA-256 against the recorded ones.

  A failure of the response (or of its bytes) is raised as _Answered; one of `out` as it is.
  """
  digest, received = hashlib.sha256(), 0
  # read1: what has arrived. read(n) waits for all n bytes: a byte every few seconds (under the
  # per-read timeout) held it past any deadline.
  read = getattr(response, "read1", response.read)
  while True:
    try:
      block = read(_CHUNK)
    except (OSError, ValueError, http.client.HTTPException) as e:  # IncompleteRead: cut off.
      raise _Answered() from e
    if not block:
      break
    received += len(block)
    if received > size:
      raise _Answered(f"more than the recorded {size} bytes")
    if time.monotonic() > deadline:
      raise _Answered(f"too slow: {received} of {size} bytes after {limit:.0f}s (under "
                      f"{MIN_RATE / 1e3:.0f} kB/s)")
    digest.update(block)
    out.write(block)
  if received != size:
    raise _Answered(f"{received} bytes, but tfds records {size}")
  if digest.hexdigest() != sha:
    raise _Answered(f"SHA-256 {digest.hexdigest()[:16]}... differs from the recorded "
                    f"{sha[:16]}... (a damaged or altered file; not used)")


def _reason(e: Exception) -> str:
  if isinstance(e, urllib.error.HTTPError):
    return f"HTTP {e.code} {e.reason}"
  if isinstance(e, urllib.error.URLError):
    e = e.reason if isinstance(e.reason, Exception) else e
  if isinstance(e, network.NoAnswer):
    return str(e)
  if isinstance(e, socket.gaierror):
    return f"name lookup failed ({e.strerror or e}; no network?)"
  if isinstance(e, (socket.timeout, TimeoutError)):
    return "timed out (no network?)"
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  if isinstance(e, http.client.BadStatusLine) and not isinstance(e, OSError):
    return f"not an HTTP server (it answered {e.line.strip()[:40]!r})"
  if isinstance(e, http.client.IncompleteRead):
    return "the transfer was cut off (IncompleteRead)"
  return " ".join(str(e).split()) or type(e).__name__  # One line, whatever a server sent.
