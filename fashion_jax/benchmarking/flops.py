"""FLOP accounting for the benchmark: device peaks, model FLOPs, executed kernel FLOPs.

MFU counts the model's FLOPs (XLA's cost analysis of the reference
formulation); HFU the FLOPs the hardware executed, which adds what the native
kernels' custom calls do (XLA counts them as none).
"""

from __future__ import annotations

import functools
import math
import os
import re

# Dense peak TFLOP/s of one device (one TPU core or chip as JAX counts it, one GPU), matched on its
# device_kind, first match first (so "H100 PCIe" before "H100", and r"\bL4\b" is not "L40"):
# (float32 at full precision, float32 at JAX's default matmul precision, bfloat16).
# JAX's default precision computes float32 convolutions and matmuls as one bfloat16 pass on TPUs
# and as TensorFloat-32 on NVIDIA tensor cores from Ampere (A100) on. Older GPUs have no TF32
# (None: float32 runs at FP32) and no bfloat16 tensor cores (their FP32 peak). A TPU's
# full-precision float32 is several bfloat16 passes: None, not guessed (pass --peak_gflops).
DEVICE_PEAKS = (
    (r"\bTPU v2\b", None, 22.5, 22.5), (r"\bTPU v3\b", None, 61.5, 61.5),
    (r"\bTPU v4 lite\b", None, 138.0, 138.0), (r"\bTPU v4\b", None, 275.0, 275.0),
    (r"\bTPU v5 lite\b|\bTPU v5e\b", None, 197.0, 197.0),
    (r"\bTPU v5p?\b", None, 459.0, 459.0),
    (r"\bTPU v6 lite\b|\bTPU v6e\b", None, 918.0, 918.0),
    (r"\bTesla T4\b|\bT4\b", 8.1, None, 8.1), (r"\bV100\b", 15.7, None, 15.7),
    (r"\bA100\b", 19.5, 156.0, 312.0), (r"\bA10G?\b", 31.2, 62.5, 125.0),
    (r"\bH[12]00\b.*\bNVL\b", 60.0, 417.5, 835.0), (r"\bH100\b.*\bPCIe\b", 51.0, 378.0, 756.0),
    (r"\bH100\b|\bH200\b|\bGH200\b", 67.0, 494.5, 989.0),
    (r"\bL40S\b", 91.6, 183.0, 362.0), (r"\bL40\b", 90.5, 90.5, 181.0),
    (r"\bL4\b", 30.3, 60.0, 121.0),
)
_FULL_FLOAT32 = ("highest", "float32", "F32_F32_F32")
_DEFAULT_EQUIVALENT = (("tensorfloat32", "TF32_TF32_F32"), ("bfloat16", "BF16_BF16_F32"))  # GPU, TPU


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity), not the machine's count."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpuinfo() -> tuple[float, str]:
  """cpuinfo's highest "cpu MHz" (0 where unknown) and its flags line."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    flags = re.search(r"flags\s*:(.*)", info)
    return (max(map(float, re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)), default=0.0),
            flags.group(1) if flags else "")
  except (OSError, ValueError):
    return 0.0, ""


def nominal_cpu_peak_gflops() -> tuple[float, str]:
  """Cores x cpuinfo's clock x 32 fp32 FLOP/cycle (AVX2: 2 FMA units x 8 lanes x 2), or x64 with
  AVX-512. Only an estimate: VMs often report the nominal clock (2,596 MHz on a Zen 5 VM whose
  cores ran at ~3,900 under load), and some cores run 512-bit FMAs at half rate (Zen 4)."""
  cores = usable_cpus()
  mhz, flags_line = _cpuinfo()
  mhz = mhz or 2500.0
  per_cycle = 64 if " avx512f" in flags_line else 32 if " fma" in flags_line else 16
  return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"


def sample_cpu_peak() -> list[dict]:
  """Three runs of ~0.3 s of the native library's FjMeasurePeak (none without the native
  kernels). The benchmark samples before its sweep and passes them to `cpu_peak_gflops`, which
  samples again: a stretch when the shared machine is busy has to cover both to lower the peak."""
  from fashion_jax.kernels import native  # pylint: disable=g-import-not-at-top
  return [r for r in (native.measure_peak(usable_cpus(), 0.3) for _ in range(3)) if r]


def cpu_peak_gflops(earlier: list[dict] | None = None) -> tuple[float, str]:
  """The CPU's float32 peak GFLOP/s, measured: every core runs independent multiply-add chains
  at the widest vector width it has (FjMeasurePeak: every core at the fastest thread's rate),
  the best of this call's runs and the `earlier` ones, since a busy neighbour or a descheduled
  virtual core only ever lowers it. The source says where a busy machine may still have spoiled
  it. Without the native kernels, the nominal estimate, said so."""
  nominal, how = nominal_cpu_peak_gflops()
  runs = [*(earlier or []), *sample_cpu_peak()]
  if not runs:
    return nominal, (f"nominal: {how}; not measured, the native kernels are unavailable, "
                     "and the clock may be higher than cpuinfo says: pass --peak_gflops")
  best = max(runs, key=lambda r: r["gflops"])
  per_cycle = best["gflops"] * 1000 / (best["threads"] * best["mhz"])
  source = (f"measured: {best['threads']} cores x {best['lanes']}-float FMA chains at "
            f"{best['mhz']:,.0f} MHz, {per_cycle:.0f} FLOP/cycle/core; nominal {nominal:,.0f} "
            f"from {how}")
  cpuinfo_mhz = _cpuinfo()[0]
  # Whole multiply-add pipes (half a vector a cycle, or 1, 2 or 4 -- Arm's Neoverse V1/V2 and
  # Apple's cores have four 128-bit ones: 2 x lanes x that): otherwise a phase of the run (FMA
  # chains or clock) was disturbed, as on a busy machine.
  if not any(abs(per_cycle / (2 * best["lanes"] * pipes) - 1) < 0.15 for pipes in (0.5, 1, 2, 4)):
    source += (f"; WARNING: {per_cycle:.0f} FLOP/cycle/core is no whole number of "
               f"{best['lanes']}-float multiply-add pipes, so the machine was busy while the peak "
               "was measured; rerun when it is quiet, or pass --peak_gflops")
  elif cpuinfo_mhz and best["mhz"] < 0.6 * cpuinfo_mhz:
    source += (f"; WARNING: the cores ran at {best['mhz']:,.0f} MHz, well under cpuinfo's "
               f"{cpuinfo_mhz:,.0f}: the machine was busy while the peak was measured, so shares "
               "of it read high; rerun when it is quiet, or pass --peak_gflops")
  return best["gflops"], source


def device_peak_gflops(device, dtype: str = "float32", given: float = 0.0,
                       earlier: list[dict] | None = None) -> tuple[float, str]:
  """Peak GFLOP/s of one device for `dtype`, and where the figure comes from (`given` > 0
  is the user's --peak_gflops; `earlier`: CPU peak samples taken before, `sample_cpu_peak`)."""
  if given > 0:
    return given, "--peak_gflops"
  if device.platform == "cpu":
    return cpu_peak_gflops(earlier)
  kind = device.device_kind
  precision = _matmul_precision()
  for pattern, *tflops in DEVICE_PEAKS:
    if re.search(pattern, kind, re.IGNORECASE):
      if dtype == "bfloat16":
        column, what = 2, "bfloat16"
      elif precision in _FULL_FLOAT32:
        column, what = 0, f"float32 at jax_default_matmul_precision={precision!r}"
      elif precision not in ("", "default", *_DEFAULT_EQUIVALENT[device.platform == "tpu"]):
        return float("nan"), (f"{kind!r}: no peak known for float32 at jax_default_matmul_"
                              f"precision={precision!r}: pass --peak_gflops")
      elif device.platform == "tpu":
        column, what = 1, "float32 at JAX's default precision (one bfloat16 pass)"
      elif tflops[1] is None:
        column, what = 0, "float32 (FP32: no TensorFloat-32 on this GPU)"
      else:
        column, what = 1, "float32 at JAX's default precision (TensorFloat-32)"
      if tflops[column] is None:
        return float("nan"), f"{kind!r}: no peak known for {what}: pass --peak_gflops"
      return tflops[column] * 1000, f"table entry for {kind!r}, {what}"
  return float("nan"), f"unknown device kind {kind!r}: pass --peak_gflops"


def _matmul_precision() -> str:
  """jax_default_matmul_precision as set (flag, environment or config), '' when left default."""
  import jax  # pylint: disable=g-import-not-at-top
  value = jax.config.jax_default_matmul_precision
  return "" if value is None else str(getattr(value, "name", value))


def peak_units(parallel) -> int:
  """How many times the per-device peak the run can use.

  CPU devices in one process share the host's cores (the CPU peak already
  counts all of them), so on CPU that is one host's peak per process.
  """
  if parallel.devices[0].platform == "cpu":
    return len({d.process_index for d in parallel.devices})
  return parallel.num_devices


def analytic_flops_per_image(model_name: str) -> float | None:
  """Training FLOPs per image of the classic CNN counted by hand (fallback for cost analysis);
  None for the other models (a NaN had made the benchmark's JSON fail after the whole run).

  Forward: multiply-adds x 2 of each layer; backward twice that (weight and input gradients),
  less the first conv's input gradient, which nothing needs. Optimizer and elementwise work
  (~1 %) are left out.
  """
  if model_name != "cnn":
    return None
  first_conv = 2 * 26 * 26 * 32 * 9 * 1
  forward = first_conv + 2 * (11 * 11 * 64 * 9 * 32 + 1600 * 128 + 128 * 10)
  return 3.0 * forward - first_conv


def cost_flops(stage) -> float | None:
  """FLOPs of one call from XLA's cost analysis of a lowered or compiled program, or None where
  the backend has none."""
  try:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # Not every backend implements cost analysis.
    return None


def model_flops_per_image(config, batch_size: int) -> float | None:
  """Training FLOPs per image of the model's math, whatever formulation runs.

  MFU counts the model's FLOPs (as in the PaLM paper's definition), so it is
  XLA's cost analysis of the train step written with the reference ops (XLA's
  own convolution and pooling), lowered but not compiled: on GPUs the compiled
  program hands its convolutions and matmuls to cuDNN and cuBLAS calls that
  XLA counts as no work (an H200's count was 0.75 of 15.5 MFLOP). A faster
  formulation that needs fewer FLOPs for the same math (Winograd) then shows up
  as a higher MFU, while `hfu` reports the FLOPs the hardware actually executed.

  Per image: what one more image adds to the step (the count at 2 x `batch_size` less that at
  `batch_size`, over `batch_size`). The step's count divided by its batch had spread the
  optimizer's per-step work (Adam: ~4 MFLOP a step for the CNN) over the images: 19.6 MFLOP
  an image at batch 1, 15.5 at 512, so MFU read up to 27 % high at small batches.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.conv_impl, config.pool_impl = "xla", "xla"
  model, tx = steps.create_model(config), steps.create_optimizer(config)
  state = steps.create_train_state(model, tx, config.seed)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))

  def count(images):  # Lowered on shapes alone: nothing of 2 x batch_size is allocated.
    batch = {"image": jax.ShapeDtypeStruct((images,) + steps.IMAGE_SHAPE, jnp.uint8),
             "label": jax.ShapeDtypeStruct((images,), jnp.int32)}
    return cost_flops(step.lower(state, batch))

  one, two = count(batch_size), count(2 * batch_size)
  return (two - one) / batch_size if one and two and two > one else None


def executed_step_flops(lowered, compiled, parallel) -> float | None:
  """FLOPs one call of a compiled step executes on all its devices together.

  On CPU: XLA's count of the optimized program (one device's part of it under mesh and
  pmap), plus the native kernels' custom calls, which it counts as none. Elsewhere there are
  no native kernels, and the optimized program's library calls (cuDNN, cuBLAS) count as none:
  the lowered program's count, since those libraries run its math as written (the whole
  step's under jit, one device's under pmap).
  """
  if parallel.devices[0].platform == "cpu":
    flops = cost_flops(compiled)
    flops = flops and flops + executed_flops(compiled.as_text())
    per_device = parallel.mode != "none"
  else:
    flops, per_device = cost_flops(lowered), parallel.mode == "pmap"
  return flops * parallel.num_devices if flops and per_device else flops


_TARGET_RE = re.compile(r'custom_call_target="(fashion_jax_[a-z_]+)"')
_SHAPE_RE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]\{[0-9,]*\}")  # e.g. f32[4,28,28,1]{3,2,1,0}


def _kernel_flops(target: str, operands: list[tuple[int, ...]],
                  result: tuple[int, ...] = ()) -> float:
  """Floating-point operations of one kernel call, from its operand (and result) shapes."""
  # The Winograd filter transform U = G g G^T ((m+2) x 3 G; result U [P, ., .]) and its
  # gradient (operand dU [P, C, K]), per (input, output) channel pair: G applied to g's 3
  # columns, then to the (m+2) rows, multiply-adds x 2 (zeros in G counted).
  if target in ("fashion_jax_filter_transform", "fashion_jax_filter_transform_grad"):
    u = result if target.endswith("transform") else operands[0]
    a = math.isqrt(u[0])
    return 2.0 * (9 * a + 3 * a * a) * u[1] * u[2]
  if target in ("fashion_jax_conv_pool_fwd", "fashion_jax_conv_pool_bwd"):
    (n, h, w, c), k = operands[0], operands[1][-1]
    return 2.0 * n * ((h - 2) // 2) * ((w - 2) // 2) * 4 * 9 * c * k  # Multiply-adds x 2.
  # The direct kernel's plain convolution (its backward: the kernel's gradient only).
  if target in ("fashion_jax_direct_conv_fwd", "fashion_jax_direct_conv_bwd"):
    (n, h, w, c), k = operands[0], operands[1][-1]
    return 2.0 * n * (h - 2) * (w - 2) * 9 * c * k
  # The fused Winograd layers (`_winograd_flops`).
  if target.startswith("fashion_jax_winograd_conv"):
    (n, h, w, c), (planes, u1, u2) = operands[0], operands[1]
    return _winograd_flops(target.endswith("fwd"), n, h, w, c, u1 * u2 // c, planes)
  # The two layers as one op: the direct layer, then the Winograd one on its pooled output h
  # [n, (h-2)/2, (w-2)/2, C], and its filter U of the second kernel [3, 3, C, K] (operand 3 of
  # both; the backward's U^T and the kernel's gradient from dU): the Winograd tile is
  # two_layers.two_layer_tile's, as the op's `tile` attribute.
  if target.startswith("fashion_jax_two_layer_"):
    from fashion_jax.kernels import two_layers  # pylint: disable=g-import-not-at-top
    (n, h, w, cin), (_, _, c, k) = operands[0], operands[3]
    planes = (two_layers.two_layer_tile(operands[0]) + 2) ** 2
    hp, wp = (h - 2) // 2, (w - 2) // 2
    # The first layer computes only the rows and columns of h the second reads (F(5x5, 3x3)'s
    # tiles: 12 of the CNN's 13).
    _, rows, cols, _ = two_layers.first_layer_shape(operands[0], c)
    first = 2.0 * n * rows * cols * 4 * 9 * cin * c  # Forward, or the kernel gradient.
    forward = target.endswith("fwd")
    a = math.isqrt(planes)
    filters = (1 if forward else 2) * 2.0 * (9 * a + 3 * a * a) * c * k  # As the filter ops'.
    return first + _winograd_flops(forward, n, hp, wp, c, k, planes) + filters
  # BatchNorm + ReLU, per element of y (operand 0): the statistics' add and multiply-add; the
  # normalization (y - mean) a + t (3) then the forward's max, or the gradient sums' compare, add
  # and multiply-add, or the gradient's compare and two multiply-adds. With the pool: the
  # forward's max is the window's; the gradient's mask is a compare with the argmax, not the
  # normalization.
  per_element = {"fashion_jax_bn_stats": 3, "fashion_jax_bn_relu_fwd": 4,
                 "fashion_jax_bn_relu_grad_sums": 7, "fashion_jax_bn_relu_grad": 8,
                 "fashion_jax_bn_relu_pool_fwd": 4, "fashion_jax_bn_relu_pool_grad_sums": 5,
                 "fashion_jax_bn_relu_pool_grad": 6,
                 "fashion_jax_adam": 15}  # Adam: m 3, v 4, the update 8 (a sqrt, 3 divisions).
  if target in per_element:
    return float(per_element[target] * math.prod(operands[0]))
  # Dense layers' matmuls, x [b, d] and w [d, h]: y forward; dx and dw backward.
  if target in ("fashion_jax_dense_fwd", "fashion_jax_dense_bwd"):
    (b, d), h = operands[0], operands[1][1]
    return 2.0 * b * d * h * (1 if target.endswith("fwd") else 2)
  return 0.0  # Dropout's keep mask (fashion_jax_keep_mask): integer hashing, no float work.


# Per tile and channel, the transforms' FLOPs in F(2x2, 3x3) (additions only, ~32 each way),
# in F(4x4, 3x3) (csrc/conv_pool.cc's Wino<4>: 19 per 6-point B^T, 13 per A^T, 11 per A, 19 per
# B, each applied to the window's columns, then rows): V = B^T d B (4 new columns and 6 rows per
# tile), Y = A^T M A (6 columns, 4 rows), dM = A G A^T (4 rows, 6 columns), dX = B dV B^T (12,
# and the carried columns' 12 additions); and in F(5x5, 3x3) (Wino<5>: its constant matrices'
# terms, a multiply-add 2 and an addition of a +-1 term 1: 53 per 7-point B^T, 34 per A^T, 32
# per A, 52 per B; 5 new columns and 7 rows, 7 and 5, 5 and 7, 14 and 14 additions).
_TRANSFORM_FLOPS = {16: {"v": 32, "y": 32, "dm": 32, "dx": 32},
                    36: {"v": 190, "y": 130, "dm": 110, "dx": 240},
                    49: {"v": 636, "y": 408, "dm": 384, "dx": 742}}


def _winograd_flops(forward: bool, n: int, h: int, w: int, c: int, k: int,
                    planes: int = 16) -> float:
  """A fused Winograd layer on [n, h, w, c] with k outputs: its transforms (`_TRANSFORM_FLOPS`)
  and the per-tile products (forward; dV and dU backward, where V is recomputed from x). U is
  [planes, C, K] forward, U^T [planes, K, C] backward: 16 planes and 2x2 outputs a tile
  (F(2x2, 3x3)), 36 and 4x4 (F(4x4, 3x3)) or 49 and 5x5 (F(5x5, 3x3), the two-layer op's
  pooled second layer: (h - 2) // 5 tiles a side, as its 2 ((h - 2) // 2) / 5)."""
  m = math.isqrt(planes) - 2  # (m + 2)^2 planes.
  tiles = n * ((h - 2) // m) * ((w - 2) // m)
  t = _TRANSFORM_FLOPS[planes]
  if forward:
    return tiles * (t["v"] * c + t["y"] * k) + 2.0 * planes * tiles * c * k
  return tiles * ((t["v"] + t["dx"]) * c + t["dm"] * k) + 4.0 * planes * tiles * c * k


_NAME_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")  # An HLO instruction's name.


def kernel_calls(hlo_text: str) -> dict[str, tuple[str, float]]:
  """The native kernels' calls in a compiled program's HLO text: instruction name -> (custom-call
  target, FLOPs of one call)."""
  calls = {}
  for line in hlo_text.splitlines():
    target = _TARGET_RE.search(line)
    name = _NAME_RE.match(line)
    if not target or not name or "operand_layout_constraints={" not in line:
      continue
    head, constraints = line.split("operand_layout_constraints={", 1)
    shapes = [tuple(int(d) for d in dims.split(",") if d)
              for dims in _SHAPE_RE.findall(constraints)]
    results = _SHAPE_RE.findall(head.split("custom-call(", 1)[0])
    result = tuple(int(d) for d in results[0].split(",") if d) if results else ()
    calls[name.group(1)] = (target.group(1), _kernel_flops(target.group(1), shapes, result))
  return calls


def module_name(hlo_text: str) -> str | None:
  """An HLO text's module name (its first line: `HloModule jit_train_step, ...`)."""
  found = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
  return found.group(1) if found else None


def instruction_names(hlo_text: str) -> set[str]:
  """Every instruction name in an HLO text (what a profile's op events are called)."""
  return {m.group(1) for m in map(_NAME_RE.match, hlo_text.splitlines()) if m}


def executed_flops(hlo_text: str) -> float:
  """FLOPs the native kernels execute in a compiled program's HLO text.

  XLA's cost analysis knows nothing about custom calls (it counts them as
  none), so the benchmark adds this for its hardware-FLOP figures.
  """
  return sum(f for _, f in kernel_calls(hlo_text).values())
