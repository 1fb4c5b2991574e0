"""Shared fixtures: tiny IDX data sets written by the tests, configs, subprocess helpers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fashion_jax import idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA_ENV = "FASHION_JAX_IDX_DIR"


def make_images(labels: np.ndarray, seed: int) -> np.ndarray:
  """Learnable synthetic images: a bright bar whose position encodes the label, plus noise."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
  for i, label in enumerate(labels):
    row = 2 + 2 * int(label)
    images[i, row:row + 2, 4:24] = 255
  return images


def write_idx_folder(folder: str, n_train: int = 256, n_test: int = 100, gz: bool = True,
                     seed: int = 0) -> str:
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  suffix = ".gz" if gz else ""
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images_name, labels_name = idx.FILES[split]
    idx.write_idx(os.path.join(folder, images_name + suffix), make_images(labels, seed + n))
    idx.write_idx(os.path.join(folder, labels_name + suffix), labels)
  return folder


@pytest.fixture
def idx_dir(tmp_path):
  return write_idx_folder(str(tmp_path / "idx"))


@pytest.fixture
def tiny_config(idx_dir):
  from fashion_jax import config_lib
  config = config_lib.load_sibling(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  config.idx_dir = idx_dir
  return config


@pytest.fixture
def real_idx_dir():
  folder = os.environ.get(REAL_DATA_ENV, "")
  if not folder:
    pytest.skip(f"{REAL_DATA_ENV} is not set: no real Fashion-MNIST IDX folder to train on")
  if not os.path.isdir(folder):
    pytest.fail(f"{REAL_DATA_ENV}={folder!r} is set but is not a folder")
  return folder


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600):
  """Runs `python -m module args` from the repository root; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
