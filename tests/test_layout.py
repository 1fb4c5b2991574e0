"""The package's shape: one-way imports, configs without JAX, serving without the loop."""

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "fashion_jax")
MAX_LINES = 450


def _modules() -> dict[str, str]:
  return {name[:-3]: os.path.join(PACKAGE, name) for name in sorted(os.listdir(PACKAGE))
          if name.endswith(".py")}


def _imports(path: str) -> set[str]:
  """Package modules `path` imports anywhere (module level and inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "fashion_jax":
        found |= {alias.name for alias in node.names}
      elif node.module.startswith("fashion_jax."):
        found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fashion_jax.")}
  return found


def test_no_import_cycles_function_level_imports_included():
  modules = _modules()
  graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
  assert graph["steps"] and "train" in graph["main"]  # The parser sees imports at all.
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


def test_layers_import_downwards_only():
  """Kernels import no model, step, loop or serving code; serving never imports the loop."""
  graph = {name: _imports(path) for name, path in _modules().items()}
  for kernel in ("winograd", "native", "ops"):
    assert graph[kernel] <= {"winograd", "native", "paths"}, (kernel, graph[kernel])
  for serving in ("inference", "predict", "evaluate", "export", "report", "preprocess"):
    assert not graph[serving] & {"train", "loop", "stops"}, (serving, graph[serving])
  assert not graph["steps"] & {"train", "loop", "inference", "checkpointing"}


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
config = config_lib.load_sibling("configs/{name}.py", "{name}")
assert config.model, config
heavy = sorted(m for m in ("jax", "flax", "optax", "orbax", "tensorflow") if m in sys.modules)
print("HEAVY", heavy)
""")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "HEAVY []" in proc.stdout, proc.stdout


def test_serving_modules_do_not_import_the_train_loop():
  proc = _run("""
import sys
import fashion_jax.inference, fashion_jax.predict, fashion_jax.evaluate, fashion_jax.export
print("LOADED", sorted(m for m in sys.modules if m in (
    "fashion_jax.train", "fashion_jax.loop", "fashion_jax.stops", "fashion_jax.benchmark")))
""")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "LOADED []" in proc.stdout, proc.stdout


def test_train_and_evaluate_reads_in_one_screenful():
  tree = ast.parse(open(os.path.join(PACKAGE, "train.py")).read())
  function = next(n for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name == "train_and_evaluate")
  assert function.end_lineno - function.lineno + 1 <= 100
