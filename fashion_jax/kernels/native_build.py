"""Building, caching and choosing the native kernels' shared library: one build per CPU target.

A build is for an ISA level, not one CPU (`-march=x86-64-v4`, not `-march=native`: within noise on
the Zen 5 VM, BENCHMARKS.md), so a cache filled ahead of time (`python -m fashion_jax.kernels.native
--all`, e.g. in a Docker image) serves every CPU of the architecture. A process loads the best
target its CPU runs: built if missing and a compiler is there, else the best one built. x86-64-v4:
16 floats (AVX-512), x86-64-v3: 8 (AVX2; `_V3`, `_V4`: their /proc/cpuinfo flags), x86-64 and
armv8-a: 4 (SSE2, NEON: every CPU of the architecture). GCC < 11, Clang < 12 (no x86-64-v3/v4)
build them as -m flags, else the next lower target (`choose`: a probe, a warning, remembered a
week). `FASHION_JAX_NATIVE_ISA=<target>` forces a target (one this CPU runs),
`FASHION_JAX_NATIVE_LANES=4|8|16` another width (tests, measurements).

The compiler is `$CXX`, else c++, g++ or clang++ (`compiler`): GCC or Clang (macOS's). Without
/proc/cpuinfo (macOS) an x86-64 CPU gets the portable target unless `FASHION_JAX_NATIVE_ISA` names
another (an Intel Mac with AVX2: `x86-64-v3`), taken on the user's word, with a warning.

Trust: a cached library is loaded only if it and every folder down from the cache are this user's
own, no symlink, not group/world-writable, and no folder above the cache is one every user may
write (`paths.put_by_others`); otherwise it is built afresh in a private `mkdtemp` folder. It is
loaded through the descriptor it was checked by (`open_library`): a folder swapped after the check
cannot change what runs. The cache key covers the source, the target's -march and width, jax,
jaxlib and XLA's FFI headers, not the compiler (any one's build does the same; none: prebuilt).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path
import platform
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time

from absl import logging
import jax

from fashion_jax.support import paths, runtime

SOURCE = Path(__file__).parent / "csrc" / "conv_pool.cc"
FLAGS = ("-O3", "-std=gnu++17", "-shared", "-fPIC", "-Wno-psabi")
LANES = (4, 8, 16)  # Vector widths (floats) the source builds with.
LIBRARY = "conv_pool.so"
_warn_once = functools.cache(logging.warning)  # (Each message once a process.)

_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  march: str
  lanes: int
  requires: frozenset[str] = frozenset()
  spelled: tuple[str, ...] = ()  # `march`'s ISA as flags GCC 7+ and Clang 5+ know.


_M2 = ("-march=x86-64", "-mcx16", "-msahf", "-mpopcnt", "-msse3", "-msse4.1", "-msse4.2", "-mssse3")
_M3 = (*_M2, *"-mavx -mavx2 -mbmi -mbmi2 -mf16c -mfma -mlzcnt -mmovbe -mxsave".split())
_M4 = (*_M3, *"-mavx512f -mavx512bw -mavx512cd -mavx512dq -mavx512vl".split())  # GCC's v4.
# Per architecture (platform.machine()), best first; the last one runs on every CPU of it.
TARGETS = {
    "x86_64": (Target("x86-64-v4", "-march=x86-64-v4", 16, _V4, _M4),
               Target("x86-64-v3", "-march=x86-64-v3", 8, _V3, _M3),
               Target("x86-64", "-march=x86-64", 4)),
    "aarch64": (Target("armv8-a", "-march=armv8-a", 4),),
}
TARGETS.update(AMD64=TARGETS["x86_64"], arm64=TARGETS["aarch64"])


class NativeUnavailable(RuntimeError):
  pass


def compiler() -> str | None:
  """The C++ compiler's absolute path: `$CXX`, else c++, g++ or clang++ from PATH's absolute
  folders no other user could have put it in (`paths.put_by_others`; not `.`, a shared /tmp)."""
  cxx = os.environ.get("CXX")
  for name in (cxx, "c++", "g++", "clang++"):
    if name != cxx and cxx:  # $CXX was passed over, which had been without a word.
      _warn_once("CXX=%r is not used: not found, or refused above (it names a compiler's path or a "
                 "name on PATH, without options: not 'ccache g++'); trying c++, g++ and clang++",
                 cxx)
    if name and os.sep in name:  # A path the user named ($CXX=/opt/gcc/bin/g++): theirs to vouch.
      if found := shutil.which(name):
        return os.path.abspath(found)
    elif name:
      for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if os.path.isabs(folder) and (found := shutil.which(name, path=folder)):
          try:
            why = paths.put_by_others(found)
          except OSError as e:
            why = e.strerror or str(e)
          if not why:
            return found
          logging.warning("not running the compiler %s: %s", found, why)
  return None


def cache_dir() -> Path:
  """The builds' folder; NativeUnavailable where there is none to name (HOME unset, a uid without
  a passwd entry, no FASHION_JAX_CACHE_DIR or XDG_CACHE_HOME: Path.home()'s RuntimeError)."""
  try:
    return paths.cache_root() / "native"
  except RuntimeError as e:
    raise NativeUnavailable(f"no cache folder ({e}; set FASHION_JAX_CACHE_DIR)") from e


def cpu_flags() -> frozenset[str]:
  """The running CPU's feature flags (/proc/cpuinfo's `flags` or `Features`; empty elsewhere)."""
  with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith(("flags", "Features")):
        return frozenset(line.partition(":")[2].split())
  return frozenset()


def targets() -> tuple[Target, ...]:
  """This architecture's targets, best first (none on an architecture without kernels)."""
  return TARGETS.get(platform.machine(), ())


def runnable() -> list[Target]:
  """The targets this CPU runs, best first."""
  flags = cpu_flags()
  return [t for t in targets() if t.requires <= flags]


def forced() -> Target | None:
  """The target `FASHION_JAX_NATIVE_ISA` names, or None; ValueError if this CPU cannot run it."""
  if not (name := os.environ.get("FASHION_JAX_NATIVE_ISA", "")):
    return None
  known = {t.name: t for t in targets()}
  if name not in known:
    raise ValueError(f"FASHION_JAX_NATIVE_ISA={name!r}: use one of {sorted(known)} on "
                     f"{platform.machine()}")
  flags = cpu_flags()
  if not flags and known[name].requires:  # No /proc/cpuinfo (macOS): the user's word is all.
    logging.warning("FASHION_JAX_NATIVE_ISA=%s: this system does not list its CPU's features: "
                    "not checked (a CPU without them stops on an illegal instruction)", name)
    return known[name]
  if missing := known[name].requires - flags:
    raise ValueError(f"FASHION_JAX_NATIVE_ISA={name}: this CPU lacks {', '.join(sorted(missing))}")
  return known[name]


def lanes_for(target: Target) -> int:
  """The target's vector width, or `FASHION_JAX_NATIVE_LANES`."""
  wanted = os.environ.get("FASHION_JAX_NATIVE_LANES", "")
  if wanted and (not wanted.isdigit() or int(wanted) not in LANES):
    raise ValueError(f"FASHION_JAX_NATIVE_LANES={wanted!r}: use one of {LANES}")
  return int(wanted) if wanted else target.lanes


def build_flags(target: Target, lanes: int, isa: tuple[str, ...] = ()) -> tuple[str, ...]:
  return (*FLAGS, *(isa or (target.march,)), f"-DFJ_LANES={lanes}")


_PROBE = "typedef float v __attribute__((vector_size(%d)));\nv f(v a, v b) { return a * b + a; }\n"
RECORD_DAYS = 7  # A failed probe's record counts this long from the probe (not from its reads).
# GCC's, Clang's, GNU as' words for a flag, target or instruction they do not know (not ENOSPC's).
_UNKNOWN = re.compile(r"unrecogni[sz]ed|bad (value|register)|unknown (target|argument)|invalid "
                      r"(feature|instruction)|no such instruction|not supported|unsupported", re.I)
_TRANSIENT = re.compile(r"No space left|Killed signal|terminated program|out of memory|Cannot "
                        r"allocate", re.I)


@functools.cache
def isa_flags(cxx: str, target: Target, lanes: int) -> tuple[tuple[str, ...] | None, str]:
  """(The flags `cxx` builds `target` by: its -march, else its ISA spelled out, else None; why not
  the ones before: their first errors). A probe: the compiler knows them, its assembler too. That
  this compiler file (path, inode, size, mtime, ctime) knows neither is kept in the cache."""
  try:
    info = os.stat(cxx)  # (Not its atime, which each run changes.)
    tag = repr((os.path.realpath(cxx), info.st_ino, info.st_size, info.st_mtime_ns,
                info.st_ctime_ns, build_flags(target, lanes)))
    record = cache_dir() / f"no-{target.name}-{lanes}-{hashlib.sha256(tag.encode()).hexdigest()}"
  except (OSError, NativeUnavailable):
    record = None
  if record and paths.private(record / "why", cache_dir()) and not _swappable(cache_dir()):
    with contextlib.suppress(OSError):  # (Older: as absent, and `prune` removes it.)
      if 0 <= time.time() - (record / "why").lstat().st_mtime < RECORD_DAYS * 86400:
        return None, f"{(record / 'why').read_text()} (remembered in {record})"
  errors, logs = [], []
  for isa in filter(None, ((target.march,), target.spelled)):
    work = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_probe_"))  # (`abandon`: too.)
    try:
      Path(work, "probe.cc").write_text(_PROBE % (4 * lanes))
      failed = _run([[cxx, *build_flags(target, lanes, isa), "-c", f"{work}/probe.cc", "-o",
                      f"{work}/probe.o"]], work, 120)
    except (OSError, subprocess.SubprocessError) as e:
      failed = [(-1, str(e))]
    finally:
      runtime.scratch(work, remove=True)
    if not failed:
      return isa, "; ".join(errors)
    errors.append(first_error(failed[0][1]))
    logs.extend(failed)
  if (record and all(code == 1 and _UNKNOWN.search(log) and not _TRANSIENT.search(log)
                     for code, log in logs) and paths.make_private_dir(record, cache_dir())
      and not _swappable(cache_dir())):  # (As `_build_dir`: made first, then looked at.)
    with contextlib.suppress(OSError):
      (record / f".why{os.getpid()}").write_text("; ".join(errors))
      os.replace(record / f".why{os.getpid()}", record / "why")
  return None, "; ".join(errors)


def first_error(log: str) -> str:
  """The first `error:` line (not GCC's context naming an `ffi::Error` function), else the first
  line: a failed build said the log's end, where the errors that follow from it hid it."""
  lines = [line.strip() for line in log.splitlines() if line.strip()] or ["(no output)"]
  found = (line for line in lines if re.search(r"\berror:(\s|$)|undefined reference", line, re.I))
  return next(found, lines[0])[:500]


@functools.cache
def _headers(include: str) -> bytes:
  return b"".join(path.read_bytes() for path in sorted(Path(include).rglob("*.h")))


def build_key(target: Target, lanes: int, include: str) -> str:
  """The cache folder's name: target, width and a hash of what the library depends on."""
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = "?"
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(build_flags(target, lanes)).encode(),
               jax.__version__.encode(), jaxlib_version.encode(), _headers(include)):
    key.update(part + b"\0")
  return f"{target.name}-{lanes}-{key.hexdigest()[:16]}"


def _swappable(folder: Path) -> str | None:
  """Why another user could swap the cache `folder` for theirs (`paths.put_by_others`), or None."""
  try:
    return paths.put_by_others(os.path.realpath(folder))
  except OSError as e:
    return f"{folder} cannot be looked at ({e.strerror or e})"


def cached(key: str) -> Path | None:
  """The user's own cached build for `key`, if there is one to trust."""
  try:
    if not (library := cache_dir() / key / LIBRARY).exists():
      return None
  except NativeUnavailable:
    return None
  why = (_swappable(cache_dir()) if paths.private(library, cache_dir()) else
         "it or a folder above it is not yours alone (another's, a symlink, or writable by others)")
  if why:
    logging.warning("not loading %s: %s", library, why)
    return None
  return library


def open_library(library: Path) -> int:
  """A descriptor of `library` to load it through (`/proc/self/fd/N`), opened without following a
  symlink and checked to be this user's (or root's) file nobody else may write: what is loaded is
  what was checked, whatever was swapped after `cached` looked. OSError: it cannot be opened."""
  fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode) or info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
    os.close(fd)
    raise NativeUnavailable(f"not loading {library}: it is not this user's own file, or others "
                            "may write it (set FASHION_JAX_CACHE_DIR to a folder of your own)")
  return fd


UNUSED_DAYS = 30  # A new build removes those unloaded this long (~250 KB each; see `mark_used`).


def mark_used(library: Path) -> None:
  """Records that `library` was loaded now (its mtime), for `prune` (a read-only cache: not)."""
  with contextlib.suppress(OSError):
    os.utime(library)


def prune(keep: str, now: float | None = None) -> list[str]:
  """Removes builds unused for `UNUSED_DAYS` (never `keep`) and probe records older than
  `RECORD_DAYS`; returns their names. Only this user's own entries, alone (`paths.private`), no
  symlinks: others' (root's prebuilt ones too) are theirs. A loaded removed library still runs."""
  root, now = cache_dir(), time.time() if now is None else now
  removed = []
  try:
    entries = sorted(root.iterdir())
  except OSError:
    return removed
  for entry in entries:
    if (entry.name == keep or entry.is_symlink() or not entry.is_dir()
        or not paths.private(entry, root) or entry.lstat().st_uid != os.getuid()):
      continue
    try:
      newest = max([p.lstat().st_mtime for p in entry.iterdir()] + [entry.lstat().st_mtime])
      if newest < now - (RECORD_DAYS if entry.name.startswith("no-") else UNUSED_DAYS) * 86400:
        shutil.rmtree(entry)
        removed.append(entry.name)
    except OSError:
      continue  # Another process pruning or building there: leave it.
  if removed:
    logging.info("Removed %d native kernel build(s) unused for %d days from %s", len(removed),
                 UNUSED_DAYS, root)
  return removed


def _build_dir(key: str) -> tuple[Path, bool]:
  """(Where to build, whether it is the cache): the cache if it can be made private, else a fresh
  `mkdtemp` folder (never a predictable shared path), removed at the process's end."""
  try:
    root = cache_dir()
    why = f"{root} is not writable (or not yours alone)"
  except NativeUnavailable as e:
    root, why = None, str(e)
  if root and paths.make_private_dir(root / key, root) and not _swappable(root):
    return root / key, True
  out_dir = Path(runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_native_")))  # (`os._exit`.)
  atexit.register(shutil.rmtree, out_dir, True)  # Its use ends with the process (loaded or not).
  logging.warning("%s; building the native kernels in %s for this process", why, out_dir)
  return out_dir, False


PARTS = (1, 2)  # The source's halves (its FJ_PART), compiled at once: 12.7 s, not 27.5 (2 cores).
TIMEOUT_S = 600  # The compiles' limit, then the link's.


def _run(commands: list[list[str]], tmp: str, limit: float = 0) -> list[tuple[int, str]]:
  """Runs `commands` at once, each in a session of its own, killed at a timeout (`limit`, else
  TIMEOUT_S), an error, Ctrl-C or `runtime.abandon`; the failed ones' (status, output). Their
  temporary files go to `tmp`, not /tmp (a killed driver removes none), which the caller removes."""
  procs, deadline = [], time.monotonic() + (limit := limit or TIMEOUT_S)
  try:
    for command in commands:
      procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True,
                                    env=dict(os.environ, TMPDIR=tmp)))
      runtime.child_group(procs[-1])
    logs = [proc.communicate(timeout=max(0, deadline - time.monotonic()))[1] for proc in procs]
    return [(proc.returncode, log.strip()) for proc, log in zip(procs, logs) if proc.returncode]
  except subprocess.TimeoutExpired:
    return [(-1, f"timed out after {limit:g} s")]
  finally:
    for proc in procs:  # Each whole group (not its driver alone), all before any wait (Ctrl-C).
      if proc.returncode is None:  # (Not reaped yet: its id is still its group's, no other's.)
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.killpg(proc.pid, signal.SIGKILL)
      runtime.child_group(proc, running=False)
    for proc in procs:
      proc.stderr.close()
      proc.wait()


def _compile_and_link(cxx: str, flags: list[str], work: str, library: str) -> None:
  """Compiles SOURCE's parts into `work` in parallel, links them into `library`."""
  parts = PARTS if b"FJ_PART" in SOURCE.read_bytes() else (0,)  # (Tests plant one-part ones.)
  objects = [os.path.join(work, f"part{part}.o") for part in parts]
  errors = (_run([[cxx, *flags, *([f"-DFJ_PART={part}"] if part else []), "-c", str(SOURCE), "-o",
                   obj] for part, obj in zip(parts, objects)], work)
            or _run([[cxx, *flags, *objects, "-o", library]], work))
  if errors:
    logging.info("%s's output:\n%s", cxx, errors[0][1])  # (`python -m fashion_jax.kernels.native`)
    raise NativeUnavailable(f"{cxx} failed: {first_error(errors[0][1])}")


def _named_cache() -> str:
  try:
    return str(cache_dir())
  except NativeUnavailable as e:
    return f"any cache: {e}"


def _same_file(path: Path | None, identity: os.stat_result | None) -> bool:
  try:
    return identity is not None and os.path.samestat(os.stat(path), identity)
  except (OSError, TypeError):
    return False


def build(target: Target, lanes: int, include: str, failed: Path | None = None) -> Path:
  """Builds `target`'s kernels into the cache (unless there); returns the path. One build at a
  time per entry (a file lock). `failed`: the cached library that did not load here (damaged; a
  newer libstdc++'s), rebuilt unless another process did; never removed (others may load it)."""
  key = build_key(target, lanes, include)
  broken = os.stat(failed) if failed is not None and failed.exists() else None
  if (library := cached(key)) is not None and not _same_file(library, broken):
    return library
  if (cxx := compiler()) is None:
    raise NativeUnavailable("no C++ compiler found (set CXX or install g++/clang++) " + (
        f"and no prebuilt kernels for this CPU in {_named_cache()}" if broken is None else
        f"to rebuild {failed}"))
  isa, why = isa_flags(cxx, target, lanes)
  if isa is None:
    raise NativeUnavailable(f"{cxx} cannot build for {target.name}: {why}")
  out_dir, persistent = _build_dir(key)
  library = out_dir / LIBRARY
  with paths.exclusive(out_dir / ".lock") as held:
    if persistent and (done := cached(key)) is not None and not _same_file(done, broken):
      return done  # Another process built it while this one waited.
    logging.info("Compiling fashion_jax's native CPU kernels for %s%s into %s", target.name,
                 f" as {' '.join(isa)} ({why})" if why else "", out_dir)
    for stale in out_dir.glob("tmp*") if held else ():  # A killed build's work folder (unlocked,
      shutil.rmtree(stale, ignore_errors=True)  # ENOLCK on NFS: maybe a live build's: kept).
    start, work = time.perf_counter(), runtime.scratch(tempfile.mkdtemp(dir=out_dir))
    tmp = os.path.join(work, LIBRARY)  # Renamed from there: nobody loads half a file.
    try:
      _compile_and_link(cxx, [*build_flags(target, lanes, isa), "-isystem", include], work, tmp)
      os.chmod(tmp, 0o700)
      os.replace(tmp, library)
    finally:
      runtime.scratch(work, remove=True)
    logging.info("Compiled the native kernels in %.1fs", time.perf_counter() - start)
  if persistent:
    prune(keep=key)
  return library


def choose(include: str, probe: bool = True) -> tuple[Target, int]:
  """(Target, width) this process loads: the forced one, else the best this CPU runs that is built
  or that the compiler builds (`isa_flags`; a lower one with a warning). Builds nothing."""
  if (target := forced()) is not None:
    return target, lanes_for(target)
  if not (options := runnable()):
    raise NativeUnavailable(f"no native kernels for {platform.machine()} CPUs")
  cxx, skipped = "", []
  for target in options if probe else ():  # (No probe: the best, nominally.)
    if cached(build_key(target, lanes_for(target), include)) is not None:
      break
    cxx = compiler() if cxx == "" else cxx  # (Not on a cache hit: no word on an unused $CXX.)
    if cxx is not None:
      isa, why = isa_flags(cxx, target, lanes_for(target))
      if isa is not None:
        break
      skipped.append(f"{target.name} ({why})")
  else:
    return options[0], lanes_for(options[0])  # `build` says why not.
  if skipped:  # Once, the first time: a remembered probe is said at INFO.
    (logging.info if all("remembered in" in why for why in skipped) else _warn_once)(
        "%s cannot build the native kernels for %s: using %s, this CPU's next best (a newer "
        "GCC or Clang builds the best)", cxx, "; ".join(skipped), target.name)
  return target, lanes_for(target)
