"""The package's shape: one-way imports, configs without JAX, serving without the loop."""

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "fashion_jax")
MAX_LINES = 450
# The top level holds the commands and the config (no JAX on import); everything else is in a layer.
TOP_LEVEL = {"__init__", "__main__", "main", "predict", "evaluate", "export", "benchmark",
             "cli", "config_lib", "default_config"}
COMMANDS = ("main", "predict", "evaluate", "export", "benchmark")
CONFIG = {"cli", "config_lib", "default_config"}
# What each layer may import (layers by folder name, single modules by dotted name). Imports
# inside a layer are free but must not form a cycle (checked for all modules below).
ALLOWED = {
    "support": {"support"},
    "kernels": {"kernels", "support.paths", "support.runtime"},  # (Its child groups.)
    "data": {"data", "support.errors", "support.paths", "support.backends",  # TF beside JAX,
             "support.storage", "support.network"},  # gs:// IDX folders; downloads.
    "model": {"model", "kernels", "data", "support", *CONFIG},
    "training": {"training", "model", "data", "support", *CONFIG},
    "serving": {"serving", "model", "data", "support", *CONFIG},
    "benchmarking": {"benchmarking", "training", "model", "kernels", "data", "support", *CONFIG},
}


def _modules() -> dict[str, str]:
  """Dotted name inside the package (e.g. "kernels.ops") -> file, for every module."""
  found = {}
  for folder, dirs, files in os.walk(PACKAGE):
    dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
    prefix = os.path.relpath(folder, PACKAGE).replace(os.sep, ".")
    for name in files:
      if name.endswith(".py"):
        module = name[:-3] if prefix == "." else f"{prefix}.{name[:-3]}"
        found[module] = os.path.join(folder, name)
  return found


def _imports(path: str, modules) -> set[str]:
  """Package modules `path` imports anywhere (module level and inside functions)."""
  found = set()

  def add(dotted: str):
    name = dotted[len("fashion_jax."):] if dotted.startswith("fashion_jax.") else ""
    while name and name not in modules:  # `from fashion_jax.support.errors import UserError`
      name = name.rpartition(".")[0]
    if name:
      found.add(name)

  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fashion_jax"):
      for alias in node.names:  # `from fashion_jax.kernels import ops`: the module kernels.ops.
        add(f"{node.module}.{alias.name}")
      if node.module != "fashion_jax":
        add(node.module)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
  return module.partition(".")[0] if "." in module else module


def test_every_module_is_in_a_layer_or_a_command_or_the_config():
  assert {m for m in _modules() if "." not in m} == TOP_LEVEL
  assert {_layer(m) for m in _modules()} - TOP_LEVEL == set(ALLOWED)
  assert os.path.isfile(os.path.join(PACKAGE, "kernels", "csrc", "conv_pool.cc"))


def test_no_import_cycles_function_level_imports_included():
  graph = _graph()
  assert "model.models" in graph["model.steps"] and "training.train" in graph["main"]
  assert "support.errors" in graph["serving.predict"]  # `from fashion_jax.support.errors import`
  done, path = set(), []

  def visit(name):
    if name in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
    if name in done:
      return
    path.append(name)
    for dependency in sorted(graph[name]):
      visit(dependency)
    path.pop()
    done.add(name)

  for name in graph:
    visit(name)


def _allowed(importer: str, imported: str) -> bool:
  allowed = ALLOWED[_layer(importer)]
  return _layer(imported) in allowed or imported in allowed or imported == "__init__"


def test_layers_import_downwards_only():
  """Kernels import no model, step, loop or serving code; serving never imports the loop..."""
  wrong = {(importer, imported) for importer, imports in _graph().items()
           if _layer(importer) in ALLOWED for imported in imports if not _allowed(importer, imported)}
  assert wrong == set()
  # The checker itself: the imports this layout forbids are caught.
  assert not _allowed("serving.inference", "training.train")
  assert not _allowed("kernels.ops", "model.models") and not _allowed("data.idx", "kernels.ops")
  assert not _allowed("support.checkpointing", "model.steps")
  assert not _allowed("model.steps", "training.loop") and _allowed("model.steps", "config_lib")


def test_the_commands_are_thin_entry_points():
  sizes = {name: len(open(path).read().splitlines()) for name, path in _modules().items()
           if name in COMMANDS}
  assert {name: n for name, n in sizes.items() if n > 80} == {}


def test_no_module_over_the_size_limit():
  sizes = {name: len(open(path).read().splitlines()) for name, path in _modules().items()}
  assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("name", sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "configs"))
                                        if n.endswith(".py")))
def test_config_files_load_without_jax(name):
  proc = _run(f"""
import sys
from fashion_jax import config_lib
config = config_lib.load_file("configs/{name}.py")
assert config.model, config
heavy = sorted(m for m in ("jax", "flax", "optax", "orbax", "tensorflow") if m in sys.modules)
print("HEAVY", heavy)
""")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "HEAVY []" in proc.stdout, proc.stdout


def test_serving_modules_do_not_import_the_train_loop():
  proc = _run("""
import sys
import fashion_jax.predict, fashion_jax.evaluate, fashion_jax.export
import fashion_jax.serving.inference, fashion_jax.serving.preprocess, fashion_jax.serving.report
print("LOADED", sorted(m for m in sys.modules if m.startswith(
    ("fashion_jax.training", "fashion_jax.benchmark"))))
""")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "LOADED []" in proc.stdout, proc.stdout


def test_train_and_evaluate_reads_in_one_screenful():
  tree = ast.parse(open(os.path.join(PACKAGE, "training", "train.py")).read())
  function = next(n for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name == "train_and_evaluate")
  assert function.end_lineno - function.lineno + 1 <= 100
