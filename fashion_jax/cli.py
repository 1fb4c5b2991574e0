"""Command-line plumbing shared by the entry points (main, benchmark, ...)."""

import contextlib
import logging as logging_std
import os
import re
import select
import sys

from absl import app
from absl import flags
from absl import logging as logging_absl
from ml_collections import config_dict
from ml_collections import config_flags

from fashion_jax.support import backends
from fashion_jax.support import runtime
from fashion_jax.support import storage
from fashion_jax.support.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, INTERRUPTED, UserError

FLAGS = flags.FLAGS


def define_config_flag(default: str | None, help_text: str) -> None:
  """--config (ml_collections' config file flag), after checking that each --flagfile on the
  command line can be read: defining the flag reads them, so a missing one was a traceback of
  ml_collections' and absl's (exit 1) before any command started."""
  try:
    _with_flagfiles(sys.argv[1:])
  except flags.CantOpenFlagFileError as e:
    fail(f"{str(e).replace('ERROR:: ', '').strip()}; pass --flagfile a file of flags, one a line")
  config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)


def _with_flagfiles(args: list[str]) -> list[str]:
  """`args` with each --flagfile's flags in its place, as absl reads them (before the others)."""
  return FLAGS.read_flags_from_files(args, force_gnu=False)


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line (exit 2).

  `model_kwargs` (open-ended: depth/width for "wrn", dropout_rate...) is set
  whole, as ml_collections parses a dict literal:
  `--config.model_kwargs='{"depth": 16, "width": 4}'`; a key the config file
  already lists can also be set alone (`--config.model_kwargs.depth=16`). The
  model checks the keys when the config is validated.
  """
  backends.quiet_cuda_plugin_without_gpu()  # Every command parses its flags before JAX starts,
  storage.use_gcsfs()  # and before any path is opened.
  if "config" in FLAGS:
    # ~ as --workdir=~/fj takes it (the shell expands no ~ after "--config="): it was read as a
    # folder named "~" in the current one.
    argv = [f"--config={os.path.expanduser(arg[9:])}" if arg.startswith("--config=~") else arg
            for arg in argv]
    _refuse_repeated_config(argv)
    _refuse_config_others_could_write(argv)
  try:
    rest = FLAGS(argv)
  except SystemExit as e:  # absl's --help/--helpfull/--helpxml print the help and exit 1, the
    if e.code == 1 and _asked_for_help(argv):  # status of a crash (main's docstring): asked
      sys.exit(0)  # for, the help is a success.
    raise
  except OSError as e:  # An unreadable config file, read while parsing a --config.X override.
    fail(_config_file_error(e))
  except UserError as e:  # The config file's own get_config refused (config_lib.load_sibling).
    fail(str(e))
  except (SyntaxError, NameError, ImportError) as e:  # The file is not a Python config module.
    fail(_config_load_error(e))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if "has no attribute 'get_config'" in str(e):
      fail(_config_load_error(e))
    if "Error whilst parsing config file" in str(e):  # ml_collections' text holds a traceback:
      last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]  # its last line.
      fail(_config_load_error(e, why=last[:200]))
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    unknown = (re.search(r"'([\w.]+)'", text)
               if isinstance(e, (AttributeError, KeyError, flags.Error)) else None)
    kwarg = next((a.split("=", 1)[0][len("--config.model_kwargs."):] for a in argv
                  if a.startswith("--config.model_kwargs.")), None)
    config_given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    if config_given and "Flag --config must have a value other than None" in text:
      fail(_config_load_error(e, why=_RETURNED_NONE))  # (Not "--config=None": it was given.)
    if (unknown and unknown.group(1).startswith("config.") and not config_given
        and "config" in FLAGS):
      message = (f"--config is missing (needed by --{unknown.group(1)}=...): pass a config "
                 "file, e.g. --config=configs/default.py")
    elif kwarg and unknown and kwarg in unknown.group(1):
      message = (f"config.model_kwargs has no key {kwarg!r} in this config file; set the whole "
                 f"dict instead: --config.model_kwargs='{{\"{kwarg}\": VALUE, ...}}'")
    elif unknown and isinstance(e, (AttributeError, KeyError)):
      guess = re.search(r'Did you mean "(\w+)"', text)
      message = (f"unknown config key {unknown.group(1)!r}"
                 + (f" (did you mean {guess.group(1)!r}?)" if guess else "")
                 + "; the keys are listed in fashion_jax/default_config.py")
    else:
      message = _wrong_type(text) or _missing(text) or _checkpoint_flag(text) or text.strip()
    program = os.path.basename(sys.argv[0]) if sys.argv else "fashion_jax"
    fail(f"{message}\nRun with --helpfull for the flags of {program}.")
  except Exception as e:  # pylint: disable=broad-except  (a config file's get_config failed)
    fail(_config_load_error(e))
  if "config" in FLAGS and FLAGS["config"].present and FLAGS["config"].value is None:
    fail(_config_load_error(TypeError(), why=_RETURNED_NONE))  # (benchmark: a traceback later)
  if "config" in FLAGS and FLAGS["config"].value is not None:
    try:  # ml_collections defers a config file it could not read to the first attribute read.
      config = FLAGS.config
      getattr(config, "keys")
    except OSError as e:
      fail(_config_file_error(e))
    except UserError as e:
      fail(str(e))
    except Exception as e:  # pylint: disable=broad-except  (the file's own code failed)
      fail(_config_load_error(e))
    if not isinstance(config, config_dict.ConfigDict):
      fail(_config_load_error(TypeError(f"get_config() returned a {type(config).__name__}, "
                                        "not an ml_collections.ConfigDict")))
  return rest


_KINDS = (("invalid literal for int()", "a whole number"),
          ("could not convert string to float", "a number"),
          ("Non-boolean argument to boolean flag", "true or false"),
          ("Failed to parse", "a dict written as Python (True, False, None; names and text in "
           "quotes), quoted for the shell: --config.{key}='{{\"NAME\": VALUE}}'"))


def _wrong_type(text: str) -> str | None:
  """absl's words for `--config.KEY=VALUE` (or another flag: `--step=20.0`) of the wrong type
  ("invalid literal for int() with base 10: '0.5'") as what KEY takes, and, for a fraction of
  an epoch, how to ask for one."""
  given = re.match(r"flag (--(?:config\.)?([\w.]+))=", text)
  words, kind = next(((w, k) for w, k in _KINDS if w in text), (None, None))
  if not given or not kind or (words == "Failed to parse" and "as a ConfigDict" not in text):
    return None  # (A dict field given no dict: ml_collections' words held a Python object's id.)
  flag, key = given.groups()
  rest = text[given.end():]
  value = rest[:rest.rfind(": ", 0, rest.index(words))]  # (It may hold ": " itself.)
  what = f"config.{key}" if flag.startswith("--config.") else flag
  message = f"{flag}={value} is invalid: {what} takes {kind.format(key=key)}"
  if what == "config.num_epochs":
    message += ("; for part of an epoch, set --config.num_train_steps instead (steps of "
                "batch_size images)")
  return message


def _missing(text: str) -> str | None:
  """absl's words for required flags not given ("flag --workdir=None: Flag --workdir must have a
  value other than None. flag --output=None: ...") as which ones, and that they are required."""
  names = re.findall(r"Flag (--\w+) must have a value other than None", text)
  if not names:
    return None
  listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
  example = {"--config": "configs/default.py", "--workdir": "DIR", "--output": "FOLDER"}
  return (f"{listed} {'are' if len(names) > 1 else 'is'} required: pass "
          + " ".join(f"{name}={example.get(name, 'VALUE')}" for name in names))


def _checkpoint_flag(text: str) -> str | None:
  """--checkpoint=... (or --ckpt) to predict, evaluate or export, which pick one by --step: absl
  said "Unknown command line flag 'checkpoint'", and not what to pass instead."""
  found = re.match(r"Unknown command line flag '((?:checkpoint|ckpt)\w*)'", text)
  if not found or "step" not in FLAGS:
    return None
  return (f"unknown flag --{found.group(1)}: a checkpoint is picked by its step, --step=N (the "
          "number of its folder in WORKDIR/checkpoints; default: the best by validation "
          "accuracy, else the latest)")


_RETURNED_NONE = "its get_config() returned None; is its return statement missing?"


def _asked_for_help(argv) -> bool:
  """Whether the command line (before a `--`) holds one of absl's help flags."""
  for arg in argv[1:]:
    if arg == "--":
      return False
    name, _, value = arg.lstrip("-").partition("=")
    if (arg.startswith("-") and name in ("help", "helpshort", "helpfull", "helpxml", "?")
        and value.lower() not in ("false", "0")):
      return True
  return False


def _config_load_error(e: BaseException, why: str | None = None) -> str:
  """One line for a --config file that was read but is not a config: not Python (a run's
  config.json, a typo), no get_config(), or its code failed (`why`: how, where known)."""
  path = _config_argument()
  if why:
    pass
  elif "has no attribute 'get_config'" in str(e):
    why = "it defines no get_config()"
  else:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    why = f"{type(e).__name__}: {first}" if first else type(e).__name__
  return (f"--config={path} did not load as a config ({why}); pass a Python file whose get_config() "
          "returns an ml_collections.ConfigDict, e.g. --config=configs/default.py"
          + (" (a run's config.json records a config: it is not one)"
             if path.endswith(".json") else ""))


def _config_files(argv, expand: bool = True) -> list[str]:
  """The --config values as given, `--config=PATH` or `--config PATH` (absl takes both); a ~
  after '=' expanded unless not `expand` (what is loaded: parse_flags expands only its argv's)."""
  files, args = [], list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    name, eq, value = arg.partition("=")
    if name in ("--config", "-config"):
      value = ((os.path.expanduser(value) if expand else value) if eq
               else (args[i + 1] if i + 1 < len(args) else ""))
      files.append(value)
  return files


def _refuse_repeated_config(argv) -> None:
  """Two --config files on one line: absl kept the last one silently, or (with an override)
  failed with its own "flag 'config.X' is defined twice" message."""
  files = _config_files(argv)
  if len(files) > 1:
    fail(f"--config is given {len(files)} times ({', '.join(files)}); pass one config file and "
         "change its fields with --config.KEY=VALUE")


def _refuse_config_others_could_write(argv) -> None:
  """A --config file is Python that runs: one that another user could have written (in a
  folder every user may write, /tmp/shared/exp.py) is not run, as a config's sibling is not
  (config_lib.load_sibling); $FASHION_JAX_TRUST_WORKDIR=1 trusts it (a mount that shows every
  file as another user's or 0777)."""
  if os.environ.get(storage.TRUST_ENV) == "1":
    return
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:  # A --config in a --flagfile (absl reads those first) was run unchecked.
    argv = argv[:1] + _with_flagfiles(argv[1:])
  except Exception:  # pylint: disable=broad-except  (an unreadable flagfile: absl says so next)
    pass
  for given in _config_files(argv, expand=False):  # A flagfile's --config=~/x is ./~/x.
    try:  # (ml_collections reads the part before a ':' and passes the rest to get_config.)
      unsafe = config_lib.others_could_write(given.split(":", 1)[0])
    except OSError:  # Missing or unreadable: its read says so in one line.
      continue
    if unsafe:
      fail(f"--config={given} is not run: {unsafe}, so another user could have put code in it; "
           "keep the config in a folder only you can write, or set "
           f"{storage.TRUST_ENV}=1 if nobody else can reach it")


def _config_argument() -> str:
  """The --config file this command was given ("?" if none)."""
  files = _config_files(sys.argv)
  return files[-1] if files and files[-1] else "?"


def _config_file_error(e: OSError) -> str:
  """One line for a --config file that could not be read: the file, or the one it reads."""
  try:
    path = config_flags.get_config_filename(FLAGS["config"])
  except Exception:  # pylint: disable=broad-except  (failed while parsing: not recorded yet)
    path = _config_argument()
    path = FLAGS["config"].default_as_str or "?" if path == "?" else path
  found = re.search(r"\[Errno \d+\] ([^:\n]+)(?:: '([^'\n]+)')?", str(e))
  reason = found.group(1) if found else str(e).strip().splitlines()[0]
  other = found.group(2) if found else None
  if other and os.path.abspath(other) != os.path.abspath(path.split(":", 1)[0]):
    return (f"--config={path}: loading it failed: {other}: {reason}; a config file next to its "
            "siblings (configs/) is what it needs")
  if not os.path.isabs(path):
    reason += f"; a relative path is read from {os.getcwd()}"
  return (f"--config={path}: cannot read the config file ({reason}); pass a config file, e.g. "
          "--config=configs/default.py")




@contextlib.contextmanager
def interrupt_is_one_line():
  """Ctrl-C while an entry point imports its command (JAX: a second or more) ends it with
  the same one line as `run`'s, not a KeyboardInterrupt traceback."""
  try:
    yield
  except KeyboardInterrupt:
    fail(INTERRUPTED, EXIT_INTERRUPTED)


def run(main) -> None:
  """absl's app.run(main) with parse_flags; an interrupt (Ctrl-C where nothing catches it: in
  evaluate, predict, export, benchmark, or before training holds its signals) ends it with one
  line, not a traceback."""
  def fitted_main(argv):
    if fitted := runtime.fit_to_cpu_quota():  # Before JAX starts its CPU backend.
      logging_absl.info("%s", fitted)
    return main(argv)
  try:
    app.run(fitted_main, flags_parser=parse_flags)
  except KeyboardInterrupt:  # (A second signal during training exits in stops.py.)
    fail(INTERRUPTED, EXIT_INTERRUPTED)
  except BrokenPipeError:
    if not _stdout_gone():  # Another pipe (a subprocess, a socket): a crash, as it is.
      raise
    # `predict --json ... | head -1`: the reader left; no traceback. Python's own recipe: stdout
    # onto /dev/null, so that the flush at exit cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def _stdout_gone() -> bool:
  """Whether stdout is a pipe whose reader has left (poll says POLLERR on its write end)."""
  try:
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))
  except (AttributeError, OSError, ValueError):  # No poll (Windows), or no stdout file.
    return False


def refuse_arguments(argv) -> None:
  """For a command that takes no positional arguments: anything left after the flags is a
  one-line error, exit 2 (absl's UsageError printed every flag's help and exited 1)."""
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a --flag (or "
         "--config.KEY=VALUE), and a value with spaces needs quotes")


def refuse_ignored_epochs(config) -> None:
  """--config.num_epochs=N where the config file sets num_train_steps (speedrun_cpu.py, tiny.py)
  did nothing: the run trained the file's steps without a word (2.5 epochs when 1 was asked)."""
  args = _with_flagfiles(sys.argv[1:])  # (Readable: define_config_flag checked.)
  given = {"--" + arg.split("=", 1)[0].lstrip("-")  # (absl takes -flag as --flag.)
           for arg in (args[:args.index("--")] if "--" in args else args)}
  if ("--config.num_epochs" in given and "--config.num_train_steps" not in given
      and config.num_train_steps > 0):
    fail(f"--config.num_epochs={config.num_epochs} does nothing: --config={_config_argument()} "
         f"sets num_train_steps={config.num_train_steps}, which wins; add "
         "--config.num_train_steps=-1 to train by epochs")


def refuse_config_mistakes(config, workdir: str | None = None) -> None:
  """A config's values (config_lib.validate with model=False) and a --workdir's form (an s3://
  scheme, gs:// without gcsfs) checked before JAX's import: a mistake is one line at once, not
  2-3 s on. config.model_kwargs, and whether the workdir can be written, once JAX is in."""
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    config_lib.validate(config, warn=False, model=False)
    if workdir is not None:
      storage.resolve(workdir, "--workdir")
  except UserError as e:
    fail(str(e))


def fail(message: str, code: int = 2):
  """Prints `fashion_jax: error: MESSAGE` on stderr (once: not also as a log line) and exits;
  in a job of several processes, telling the others (support.multihost.fail_fast)."""
  print(f"fashion_jax: error: {message}", file=sys.stderr)
  if "jax" in sys.modules:  # Only a command that started JAX can be in a multi-process job.
    from fashion_jax.support import multihost  # pylint: disable=g-import-not-at-top
    multihost.fail_fast(message, code)
  sys.exit(code)


def quiet_console() -> None:
  """What each command's main does first: libraries' INFO chatter kept out of absl's console
  handler, and each of jax's log lines printed once. jax 0.7.2 (Colab's) gives its loggers a
  stderr handler of their own at its default level (NOTSET), so under absl's every jax line came
  twice (newer jax adds none at that default); a level the user set (JAX_LOGGING_LEVEL) stays."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(QuietLibraries())
  if jax.config.jax_logging_level == "NOTSET":
    jax.config.update("jax_logging_level", None)  # No level set: jax's own handler removed.


class QuietLibraries(logging_std.Filter):
  """Keeps libraries' INFO chatter out of the console (Orbax's per save, jax's "Resetting cache
  at ..." each time the benchmark's compile measure switches caches and "Unable to initialize
  backend 'tpu'" at each start on a machine without one, fsspec's "AdaptiveReadaheadCache
  enabled" per file read from gs:// through gcsfs, TensorFlow's eight lines an export: "input
  name(s) ... with unsupported characters which will be renamed to unknown", "Assets written to:"
  its staging folder; jax's profiler two a `benchmark --profile`: "Loading trace.json.gz ...",
  "Writing perfetto_trace ..."); warnings still show. (A TPU or GPU that is there but did not start is
  backends.py's warning, with its cause.)"""

  def filter(self, record):
    path = record.pathname.replace(os.sep, "/")
    if record.exc_info and "/gcsfs/" in path:  # "_request out of retries": its line, no traceback
      record.exc_info = record.exc_text = None  # (the command's own one-line error follows).
    return record.levelno >= logging_std.WARNING or not (
        any(name in path for name in ("/orbax/", "/gcsfs/", "/fsspec/", "/tensorflow/"))
        or path.endswith(("/jax/_src/compilation_cache.py", "/jax/_src/xla_bridge.py",
                          "/jax/_src/profiler.py")))
