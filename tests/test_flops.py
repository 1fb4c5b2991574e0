"""FLOP accounting (fashion_jax/benchmarking/flops.py): the native kernels' executed FLOPs, device peaks."""

import time

import jax
import jax.numpy as jnp
import pytest

from fashion_jax import default_config
from fashion_jax.benchmarking import flops
from fashion_jax.kernels import batchnorm, dense, native, plain_conv, two_layers
from tests.conftest import require_native


def test_executed_flops_counts_the_kernels_xla_cannot_see():
  require_native()
  x, k, b = jnp.zeros((4, 28, 28, 1)), jnp.zeros((3, 3, 1, 32)), jnp.zeros(32)
  step = jax.jit(jax.grad(lambda k: jnp.sum(native.conv3x3_pool2(x, k, b))))
  direct = 2 * 4 * 13 * 13 * 4 * 9 * 32  # Multiply-adds x 2 of 4 conv outputs per pooled one.
  assert flops.executed_flops(step.lower(k).compile().as_text()) == 2 * direct  # Fwd + bwd.
  x8, k8 = jnp.zeros((4, 13, 13, 32)), jnp.zeros((3, 3, 32, 64))
  step = jax.jit(jax.grad(lambda x: jnp.sum(native.conv3x3_pool2(x, k8, jnp.zeros(64)))))
  tiles = 4 * 5 * 5
  # The fused Winograd layer: forward (input and output transforms, 16 products per tile) and
  # backward (V again, the output transform's gradient, dV and dU, the input's gradient). The
  # filter transform, U forward and U^T backward (its gradient too where the kernel's is
  # taken): G (m+2 x 3) on the kernel's 3 columns, then on the m+2 rows, per channel pair.
  filters = lambda m: 2 * (9 * (m + 2) + 3 * (m + 2) ** 2) * 32 * 64
  product = 2 * 16 * tiles * 32 * 64
  forward = 32 * tiles * (32 + 64) + product + filters(2)
  backward = 32 * tiles * (2 * 32 + 64) + 2 * product + filters(2)
  assert flops.executed_flops(step.lower(x8).compile().as_text()) == forward + backward
  # The plain fused convolution (cnn_bn's layers): the same count, 2x2 outputs per tile.
  x16 = jnp.zeros((4, 16, 16, 32))
  step = jax.jit(jax.grad(lambda x: jnp.sum(plain_conv.conv3x3(x, k8) ** 2)))  # y is needed.
  tiles = 4 * 7 * 7
  product = 2 * 16 * tiles * 32 * 64
  forward = 32 * tiles * (32 + 64) + product + filters(2)
  backward = 32 * tiles * (2 * 32 + 64) + 2 * product + filters(2)
  assert flops.executed_flops(step.lower(x16).compile().as_text()) == forward + backward
  # F(4x4, 3x3) (outputs whose sides are multiples of 4): 36 products per 4x4 tile, and its own
  # transforms' counts (flops._TRANSFORM_FLOPS).
  x30 = jnp.zeros((4, 30, 30, 32))
  tiles = 4 * 7 * 7
  product = 2 * 36 * tiles * 32 * 64
  forward = tiles * (190 * 32 + 130 * 64) + product + filters(4)
  backward = tiles * ((190 + 240) * 32 + 110 * 64) + 2 * product + filters(4)
  assert flops.executed_flops(step.lower(x30).compile().as_text()) == forward + backward
  assert flops.executed_flops("%c = f32[2] custom-call(), custom_call_target=\"other\"") == 0
  # The two layers as one op: the direct layer (forward, then its kernel gradient from the
  # forward's output: not recomputed) and the Winograd layer on its 13x13 output, as F(5x5, 3x3):
  # 2x2 tiles an image, 49 products per tile and Wino<5>'s transforms; the tiles read 12x12 of
  # the 13x13, and the direct layer computes only those.
  x1, k1, b1 = jnp.zeros((4, 28, 28, 1)), jnp.zeros((3, 3, 1, 32)), jnp.zeros(32)
  two = lambda k1, k8: jnp.sum(two_layers.conv3x3_pool2_twice(x1, k1, b1, k8, jnp.zeros(64)))
  step = jax.jit(jax.grad(two, argnums=(0, 1)))
  tiles = 4 * 2 * 2
  product = 2 * 49 * tiles * 32 * 64
  # U, U^T and the kernel's gradient: in the op (no filter-transform ops), counted as theirs.
  second = ((636 * 32 + 408 * 64) * tiles + product) + (
      ((636 + 742) * 32 + 384 * 64) * tiles + 2 * product) + 3 * filters(5)
  read = 2 * 4 * 12 * 12 * 4 * 9 * 32
  assert flops.executed_flops(step.lower(k1, k8).compile().as_text()) == 2 * read + second
  # ... and as F(2x2, 3x3) where the pooled output's sides are not multiples of 5 (30x30: h
  # 14x14, 6x6 pooled).
  x1 = jnp.zeros((4, 30, 30, 1))
  step = jax.jit(jax.grad(two, argnums=(0, 1)))
  tiles = 4 * 6 * 6
  product = 2 * 16 * tiles * 32 * 64
  second = (32 * tiles * (32 + 64) + product) + (32 * tiles * (2 * 32 + 64) + 2 * product)
  second += 3 * filters(2)
  first = 2 * 2 * 4 * 14 * 14 * 4 * 9 * 32
  assert flops.executed_flops(step.lower(k1, k8).compile().as_text()) == first + second

  # The direct kernel's plain convolution (cnn_bn's first layer), forward and kernel gradient.
  x1, k1 = jnp.zeros((4, 30, 30, 1)), jnp.zeros((3, 3, 1, 32))
  step = jax.jit(jax.grad(lambda k: jnp.sum(plain_conv.conv3x3(x1, k) ** 2)))
  assert flops.executed_flops(step.lower(k1).compile().as_text()) == 2 * (2 * 4 * 28 * 28 * 9 * 32)
  # BatchNorm + ReLU (fashion_jax.kernels.batchnorm), per element of y: statistics 3, forward
  # 4, the gradient's sums 7 and the gradient 8.
  y = jnp.zeros((4, 6, 6, native.lanes()))
  bn = lambda y: batchnorm.batch_norm_relu(y, jnp.ones(y.shape[-1]), jnp.zeros(y.shape[-1]),
                                           epsilon=1e-5, pad=1)[0]
  step = jax.jit(jax.grad(lambda y: jnp.sum(bn(y) ** 2)))
  assert flops.executed_flops(step.lower(y).compile().as_text()) == (3 + 4 + 7 + 8) * y.size
  # With the 2x2 pool: statistics 3, forward 4, the gradient's sums 5 and the gradient 6.
  bn = lambda y: batchnorm.batch_norm_relu_pool(y, jnp.ones(y.shape[-1]), jnp.zeros(y.shape[-1]),
                                                epsilon=1e-5)[0]
  step = jax.jit(jax.grad(lambda y: jnp.sum(bn(y) ** 2)))
  assert flops.executed_flops(step.lower(y).compile().as_text()) == (3 + 4 + 5 + 6) * y.size
  # A dense layer's matmuls: y forward (y is needed for the square's gradient), dx and dw.
  x, w = jnp.zeros((5, 40)), jnp.zeros((40, 2 * native.lanes()))
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(dense.matmul(x, w) ** 2), argnums=(0, 1)))
  assert flops.executed_flops(step.lower(x, w).compile().as_text()) == 3 * (2 * 5 * 40 * w.shape[1])


def test_model_flops_count_the_lowered_step(monkeypatch):
  """On a GPU the compiled step's convolutions and matmuls are cuDNN and cuBLAS calls that
  XLA's count skips (an H200: 0.75 of 15.5 MFLOP an image, so MFU read 1.8 % for 39 %): the
  model's FLOPs come from the lowered step, whatever the backend. A compiled program's count
  made as blind as a GPU's changes nothing."""
  monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: {"flops": 1.0})
  per_image = flops.model_flops_per_image(default_config.get_config(), 16)
  assert per_image == pytest.approx(flops.analytic_flops_per_image("cnn"), rel=0.03)


def test_model_flops_per_image_leave_out_the_optimizers_per_step_work():
  """The step's count over its batch had spread Adam's per-step work (~4 MFLOP for the CNN)
  over the images: 19.6 MFLOP an image at batch 1 for the hand count's 15.4, so MFU read 27 %
  high there. What one more image adds is the same at any batch size, within 1 % of the hand
  count (forward, backward less the first conv's input gradient; elementwise work the rest)."""
  config = default_config.get_config()
  at_1, at_64 = (flops.model_flops_per_image(config, b) for b in (1, 64))
  assert at_1 == pytest.approx(at_64, rel=1e-4)
  assert at_1 == pytest.approx(flops.analytic_flops_per_image("cnn"), rel=0.01)


class _Stage:
  """A lowered or compiled program as far as the FLOP count reads one."""

  def __init__(self, count: float, text: str = ""):
    self.count, self.text = count, text

  def cost_analysis(self):
    return {"flops": self.count}

  def as_text(self):
    return self.text


@pytest.mark.parametrize("platform, mode, devices, expected", [
    ("gpu", "none", 1, 1000.0),  # The lowered count: the library calls run its math.
    ("gpu", "mesh", 4, 1000.0),  # Lowered under jit: the whole step's already.
    ("gpu", "pmap", 4, 4000.0),  # Lowered under pmap: one device's.
    ("tpu", "none", 1, 1000.0),
    ("cpu", "none", 1, 30.0 + 2 * 4 * 13 * 13 * 4 * 9 * 32),  # Compiled + the native kernel.
    ("cpu", "mesh", 2, 2 * (30.0 + 2 * 4 * 13 * 13 * 4 * 9 * 32)),  # One device's part each.
])
def test_executed_step_flops_per_backend(platform, mode, devices, expected):
  kernel = ('%c = f32[4,13,13,32]{3,2,1,0} custom-call(%x, %k), custom_call_target='
            '"fashion_jax_conv_pool_fwd", operand_layout_constraints={f32[4,28,28,1]{3,2,1,0}, '
            'f32[3,3,1,32]{3,2,1,0}}')
  parallel = type("P", (), {"mode": mode, "num_devices": devices,
                            "devices": [type("D", (), {"platform": platform})()] * devices})()
  assert flops.executed_step_flops(_Stage(1000.0), _Stage(30.0, kernel), parallel) == expected


def _device(kind, platform="gpu"):
  return type("D", (), {"platform": platform, "device_kind": kind})()


@pytest.mark.parametrize("kind, platform, float32, bfloat16", [
    # JAX's default precision runs float32 convolutions and matmuls as TF32 on Ampere and later
    # (the CUDA-core FP32 peak, 67 on an H200, had made MFU ~7x too high).
    ("NVIDIA H200", "gpu", 494_500, 989_000), ("NVIDIA H100 80GB HBM3", "gpu", 494_500, 989_000),
    ("NVIDIA GH200 480GB", "gpu", 494_500, 989_000),
    ("NVIDIA H100 PCIe", "gpu", 378_000, 756_000), ("NVIDIA H100 NVL", "gpu", 417_500, 835_000),
    ("NVIDIA A100-SXM4-40GB", "gpu", 156_000, 312_000), ("NVIDIA A100 80GB PCIe", "gpu", 156_000, 312_000),
    ("NVIDIA L4", "gpu", 60_000, 121_000),
    ("NVIDIA L40", "gpu", 90_500, 181_000),  # Had matched "L4".
    ("NVIDIA L40S", "gpu", 183_000, 362_000),
    # No TF32, no bfloat16 tensor cores: FP32 for both (bfloat16 had read the FP16 peak).
    ("Tesla T4", "gpu", 8_100, 8_100), ("Tesla V100-SXM2-16GB", "gpu", 15_700, 15_700),
    # TPUs: float32 at the default precision is one bfloat16 pass.
    ("TPU v5 lite", "tpu", 197_000, 197_000), ("TPU v5", "tpu", 459_000, 459_000),
    ("TPU v4", "tpu", 275_000, 275_000), ("TPU v4 lite", "tpu", 138_000, 138_000),  # Had read v4.
    ("TPU v6 lite", "tpu", 918_000, 918_000)])
def test_device_peaks_by_kind_and_dtype(kind, platform, float32, bfloat16):
  peak, why = flops.device_peak_gflops(_device(kind, platform), "float32")
  assert peak == float32 and kind in why
  assert ("TensorFloat-32)" in why) == (platform == "gpu" and kind[:5] != "Tesla"), why
  assert flops.device_peak_gflops(_device(kind, platform), "bfloat16")[0] == bfloat16


def test_device_peaks_follow_the_matmul_precision_and_the_users_figure():
  h200 = _device("NVIDIA H200")
  with jax.default_matmul_precision("highest"):  # True float32: the CUDA cores.
    assert flops.device_peak_gflops(h200, "float32") == (
        67_000.0, "table entry for 'NVIDIA H200', float32 at jax_default_matmul_precision='highest'")
    peak, why = flops.device_peak_gflops(_device("TPU v5 lite", "tpu"), "float32")
    assert peak != peak and "--peak_gflops" in why  # Several bf16 passes: not guessed.
  with jax.default_matmul_precision("tensorfloat32"):  # What the default is on this GPU.
    assert flops.device_peak_gflops(h200, "float32")[0] == 494_500
  with jax.default_matmul_precision("high"):  # Three passes of something: not guessed.
    peak, why = flops.device_peak_gflops(h200, "float32")
    assert peak != peak and "'high'" in why and "--peak_gflops" in why
  assert flops.device_peak_gflops(h200, "float32", given=5.0) == (5.0, "--peak_gflops")
  peak, why = flops.device_peak_gflops(_device("Mystery 9000"))
  assert peak != peak and "--peak_gflops" in why  # NaN, and what to do.


def test_the_cpu_peak_is_measured_and_no_xla_matmul_beats_it():
  """The CPU peak MFU and HFU divide by is measured, not cpuinfo's clock (a Zen 5 VM said
  2,596 MHz, 332 GFLOP/s, while XLA's own matmul ran at 420): a large matmul never exceeds it.
  Up to five tries, each measuring both: a test running beside this one (xdist) can only lower
  a try's peak, and a too-low peak fails every try."""
  require_native()
  x = jnp.ones((1536, 1536), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  tries = []
  for _ in range(5):
    peak, source = flops.cpu_peak_gflops()
    assert source.startswith("measured: ") and "nominal" in source, source
    best = float("inf")
    for _ in range(5):
      start = time.perf_counter()
      matmul(x).block_until_ready()
      best = min(best, time.perf_counter() - start)
    tries.append((2 * 1536**3 / best / 1e9, peak))
    if tries[-1][0] <= 1.15 * peak:
      return
  pytest.fail(f"XLA's matmul ran faster than the measured peak in every try (GFLOP/s, peak): {tries}")


def test_without_native_kernels_the_cpu_peak_is_the_nominal_one_and_says_so(monkeypatch):
  monkeypatch.setattr(native, "measure_peak", lambda *args, **kwargs: None)
  peak, source = flops.cpu_peak_gflops()
  assert peak == flops.nominal_cpu_peak_gflops()[0] > 0
  assert source.startswith("nominal: ") and "--peak_gflops" in source, source


@pytest.mark.parametrize("runs, warning", [
    ([(233.0, 3655.0)], None),  # Zen 4 when quiet: 32 FLOP/cycle/core at 3,655 MHz.
    ([(80.0, 1254.0)], "the cores ran at 1,254 MHz, well under cpuinfo's 2,596"),  # Busy.
    ([(80.0, 1254.0), (233.0, 3655.0)], None),  # Busy before the sweep only: the best counts.
    ([(180.0, 3655.0)], "25 FLOP/cycle/core is no whole number of 16-float multiply-add pipes"),
    ([(467.8, 3655.0)], None)])  # 64 FLOP/cycle: two 512-bit pipes (Zen 5, the Xeon).
def test_the_cpu_peak_is_the_best_sample_and_says_when_a_busy_machine_spoiled_it(
    monkeypatch, runs, warning):
  """A benchmark on a busy machine had divided by a third of the peak (HFU 78 % for 31 %) and not
  said so; the peak is now sampled before and after the sweep as well."""
  samples = iter([{"gflops": g, "mhz": m, "lanes": 16, "threads": 2} for g, m in runs] * 3)
  monkeypatch.setattr(native, "measure_peak", lambda *args, **kwargs: next(samples, None))
  monkeypatch.setattr(flops, "_cpuinfo", lambda: (2596.0, " fma avx512f"))
  earlier = [run for _ in runs[1:] for run in flops.sample_cpu_peak()]
  peak, source = flops.cpu_peak_gflops(earlier)
  assert peak == max(g for g, _ in runs)
  assert ("WARNING" in source) == (warning is not None) and (warning or "") in source, source


def test_step_profile_times_each_programs_op_a_step():
  """A trace's op events (named after the program's instructions; runtime events are not ops)
  gathered per op; a step's time is the median call's times the calls a step (one stalled call
  does not count), a native kernel's GFLOP/s its executed FLOPs over the median call."""
  from fashion_jax.benchmarking import step_profile  # pylint: disable=import-outside-toplevel
  events = [{"ph": "X", "name": "ffi_call.3", "dur": 200.0},
            {"ph": "X", "name": "ffi_call.3", "dur": 200.0},
            {"ph": "X", "name": "ffi_call.3", "dur": 5000.0},  # The machine stalled.
            {"ph": "X", "name": "fusion.1", "dur": 50.0},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 900.0},  # Not an op.
            {"ph": "i", "name": "fusion.1"},  # Not a complete event.
            {"ph": "X", "name": "fusion.1"}]  # No duration.
  durations = step_profile.op_times(events, {"ffi_call.3", "fusion.1", "copy.2"})
  assert durations == {"ffi_call.3": [200.0, 200.0, 5000.0], "fusion.1": [50.0]}
  rows = step_profile.summarize(durations, {"ffi_call.3": ("fashion_jax_dense_fwd", 2e6)},
                                steps=3, step_ms=0.5, peak_gflops=40.0)
  assert [r["op"] for r in rows] == ["ffi_call.3", "fusion.1"]
  kernel, fusion = rows
  assert kernel["ms_per_step"] == pytest.approx(0.2) and kernel["calls_per_step"] == 1
  assert kernel["mean_ms_per_step"] == pytest.approx(1.8)
  assert kernel["share_of_step"] == pytest.approx(0.4)
  assert kernel["gflops"] == pytest.approx(2e6 / 200e-6 / 1e9)  # 10 GFLOP/s.
  assert kernel["share_of_peak"] == pytest.approx(0.25)
  assert fusion["ms_per_step"] == pytest.approx(0.05 / 3)
  assert fusion["kind"] == "xla" and fusion["gflops"] is None and fusion["share_of_peak"] is None
  # A kernel named after itself with its op in `hlo_op` (a GPU's, by the profiler's format) counts
  # as that op; an event of another program does not.
  events = [{"ph": "X", "name": "cutlass_gemm_64x64", "dur": 30.0,
             "args": {"hlo_op": "fusion.1", "hlo_module": "jit_train_step"}},
            {"ph": "X", "name": "fusion.1", "dur": 10.0,
             "args": {"hlo_op": "fusion.1", "hlo_module": "jit_eval_step"}}]
  assert step_profile.op_times(events, {"fusion.1"}, "jit_train_step") == {"fusion.1": [30.0]}
  assert flops.module_name("HloModule jit_train_step, entry_computation_layout={...}\n") == (
      "jit_train_step")
  text = step_profile.format_profile({
      "available": True, "batch_size": 8, "steps": 3, "step_ms": 0.5, "ops_ms_per_step": 0.217,
      "peak_gflops": 40.0, "ops": rows})
  assert "ffi_call.3" in text and "fashion_jax_dense_fwd" in text and "25.0%" in text


def test_kernel_calls_name_each_native_call_of_a_program():
  require_native()
  x, w = jnp.zeros((8, 64)), jnp.zeros((64, 32))
  step = jax.jit(jax.grad(lambda w: jnp.sum(dense.matmul(x, w) ** 2)))
  text = step.lower(w).compile().as_text()
  calls = flops.kernel_calls(text)
  assert sorted(t for t, _ in calls.values()) == ["fashion_jax_dense_bwd",
                                                  "fashion_jax_dense_fwd"]
  assert set(calls) <= flops.instruction_names(text)
  by_target = {t: f for t, f in calls.values()}
  assert by_target == {"fashion_jax_dense_fwd": 2 * 8 * 64 * 32,
                       "fashion_jax_dense_bwd": 2 * 2 * 8 * 64 * 32}
  assert flops.executed_flops(text) == sum(by_target.values())
