"""The native kernels' build and cache: what is trusted, where it is built, what is left behind."""

import gc
import contextlib
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import pytest

from fashion_jax.kernels import native, native_build
from fashion_jax.support import runtime
from tests.conftest import ROOT
from tests.test_native import _STUB_INFO, _best_key, _rerun_comparisons, fresh_load  # pylint: disable=unused-import

NOBODY = 65534


def _as_root():
  if os.getuid() != 0:
    pytest.skip("needs root: another user's files are made with chown")


def _planted(tmp_path, where: Path) -> Path:
  """Another user's library at `where` whose constructor leaves a marker if it is ever loaded."""
  marker = tmp_path / "planted_ran"
  source = tmp_path / "planted.cc"
  source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run() {{ '
                    f'FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n' + "".join(
                        f'extern "C" void {s}() {{}}\n' for s in native._TARGETS.values())  # pylint: disable=protected-access
                    + _STUB_INFO)
  where.parent.mkdir(parents=True)
  subprocess.run([native_build.compiler(), "-shared", "-fPIC", str(source), "-o", str(where)],
                 check=True)
  return marker


def test_a_folder_swapped_between_the_check_and_the_load_is_not_loaded(fresh_load, monkeypatch,
                                                                       tmp_path):
  """The cache was checked (the user's own), then loaded by its path: a folder above it that
  another user could re-point in between (here a link, switched right after the check) had their
  library loaded. What is loaded is now the file that was checked."""
  del fresh_load
  _as_root()
  mine, link = tmp_path / "mine", tmp_path / "link"
  mine.mkdir(mode=0o700)
  link.symlink_to(mine)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(link))
  assert native.available(), native._load()  # pylint: disable=protected-access
  theirs = tmp_path / "theirs"
  marker = _planted(tmp_path, theirs / "native" / _best_key() / native_build.LIBRARY)
  for folder, _, files in os.walk(theirs):
    for name in (folder, *(os.path.join(folder, f) for f in files)):
      os.chown(name, NOBODY, NOBODY)
  checked = native_build.cached

  def check_then_swap(key):
    found = checked(key)
    if sys._getframe(1).f_code.co_name == "build":  # pylint: disable=protected-access  # (Not choose's.)
      (tmp_path / "new_link").symlink_to(theirs)
      os.replace(tmp_path / "new_link", link)
    return found

  monkeypatch.setattr(native_build, "cached", check_then_swap)
  native._load.cache_clear()  # pylint: disable=protected-access
  assert not native.available()
  assert not marker.exists()
  assert "not this user's own file" in native._load()  # pylint: disable=protected-access


def test_a_cache_below_a_folder_anyone_may_write_is_not_used(fresh_load, monkeypatch, tmp_path):
  """Anyone may rename such a folder's entries and put theirs: the cache in it is not trusted
  (built for this process in a private temporary folder instead)."""
  del fresh_load
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(shared / "fashion_jax"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert Path(native.info()["library"]).parent.name.startswith("fashion_jax_native_")
  assert not list(shared.rglob(native_build.LIBRARY))


def test_the_compiler_is_never_one_another_user_could_have_put_on_path(monkeypatch, tmp_path):
  """An empty entry in PATH (`PATH=:/usr/bin`, or a trailing colon) found `c++` in the current
  folder, and a folder every user may write on PATH was searched like any other: the build ran
  whatever was planted there. Only PATH's absolute folders nobody else can write are searched."""
  monkeypatch.delenv("CXX", raising=False)  # (CXX=g++ set: `real` was g++, not c++.)
  real = native_build.compiler()
  planted = tmp_path / "shared"
  planted.mkdir()
  os.chmod(planted, 0o777)
  for folder in (tmp_path, planted):
    (folder / "c++").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(folder / "c++", 0o755)
  monkeypatch.chdir(tmp_path)
  for path in (f":{os.environ['PATH']}", f".{os.pathsep}{os.environ['PATH']}",
               f"{planted}{os.pathsep}{os.environ['PATH']}"):
    monkeypatch.setenv("PATH", path)
    assert native_build.compiler() == real, path
  monkeypatch.setenv("CXX", str(planted / "c++"))  # The user's own choice, by its path: theirs.
  assert native_build.compiler() == str(planted / "c++")


_LOAD = """
import sys
import threading
import time
from pathlib import Path
import pytest

from fashion_jax.kernels import native, native_build
native_build.SOURCE = Path(sys.argv[1])
print(native._load())
"""


def test_a_build_in_a_temporary_folder_is_removed_when_the_process_ends(tmp_path):
  """Where the cache cannot be written (a read-only or shared one), each process builds in a
  fresh temporary folder; every run had left its folder (and library) behind in /tmp, a failed
  build its folder too."""
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  (tmp_path / "file").write_text("")
  stub, broken = tmp_path / "stub.cc", tmp_path / "broken.cc"
  stub.write_text("".join(f'extern "C" void {symbol}() {{}}\n'
                          for symbol in native._TARGETS.values()) + _STUB_INFO)  # pylint: disable=protected-access
  broken.write_text("this is not C++\n")
  env = dict(os.environ, TMPDIR=str(tmp), FASHION_JAX_CACHE_DIR=str(tmp_path / "file" / "cache"),
             JAX_PLATFORMS="cpu")
  for source, said in ((stub, "None"), (broken, "failed")):
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(source)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    assert said in proc.stdout and "building the native kernels in" in proc.stderr, proc.stderr
    assert not [p for p in os.listdir(tmp) if p.startswith("fashion_jax_native_")]


def _unloadable(tmp_path, library: Path) -> bytes:
  """Makes `library` one this machine cannot load (as a build by another machine's newer compiler
  whose libstdc++ this one lacks): it needs a library that is not here. Returns its bytes."""
  needed = tmp_path / "libfj_elsewhere.so"
  (tmp_path / "elsewhere.cc").write_text('extern "C" void FjElsewhere() {}\n')
  subprocess.run([native_build.compiler(), "-shared", "-fPIC", str(tmp_path / "elsewhere.cc"),
                  "-o", str(needed)], check=True)
  stub = tmp_path / "needs.cc"
  stub.write_text("".join(f'extern "C" void {s}() {{}}\n' for s in native._TARGETS.values())  # pylint: disable=protected-access
                  + _STUB_INFO)
  subprocess.run([native_build.compiler(), "-shared", "-fPIC", str(stub), "-o", str(library),
                  "-Wl,--no-as-needed", f"-L{tmp_path}", "-lfj_elsewhere"], check=True)
  needed.unlink()
  return library.read_bytes()


def test_a_library_that_does_not_load_here_is_kept_where_it_cannot_be_rebuilt(fresh_load,
                                                                              monkeypatch,
                                                                              tmp_path):
  """A shared home's cache, built on a machine whose libstdc++ is newer: on one without a
  compiler, the failed load deleted it (the other machines then had no build either). It is now
  replaced only by a new build, never removed."""
  del fresh_load
  assert native.available(), native._load()  # pylint: disable=protected-access
  library = native_build.cache_dir() / _best_key() / native_build.LIBRARY
  content = _unloadable(tmp_path, library)
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(native_build, "compiler", lambda: None)
  native._load.cache_clear()  # pylint: disable=protected-access
  assert not native.available()
  assert "libfj_elsewhere.so" in native._load() and "no C++ compiler" in native._load()  # pylint: disable=protected-access
  assert library.read_bytes() == content
  monkeypatch.undo()
  monkeypatch.setattr(native_build, "SOURCE", tmp_path / "stub.cc")
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available(), native._load()  # pylint: disable=protected-access  # Rebuilt here.
  assert library.read_bytes() != content


@pytest.mark.parametrize("value", ["false", "OFF", "no"])
def test_the_kernels_are_turned_off_by_any_usual_word_for_off(fresh_load, monkeypatch, value):
  """Only FASHION_JAX_NATIVE=0 turned them off: =false or =off kept them, without a word."""
  del fresh_load
  monkeypatch.setenv("FASHION_JAX_NATIVE", value)
  assert not native.available() and not native.available_without_building()
  assert f"disabled by FASHION_JAX_NATIVE={value}" in native._load()  # pylint: disable=protected-access


def test_prebuilding_into_a_cache_that_cannot_hold_it_fails(capsys, fresh_load, monkeypatch,
                                                            tmp_path):
  """`--all` (a Docker image's prebuild) into an unwritable cache built each target in a temporary
  folder, printed its path and exited 0: the image had no kernels."""
  del fresh_load
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "file" / "cache"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  assert native.main(["--all"]) == 1
  out = capsys.readouterr().out
  for target in native_build.targets():
    assert f"{target.name}: not built: NativeUnavailable: {native_build.cache_dir()} is not " in out


def test_a_build_in_another_users_cache_leaves_nothing_of_its_own_there(fresh_load, monkeypatch,
                                                                         tmp_path):
  """Root in a user's cache (sudo keeping HOME) made its own folder for the build there, which
  that user's runs could then never build in (not theirs): each compiled afresh for good."""
  del fresh_load
  _as_root()
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  cache = native_build.cache_dir()
  cache.mkdir(parents=True, mode=0o700)
  for folder in (cache.parent, cache):
    os.chown(folder, NOBODY, NOBODY)
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert Path(native.info()["library"]).parent.name.startswith("fashion_jax_native_")
  assert os.listdir(cache) == []


def test_a_cache_root_built_is_loaded_by_another_user(fresh_load, monkeypatch, tmp_path):
  """A cache built as root (`native --all` in a Docker image) and made readable, used by a
  container's other user: it was not theirs, so each of their processes compiled afresh (or,
  without a compiler, ran without the kernels). Root's files nobody else may write are trusted,
  as the system's are; another user's are still not (the tests above)."""
  del fresh_load
  _as_root()
  assert native.available(), native._load()  # pylint: disable=protected-access
  built = Path(native.info()["library"])
  assert built.parent.parent == native_build.cache_dir()  # Root's build, in the cache.
  monkeypatch.setattr(native_build.os, "getuid", lambda: 1000)  # Now another user.
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert Path(native.info()["library"]) == built


def test_prune_leaves_the_builds_root_made(fresh_load, monkeypatch):
  """Root's builds are trusted for loading (an image's prebuilt cache); pruning them is not this
  user's to do, however old: it tried (e0a78c2), failing only for want of permission."""
  del fresh_load
  _as_root()
  root = native_build.cache_dir()
  old = root / "x86-64-v3-8-0123456789abcdef"
  old.mkdir(parents=True, mode=0o700)
  (old / native_build.LIBRARY).write_bytes(b"root's old build")
  month_ago = os.path.getmtime(old) - 31 * 86400
  for path in (old / native_build.LIBRARY, old):
    os.utime(path, (month_ago, month_ago))
  real_getuid = os.getuid
  monkeypatch.setattr(native_build.os, "getuid", lambda: 1000)  # Another user, in root's cache.
  assert native_build.prune(keep="none") == [] and old.exists()
  monkeypatch.setattr(native_build.os, "getuid", real_getuid)
  assert native_build.prune(keep="none") == [old.name]  # Root's own prune takes it.


def test_threads_that_load_at_once_load_once(fresh_load, monkeypatch):
  """functools.cache alone let threads calling available() first at once each load, the later
  ones clearing what an earlier one had loaded while its caller read it: 3 loads from 4 threads,
  and info() None after available() said True."""
  del fresh_load
  loads, real = [], native._dlopen  # pylint: disable=protected-access

  def slow_dlopen(path):
    loads.append(path)
    time.sleep(0.2)
    return real(path)

  monkeypatch.setattr(native, "_dlopen", slow_dlopen)
  start, infos = threading.Barrier(4), []

  def first_use():
    start.wait()
    infos.append(native.available() and native.info())

  threads = [threading.Thread(target=first_use) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  assert len(loads) == 1 and len(infos) == 4 and all(infos), (loads, infos)


def test_without_a_home_folder_the_kernels_build_for_the_process_or_fall_back(fresh_load,
                                                                              monkeypatch,
                                                                              tmp_path):
  """HOME unset for a uid without a passwd entry (a container's arbitrary user) and no
  FASHION_JAX_CACHE_DIR or XDG_CACHE_HOME: Path.home() raised a RuntimeError out of
  `native.available()`, and training stopped. Now the kernels are built in a temporary folder
  for the process; without a compiler they are unavailable, saying why."""
  del fresh_load
  for name in ("HOME", "FASHION_JAX_CACHE_DIR", "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # As for a uid not in passwd.
  with pytest.raises(RuntimeError):
    Path.home()
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert Path(native.info()["library"]).parent.name.startswith("fashion_jax_native_")
  native._load.cache_clear()  # pylint: disable=protected-access
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(native_build.shutil, "which", lambda name, path=None: None)
  assert not native.available() and not native.available_without_building()
  assert "set FASHION_JAX_CACHE_DIR" in native._load()  # pylint: disable=protected-access


def test_a_cxx_that_is_not_used_is_named_once(monkeypatch, caplog):
  """CXX='ccache g++' (a command with options) or a path that is not there was passed over for
  c++ without a word: the user's compiler was silently not the one building. Now one warning
  names it (compiler() runs several times a load)."""
  native_build._warn_once.cache_clear()  # pylint: disable=protected-access  # (Once a process.)
  monkeypatch.delenv("CXX", raising=False)
  real = native_build.compiler()
  assert "CXX" not in caplog.text
  for cxx in ("ccache g++", "/nonexistent/bin/g++"):
    monkeypatch.setenv("CXX", cxx)
    caplog.clear()
    with caplog.at_level("WARNING"):
      assert native_build.compiler() == real
      assert native_build.compiler() == real
    assert caplog.text.count(f"CXX={cxx!r} is not used") == 1, caplog.text


def _old_compiler(tmp_path, *rejected: str) -> str:
  """A C++ compiler (a script, by its path as CXX) that rejects the `rejected` flags as GCC 10
  does (it knows no -march=x86-64-v3/v4) or one without AVX-512 would, else runs the real one;
  it logs each command line to calls.log."""
  real = native_build.compiler()
  fake = tmp_path / "g++-10"
  fake.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls.log
for a in "$@"; do
  case " {' '.join(rejected)} " in *" $a "*)
    case "$a" in
      -march=*) echo "cc1plus: error: bad value ('${{a#-march=}}') for '-march=' switch" >&2;;
      *) echo "g++-10: error: unrecognized command-line option '$a'" >&2;;
    esac
    echo "cc1plus: note: valid arguments to '-march=' switch are: nocona core2 x86-64" >&2
    exit 1;;
  esac
done
exec {real} "$@"
""")
  os.chmod(fake, 0o755)
  return str(fake)


def _isa_stub(monkeypatch, tmp_path):
  """The stub source (`fresh_load`'s) saying which ISA its compiler enabled, as the kernels do."""
  stub = tmp_path / "isa_stub.cc"
  stub.write_text("".join(f'extern "C" void {s}() {{}}\n' for s in native._TARGETS.values())  # pylint: disable=protected-access
                  + _STUB_INFO.replace('" isa=stub"', '" isa="\n#ifdef __AVX512F__\n"avx512f,"\n'
                                       '#endif\n#ifdef __AVX2__\n"avx2,"\n#endif\n"base"'))
  monkeypatch.setattr(native_build, "SOURCE", stub)


def _best_with_lower():
  best, *lower = native_build.runnable() or [None]
  if best is None or best == native_build.targets()[-1]:
    pytest.skip("this CPU's best target is its architecture's baseline, which every compiler knows")
  return best, lower


def test_a_compiler_that_knows_no_x86_64_v3_or_v4_builds_them_from_m_flags(fresh_load,
                                                                            monkeypatch,
                                                                            tmp_path, caplog):
  """GCC < 11 and Clang < 12 (Ubuntu 20.04, RHEL 8) reject -march=x86-64-v4 and -v3: the build
  failed and nothing else was tried, so the kernels were lost. The same ISA, spelled out as -m
  flags those compilers know, is built now: the same target, width and cache entry."""
  del fresh_load
  best, _ = _best_with_lower()
  _isa_stub(monkeypatch, tmp_path)
  monkeypatch.setenv("CXX", _old_compiler(tmp_path, "-march=x86-64-v4", "-march=x86-64-v3"))
  with caplog.at_level("INFO"):
    assert native.available(), native._load()  # pylint: disable=protected-access
  built = native.info()
  assert built["target"] == best.name and built["lanes"] == best.lanes == native.lanes()
  assert ("avx512f" in built["isa"]) == (best.lanes == 16) and "avx2" in built["isa"], built
  assert Path(built["library"]).parent.name == native_build.build_key(best, best.lanes,
                                                                      jax.ffi.include_dir())
  assert f"bad value ('{best.name}')" in caplog.text and "cannot build" not in caplog.text


def test_a_target_the_compiler_cannot_build_falls_back_to_the_next_lower_one(fresh_load,
                                                                           monkeypatch,
                                                                           tmp_path, caplog):
  """A compiler that builds no code for this CPU's best target, -march or -m flags (nor its
  assembler): the next lower target this CPU runs is built, cached under its own name (the width
  and ISA reported are the build's), and said once; a later load takes it from the cache.
  Forced to the best target, the kernels are unavailable, saying why."""
  del fresh_load
  best, lower = _best_with_lower()
  if not lower:
    pytest.skip(f"this CPU runs only {best.name}: no lower target")
  wide = "-mavx512f" if best.lanes == 16 else "-mavx2"
  _isa_stub(monkeypatch, tmp_path)
  monkeypatch.setenv("CXX", _old_compiler(tmp_path, best.march, wide))
  logs = []
  for _ in range(2):
    native._load.cache_clear()  # pylint: disable=protected-access
    with caplog.at_level("WARNING"):
      assert native.available(), native._load()  # pylint: disable=protected-access
    built = native.info()
    assert built["target"] == lower[0].name and built["lanes"] == lower[0].lanes == native.lanes()
    assert wide[2:] not in built["isa"].split(","), built
    assert Path(built["library"]).parent.name == native_build.build_key(
        lower[0], lower[0].lanes, jax.ffi.include_dir())
    logs.append((tmp_path / "calls.log").read_text())
  assert logs[0] == logs[1]  # The second load compiled nothing.
  (warning,) = [r.getMessage() for r in caplog.records if "cannot build" in r.getMessage()]
  assert best.name in warning and f"using {lower[0].name}" in warning
  assert f"unrecognized command-line option '{wide}'" in warning
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", best.name)
  native._load.cache_clear()  # pylint: disable=protected-access
  assert not native.available()
  assert f"cannot build for {best.name}" in native._load() and wide in native._load()  # pylint: disable=protected-access


def test_the_compiler_runs_only_where_its_answer_is_needed(fresh_load, monkeypatch, tmp_path,
                                                           caplog):
  """With FASHION_JAX_NATIVE=0 `supports` started the compiler (lanes -> choose -> a probe);
  with a compiler that builds nothing for the best target each process probed it again (two
  compiler runs) and warned again though the lower build was cached; a pure cache hit warned of
  an unused $CXX. Now: no compiler run while disabled, a failed probe remembered in the cache for
  that compiler file (said once), and $CXX looked for only where there is something to build."""
  del fresh_load
  best, lower = _best_with_lower()
  if not lower:
    pytest.skip(f"this CPU runs only {best.name}: no lower target")
  _isa_stub(monkeypatch, tmp_path)
  log = tmp_path / "calls.log"
  wide = "-mavx512f" if best.lanes == 16 else "-mavx2"
  monkeypatch.setenv("CXX", _old_compiler(tmp_path, best.march, wide))
  monkeypatch.setenv("FASHION_JAX_NATIVE", "0")
  native._loaded.clear()  # pylint: disable=protected-access  # (A fresh process's.)
  x, k = np.zeros((2, 10, 10, 1), np.float32), np.zeros((3, 3, 1, 2 * best.lanes), np.float32)
  assert native.supports(x, k) and native.lanes() == best.lanes and not native.available()
  assert native.supports(x, k) and not log.exists()
  monkeypatch.delenv("FASHION_JAX_NATIVE")
  for start in range(2):  # Two processes' starts.
    native._load.cache_clear()  # pylint: disable=protected-access
    native_build.isa_flags.cache_clear()
    native_build._warn_once.cache_clear()  # pylint: disable=protected-access
    caplog.clear()
    with caplog.at_level("WARNING"):
      assert native.available(), native._load()  # pylint: disable=protected-access
    assert native.info()["target"] == lower[0].name
    runs = log.read_text().splitlines()
    assert [r for r in caplog.records if "cannot build" in r.getMessage()] or start, caplog.text
    assert start == 0 or (runs == first and not caplog.records), (caplog.text, runs[len(first):])
    first = runs
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", best.name)  # The best built by a real compiler,
  monkeypatch.delenv("CXX")
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available(), native._load()  # pylint: disable=protected-access
  monkeypatch.delenv("FASHION_JAX_NATIVE_ISA")  # then a pure cache hit: no compiler wanted.
  monkeypatch.setenv("CXX", "/nonexistent/g++")
  native._load.cache_clear()  # pylint: disable=protected-access
  native_build._warn_once.cache_clear()  # pylint: disable=protected-access
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert native.available(), native._load()  # pylint: disable=protected-access
  assert native.info()["target"] == best.name and not caplog.records, caplog.text


def test_a_compile_error_is_its_first_line_and_no_lower_target_is_tried(fresh_load, monkeypatch,
                                                                       tmp_path, caplog):
  """A failed build said the log's last 2,000 characters: the first error, the one to fix, was
  cut off behind those that follow from it. An error in the source (not a target the compiler
  does not know) is now one line, the first error, for the target chosen: no other is tried."""
  del fresh_load
  broken = tmp_path / "broken.cc"
  broken.write_text("#error the first problem\n" + "".join(
      f"int f{i}() {{ return undefined_name_{i}; }}\n" for i in range(60)))
  monkeypatch.setattr(native_build, "SOURCE", broken)
  monkeypatch.setenv("CXX", _old_compiler(tmp_path, "-march=x86-64-v4", "-march=x86-64-v3"))
  with caplog.at_level("WARNING"):
    assert not native.available()
  reason = native._load()  # pylint: disable=protected-access
  assert "failed" in reason and "the first problem" in reason, reason  # (Clang: no "#error".)
  assert "\n" not in reason and "undefined_name_59" not in reason and len(reason) < 1000, reason
  assert "bad value" not in reason and "cannot build" not in caplog.text
  builds = [line for line in (tmp_path / "calls.log").read_text().splitlines()
            if str(broken) in line]
  assert len(builds) == 1, builds  # The best target's build alone.


@pytest.mark.toolchain
@pytest.mark.parametrize("rejected", ["march", "best"])
def test_the_kernels_an_old_compiler_builds_match_lax(tmp_path, rejected):
  """The kernels built by a compiler without -march=x86-64-v3/v4 (as -m flags), and by one that
  builds nothing for this CPU's best target (the next lower one), compute the lax results and
  gradients: test_native.py's comparisons, rerun in a fresh cache with that compiler as CXX."""
  best, lower = _best_with_lower()
  if rejected == "best" and not lower:
    pytest.skip(f"this CPU runs only {best.name}: no lower target")
  wide = "-mavx512f" if best.lanes == 16 else "-mavx2"
  flags = ("-march=x86-64-v4", "-march=x86-64-v3") if rejected == "march" else (best.march, wide)
  _rerun_comparisons(CXX=_old_compiler(tmp_path, *flags),
                     FASHION_JAX_CACHE_DIR=str(tmp_path / "cache"))
  want = best if rejected == "march" else lower[0]
  (library,) = (tmp_path / "cache" / "native").glob(f"*/{native_build.LIBRARY}")
  assert library.parent.name.startswith(f"{want.name}-{want.lanes}-"), library


def test_the_first_error_is_the_line_that_says_what_to_fix():
  """A failed build's reason is one line: the first error (a linker's missing symbol, not its
  `collect2` summary; an assembler's `Error:`; not the context line naming a function returning
  `ffi::Error`, as most handlers do, before it), else the first line of the output."""
  first = native_build.first_error
  assert first("In file included from a.h:1,\nx.cc:2:3: error: 'y' was not declared\n"
               "x.cc:9:1: error: expected ';'\n") == "x.cc:2:3: error: 'y' was not declared"
  assert first("/usr/bin/ld: p.o: in function `f':\np.cc:(.text+0x5): undefined reference to "
               "`g'\ncollect2: error: ld returned 1 exit status").endswith("undefined reference to `g'")
  assert first("/tmp/cc.s: Assembler messages:\n/tmp/cc.s:9: Error: no such instruction: `vpxord'"
               ).startswith("/tmp/cc.s:9: Error:")
  assert first("x.cc: In function 'ffi::Error Impl(int)':\nx.cc:7:3: error: 'q' was not "
               "declared\n") == "x.cc:7:3: error: 'q' was not declared"
  assert first("/usr/bin/ld: p.o: in function `ffi::Error Impl(int)':\np.cc:(.text+0x5): "
               "undefined reference to `g'").endswith("undefined reference to `g'")
  assert first("x.cc: In member function 'ffi::Error::Error()':\nc++: fatal error: killed\n"
               ) == "c++: fatal error: killed"
  assert first("ld: error:\n") == "ld: error:"
  assert first("timed out after 600 s\n") == "timed out after 600 s" and first("") == "(no output)"


def _forking_compiler(tmp_path) -> str:
  """A compiler driver (a script) that makes a temporary file (in $TMPDIR, as g++ does) and waits
  for a child of its own, as g++ for cc1plus and as: the child's pid is in tmp_path/child.<its
  driver's pid>, the file's path in tmp_path/temps. (The pid is written aside, then renamed: a
  file `echo` had created but not yet written could be read empty.)"""
  fake = tmp_path / "forking-c++"
  fake.write_text(f"#!/bin/sh\nmktemp >> {tmp_path}/temps\nsleep 60 &\n"
                  f"echo $! > {tmp_path}/.child.$$\nmv {tmp_path}/.child.$$ {tmp_path}/child.$$\n"
                  "wait\n")
  fake.chmod(0o755)
  return str(fake)


def _children(tmp_path, count: int, within: float = 10) -> list[int]:
  deadline = time.monotonic() + within
  while len(found := list(tmp_path.glob("child.*"))) < count and time.monotonic() < deadline:
    time.sleep(0.01)
  return [int(p.read_text()) for p in found if p.read_text().strip()]


def _running(pid: int) -> bool:
  """Whether `pid` is still a live `sleep` (not a zombie, not another process since)."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep") and (
        stat.rpartition(")")[2].split()[0] != "Z")
  except OSError:
    return False


@pytest.fixture
def leftovers(tmp_path):
  """The fake compilers' children: polled until gone (a deadline), then killed whatever the
  outcome, so that none outlives the test. Whether one runs is read from /proc."""
  if not os.path.isdir("/proc/self"):
    pytest.skip("no /proc here: whether the compilers' children still run cannot be told")
  pids = []

  def still_running() -> list[int]:
    deadline = time.monotonic() + 5
    while (left := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
      time.sleep(0.05)
    return left

  yield pids, still_running
  for pid in pids + _children(tmp_path, 0):
    if _running(pid):
      os.kill(pid, 9)


def test_an_interrupted_build_leaves_no_compiler_running(tmp_path, monkeypatch, leftovers):
  """Ctrl-C (or an error) while the build waited for its first compiler left the other parts'
  compilers running, never waited for (and their partial objects written after the build had
  given up); then only the drivers were killed: their cc1plus and as ran on, orphaned. Now each
  driver's whole process group is stopped, and every driver reaped; their temporary files
  (which a killed driver leaves) are in the build's folder, which the build removes."""
  pids, still_running = leftovers
  made = []
  real_popen = subprocess.Popen

  class Recorded(real_popen):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)
      if len(made) == 1:
        self.communicate = self.interrupted

    def interrupted(self, timeout=None):
      del timeout
      pids.extend(_children(tmp_path, len(native_build.PARTS)))  # Every part's under way.
      assert set(made) <= runtime._GROUPS  # pylint: disable=protected-access
      raise KeyboardInterrupt()

  monkeypatch.setattr(native_build.subprocess, "Popen", Recorded)
  with pytest.raises(KeyboardInterrupt):
    native_build._compile_and_link(_forking_compiler(tmp_path), [], str(tmp_path),  # pylint: disable=protected-access
                                   str(tmp_path / "lib.so"))
  assert len(made) == len(native_build.PARTS) > 1
  assert all(proc.returncode is not None for proc in made), [p.returncode for p in made]
  assert len(pids) == len(made) and not still_running(), pids
  assert not set(made) & runtime._GROUPS  # pylint: disable=protected-access
  temps = (tmp_path / "temps").read_text().split()
  assert len(temps) == len(made) and all(Path(t).parent == tmp_path for t in temps), temps


def test_a_compiler_past_the_limit_is_stopped_with_its_children(tmp_path, monkeypatch, leftovers):
  """At the time limit only the driver was killed, and reading its output then waited for its
  cc1plus (which held the pipe): a hung cc1plus outlasted the limit, and ran on. Now the build
  fails at the limit, its compilers' process groups killed, and their stderr pipes closed (left
  open: a ResourceWarning, an error under `-W error`). (3 s: under load a driver killed at 1 s
  could be before it had written its child's pid.)"""
  pids, still_running = leftovers
  monkeypatch.setattr(native_build, "TIMEOUT_S", 3)
  start = time.monotonic()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ResourceWarning)
    with pytest.raises(native_build.NativeUnavailable, match="timed out after 3 s"):
      native_build._compile_and_link(_forking_compiler(tmp_path), [], str(tmp_path),  # pylint: disable=protected-access
                                     str(tmp_path / "lib.so"))
    gc.collect()
  assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
  assert time.monotonic() - start < 20
  pids.extend(_children(tmp_path, len(native_build.PARTS)))
  assert len(pids) == len(native_build.PARTS) and not still_running(), pids


_KILLED_AT_ONCE = """
import sys
from fashion_jax.support import runtime
runtime.end_at_once_on_interrupt("interrupted", 130)
from fashion_jax.kernels import native_build
target = native_build.targets()[-1]
native_build.isa_flags = lambda *args: ((target.march,), "")
native_build.build(target, target.lanes, sys.argv[1])
"""


def test_a_build_ended_at_once_by_ctrl_c_leaves_no_compiler_or_work_folder(tmp_path, leftovers):
  """The compilers run in sessions of their own, which the terminal's Ctrl-C does not reach, and
  a Ctrl-C that ends the process at once (`os._exit`: main and the benchmark before training's
  stop handler) skipped the build's `finally`: they ran on (a hung cc1plus for ever), and the
  build's work folder stayed in the cache entry. Now both are gone with the process."""
  if not native_build.targets():
    pytest.skip("no native kernels for this architecture")
  pids, still_running = leftovers
  env = dict(os.environ, CXX=_forking_compiler(tmp_path), JAX_PLATFORMS="cpu",
             FASHION_JAX_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_AT_ONCE, str(tmp_path)], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    pids.extend(_children(tmp_path, len(native_build.PARTS), within=60))
    assert len(pids) == len(native_build.PARTS), proc.poll()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.stderr.read()
  finally:
    proc.kill()
    proc.communicate()
  assert not still_running(), pids
  entries = list((tmp_path / "cache" / "native").iterdir())
  assert entries and not [p for entry in entries for p in entry.glob("tmp*")], entries


@pytest.mark.parametrize("locked", [True, False])
def test_a_build_removes_the_work_folders_of_builds_killed_before(tmp_path, monkeypatch, locked):
  """A build killed outright (SIGKILL, the OOM killer) leaves its work folder (assembler files,
  objects) in the cache entry, which `prune` never removes while the entry is used. The next
  build of the entry removes it, holding the entry's lock; not where it runs unlocked (a file
  system without locks, ENOLCK on some NFS homes): it may be another builder's, live."""
  if not locked:
    real = native_build.paths.exclusive

    @contextlib.contextmanager
    def unlocked(lock_file, waiting=None):
      with real(lock_file, waiting):
        yield False  # As `exclusive` says where the file system has no locks.
    monkeypatch.setattr(native_build.paths, "exclusive", unlocked)
  if not native_build.targets():
    pytest.skip("no native kernels for this architecture")
  target = native_build.targets()[-1]
  fake = tmp_path / "quick-c++"  # Writes its -o file, as a build would.
  fake.write_text('#!/bin/sh\nwhile [ $# -gt 1 ]; do [ "$1" = -o ] && : > "$2"; shift; done\n')
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(native_build, "isa_flags", lambda *args: ((target.march,), ""))
  entry = native_build.cache_dir() / native_build.build_key(target, target.lanes, str(tmp_path))
  (entry / "tmpkilled").mkdir(parents=True, mode=0o700)
  (entry / "tmpkilled" / "ccX.s").write_text("half an assembler file\n")
  for folder in (tmp_path / "cache", tmp_path / "cache" / "native", entry):
    folder.chmod(0o700)
  assert native_build.build(target, target.lanes, str(tmp_path)) == entry / native_build.LIBRARY
  assert sorted(p.name for p in entry.iterdir()) == [".lock", native_build.LIBRARY] + (
      [] if locked else ["tmpkilled"])


def _failing(tmp_path, says: str) -> str:
  """A compiler (a script) that exits 1 saying `says`, as a failed probe does; logs each run."""
  (tmp_path / "says").write_text(says + "\n")
  fake = tmp_path / "c++"
  fake.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/calls.log\ncat {tmp_path}/says >&2\n"
                  "exit 1\n")
  fake.chmod(0o755)
  return str(fake)


def _probes(tmp_path) -> int:
  log = tmp_path / "calls.log"
  return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def probe_target(monkeypatch, tmp_path):
  """The architecture's best target, probed in an empty cache; isa_flags' memo cleared."""
  if not native_build.targets():
    pytest.skip("no native kernels for this architecture")
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  native_build.isa_flags.cache_clear()
  yield native_build.targets()[0]
  native_build.isa_flags.cache_clear()


@pytest.mark.parametrize("says, kept", [
    ("cc1plus: error: bad value ('x86-64-v4') for '-march=' switch", True),
    ("clang: error: unknown target CPU 'x86-64-v4'", True),
    ("probe.s: Fatal error: can't write 40 bytes to section .text of probe.o: 'No space left on "
     "device'", False),
    ("g++: fatal error: Killed signal terminated program as", False),
    ("cc1plus: error: unrecognized command-line option '-mavx2'\ng++: fatal error: Killed signal "
     "terminated program cc1plus", False),
    ("cc1plus: internal compiler error: Segmentation fault", False),
    ("/home/u/workspace/tmp/ccX.s: Error: no such instruction: `vfmadd132ps %zmm1,%zmm2,%zmm0'",
     True),  # ("space" in a path: `_TRANSIENT` had no phrases, and matched it.)
    ("cc1plus: error: unrecognized command-line option '-mavx2'\ncc1plus: out of memory "
     "allocating 65536 bytes", False)])
def test_only_a_flag_the_compiler_does_not_know_is_remembered(probe_target, tmp_path, says, kept):
  """A failed probe (exit status 1) was remembered whatever failed: a full disk (ENOSPC writing
  the object) or an assembler the OOM killer ended disabled the target for every later process.
  Only the compiler's or assembler's word that it does not know the flag or target is kept."""
  target, cxx = probe_target, _failing(tmp_path, says)
  for _ in range(2):  # Two processes' probes.
    native_build.isa_flags.cache_clear()
    isa, why = native_build.isa_flags(cxx, target, target.lanes)
    assert isa is None and says.splitlines()[0].split(": ")[-1] in why, why
  probes = 1 + bool(target.spelled)
  assert _probes(tmp_path) == probes * (1 if kept else 2)
  assert len(list((tmp_path / "cache" / "native").glob("no-*"))) == kept


def test_a_remembered_probe_counts_a_week_from_the_probe(probe_target, tmp_path):
  """Each read refreshed the record's time (`mark_used`), so `prune` never removed it and a
  compiler upgrade that the key misses (its cc1plus, its as) never got probed again. A record
  now counts `RECORD_DAYS` from its probe: older, it is probed afresh and pruned."""
  target = probe_target
  cxx = _failing(tmp_path, "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch")
  native_build.isa_flags(cxx, target, target.lanes)
  probes = _probes(tmp_path)
  (record,) = (tmp_path / "cache" / "native").glob("no-*")
  six_days = time.time() - 6 * 86400
  for path in (record / "why", record):
    os.utime(path, (six_days, six_days))
  native_build.isa_flags.cache_clear()
  assert "remembered in" in native_build.isa_flags(cxx, target, target.lanes)[1]
  assert _probes(tmp_path) == probes
  assert max(os.path.getmtime(p) for p in (record, record / "why")) == six_days  # Not refreshed.
  assert native_build.prune(keep="none") == []
  eight_days = six_days - 2 * 86400
  for path in (record / "why", record):
    os.utime(path, (eight_days, eight_days))
  native_build.isa_flags.cache_clear()
  assert "remembered in" not in native_build.isa_flags(cxx, target, target.lanes)[1]
  assert _probes(tmp_path) == 2 * probes  # Probed again, and remembered from now.
  assert time.time() - os.path.getmtime(record / "why") < 60
  assert native_build.prune(keep="none") == []
  assert native_build.prune(keep="none", now=time.time() + 8 * 86400) == [record.name]


def test_a_compiler_replaced_in_place_is_probed_again(probe_target, tmp_path):
  """The record's key was the compiler's path, size and mtime: an upgrade in place keeping the
  size and mtime (a package manager restoring the mtime) kept the old compiler's verdict. The
  key has its inode and ctime too."""
  target = probe_target
  cxx = _failing(tmp_path, "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch")
  assert native_build.isa_flags(cxx, target, target.lanes)[0] is None
  before = os.stat(cxx)
  good = "#!/bin/sh\nexit 0\n"
  time.sleep(0.05)
  with open(cxx, "r+") as f:  # The same file, size and mtime, another compiler.
    f.write(good + "#" * (before.st_size - len(good) - 1) + "\n")
  os.utime(cxx, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert os.stat(cxx).st_size == before.st_size and os.stat(cxx).st_ino == before.st_ino
  native_build.isa_flags.cache_clear()
  assert native_build.isa_flags(cxx, target, target.lanes)[0] == (target.march,)


def test_a_probe_record_dated_in_the_future_is_probed_again(probe_target, tmp_path):
  """A record dated ahead (a clock set back since, a copied cache) counted until that date."""
  target = probe_target
  cxx = _failing(tmp_path, "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch")
  native_build.isa_flags(cxx, target, target.lanes)
  probes = _probes(tmp_path)
  (record,) = (tmp_path / "cache" / "native").glob("no-*")
  later = time.time() + 86400
  os.utime(record / "why", (later, later))
  native_build.isa_flags.cache_clear()
  assert "remembered in" not in native_build.isa_flags(cxx, target, target.lanes)[1]
  assert _probes(tmp_path) == 2 * probes


def test_a_probe_is_not_remembered_in_a_cache_others_could_swap(probe_target, monkeypatch,
                                                                 tmp_path):
  """Records were read only from a cache no other user could swap, but written to any: another
  user could rename such a folder away and put theirs. Now neither."""
  target, shared = probe_target, tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(shared / "fashion_jax"))
  cxx = _failing(tmp_path, "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch")
  assert native_build.isa_flags(cxx, target, target.lanes)[0] is None
  assert not list(shared.rglob("why")) and not list(shared.rglob(".why*"))


def test_a_probe_and_a_temporary_build_folder_go_with_a_process_ended_at_once(probe_target,
                                                                               monkeypatch):
  """The probe's folder and a build's temporary one (no cache to build in) were made by
  `tempfile`'s own removers (a `with`, `atexit`), which `os._exit` skips: a Ctrl-C during a
  probe (main's, the benchmark's: they end at once) left them in /tmp. Now `runtime.abandon`
  removes them too, and a finished probe leaves no folder behind."""
  seen = []

  def run(commands, work, timeout):
    del commands, timeout
    seen.append((work, work in runtime._SCRATCH))  # pylint: disable=protected-access
    return [(1, "cc1plus: error: bad value ('x86-64-v4') for '-march=' switch")]
  monkeypatch.setattr(native_build, "_run", run)
  native_build.isa_flags("/usr/bin/c++", probe_target, probe_target.lanes)
  assert seen and all(registered and not os.path.exists(work) for work, registered in seen)
  assert not {work for work, _ in seen} & runtime._SCRATCH  # pylint: disable=protected-access
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", "/proc/no-cache-here")
  out_dir, persistent = native_build._build_dir("key")  # pylint: disable=protected-access
  assert not persistent and str(out_dir) in runtime._SCRATCH  # pylint: disable=protected-access
  runtime.abandon()
  assert not out_dir.exists()
