"""On a real GPU or TPU: short trains with each data placement and parallelism match host placement.

Marked `gpu` / `tpu`; each skips, with the reason, where JAX sees no such device (the CI suite runs
with JAX_PLATFORMS=cpu). On an accelerator machine: `python -m pytest -q -m "gpu or tpu"` with
JAX_PLATFORMS unset (launch/accelerator_check.sh runs them).
"""

import os

import jax
import numpy as np
import pytest

from fashion_jax import config_lib
from fashion_jax.training import train
from tests.conftest import ROOT, write_idx_folder
from tests.multidevice_check import final_state

RUNS = [(placement, parallelism) for placement in ("host", "device")
        for parallelism in ("none", "mesh", "pmap")]


def _devices_or_skip(kind: str):
  try:
    devices = jax.devices(kind)
  except RuntimeError as e:
    pytest.skip(f"no {kind.upper()} visible to JAX here ({str(e).splitlines()[0][:80]})")
  if jax.default_backend() != kind:
    pytest.skip(f"JAX's default backend is {jax.default_backend()}, not {kind}")
  return devices


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_idx_folder(str(tmp_path_factory.mktemp("accel") / "idx"), n_train=1024, n_test=256)


def _train(data, workdir, placement, parallelism):
  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.update(idx_dir=data, data_placement=placement, parallelism=parallelism,
                batch_size=64, eval_batch_size=128, num_train_steps=40, eval_every_steps=20,
                checkpoint_every_steps=20, log_every_steps=10)
  result = train.train_and_evaluate(config, workdir)
  return config, result


@pytest.mark.parametrize("kind", [pytest.param("gpu", marks=pytest.mark.gpu),
                                  pytest.param("tpu", marks=pytest.mark.tpu)])
def test_placements_and_parallelism_match_host_placement(kind, data, tmp_path):
  _devices_or_skip(kind)
  reference_dir = str(tmp_path / "host_none")
  config, reference = _train(data, reference_dir, "host", "none")
  expected = final_state(config, reference_dir)
  for placement, parallelism in RUNS[1:]:
    workdir = str(tmp_path / f"{placement}_{parallelism}")
    _, result = _train(data, workdir, placement, parallelism)
    got = final_state(config, workdir)
    # Same examples at every step; only the order of floating-point sums may differ on a GPU.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4),
                 expected.params, got.params)
    assert abs(result["eval_accuracy"] - reference["eval_accuracy"]) <= 0.02, (placement,
                                                                                parallelism)
