// fashion_jax's native CPU kernels for 3x3 convolutions (fashion_jax/kernels/native.py
// wraps each handler, native_build.py builds this file; BENCHMARKS.md has the measurements).
//
// 1. Fused 3x3 VALID convolution + bias + 2x2 VALID max-pooling (+ ReLU) for few input
//    channels (the first conv of a small CNN). XLA:CPU runs the classic CNN's
//    first conv (1 -> 32 channels) as an im2col matmul with K = 9, which is
//    memory-bound, and then writes, re-reads and scatters the 26x26x32
//    activation for the pool and its gradient. Here each 2x2 pooling window's
//    four conv outputs are computed in registers, pooled, and only the pooled
//    value and its argmax (int8, 0..3, first maximum wins, like
//    reduce_window's transpose; 4 where the ReLU is off) are written. The
//    backward pass recomputes nothing: it routes the pooled gradient to the
//    argmax tap and accumulates the kernel and bias gradients in registers.
//    The same kernel also computes the plain convolution (no pool: each window's four outputs
//    written; cnn_bn's first layer, fashion_jax/kernels/plain_conv.py).
// 2. Winograd F(2x2, 3x3) for wide inputs (further down): the whole layer fused,
//    conv + pool (+ ReLU), or the convolution alone (also as F(4x4, 3x3)); and the two layers
//    as one op, whose second layer runs as F(5x5, 3x3) where its pooled output's sides are
//    multiples of 5 (the CNN's).
// 3. BatchNorm with batch statistics + ReLU (at the end; fashion_jax/kernels/batchnorm.py): two
//    passes over the activation each way, optionally writing the next conv's zero border or
//    the 2x2 max-pool that follows (its gradient read pooled).
// 4. Dropout's keep mask, bitwise jax.random.bernoulli's (fashion_jax/kernels/dropout.py).
// 5. Dense layers' matmuls and their gradients (fashion_jax/kernels/dense.py), on the
//    Winograd layers' micro-kernel.
// 6. Adam's update in one pass over a parameter's arrays (fashion_jax/kernels/adam.py).
//
// Layouts: x NHWC float32, kernel HWIO [3, 3, Cin, Cout] float32 with
// Cout a multiple of the vector width (FJ_LANES), bias [Cout]; pooled output
// [N, (H-2)/2, (W-2)/2, Cout].
// Work is split over images, fixed image chunks or Winograd planes (partial
// sums added in a fixed order, so results do not depend on the thread count)
// and run on XLA's intra-op thread pool.
//
// The vector code uses GCC/Clang vector extensions, so it compiles for any
// target; native_build.py builds it per ISA level (-march=x86-64-v4 with 16
// lanes, x86-64-v3 with 8, the architecture's baseline with 4).
//
// FJ_PART=1 compiles only the conv+pool, Winograd and two-layer handlers, FJ_PART=2 only the
// others and the C functions: native_build.py compiles the two at once and links them, half the
// time of one compile of everything (27.5 -> 12.7 s on 2 Zen 4 cores). Undefined: everything.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector width: 16 floats (AVX-512's registers), 8 (AVX2's) or 4 (SSE's, NEON's), chosen at
// build time by native_build.py (-DFJ_LANES=...) with the target's ISA level. Every channel
// block below is one vector; channel counts must be multiples of it. The code is
// width-generic: a width wider than the target's registers compiles to several instructions
// per operation (that is how the 16-lane path is tested on AVX2).
#ifndef FJ_LANES
#if defined(__AVX512F__)
#define FJ_LANES 16
#else
#define FJ_LANES 8
#endif
#endif
constexpr int L = FJ_LANES;
static_assert(L == 4 || L == 8 || L == 16, "FJ_LANES must be 4, 8 or 16");

// 64-bit Arm's NEON has 32 vector registers, as AVX-512 does (AVX2 and SSE have 16), and the
// Arm cores users rent or carry issue 4 vector multiply-adds a cycle of latency 4 (Neoverse V1
// and V2: Graviton 3 and 4; Apple M1 on), so a loop needs 16 independent accumulator chains to
// keep them busy (Neoverse N1, Graviton 2: 2 a cycle, 8 chains). With NEON's own 4 lanes the
// matmul micro-kernel's blocks use the 32 registers (kGemmRows, kGemmVectors).
#if defined(__aarch64__)
constexpr bool kWideNeon = L == 4;
#else
constexpr bool kWideNeon = false;
#endif

typedef float fv __attribute__((vector_size(4 * L)));     // L floats
typedef int32_t iv __attribute__((vector_size(4 * L)));  // L int32 (masks)
typedef int8_t bv __attribute__((vector_size(L)));       // L int8 (argmax)

// Unaligned, may-alias access through a vector type of float alignment: plain loads and stores
// (a memcpy into a local made GCC keep arrays of accumulators on the stack).
typedef float fv_unaligned __attribute__((vector_size(4 * L), aligned(4), may_alias));
inline fv Load(const float* p) { return *reinterpret_cast<const fv_unaligned*>(p); }
inline void Store(float* p, fv v) { *reinterpret_cast<fv_unaligned*>(p) = v; }
// Broadcasts as vector-scalar arithmetic, which compiles to one broadcast instruction. (A loop
// over the lanes compiled, with GCC 12 at 16 lanes, to 16 masked broadcasts or stack round trips:
// it made the 16-lane build 1.7x slower than the 8-lane one on AVX-512.)
inline fv Splat(float s) { return -fv{} + s; }  // -0.0 + s is s exactly, even for s = -0.0.
inline iv SplatI(int32_t s) { return iv{} + s; }

// The low bytes of L int32 lanes (argmax taps, 0/1 masks) as L int8. __builtin_convertvector
// is one instruction with AVX-512 (vpmovdb), but GCC scalarizes it for AVX2 and NEON (~30
// extracts, shifts and ors per vector: about as many instructions as the first layer's
// multiply-adds per pooled output); a byte shuffle is vpshufb + vpermq + vpor there, or one tbl.
typedef int8_t bq __attribute__((vector_size(4 * L)));  // The bytes of an iv.
constexpr int kLowByte = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? 0 : 3;  // In an int32.
#if defined(__clang__)
// Clang (Apple's too) has no __builtin_shuffle; __builtin_shufflevector takes constant indices.
template <int... i>
inline bv LowBytes(bq bytes, std::integer_sequence<int, i...>) {
  return __builtin_shufflevector(bytes, bytes, (4 * i + kLowByte)...);
}
#endif
inline bv Narrow(iv v) {
#if FJ_LANES == 16 || !(defined(__SSSE3__) || defined(__ARM_NEON))
  return __builtin_convertvector(v, bv);
#elif defined(__clang__)
  return LowBytes(reinterpret_cast<bq>(v), std::make_integer_sequence<int, L>{});
#else
  bq pick;
  for (int i = 0; i < 4 * L; ++i) pick[i] = int8_t((4 * i + kLowByte) % (4 * L));
  const bq bytes = __builtin_shuffle(reinterpret_cast<bq>(v), pick);
  bv out;
  std::memcpy(&out, &bytes, sizeof(out));
  return out;
#endif
}

// The inverse for argmax taps (0..4): L int8 as L int32 lanes. __builtin_convertvector
// scalarizes this too with GCC 12 for AVX2 (~35 instructions a vector, most of the first layer's
// kernel-gradient time: 6.5 -> 4.9 us an image on a Zen 3 core); one vpmovsxbd, or two
// unpacks and a shift (SSE2), or two sxtl (NEON) instead.
inline iv Widen(const int8_t* p) {
#if FJ_LANES == 16 && defined(__AVX512F__)
  return reinterpret_cast<iv>(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
#elif FJ_LANES == 8 && defined(__AVX2__)
  return reinterpret_cast<iv>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p))));
#elif FJ_LANES == 4 && (defined(__SSE2__) || defined(__aarch64__))
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
#if defined(__SSE2__)
  __m128i b = _mm_cvtsi32_si128(word);
  b = _mm_unpacklo_epi8(b, b);  // Each byte 4 times; the arithmetic shift keeps one, signed.
  return reinterpret_cast<iv>(_mm_srai_epi32(_mm_unpacklo_epi16(b, b), 24));
#else
  const int16x8_t w = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(word)));
  return reinterpret_cast<iv>(vmovl_s16(vget_low_s16(w)));
#endif
#else
  bv b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, iv);
#endif
}

// The pooled output is [n, hp, wp, cout]: every pooled window of the image ((h - 2) / 2 a side),
// or its first hp x wp (the two-layer op's F(5x5, 3x3) second layer reads only those).
struct Shape {
  int64_t n, h, w, cin, cout, hp, wp;
};

// Runs f(i) for i in [0, n) on the calling thread and the pool's threads (XLA's intra-op pool,
// or any type with num_threads() and Schedule(task): csrc/selftest.cc runs serially). The
// caller claims work too, so it never waits for a task that has not started.
template <typename Pool, typename F>
void ParallelFor(Pool& pool, int64_t n, const F& f) {
  struct Counter {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counter = std::make_shared<Counter>();
  auto run = [counter, n, &f] {
    for (int64_t i; (i = counter->next.fetch_add(1)) < n;) {
      f(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run;  // A helper starting after all work is claimed only touches `counter`.
    pool.Schedule(std::move(task));
  }
  run();
  while (counter->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Asks for `bytes` from p to be brought into L2, a line at a time (prefetcht1; PLDL2KEEP on
// Arm). The training backward reads what the forward wrote long before (h: 21 KB an image for
// the CNN), from L3 or memory; the hardware prefetchers follow it poorly (seven rows of a tile's
// window at once, and on Intel's server cores an L3 far away).
inline void Prefetch(const void* p, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};  // Whole lines.
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t line = first; line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

// The argmax tap of each lane that the gradient flows to; kNoTap where a fused ReLU is off.
constexpr int32_t kNoTap = 4;

// Pools a window's four outputs: y = max + add (then max(y, 0) with `relu`), and the argmax
// (int8, first maximum wins ties, like reduce_window's transpose; kNoTap where the ReLU is
// off: y <= 0 there, and its gradient, like jax.nn.relu's at 0, is zero). A NaN output makes
// the window's y NaN wherever it is, as reduce_window's and jnp.maximum's max do, and the
// gradient goes to it (the last NaN tap). (With `>` alone a NaN anywhere but the first tap was
// dropped: a NaN or Inf-Inf input at an image's last row or column gave finite outputs and loss,
// where the XLA formulations give NaN and on_nonfinite stops the step.)
inline void PoolStore(const fv out[4], fv add, bool relu, float* y, int8_t* arg) {
  fv best = out[0];
  iv which = SplatI(0);
  for (int q = 1; q < 4; ++q) {
    // Strict: the first maximum wins ties. A NaN tap wins, and a NaN best stays (x > NaN is
    // false).
    const iv better = (out[q] > best) | (out[q] != out[q]);
    best = better ? out[q] : best;
    which = better ? SplatI(q) : which;
  }
  best += add;
  if (relu) {
    const iv off = best <= Splat(0.0f);
    best = off ? Splat(0.0f) : best;
    which = off ? SplatI(kNoTap) : which;
  }
  Store(y, best);
  const bv which_b = Narrow(which);
  std::memcpy(arg, &which_b, sizeof(which_b));
}

// One image, NB blocks of L output channels from cb. CIN > 0: compile-time channel count.
// Two blocks give each window 8 independent accumulator chains, enough to hide the multiply-add
// latency (one block's 4 chains of 9 left half the FMA throughput unused). POOL: pooled output
// and argmax [hp, wp, Cout]; else the plain convolution's 2x2 outputs per window, y [2 hp, 2 wp,
// Cout] (arg unused).
template <int CIN, int NB, bool POOL>
void ForwardBlock(const Shape& s, const float* x, const float* k, const float* b, bool relu,
                  float* y, int8_t* arg, int64_t cb) {
  const int64_t cin = CIN > 0 ? CIN : s.cin;
  std::vector<fv> wheap(CIN > 0 ? 0 : 9 * cin * NB);
  fv wstack[CIN > 0 ? 9 * CIN * NB : 1];
  fv* w = CIN > 0 ? wstack : wheap.data();  // w[tap * NB + block]
  for (int64_t t = 0; t < 9 * cin; ++t) {
    for (int nb = 0; nb < NB; ++nb) w[t * NB + nb] = Load(k + t * s.cout + cb + nb * L);
  }
  fv bias[NB];
  for (int nb = 0; nb < NB; ++nb) bias[nb] = Load(b + cb + nb * L);
  for (int64_t i = 0; i < s.hp; ++i) {
    for (int64_t j = 0; j < s.wp; ++j) {
      fv acc[NB][4];
      for (int nb = 0; nb < NB; ++nb) {
        for (int q = 0; q < 4; ++q) acc[nb][q] = bias[nb];
      }
      // The 4x4 input patch covers the four 3x3 windows of the pooling window.
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const float* px = x + ((2 * i + r) * s.w + 2 * j + c) * cin;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const fv xv = Splat(px[ci]);
            for (int dy = 0; dy < 2; ++dy) {
              for (int dx = 0; dx < 2; ++dx) {
                const int ky = r - dy, kx = c - dx;
                if (ky < 0 || ky > 2 || kx < 0 || kx > 2) continue;
                for (int nb = 0; nb < NB; ++nb) {
                  acc[nb][2 * dy + dx] += xv * w[((ky * 3 + kx) * cin + ci) * NB + nb];
                }
              }
            }
          }
        }
      }
      for (int nb = 0; nb < NB; ++nb) {
        if constexpr (POOL) {
          const int64_t o = (i * s.wp + j) * s.cout + cb + nb * L;
          PoolStore(acc[nb], Splat(0.0f), relu, y + o, arg + o);
        } else {
          for (int q = 0; q < 4; ++q) {
            Store(y + ((2 * i + q / 2) * 2 * s.wp + 2 * j + q % 2) * s.cout + cb + nb * L,
                  acc[nb][q]);
          }
        }
      }
    }
  }
}

// Kernel and bias gradients of one image, NB blocks from cb, added into gw_out/gb
// (gw_out[tap * NB + block], gb[block]). With a compile-time channel count the accumulators are
// locals, so they stay in registers (through the pointer the compiler stored and reloaded them
// around every multiply-add). POOL: dy is the pooled gradient, routed by arg; else the plain
// convolution's [2 hp, 2 wp, Cout] (no bias: gb unchanged).
template <int CIN, int NB, bool POOL>
void BackwardBlock(const Shape& s, const float* x, const int8_t* arg, const float* dy,
                   fv* gw_out, fv* gb, int64_t cb) {
  const int64_t cin = CIN > 0 ? CIN : s.cin;
  fv gw_local[CIN > 0 ? 9 * CIN * NB : 1];
  fv* gw = CIN > 0 ? gw_local : gw_out;
  if (CIN > 0) std::copy(gw_out, gw_out + 9 * cin * NB, gw_local);
  const fv zero = Splat(0.0f);
  for (int64_t i = 0; i < s.hp; ++i) {
    for (int64_t j = 0; j < s.wp; ++j) {
      const int64_t o = (i * s.wp + j) * s.cout + cb;
      fv gq[NB][4];
      for (int nb = 0; nb < NB; ++nb) {
        if constexpr (POOL) {
          const fv g = Load(dy + o + nb * L);
          const iv which = Widen(arg + o + nb * L);
          gb[nb] += which < SplatI(kNoTap) ? g : zero;
          for (int q = 0; q < 4; ++q) gq[nb][q] = which == SplatI(q) ? g : zero;
        } else {
          for (int q = 0; q < 4; ++q) {
            gq[nb][q] = Load(dy + ((2 * i + q / 2) * 2 * s.wp + 2 * j + q % 2) * s.cout + cb +
                             nb * L);
          }
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const float* px = x + ((2 * i + r) * s.w + 2 * j + c) * cin;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const fv xv = Splat(px[ci]);
            for (int ddy = 0; ddy < 2; ++ddy) {
              for (int ddx = 0; ddx < 2; ++ddx) {
                const int ky = r - ddy, kx = c - ddx;
                if (ky < 0 || ky > 2 || kx < 0 || kx > 2) continue;
                for (int nb = 0; nb < NB; ++nb) {
                  gw[((ky * 3 + kx) * cin + ci) * NB + nb] += xv * gq[nb][2 * ddy + ddx];
                }
              }
            }
          }
        }
      }
    }
  }
  if (CIN > 0) std::copy(gw_local, gw_local + 9 * cin * NB, gw_out);
}

// Blocks of NB * L channels, then one of L where Cout is an odd multiple of L (NB = 1 or 2).
template <int NB, typename F>
void ForEachChannelBlock(int64_t cout, const F& f) {
  int64_t cb = 0;
  for (; cb + NB * L <= cout; cb += NB * L) f(cb, std::integral_constant<int, NB>());
  if (cb < cout) f(cb, std::integral_constant<int, 1>());
}

// One image (x_img, its outputs y_img and arg_img), every channel block.
template <int CIN, bool POOL = true>
void ImageForward(const Shape& s, const float* x_img, const float* k, const float* b, bool relu,
                  float* y_img, int8_t* arg_img) {
  ForEachChannelBlock<2>(s.cout, [&](int64_t cb, auto nb) {
    ForwardBlock<CIN, decltype(nb)::value, POOL>(s, x_img, k, b, relu, y_img, arg_img, cb);
  });
}

// Floats of one image's output: pooled, or the plain convolution's (arg: as many int8, pooled).
template <bool POOL>
inline int64_t OutputFloats(const Shape& s) { return (POOL ? 1 : 4) * s.hp * s.wp * s.cout; }

template <int CIN, bool POOL, typename Pool>
void Forward(Pool& pool, const Shape& s, const float* x, const float* k,
             const float* b, bool relu, float* y, int8_t* arg) {
  const int64_t in_img = s.h * s.w * s.cin, out_img = OutputFloats<POOL>(s);
  ParallelFor(pool, s.n, [&](int64_t n) {
    ImageForward<CIN, POOL>(s, x + n * in_img, k, b, relu, y + n * out_img,
                            POOL ? arg + n * out_img : nullptr);
  });
}

constexpr int64_t kGradChunks = 8;  // Fixed, so the summation order is too.

template <int CIN, bool POOL, typename Pool>
void Backward(Pool& pool, const Shape& s, const float* x, const int8_t* arg,
              const float* dy, float* dk, float* db) {
  const int64_t in_img = s.h * s.w * s.cin, out_img = OutputFloats<POOL>(s);
  const int64_t chunks = std::max<int64_t>(1, std::min(kGradChunks, s.n));
  const int64_t nk = 9 * s.cin * s.cout;
  std::vector<float> partial(chunks * (nk + s.cout), 0.0f);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t lo = s.n * chunk / chunks, hi = s.n * (chunk + 1) / chunks;
    float* pk = partial.data() + chunk * (nk + s.cout);
    float* pb = pk + nk;
    std::vector<fv> gw(9 * s.cin);
    // One block at a time: with two, the 18 accumulators and 8 routed gradients did not fit
    // the registers (measured 35 % slower at 16 lanes).
    ForEachChannelBlock<1>(s.cout, [&](int64_t cb, auto nb_constant) {
      constexpr int NB = decltype(nb_constant)::value;
      std::fill(gw.begin(), gw.end(), Splat(0.0f));
      fv gb[NB];
      for (int nb = 0; nb < NB; ++nb) gb[nb] = Splat(0.0f);
      for (int64_t n = lo; n < hi; ++n) {
        BackwardBlock<CIN, NB, POOL>(s, x + n * in_img, POOL ? arg + n * out_img : nullptr,
                                     dy + n * out_img, gw.data(), gb, cb);
      }
      for (int nb = 0; nb < NB; ++nb) {
        for (int64_t t = 0; t < 9 * s.cin; ++t) Store(pk + t * s.cout + cb + nb * L, gw[t * NB + nb]);
        Store(pb + cb + nb * L, gb[nb]);
      }
    });
  });
  std::fill(dk, dk + nk, 0.0f);
  std::fill(db, db + s.cout, 0.0f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* pk = partial.data() + chunk * (nk + s.cout);
    for (int64_t t = 0; t < nk; ++t) dk[t] += pk[t];
    for (int64_t c = 0; c < s.cout; ++c) db[c] += pk[nk + c];
  }
}

ffi::Error CheckShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd, Shape* s) {
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3]) {
    return ffi::Error::InvalidArgument(
        "fashion_jax conv_pool: expected x [N, H, W, Cin] and kernel [3, 3, Cin, Cout]");
  }
  if (kd[3] % L != 0 || xd[1] < 4 || xd[2] < 4) {
    return ffi::Error::InvalidArgument(
        "fashion_jax conv_pool: needs Cout % " + std::to_string(L) + " == 0 and H, W >= 4");
  }
  *s = Shape{xd[0], xd[1], xd[2], xd[3], kd[3], (xd[1] - 2) / 2, (xd[2] - 2) / 2};
  return ffi::Error::Success();
}

// The pooled kernels' other operands: the bias (or its gradient) of Cout floats, y (or dy)
// [N, hp, wp, Cout] and the argmax of as many bytes. (Unchecked, a bias shorter than Cout was
// read past its end.)
ffi::Error PooledCounts(const Shape& s, size_t bias, ffi::Span<const int64_t> yd, size_t arg) {
  if (bias != static_cast<size_t>(s.cout) || yd.size() != 4 || yd[0] != s.n || yd[1] != s.hp ||
      yd[2] != s.wp || yd[3] != s.cout || arg != static_cast<size_t>(s.n * s.hp * s.wp * s.cout)) {
    return ffi::Error::InvalidArgument(
        "fashion_jax conv_pool: expected bias [Cout], y and its argmax [N, (H-2)/2, (W-2)/2, Cout]");
  }
  return ffi::Error::Success();
}

#define FJ_DISPATCH_CIN(CIN_VALUE, CALL) \
  switch (CIN_VALUE) {                   \
    case 1: CALL(1); break;              \
    case 2: CALL(2); break;              \
    case 3: CALL(3); break;              \
    case 4: CALL(4); break;              \
    default: CALL(0); break;             \
  }

template <typename Pool>
void ConvPoolForwardCore(Pool& pool, const Shape& s, const float* x, const float* k,
                         const float* b, bool relu, float* y, int8_t* arg) {
#define FJ_CALL(C) Forward<C, true>(pool, s, x, k, b, relu, y, arg)
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
}

template <typename Pool>
void ConvPoolBackwardCore(Pool& pool, const Shape& s, const float* x, const int8_t* arg,
                          const float* dy, float* dk, float* db) {
#define FJ_CALL(C) Backward<C, true>(pool, s, x, arg, dy, dk, db)
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
}

// The plain 3x3 VALID convolution (no bias, no pool) by the direct kernel, for few input
// channels (cnn_bn's first layer): y [N, H-2, W-2, Cout] with H and W even, 2x2 outputs per
// window as the pooled kernel computes them; the backward's kernel gradient.
template <typename Pool>
void DirectConvForwardCore(Pool& pool, const Shape& s, const float* x, const float* k, float* y) {
  const std::vector<float> no_bias(s.cout, 0.0f);
#define FJ_CALL(C) Forward<C, false>(pool, s, x, k, no_bias.data(), false, y, nullptr)
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
}

template <typename Pool>
void DirectConvBackwardCore(Pool& pool, const Shape& s, const float* x, const float* dy,
                            float* dk) {
  std::vector<float> db(s.cout);  // Unused: all zeros.
#define FJ_CALL(C) Backward<C, false>(pool, s, x, nullptr, dy, dk, db.data())
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
}

ffi::Error ConvPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> arg,
                           int32_t relu) {
  Shape s;
  if (ffi::Error e = CheckShapes(x.dimensions(), kernel.dimensions(), &s); e.failure()) return e;
  if (ffi::Error e = PooledCounts(s, bias.element_count(), y->dimensions(), arg->element_count());
      e.failure()) {
    return e;
  }
  ConvPoolForwardCore(pool, s, x.typed_data(), kernel.typed_data(), bias.typed_data(), relu != 0,
                      y->typed_data(), arg->typed_data());
  return ffi::Error::Success();
}

ffi::Error ConvPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::S8> arg,
                            ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                            ffi::ResultBuffer<ffi::F32> dbias) {
  Shape s;
  if (ffi::Error e = CheckShapes(x.dimensions(), kernel.dimensions(), &s); e.failure()) return e;
  if (ffi::Error e = PooledCounts(s, dbias->element_count(), dy.dimensions(), arg.element_count());
      e.failure()) {
    return e;
  }
  if (dkernel->element_count() != kernel.element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax conv_pool gradient: dkernel's shape differs");
  }
  ConvPoolBackwardCore(pool, s, x.typed_data(), arg.typed_data(), dy.typed_data(),
                       dkernel->typed_data(), dbias->typed_data());
  return ffi::Error::Success();
}

// y [N, H-2, W-2, Cout] (or dy for the backward) with H, W even.
ffi::Error DirectConvShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd,
                            ffi::Span<const int64_t> yd, Shape* s) {
  if (ffi::Error e = CheckShapes(xd, kd, s); e.failure()) return e;
  if (s->h % 2 != 0 || s->w % 2 != 0 || yd.size() != 4 || yd[0] != s->n || yd[1] != s->h - 2 ||
      yd[2] != s->w - 2 || yd[3] != s->cout) {
    return ffi::Error::InvalidArgument(
        "fashion_jax direct conv: expected y [N, H-2, W-2, Cout] with H and W even");
  }
  return ffi::Error::Success();
}

ffi::Error DirectConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (ffi::Error e = DirectConvShapes(x.dimensions(), kernel.dimensions(), y->dimensions(), &s);
      e.failure()) {
    return e;
  }
  DirectConvForwardCore(pool, s, x.typed_data(), kernel.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error DirectConvBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel) {
  Shape s;
  if (ffi::Error e = DirectConvShapes(x.dimensions(), dkernel->dimensions(), dy.dimensions(), &s);
      e.failure()) {
    return e;
  }
  DirectConvBackwardCore(pool, s, x.typed_data(), dy.typed_data(), dkernel->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Winograd F(2x2, 3x3) (fashion_jax/kernels/winograd.py) for wide inputs, and F(4x4, 3x3) for
// the plain convolution whose output sides are multiples of 4.
//
//   V = B^T d B  for each (M+2)^2 input window d       [B,H,W,C] -> [P, tiles, C]
//   M = V U      per plane, U = G g G^T                [P, tiles, C] x [P, C, K]
//   y = A^T M A (the M x M outputs of each tile)       [P, tiles, K] -> [B,M th,M tw,K]
//       or (F(2x2, 3x3)) its max + bias (+ ReLU) with the pool -> [B,th,tw,K]
// with P = (M+2)^2 planes (16 or 36), and their transposes for the backward pass. Tile (i, j) of
// an image has its window at (M i, M j). F(4x4, 3x3) multiplies 36 times per 16 outputs instead
// of 16 per 4 (2.25 against 4 per output, direct: 9); its transforms are not exact in binary
// (factors 4, 5, 8 and sixths), which costs a few bits (winograd.py has the measured error).
//
// The whole layer is fused, with a pool (the classic CNN's second layer) or
// without (cnn_bn, ResNets): a block of an image's tiles at a time, its V and M
// only in cache, and the backward recomputes V from x instead of keeping it, so
// the layer reads and writes only the images, the outputs and their gradients.
// (XLA's matmuls between separate transforms had written and re-read
// [16, tiles, K] planes, 26 MB at batch 256 for the CNN, and were bound by that
// traffic; for cnn_bn the fused kernels halve the time of its wide layers.)

// C[R x KV*L] (+)= A[R x n] B[n x KV*L] in registers: A(i, p) = a[i * ars + p * acs] (so A or
// its transpose can be read in place), row p of B at b + p * ldb, row i of C at c + i * ldc.
// With `accumulate` the sums start from C and add the products in order of p, so a contraction
// split into consecutive parts sums exactly as in one call. (Adding a block's sums to C after
// the loop made the dU products, 25 terms a block, 5 % slower on Zen 3.)
// With T (a transposed store; `accumulate` unused) C's row i goes to column i of c instead,
// C(i, j) to c[j * ldc + i], for the block's first `valid` columns j (B's others are padding).
template <int R, int KV, bool T = false>
void GemmBlock(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
               int64_t ldc, int64_t n, bool accumulate, int64_t valid = 0) {
  fv acc[R][KV];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < KV; ++j) {
      acc[i][j] = !T && accumulate ? Load(c + i * ldc + j * L) : Splat(0.0f);
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    fv bv[KV];
    for (int j = 0; j < KV; ++j) bv[j] = Load(b + p * ldb + j * L);
    for (int i = 0; i < R; ++i) {
      const fv av = Splat(a[i * ars + p * acs]);
      for (int j = 0; j < KV; ++j) acc[i][j] += av * bv[j];
    }
  }
  if constexpr (T) {
    float t[R][KV * L];
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < KV; ++j) Store(t[i] + j * L, acc[i][j]);
    }
    for (int64_t j = 0; j < std::min<int64_t>(valid, KV * L); ++j) {
      for (int i = 0; i < R; ++i) c[j * ldc + i] = t[i][j];
    }
    return;
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < KV; ++j) Store(c + i * ldc + j * L, acc[i][j]);
  }
}

// Blocks of at most 6 rows, except AVX-512's of one or two vectors (up to 12: GemmMaxRows
// below): 6 x 4 accumulators fill AVX-512's 32 registers with room for the B row and the
// broadcast; 6 x 2 fit AVX2's and SSE's 16. NEON: at most 5 x 4 (20 chains; 6 x 2's
// 12 leave a quarter of a 4-pipe core's multiply-adds unused, and at 6 x 4 GCC 12 spilled two
// accumulators: NEON multiplies by a lane of a register, so each of A's 6 values takes one, as
// each of B's 4 vectors does). The rows are split evenly (with blocks of up to 6: 25 as 5 x 5,
// 32 as 6 6 5 5 5 5), not as 6s and a short last block: one row's 2 (AVX2) or 4 (AVX-512)
// accumulator chains wait on the multiply-add latency (on Zen 3, AVX2, the 25th of the CNN's 25
// tiles a plane added 9-14 % to 24 rows' time; split evenly its 16 products took 5 % less, the
// two-layer op 2-3 % less: BENCHMARKS.md, session 16). Each output's sum is the same whatever
// block holds its row.
constexpr int kGemmRows = kWideNeon ? 5 : 6;
constexpr int kGemmVectors = L == 16 || kWideNeon ? 4 : 2;

// `count` blocks of R rows from row i; returns the row after them.
template <int R, int KV, bool T>
int64_t GemmBlocks(int64_t count, int64_t i, const float* a, int64_t ars, int64_t acs,
                   const float* b, int64_t ldb, float* c, int64_t crs, int64_t ldc, int64_t n,
                   bool accumulate, int64_t valid) {
  for (; count > 0; --count, i += R) {
    GemmBlock<R, KV, T>(a + i * ars, ars, acs, b, ldb, c + i * crs, ldc, n, accumulate, valid);
  }
  return i;
}

// Row blocks of up to GemmMaxRows(KV) rows: kGemmRows, but 12 for AVX-512's blocks of one or two
// vectors (12 or 24 accumulator chains; 32 registers hold them beside B's row and the
// broadcast). A core with two 512-bit multiply-add pipes (Intel's server cores) keeps 8 in
// flight and loads 2-3 vectors a cycle: 6 x 2's 12 chains and 8 loads per 12 multiply-adds left
// it short (one core, data in L1, session 30's Xeon: 6 x 1 134-144 GFLOP/s, 12 x 1 150-164;
// 6 x 2 169-186, 12 x 2 188-202; 6 x 4 185-204; 8 x 3 against 6 x 3 did not pay in the dense
// backward). Each output's sum is the same whatever block holds its row.
constexpr int GemmMaxRows(int kv) { return L == 16 && kv <= 2 ? 12 : kGemmRows; }

// `count` blocks of `size` rows (1 <= size <= R) from row i; returns the row after them.
template <int R, int KV, bool T>
int64_t GemmBlocksOfSize(int64_t size, int64_t count, int64_t i, const float* a, int64_t ars,
                         int64_t acs, const float* b, int64_t ldb, float* c, int64_t crs,
                         int64_t ldc, int64_t n, bool accumulate, int64_t valid) {
  if constexpr (R > 1) {
    if (size < R) {
      return GemmBlocksOfSize<R - 1, KV, T>(size, count, i, a, ars, acs, b, ldb, c, crs, ldc, n,
                                            accumulate, valid);
    }
  }
  return GemmBlocks<R, KV, T>(count, i, a, ars, acs, b, ldb, c, crs, ldc, n, accumulate, valid);
}

template <int KV, bool T>
void GemmRows(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
              int64_t ldc, int64_t rows, int64_t n, bool accumulate, int64_t valid) {
  constexpr int kMax = GemmMaxRows(KV);
  const int64_t crs = T ? 1 : ldc;  // Where C's next row starts.
  const int64_t blocks = (rows + kMax - 1) / kMax;
  if (blocks == 0) return;
  const int64_t small = rows / blocks, big = rows - small * blocks;  // big blocks of small + 1
  // One size per loop, chosen once (not a choice per block).
  int64_t i = 0;
  if (big > 0) {
    i = GemmBlocksOfSize<kMax, KV, T>(small + 1, big, i, a, ars, acs, b, ldb, c, crs, ldc, n,
                                      accumulate, valid);
  }
  GemmBlocksOfSize<kMax, KV, T>(small, blocks - big, i, a, ars, acs, b, ldb, c, crs, ldc, n,
                                accumulate, valid);
}

// C[rows x cols] (+)= A[rows x n] B[n x cols], cols a multiple of L. With T, C^T is stored
// (C(i, j) at c[j * ldc + i]) for the first `valid` columns (GemmBlock).
template <bool T = false>
void Gemm(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
          int64_t ldc, int64_t rows, int64_t n, int64_t cols, bool accumulate,
          int64_t valid = 0) {
  const int64_t ccs = T ? ldc : 1;  // Where C's next column starts.
  int64_t j = 0;
  for (; j + kGemmVectors * L <= cols; j += kGemmVectors * L) {
    GemmRows<kGemmVectors, T>(a, ars, acs, b + j, ldb, c + j * ccs, ldc, rows, n, accumulate,
                              valid - j);
  }
  float* cj = c + j * ccs;
  switch ((cols - j) / L) {
    case 3: GemmRows<3, T>(a, ars, acs, b + j, ldb, cj, ldc, rows, n, accumulate, valid - j); break;
    case 2: GemmRows<2, T>(a, ars, acs, b + j, ldb, cj, ldc, rows, n, accumulate, valid - j); break;
    case 1: GemmRows<1, T>(a, ars, acs, b + j, ldb, cj, ldc, rows, n, accumulate, valid - j); break;
    default: break;
  }
}

// The 1-D transforms of F(M, 3) over an A = M + 2 point window: In t = B^T d, InT d = B t,
// Out y = A^T m (A points to M outputs), OutT m = A g.
template <int M>
struct Wino;

// B^T rows (1,0,-1,0), (0,1,1,0), (0,-1,1,0), (0,1,0,-1); A^T rows (1,1,1,0), (0,1,-1,-1).
template <>
struct Wino<2> {
  static constexpr int A = 4;
  static void In(const fv d[4], fv t[4]) {
    t[0] = d[0] - d[2];
    t[1] = d[1] + d[2];
    t[2] = d[2] - d[1];
    t[3] = d[1] - d[3];
  }
  static void InT(const fv t[4], fv d[4]) {
    d[0] = t[0];
    d[1] = t[1] - t[2] + t[3];
    d[2] = t[1] + t[2] - t[0];
    d[3] = -t[3];
  }
  static void Out(const fv m[4], fv y[2]) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  static void OutT(const fv g[2], fv m[4]) {
    m[0] = g[0];
    m[1] = g[0] + g[1];
    m[2] = g[0] - g[1];
    m[3] = -g[1];
  }
};

// Points 0, 1, -1, 2, -2 and infinity (Lavin & Gray's): B^T rows (4,0,-5,0,1,0),
// (0,-4,-4,1,1,0), (0,4,-4,-1,1,0), (0,-2,-1,2,1,0), (0,2,-1,-2,1,0), (0,4,0,-5,0,1); A^T rows
// (1,1,1,1,1,0), (0,1,-1,2,-2,0), (0,1,1,4,4,0), (0,1,-1,8,-8,1). Shared sums and differences
// first: 19 operations per In (13 instructions with fused multiply-adds), 13 per Out.
template <>
struct Wino<4> {
  static constexpr int A = 6;
  static void In(const fv d[6], fv t[6]) {
    const fv four = Splat(4.0f), five = Splat(5.0f), two = Splat(2.0f);
    const fv p = d[4] - four * d[2], q = d[3] - four * d[1];
    const fv r = d[4] - d[2], s = two * (d[3] - d[1]);
    t[0] = four * d[0] - five * d[2] + d[4];
    t[1] = p + q;
    t[2] = p - q;
    t[3] = r + s;
    t[4] = r - s;
    t[5] = four * d[1] - five * d[3] + d[5];
  }
  static void InT(const fv t[6], fv d[6]) {
    const fv four = Splat(4.0f), five = Splat(5.0f), two = Splat(2.0f);
    const fv p = t[1] + t[2], q = t[1] - t[2], r = t[3] + t[4], s = t[3] - t[4];
    d[0] = four * t[0];
    d[1] = four * (t[5] - q) - two * s;
    d[2] = -five * t[0] - four * p - r;
    d[3] = q + two * s - five * t[5];
    d[4] = t[0] + p + r;
    d[5] = t[5];
  }
  static void Out(const fv m[6], fv y[4]) {
    const fv p = m[1] + m[2], q = m[1] - m[2], r = m[3] + m[4], s = m[3] - m[4];
    y[0] = m[0] + p + r;
    y[1] = q + Splat(2.0f) * s;
    y[2] = p + Splat(4.0f) * r;
    y[3] = q + Splat(8.0f) * s + m[5];
  }
  static void OutT(const fv g[4], fv m[6]) {
    const fv e = g[0] + g[2], o = g[1] + g[3];
    const fv e4 = g[0] + Splat(4.0f) * g[2], o8 = Splat(2.0f) * g[1] + Splat(8.0f) * g[3];
    m[0] = g[0];
    m[1] = e + o;
    m[2] = e - o;
    m[3] = e4 + o8;
    m[4] = e4 - o8;
    m[5] = g[3];
  }
};

// F(5x5, 3x3) (points 0, 1, -1, 2, -2, 1/2 and infinity; 7x7 windows, 49 products per 25
// outputs: 1.96 a output against F(2x2, 3x3)'s 4) for the two-layer op's second layer, whose
// 10x10 pooled conv outputs are 2x2 of its tiles (F(2x2, 3x3): 5x5 tiles, 400 products an image;
// here 196). B^T and A^T are exact in binary (halves, powers of two); G (in winograd.py) holds
// the thirds, ninths, fifteenths. Each 1-D transform is its constant matrix applied directly:
// the terms with a zero skipped and +-1 as additions at compile time (33 instructions per
// 7-point input transform, 22 per output transform, with multiply-adds).
template <int R, int N>
struct ConstMatrix {
  static constexpr int rows = R, cols = N;
  float c[R][N];
};

template <int R, int N>
constexpr ConstMatrix<N, R> Transposed(const ConstMatrix<R, N>& m) {
  ConstMatrix<N, R> t{};
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < N; ++j) t.c[j][i] = m.c[i][j];
  }
  return t;
}

template <const auto& C, int I, int J>
inline void MatrixTerm(fv& acc, const fv* in) {
  constexpr float w = C.c[I][J];
  if constexpr (w == 1.0f) {
    acc += in[J];
  } else if constexpr (w == -1.0f) {
    acc -= in[J];
  } else if constexpr (w != 0.0f) {
    acc += Splat(w) * in[J];
  }
}

template <const auto& C, int I, int... J>
inline fv MatrixRow(const fv* in, std::integer_sequence<int, J...>) {
  fv acc = -fv{};  // -0.0: adding it to the first term gives that term exactly.
  (MatrixTerm<C, I, J>(acc, in), ...);
  return acc;
}

// out = C in for a constant matrix C.
template <const auto& C, int... I>
inline void MatrixApply(const fv* in, fv* out, std::integer_sequence<int, I...>) {
  ((out[I] = MatrixRow<C, I>(in, std::make_integer_sequence<int, C.cols>{})), ...);
}

template <const auto& C>
inline void MatrixApply(const fv* in, fv* out) {
  MatrixApply<C>(in, out, std::make_integer_sequence<int, C.rows>{});
}

constexpr ConstMatrix<7, 7> kWino5BT = {{{-2, 4, 2.5f, -5, -0.5f, 1, 0},
                                         {0, 2, -2, -4.5f, 0.5f, 1, 0},
                                         {0, -2, 6, -3.5f, -1.5f, 1, 0},
                                         {0, 1, -1.5f, -2, 1.5f, 1, 0},
                                         {0, -1, 2.5f, 0, -2.5f, 1, 0},
                                         {0, 4, 0, -5, 0, 1, 0},
                                         {0, -2, 4, 2.5f, -5, -0.5f, 1}}};
constexpr ConstMatrix<5, 7> kWino5AT = {{{1, 1, 1, 1, 1, 1, 0},
                                         {0, 1, -1, 2, -2, 0.5f, 0},
                                         {0, 1, 1, 4, 4, 0.25f, 0},
                                         {0, 1, -1, 8, -8, 0.125f, 0},
                                         {0, 1, 1, 16, 16, 0.0625f, 1}}};
constexpr ConstMatrix<7, 7> kWino5B = Transposed(kWino5BT);
constexpr ConstMatrix<7, 5> kWino5A = Transposed(kWino5AT);

template <>
struct Wino<5> {
  static constexpr int A = 7;
  static void In(const fv d[7], fv t[7]) { MatrixApply<kWino5BT>(d, t); }
  static void InT(const fv t[7], fv d[7]) { MatrixApply<kWino5B>(t, d); }
  static void Out(const fv m[7], fv y[5]) { MatrixApply<kWino5AT>(m, y); }
  static void OutT(const fv g[5], fv m[7]) { MatrixApply<kWino5A>(g, m); }
};

// An image's tiles for F(m x m, 3 x 3): th x tw of them, c channels.
struct Tiles {
  int64_t n, h, w, c, th, tw;
  int64_t m = 2;
};

// A block of whole tile rows [i0, i1) of image b: what the fused kernels transform, multiply and
// transform back at a time, sized so its planes stay in a core's L2 cache (a 28x28 image's 196
// tiles at once were 1.2 MB in the backward with 32 input and output channels).
struct TileRows {
  int64_t b, i0, i1;
};

// f(i, j, t, cb) for each tile (i, j) of the block (t: its number within the block) and each
// channel block cb of s.c, in that order.
template <typename F>
inline void ForEachTile(const Tiles& s, const TileRows& r, const F& f) {
  for (int64_t i = r.i0; i < r.i1; ++i) {
    for (int64_t j = 0; j < s.tw; ++j) {
      for (int64_t cb = 0; cb < s.c; cb += L) f(i, j, (i - r.i0) * s.tw + j, cb);
    }
  }
}

// The first 64-byte boundary at or after p (buffers get kAlignPad floats more). The planes are
// read and written a vector at a time; at the 16-byte alignment malloc gives, each 16-float
// vector spanned two cache lines (the fused CNN layer's transforms and dU were 4-7 % slower,
// measured single-threaded on Zen 5).
constexpr int64_t kAlignPad = 64 / sizeof(float);
inline float* AlignUp(float* p) {
  const int64_t misaligned = reinterpret_cast<uintptr_t>(p) % 64 / sizeof(float);
  return p + (kAlignPad - misaligned) % kAlignPad;
}

// About kBlockTiles tiles per block (3 rows of 14...), or the whole image where that is one tile
// row more: cnn_bn's 7x7-tile layers ran as blocks of 6 rows and 1, and the second block's
// products (7 tiles) were mostly loading and storing accumulators; one block of 7 rows made those
// layers 4-6 % faster.
// The same count for F(4x4, 3x3) (36 planes a tile, 2.25 times F(2x2, 3x3)'s floats): measured
// single-threaded on Zen 5, its 28x28 layers (7 x 7 tiles) ran as fast or faster in one block
// than in blocks of 3 rows, at 16, 32 and 64 channels, and 56x56 ones with blocks of 42 tiles as
// with 21.
constexpr int64_t kBlockTiles = 48;
inline int64_t RowsPerBlock(const Tiles& s) {
  const int64_t rows = std::max<int64_t>(1, kBlockTiles / s.tw);
  return s.th <= rows + 1 ? s.th : rows;
}

// A block's P transformed planes: plane x, tile t (within the block), channel ch of `channels`
// at base[x * plane + t * channels + ch].

// V = B^T d B for the (M+2)^2 input window d of each tile of the block. Neighbouring windows
// share two columns: each column's vertical transform is computed once and carried to the next
// tile.
template <int M>
void InputTransformRows(const Tiles& s, const float* x, const TileRows& r, float* v,
                        int64_t plane) {
  constexpr int A = Wino<M>::A;
  const float* img = x + r.b * s.h * s.w * s.c;
  for (int64_t i = r.i0; i < r.i1; ++i) {
    for (int64_t cb = 0; cb < s.c; cb += L) {
      const float* window = img + M * i * s.w * s.c + cb;
      const auto column = [&](int64_t col, fv out[A]) {  // out[q] = (B^T d)[q] of x column col
        fv d[A];
        for (int q = 0; q < A; ++q) d[q] = Load(window + (q * s.w + col) * s.c);
        Wino<M>::In(d, out);
      };
      fv cols[A][A];  // cols[col][q] of the current window
      column(0, cols[0]);
      column(1, cols[1]);
      for (int64_t j = 0; j < s.tw; ++j) {
        for (int col = 2; col < A; ++col) column(M * j + col, cols[col]);
        float* vt = v + ((i - r.i0) * s.tw + j) * s.c + cb;
        for (int q = 0; q < A; ++q) {
          fv row[A], tr[A];
          for (int col = 0; col < A; ++col) row[col] = cols[col][q];
          Wino<M>::In(row, tr);
          for (int e = 0; e < A; ++e) Store(vt + (q * A + e) * plane, tr[e]);
        }
        for (int q = 0; q < A; ++q) {
          cols[0][q] = cols[M][q];
          cols[1][q] = cols[M + 1][q];
        }
      }
    }
  }
}

// Its transpose: each tile's B dV B^T into dx where the window came from. Neighbouring windows
// share two columns and two rows: a tile's last two columns are carried in registers and added
// to the next tile's first two, and a tile row's last two image rows are written (not added: no
// window above touched them) and the next tile row's first two added to them, so each element of
// dx is written once per tile row that covers it, with no zeroing first. Tile rows must come in
// order within an image (the first is row 0); what no window covers (an odd last row or column
// of a pooled layer's input) is left for ZeroUncovered.
template <int M>
void InputGradRows(const Tiles& s, const float* dv, int64_t plane, const TileRows& r, float* dx) {
  constexpr int A = Wino<M>::A;
  float* img = dx + r.b * s.h * s.w * s.c;
  for (int64_t i = r.i0; i < r.i1; ++i) {
    for (int64_t cb = 0; cb < s.c; cb += L) {
      float* window = img + M * i * s.w * s.c + cb;
      const auto put_column = [&](int64_t col, const fv d[A]) {
        for (int q = 0; q < A; ++q) {
          float* p = window + (q * s.w + col) * s.c;
          Store(p, q < 2 && i > 0 ? Load(p) + d[q] : d[q]);
        }
      };
      fv carry[2][A];  // The previous tile's last two columns: [col][q].
      for (int col = 0; col < 2; ++col) {
        for (int q = 0; q < A; ++q) carry[col][q] = Splat(0.0f);
      }
      for (int64_t j = 0; j < s.tw; ++j) {
        const float* dvt = dv + ((i - r.i0) * s.tw + j) * s.c + cb;
        fv rows[A][A];  // rows[q][col]
        for (int q = 0; q < A; ++q) {
          fv tr[A];
          for (int e = 0; e < A; ++e) tr[e] = Load(dvt + (q * A + e) * plane);
          Wino<M>::InT(tr, rows[q]);
        }
        fv cols[A][A];  // cols[col][q]
        for (int col = 0; col < A; ++col) {
          fv tr[A];
          for (int q = 0; q < A; ++q) tr[q] = rows[q][col];
          Wino<M>::InT(tr, cols[col]);
        }
        for (int col = 0; col < 2; ++col) {
          for (int q = 0; q < A; ++q) cols[col][q] += carry[col][q];
        }
        for (int col = 0; col < M; ++col) put_column(M * j + col, cols[col]);
        for (int q = 0; q < A; ++q) {
          carry[0][q] = cols[M][q];
          carry[1][q] = cols[M + 1][q];
        }
      }
      put_column(M * s.tw, carry[0]);
      put_column(M * s.tw + 1, carry[1]);
    }
  }
}

// Zeroes what no tile's window covers in an image's gradient: the rows from m th + 2 and the
// columns from m tw + 2 (an odd last row or column of a pooled layer's input).
void ZeroUncovered(const Tiles& s, float* img) {
  const int64_t rows = s.m * s.th + 2, cols = s.m * s.tw + 2;
  if (cols < s.w) {
    for (int64_t y = 0; y < rows; ++y) {
      std::fill(img + (y * s.w + cols) * s.c, img + (y + 1) * s.w * s.c, 0.0f);
    }
  }
  std::fill(img + rows * s.w * s.c, img + s.h * s.w * s.c, 0.0f);
}

// out = A^T m A of tile t, channels [kb, kb + L) of k: out[M a + e] is the output at (a, e).
template <int M>
inline void OutputTransform(const float* m, int64_t plane, int64_t t, int64_t k, int64_t kb,
                            fv out[M * M]) {
  constexpr int A = Wino<M>::A;
  fv h[A][M];  // h[col][a] = (A^T m)[a][col]
  for (int col = 0; col < A; ++col) {
    fv mc[A];
    for (int q = 0; q < A; ++q) mc[q] = Load(m + (q * A + col) * plane + t * k + kb);
    Wino<M>::Out(mc, h[col]);
  }
  for (int a = 0; a < M; ++a) {
    fv row[A];
    for (int col = 0; col < A; ++col) row[col] = h[col][a];
    Wino<M>::Out(row, out + M * a);
  }
}

// Its transpose: dM = A g A^T from the gradients g[M a + e] of tile t's outputs.
template <int M>
inline void OutputTransformT(const fv g[M * M], float* dm, int64_t plane, int64_t t, int64_t k,
                             int64_t kb) {
  constexpr int A = Wino<M>::A;
  fv h[M][A];  // h[a][col] = sum_e A^T[e][col] g[a][e]
  for (int a = 0; a < M; ++a) Wino<M>::OutT(g + M * a, h[a]);
  for (int col = 0; col < A; ++col) {
    fv column[M], rows[A];
    for (int a = 0; a < M; ++a) column[a] = h[a][col];
    Wino<M>::OutT(column, rows);
    for (int q = 0; q < A; ++q) Store(dm + (q * A + col) * plane + t * k + kb, rows[q]);
  }
}

// Pooled outputs (F(2x2, 3x3); s.c is K): y and the argmax [N, th, tw, K] of the block's tiles,
// with bias and ReLU.
void OutputPoolRows(const Tiles& s, const float* m, int64_t plane, const TileRows& r,
                    const float* bias, bool relu, float* y, int8_t* arg) {
  ForEachTile(s, r, [&](int64_t i, int64_t j, int64_t t, int64_t kb) {
    const int64_t o = ((r.b * s.th + i) * s.tw + j) * s.c;
    fv out[4];
    OutputTransform<2>(m, plane, t, s.c, kb, out);
    PoolStore(out, Load(bias + kb), relu, y + o + kb, arg + o + kb);
  });
}

// dM of the block's tiles from the pooled gradient at each window's winning output; the
// gradient that reaches an output is added to db (K / L vectors).
void OutputPoolGradRows(const Tiles& s, const float* dy, const int8_t* arg, const TileRows& r,
                        float* dm, int64_t plane, fv* db) {
  const fv zero = Splat(0.0f);
  ForEachTile(s, r, [&](int64_t i, int64_t j, int64_t t, int64_t kb) {
    const int64_t o = ((r.b * s.th + i) * s.tw + j) * s.c;
    const fv g = Load(dy + o + kb);
    const iv which = Widen(arg + o + kb);
    db[kb / L] += which < SplatI(kNoTap) ? g : zero;
    fv go[4];
    for (int q = 0; q < 4; ++q) go[q] = which == SplatI(q) ? g : zero;
    OutputTransformT<2>(go, dm, plane, t, s.c, kb);
  });
}

// F(5x5, 3x3) with the pool (s.m == 5, s.c is K; 5 th and 5 tw even): a 2x2 window can span
// two tiles, so per channel block an image's tiles put their conv outputs into `conv` (5 th x
// 5 tw vectors) and the windows are pooled from there. The image's tiles are tiles
// [0, th tw) of the planes m; y and arg [N, 5 th / 2, 5 tw / 2, K], image b.
void OutputPoolImage5(const Tiles& s, const float* m, int64_t plane, int64_t b, const float* bias,
                      bool relu, float* y, int8_t* arg, fv* conv) {
  const int64_t ow = 5 * s.tw, ph = 5 * s.th / 2, pw = 5 * s.tw / 2;
  for (int64_t kb = 0; kb < s.c; kb += L) {
    for (int64_t i = 0; i < s.th; ++i) {
      for (int64_t j = 0; j < s.tw; ++j) {
        fv out[25];
        OutputTransform<5>(m, plane, i * s.tw + j, s.c, kb, out);
#pragma GCC unroll 25
        for (int q = 0; q < 25; ++q) conv[(5 * i + q / 5) * ow + 5 * j + q % 5] = out[q];
      }
    }
    const fv add = Load(bias + kb);
    for (int64_t a = 0; a < ph; ++a) {
      for (int64_t e = 0; e < pw; ++e) {
        const fv* top = conv + 2 * a * ow + 2 * e;
        const fv window[4] = {top[0], top[1], top[ow], top[ow + 1]};
        const int64_t o = ((b * ph + a) * pw + e) * s.c + kb;
        PoolStore(window, add, relu, y + o, arg + o);
      }
    }
  }
}

// Its gradient: dM of image b's tiles (tiles [0, th tw) of the planes dm) from the pooled
// gradient at each window's winning output; what reaches an output is added to db.
void OutputPoolGradImage5(const Tiles& s, const float* dy, const int8_t* arg, int64_t b,
                          float* dm, int64_t plane, fv* db, fv* conv) {
  const int64_t ow = 5 * s.tw, ph = 5 * s.th / 2, pw = 5 * s.tw / 2;
  const fv zero = Splat(0.0f);
  for (int64_t kb = 0; kb < s.c; kb += L) {
    fv db_kb = db[kb / L];  // In a register (through db, a store and reload per window: db and
                            // conv are both fv*, so the compiler could not keep it).
    for (int64_t a = 0; a < ph; ++a) {  // The windows cover every conv output.
      for (int64_t e = 0; e < pw; ++e) {
        const int64_t o = ((b * ph + a) * pw + e) * s.c + kb;
        const fv g = Load(dy + o);
        const iv which = Widen(arg + o);
        db_kb += which < SplatI(kNoTap) ? g : zero;
        fv* top = conv + 2 * a * ow + 2 * e;
        top[0] = which == SplatI(0) ? g : zero;
        top[1] = which == SplatI(1) ? g : zero;
        top[ow] = which == SplatI(2) ? g : zero;
        top[ow + 1] = which == SplatI(3) ? g : zero;
      }
    }
    db[kb / L] = db_kb;
    for (int64_t i = 0; i < s.th; ++i) {
      for (int64_t j = 0; j < s.tw; ++j) {
        fv g[25];
#pragma GCC unroll 25
        for (int q = 0; q < 25; ++q) g[q] = conv[(5 * i + q / 5) * ow + 5 * j + q % 5];
        OutputTransformT<5>(g, dm, plane, i * s.tw + j, s.c, kb);
      }
    }
  }
}

// The plain convolution's outputs (s.c is K): y [N, M th, M tw, K], M x M per tile.
template <int M>
void OutputRows(const Tiles& s, const float* m, int64_t plane, const TileRows& r, float* y) {
  const int64_t oh = M * s.th, ow = M * s.tw;
  ForEachTile(s, r, [&](int64_t i, int64_t j, int64_t t, int64_t kb) {
    fv out[M * M];
    OutputTransform<M>(m, plane, t, s.c, kb, out);
    for (int q = 0; q < M * M; ++q) {
      Store(y + ((r.b * oh + M * i + q / M) * ow + M * j + q % M) * s.c + kb, out[q]);
    }
  });
}

// dM of the block's tiles from the plain convolution's output gradient dy [N, M th, M tw, K].
template <int M>
void OutputGradRows(const Tiles& s, const float* dy, const TileRows& r, float* dm,
                    int64_t plane) {
  const int64_t oh = M * s.th, ow = M * s.tw;
  ForEachTile(s, r, [&](int64_t i, int64_t j, int64_t t, int64_t kb) {
    fv g[M * M];
    for (int q = 0; q < M * M; ++q) {
      g[q] = Load(dy + ((r.b * oh + M * i + q / M) * ow + M * j + q % M) * s.c + kb);
    }
    OutputTransformT<M>(g, dm, plane, t, s.c, kb);
  });
}

ffi::Error TilesOf(ffi::Span<const int64_t> image, int64_t c, int64_t m, Tiles* s) {
  if (image.size() != 4 || image[1] < 4 || image[2] < 4 || c % L != 0) {
    return ffi::Error::InvalidArgument("fashion_jax winograd: expected images [N, H, W, C], "
                                       "H, W >= 4, C % " + std::to_string(L) + " == 0");
  }
  *s = Tiles{image[0], image[1], image[2], c, (image[1] - 2) / m, (image[2] - 2) / m, m};
  return ffi::Error::Success();
}

// The planes of F(m x m, 3 x 3): 16 for m = 2, 36 for m = 4.
constexpr int64_t Planes(int64_t m) { return (m + 2) * (m + 2); }

// The fused layers' shapes: x [N, H, W, C], U [P, C, K] (or U^T [P, K, C]) and y: pooled
// [N, (H-2)/2, (W-2)/2, K] (P = 16), or the plain convolution's [N, H-2, W-2, K] with H-2 and
// W-2 multiples of m (P = 16: m = 2, P = 36: m = 4); C and K multiples of L. Returns the tiles of
// x (c = C) and of y (c = K).
ffi::Error FusedShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> ud,
                       ffi::Span<const int64_t> yd, bool transposed, bool pooled, Tiles* sx,
                       Tiles* sy) {
  const int64_t m = ud.size() == 3 && ud[0] == Planes(4) && !pooled ? 4 : 2;
  if (ffi::Error e = TilesOf(xd, xd.size() == 4 ? xd[3] : 0, m, sx); e.failure()) return e;
  const int64_t k = yd.size() == 4 ? yd[3] : 0, scale = pooled ? 1 : m;
  const int64_t uc = transposed ? 2 : 1, uk = transposed ? 1 : 2;
  const bool whole = pooled || ((sx->h - 2) % m == 0 && (sx->w - 2) % m == 0);
  if (ud.size() != 3 || ud[0] != Planes(m) || ud[uc] != sx->c || ud[uk] != k || yd.size() != 4 ||
      yd[0] != sx->n || yd[1] != scale * sx->th || yd[2] != scale * sx->tw || k % L != 0 ||
      !whole) {
    return ffi::Error::InvalidArgument(
        "fashion_jax winograd conv: expected x [N, H, W, C], U [16, C, K] (U^T [16, K, C] for "
        "the gradient) and y [N, (H-2)/2, (W-2)/2, K] pooled or [N, H-2, W-2, K] with H, W even "
        "(U [36, ...]: H-2, W-2 multiples of 4, not pooled), K % " + std::to_string(L) + " == 0");
  }
  *sy = Tiles{sx->n, sx->h, sx->w, k, sx->th, sx->tw, m};
  return ffi::Error::Success();
}

// Floats of a block's planes: V and M forward, V (then dV) and dM backward.
inline int64_t BlockTiles(const Tiles& sx) { return RowsPerBlock(sx) * sx.tw; }
inline int64_t ForwardPlaneFloats(const Tiles& sx, int64_t k) {
  return Planes(sx.m) * BlockTiles(sx) * (sx.c + k);
}
inline int64_t BackwardPlaneFloats(const Tiles& sx, int64_t k) {
  return Planes(sx.m) * BlockTiles(sx) * (sx.c + k);
}

// One image of the fused Winograd layer, forward: x_img is the image (sx's shape), b its index
// among the outputs. A block of tile rows at a time in cache: V = B^T d B, the 16 per-tile
// channel products M = V U (the register-blocked micro-kernel), then out(rows, M, plane) writes
// the block's outputs (pooled or not). XLA's matmuls between separate transforms had written
// and re-read [16, tiles, K] planes (26 MB at batch 256). planes: ForwardPlaneFloats, aligned.
template <int M, typename Out>
void WinogradImageForward(const Tiles& sx, int64_t k, const float* x_img, int64_t b,
                          const float* u, float* planes, const Out& out) {
  constexpr int64_t P = Planes(M);
  const int64_t c = sx.c, rows = RowsPerBlock(sx), block = BlockTiles(sx);
  float* v = planes;
  float* m = v + P * block * c;
  for (int64_t i0 = 0; i0 < sx.th; i0 += rows) {
    const int64_t i1 = std::min(i0 + rows, sx.th), tiles = (i1 - i0) * sx.tw;
    InputTransformRows<M>(sx, x_img, TileRows{0, i0, i1}, v, block * c);  // The image's rows.
    for (int p = 0; p < P; ++p) {
      Gemm(v + p * block * c, c, 1, u + p * c * k, k, m + p * block * k, k, tiles, c, k, false);
    }
    out(TileRows{b, i0, i1}, m, block * k);
  }
}

template <int M, typename Pool, typename Out>
void WinogradFusedForward(Pool& pool, const Tiles& sx, int64_t k, const float* x, const float* u,
                          const Out& out) {
  ParallelFor(pool, sx.n, [&](int64_t b) {
    thread_local std::vector<float> scratch;
    scratch.resize(ForwardPlaneFloats(sx, k) + kAlignPad);
    WinogradImageForward<M>(sx, k, x + b * sx.h * sx.w * sx.c, b, u, AlignUp(scratch.data()), out);
  });
}

// The backward of one image: per block, V again from x_img, dM = out_grad(rows, dM, plane, db)
// (which adds the bias gradient, if the layer has one, to db: K / L vectors), dU += V^T dM (into
// du_acc [P, C, K]; with du_fresh, its first block's sums are written, not added), then
// dV = dM U^T over V's plane, which dU has used (its transform written into dx_img). A set of
// planes less in cache (the CNN's backward kept V, dM, dV, U^T and dU, ~510 KB, in Zen 3's
// 512 KB L2; as fast there without dV's). planes: BackwardPlaneFloats, aligned.
template <int M, typename OutGrad>
void WinogradImageBackward(const Tiles& sx, int64_t k, const float* x_img, int64_t b,
                           const float* ut, const OutGrad& out_grad, float* planes, float* dx_img,
                           float* du_acc, bool du_fresh, fv* db_acc) {
  constexpr int64_t P = Planes(M);
  const int64_t c = sx.c, rows = RowsPerBlock(sx), block = BlockTiles(sx);
  float* v = planes;
  float* dm = v + P * block * c;
  float* dv = v;
  ZeroUncovered(sx, dx_img);
  for (int64_t i0 = 0; i0 < sx.th; i0 += rows) {
    const int64_t i1 = std::min(i0 + rows, sx.th), tiles = (i1 - i0) * sx.tw;
    const TileRows own{0, i0, i1};
    InputTransformRows<M>(sx, x_img, own, v, block * c);
    out_grad(TileRows{b, i0, i1}, dm, block * k, db_acc);
    for (int p = 0; p < P; ++p) {
      const float* dmp = dm + p * block * k;
      Gemm(v + p * block * c, 1, c, dmp, k, du_acc + p * c * k, k, c, tiles, k,
           !du_fresh || i0 > 0);
      Gemm(dmp, k, 1, ut + p * k * c, c, dv + p * block * c, c, tiles, k, c, false);
    }
    InputGradRows<M>(sx, dv, block * c, own, dx_img);
  }
}

// Gradients are summed per fixed chunk of images, then over the chunks in order, so they do not
// depend on the thread count.
constexpr int64_t kWinogradGradChunks = 16;

inline int64_t GradChunks(int64_t n) {
  return std::max<int64_t>(1, std::min(kWinogradGradChunks, n));
}

// Adds chunks 1.. of `partial` (each `stride` floats, `used` of them summed) into chunk 0, in
// order; returns chunk 0. Slices of the floats in parallel, each summed over the chunks in the
// same order, so the result does not depend on the split. (On one thread the CNN's 16 chunks of
// 33 K floats took ~70 us on Zen 3, 5 % of its backward at batch 32; each core now sums half.)
constexpr int64_t kSumSlice = 4096;

template <typename Pool>
float* SumChunks(Pool& pool, float* partial, int64_t chunks, int64_t stride, int64_t used) {
  ParallelFor(pool, (used + kSumSlice - 1) / kSumSlice, [&](int64_t slice) {
    const int64_t lo = slice * kSumSlice, hi = std::min(used, lo + kSumSlice);
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const float* acc = partial + chunk * stride;
      for (int64_t i = lo; i < hi; ++i) partial[i] += acc[i];
    }
  });
  return partial;
}

// The fused Winograd layer, backward: dx, dU [P, C, K] and (db != nullptr) db [K].
template <int M, typename Pool, typename OutGrad>
void WinogradFusedBackward(Pool& pool, const Tiles& sx, int64_t k, const float* x,
                           const float* ut, const OutGrad& out_grad, float* dx, float* du,
                           float* db) {
  const int64_t c = sx.c, nuk = Planes(M) * c * k;
  const int64_t nu = nuk + (db != nullptr ? k : 0), image = sx.h * sx.w * c;
  if (sx.n == 0) {  // No images: zero gradients (a chunk writes its dU at its first image; with
                    // none, dU was whatever the buffer held: garbage, often NaN).
    std::fill(du, du + nuk, 0.0f);
    if (db != nullptr) std::fill(db, db + k, 0.0f);
    return;
  }
  const int64_t chunks = GradChunks(sx.n);
  // Per chunk: dU [P, C, K], then db [K]. The chunk's first image writes its dU and db is
  // stored at the end, so nothing is zeroed first (a pass over 2 MB at batch 32 for the CNN).
  std::unique_ptr<float[]> partial_buffer(new float[chunks * nu + kAlignPad]);
  float* const partial = AlignUp(partial_buffer.get());
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    thread_local std::vector<float> scratch;
    scratch.resize(BackwardPlaneFloats(sx, k) + kAlignPad);
    float* acc = partial + chunk * nu;
    std::vector<fv> db_acc(k / L, Splat(0.0f));
    const int64_t first = sx.n * chunk / chunks;
    for (int64_t b = first; b < sx.n * (chunk + 1) / chunks; ++b) {
      WinogradImageBackward<M>(sx, k, x + b * image, b, ut, out_grad, AlignUp(scratch.data()),
                               dx + b * image, acc, b == first, db_acc.data());
    }
    if (db != nullptr) {
      for (int64_t kb = 0; kb < k; kb += L) Store(acc + nuk + kb, db_acc[kb / L]);
    }
  });
  const float* total = SumChunks(pool, partial, chunks, nu, nu);
  std::copy(total, total + nuk, du);
  if (db != nullptr) std::copy(total + nuk, total + nu, db);
}

// Conv + pool (+ ReLU): y, argmax = pool(A^T [(B^T d B) U] A) + bias.
template <typename Pool>
void WinogradConvPoolForwardCore(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                                 const float* u, const float* bias, bool relu, float* y,
                                 int8_t* arg) {
  WinogradFusedForward<2>(pool, sx, sy.c, x, u,
                          [&](const TileRows& r, const float* m, int64_t plane) {
                            OutputPoolRows(sy, m, plane, r, bias, relu, y, arg);
                          });
}

template <typename Pool>
void WinogradConvPoolBackwardCore(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                                  const float* ut, const int8_t* arg, const float* dy, float* dx,
                                  float* du, float* db) {
  WinogradFusedBackward<2>(
      pool, sx, sy.c, x, ut,
      [&](const TileRows& r, float* dm, int64_t plane, fv* db_acc) {
        OutputPoolGradRows(sy, dy, arg, r, dm, plane, db_acc);
      },
      dx, du, db);
}

// The plain VALID 3x3 convolution (no bias: the caller adds it), y [N, H-2, W-2, K], by
// F(M x M, 3 x 3); the Core functions take M from sx.m.
template <int M, typename Pool>
void WinogradPlainForward(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                          const float* u, float* y) {
  WinogradFusedForward<M>(pool, sx, sy.c, x, u,
                          [&](const TileRows& r, const float* m, int64_t plane) {
                            OutputRows<M>(sy, m, plane, r, y);
                          });
}

template <int M, typename Pool>
void WinogradPlainBackward(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                          const float* ut, const float* dy, float* dx, float* du) {
  WinogradFusedBackward<M>(
      pool, sx, sy.c, x, ut,
      [&](const TileRows& r, float* dm, int64_t plane, fv*) {
        OutputGradRows<M>(sy, dy, r, dm, plane);
      },
      dx, du, static_cast<float*>(nullptr));
}

template <typename Pool>
void WinogradConvForwardCore(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                             const float* u, float* y) {
  if (sx.m == 4) {
    WinogradPlainForward<4>(pool, sx, sy, x, u, y);
  } else {
    WinogradPlainForward<2>(pool, sx, sy, x, u, y);
  }
}

template <typename Pool>
void WinogradConvBackwardCore(Pool& pool, const Tiles& sx, const Tiles& sy, const float* x,
                              const float* ut, const float* dy, float* dx, float* du) {
  if (sx.m == 4) {
    WinogradPlainBackward<4>(pool, sx, sy, x, ut, dy, dx, du);
  } else {
    WinogradPlainBackward<2>(pool, sx, sy, x, ut, dy, dx, du);
  }
}

ffi::Error WinogradConvPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> bias,
                                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> arg,
                                   int32_t relu) {
  Tiles sx, sy;
  if (ffi::Error e = FusedShapes(x.dimensions(), u.dimensions(), y->dimensions(), false, true,
                                 &sx, &sy);
      e.failure()) {
    return e;
  }
  if (bias.element_count() != static_cast<size_t>(sy.c) ||
      arg->element_count() != y->element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax winograd conv+pool: expected bias [K] and the "
                                       "argmax y's shape");
  }
  WinogradConvPoolForwardCore(pool, sx, sy, x.typed_data(), u.typed_data(), bias.typed_data(),
                              relu != 0, y->typed_data(), arg->typed_data());
  return ffi::Error::Success();
}

ffi::Error WinogradConvPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::F32> ut, ffi::Buffer<ffi::S8> arg,
                                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                                    ffi::ResultBuffer<ffi::F32> du,
                                    ffi::ResultBuffer<ffi::F32> db) {
  Tiles sx, sy;
  if (ffi::Error e = FusedShapes(x.dimensions(), ut.dimensions(), dy.dimensions(), true, true,
                                 &sx, &sy);
      e.failure()) {
    return e;
  }
  if (arg.dimensions().size() != 4 || arg.element_count() != dy.element_count() ||
      dx->element_count() != x.element_count() || du->element_count() != ut.element_count() ||
      db->element_count() != static_cast<size_t>(sy.c)) {
    return ffi::Error::InvalidArgument("fashion_jax winograd conv+pool gradient: shapes differ");
  }
  WinogradConvPoolBackwardCore(pool, sx, sy, x.typed_data(), ut.typed_data(), arg.typed_data(),
                               dy.typed_data(), dx->typed_data(), du->typed_data(),
                               db->typed_data());
  return ffi::Error::Success();
}

ffi::Error WinogradConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> y) {
  Tiles sx, sy;
  if (ffi::Error e = FusedShapes(x.dimensions(), u.dimensions(), y->dimensions(), false, false,
                                 &sx, &sy);
      e.failure()) {
    return e;
  }
  WinogradConvForwardCore(pool, sx, sy, x.typed_data(), u.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error WinogradConvBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> ut, ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> du) {
  Tiles sx, sy;
  if (ffi::Error e = FusedShapes(x.dimensions(), ut.dimensions(), dy.dimensions(), true, false,
                                 &sx, &sy);
      e.failure()) {
    return e;
  }
  if (dx->element_count() != x.element_count() || du->element_count() != ut.element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax winograd conv gradient: shapes differ");
  }
  WinogradConvBackwardCore(pool, sx, sy, x.typed_data(), ut.typed_data(), dy.typed_data(),
                           dx->typed_data(), du->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The filter transform U = G g G^T of each (input, output) channel pair, and its transpose for
// the kernel's gradient, dg = G^T dU G: kernel [3, 3, C, K] <-> U [P, C, K] (P = (M+2)^2), or
// U^T [P, K, C] (the fused backward's operand), for F(2x2, 3x3), F(4x4, 3x3) and F(5x5, 3x3).
// XLA ran them as a [P, 9] x [9, C K] matmul, then U^T as a transpose copy of U, and the
// gradient as [9, P] x [P, C K]: for the CNN's 32 -> 64 layer 83 us of a 1.17 ms step at batch 32
// on Zen 4. Here each is two 1-D passes of the (M+2) x 3 matrix G (210 multiply-adds a pair for
// F(5x5, 3x3), not 441), L pairs at a time, and U^T is written directly: ~18 + 26 + 17 us, each
// bound by its 400 KB of U written or read (the step: 1.15 -> 1.12 ms). G's entries are
// winograd.py's _G, _G4 and _G5 in float32; the two passes round differently from the Kronecker
// matrix's one (a few ulp).

constexpr ConstMatrix<4, 3> kWino2G = {{{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f},
                                        {0, 0, 1}}};
constexpr ConstMatrix<6, 3> kWino4G = {{{1.0f / 4, 0, 0},
                                        {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                        {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                        {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                        {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                        {0, 0, 1}}};
constexpr ConstMatrix<7, 3> kWino5G = {{{-1.0f / 2, 0, 0},
                                        {-1.0f / 3, -1.0f / 3, -1.0f / 3},
                                        {1.0f / 9, -1.0f / 9, 1.0f / 9},
                                        {1.0f / 36, 1.0f / 18, 1.0f / 9},
                                        {-1.0f / 60, 1.0f / 30, -1.0f / 15},
                                        {32.0f / 45, 16.0f / 45, 8.0f / 45},
                                        {0, 0, 1}}};
constexpr ConstMatrix<3, 4> kWino2GT = Transposed(kWino2G);
constexpr ConstMatrix<3, 6> kWino4GT = Transposed(kWino4G);
constexpr ConstMatrix<3, 7> kWino5GT = Transposed(kWino5G);

// U of L pairs (g[ky * 3 + kx] one vector of them per tap) into u[a * A + b] (A = rows of G).
template <const auto& G>
inline void FilterTransformVectors(const fv g[9], fv* u) {
  constexpr int A = G.rows;
  fv t[3][A];  // t[kx][a] = (G g)[a][kx]
  for (int kx = 0; kx < 3; ++kx) {
    const fv column[3] = {g[kx], g[3 + kx], g[6 + kx]};
    MatrixApply<G>(column, t[kx]);
  }
  for (int a = 0; a < A; ++a) {
    const fv row[3] = {t[0][a], t[1][a], t[2][a]};
    MatrixApply<G>(row, u + a * A);
  }
}

// Its transpose: g[ky * 3 + kx] = (G^T du G)[ky][kx] from du[a * A + b].
template <const auto& G, const auto& GT>
inline void FilterGradVectors(const fv* du, fv g[9]) {
  constexpr int A = G.rows;
  fv t[A][3];  // t[a][kx] = (du G)[a][kx]
  for (int a = 0; a < A; ++a) MatrixApply<GT>(du + a * A, t[a]);
  for (int kx = 0; kx < 3; ++kx) {
    fv column[A], out[3];
    for (int a = 0; a < A; ++a) column[a] = t[a][kx];
    MatrixApply<GT>(column, out);
    for (int ky = 0; ky < 3; ++ky) g[ky * 3 + kx] = out[ky];
  }
}

// kernel [9, C, K] -> u [P, C, K], or (transposed) u^T [P, K, C]: per task 8 rows (C, or K), up
// to 4 vectors of the last axis (K, or C) at a time, stored plane by plane: 256 contiguous bytes
// a plane and row, not one vector 49 planes apart (that scatter took twice as long). The
// transposed form reads the kernel's lanes across C (stride K) through a transposed copy.
template <const auto& G, typename Pool>
void FilterTransformCore(Pool& pool, const float* g, int64_t c, int64_t k, bool transposed,
                         float* u) {
  constexpr int64_t P = G.rows * G.rows, kRows = 8, kVectors = 4;
  const int64_t lanes = transposed ? c : k, rows = transposed ? k : c;
  ParallelFor(pool, (rows + kRows - 1) / kRows, [&](int64_t task) {
    const int64_t r0 = task * kRows, count = std::min(kRows, rows - r0);
    float copy[9 * kRows * kVectors * L];  // [tap][row][lane]
    fv out[kVectors][P];
    for (int64_t j0 = 0; j0 < lanes; j0 += kVectors * L) {
      const int64_t vectors = std::min(kVectors, (lanes - j0) / L);
      if (transposed) {
        for (int t = 0; t < 9; ++t) {
          for (int64_t l = 0; l < vectors * L; ++l) {
            const float* src = g + (t * c + j0 + l) * k + r0;
            for (int64_t r = 0; r < count; ++r) copy[(t * kRows + r) * kVectors * L + l] = src[r];
          }
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        for (int64_t v = 0; v < vectors; ++v) {
          fv taps[9];
          for (int t = 0; t < 9; ++t) {
            taps[t] = transposed ? Load(copy + (t * kRows + r) * kVectors * L + v * L)
                                 : Load(g + (t * c + r0 + r) * k + j0 + v * L);
          }
          FilterTransformVectors<G>(taps, out[v]);
        }
        for (int64_t p = 0; p < P; ++p) {
          for (int64_t v = 0; v < vectors; ++v) {
            Store(u + (p * rows + r0 + r) * lanes + j0 + v * L, out[v][p]);
          }
        }
      }
    }
  });
}

// du [P, C, K] -> the kernel's gradient [9, C, K]: per task a block of L output channels.
template <const auto& G, const auto& GT, typename Pool>
void FilterGradCore(Pool& pool, const float* du, int64_t c, int64_t k, float* g) {
  constexpr int64_t P = G.rows * G.rows;
  ParallelFor(pool, k / L, [&](int64_t block) {
    const int64_t j0 = block * L;
    for (int64_t r = 0; r < c; ++r) {
      fv in[P], taps[9];
      for (int64_t p = 0; p < P; ++p) in[p] = Load(du + (p * c + r) * k + j0);
      FilterGradVectors<G, GT>(in, taps);
      for (int t = 0; t < 9; ++t) Store(g + (t * c + r) * k + j0, taps[t]);
    }
  });
}

// U (transposed: U^T) for F(m x m, 3 x 3), m 2, 4 or 5.
template <typename Pool>
void FilterTransform(Pool& pool, int m, const float* g, int64_t c, int64_t k, bool transposed,
                     float* u) {
  if (m == 2) FilterTransformCore<kWino2G>(pool, g, c, k, transposed, u);
  if (m == 4) FilterTransformCore<kWino4G>(pool, g, c, k, transposed, u);
  if (m == 5) FilterTransformCore<kWino5G>(pool, g, c, k, transposed, u);
}

// The gradient for F(m x m, 3 x 3), m 2, 4 or 5.
template <typename Pool>
void FilterGrad(Pool& pool, int m, const float* du, int64_t c, int64_t k, float* g) {
  if (m == 2) FilterGradCore<kWino2G, kWino2GT>(pool, du, c, k, g);
  if (m == 4) FilterGradCore<kWino4G, kWino4GT>(pool, du, c, k, g);
  if (m == 5) FilterGradCore<kWino5G, kWino5GT>(pool, du, c, k, g);
}

// kernel [3, 3, C, K] and U [P, C, K] (U^T [P, K, C] if transposed): checks, and M from P.
ffi::Error FilterShapes(ffi::Span<const int64_t> gd, ffi::Span<const int64_t> ud,
                        bool transposed, int* m) {
  const bool ok = gd.size() == 4 && gd[0] == 3 && gd[1] == 3 && gd[2] % L == 0 &&
                  gd[3] % L == 0 && gd[2] > 0 && gd[3] > 0 && ud.size() == 3 &&
                  ud[1] == gd[transposed ? 3 : 2] && ud[2] == gd[transposed ? 2 : 3];
  *m = !ok ? 0 : ud[0] == Planes(2) ? 2 : ud[0] == Planes(4) ? 4 : ud[0] == Planes(5) ? 5 : 0;
  if (*m == 0) {
    return ffi::Error::InvalidArgument(
        "fashion_jax filter transform: expected a kernel [3, 3, C, K] and U [P, C, K] (U^T "
        "[P, K, C] if transposed) with P 16, 36 or 49 and C, K multiples of " +
        std::to_string(L));
  }
  return ffi::Error::Success();
}

ffi::Error FilterTransformHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> u, int32_t transposed) {
  int m;
  if (ffi::Error e = FilterShapes(g.dimensions(), u->dimensions(), transposed != 0, &m);
      e.failure()) {
    return e;
  }
  FilterTransform(pool, m, g.typed_data(), g.dimensions()[2], g.dimensions()[3], transposed != 0,
                  u->typed_data());
  return ffi::Error::Success();
}

ffi::Error FilterTransformGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> du,
                                      ffi::ResultBuffer<ffi::F32> g) {
  int m;
  if (ffi::Error e = FilterShapes(g->dimensions(), du.dimensions(), false, &m); e.failure()) {
    return e;
  }
  FilterGrad(pool, m, du.typed_data(), g->dimensions()[2], g->dimensions()[3], g->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Two conv + pool layers as one op (the classic CNN's: the direct kernel's layer, then a fused
// Winograd one on its output). Per image, the first layer writes its pooled output h and argmax
// into the thread's buffers and the second reads h from there: for inference h (13x13x32 floats
// for the CNN, 11 MB at batch 512) never goes to memory, where the separate layers wrote it once
// and read it twice. Training's forward also writes h and the argmax out, once, as the backward's
// residuals (27 KB an image for the CNN); the backward reads them there. (Recomputing the first
// layer in the backward instead took 5-10 % longer on Zen 3, AVX2: BENCHMARKS.md, session 19.)
// The backward runs the second layer's backward into dh, in cache, and the first layer's kernel
// and bias gradients from dh. Gradients are summed per fixed chunk of images, then over the
// chunks in order, so they do not depend on the thread count.

// The shapes: s1 the first layer's (x [N, H, W, Cin], its pooled output [N, hp, wp, C]), sx the
// second layer's input tiles (h) and sy its pooled output's (K channels).
struct TwoLayers {
  Shape s1;
  Tiles sx, sy;
};

// Per thread: h and dh (C-channel images, aligned), the first layer's argmax, the blocks' planes
// (plane_floats) and `conv` vectors (OutputPoolImage5's buffer).
struct TwoLayerScratch {
  float* h;
  float* dh;
  int8_t* arg;
  float* planes;
  fv* conv;
};

inline TwoLayerScratch TwoLayerBuffers(const TwoLayers& t, int64_t plane_floats,
                                       int64_t conv_vectors = 0) {
  thread_local std::vector<float> floats;
  thread_local std::vector<int8_t> bytes;
  thread_local std::vector<fv> conv;
  const int64_t image = t.s1.hp * t.s1.wp * t.s1.cout;
  const int64_t padded = (image + kAlignPad - 1) / kAlignPad * kAlignPad;
  floats.resize(2 * padded + plane_floats + kAlignPad);
  bytes.resize(image);
  conv.resize(conv_vectors);
  float* h = AlignUp(floats.data());
  return TwoLayerScratch{h, h + padded, bytes.data(), h + 2 * padded, conv.data()};
}

// A chunk's sums after its images (db2, the first layer's dk1 and db1, each L-vector
// accumulators) into its partial buffer after its second-layer part (nuk floats), and the totals
// over the chunks out (du or the second kernel's gradient dk2, db2, dk1, db1), for both forms of
// the second layer. Where the op returns dk2, each chunk transforms its own dU to its part of dk2
// while dU is in its core's L2, and the chunks sum those: a [9, C, K] part a
// chunk, not dU's [P, C, K] (the CNN's 16 chunks wrote 400 KB each to memory, summed after).
struct TwoLayerGradSums {
  int64_t nuk, k, c, cin;
  int64_t used() const { return nuk + k + 9 * cin * c + c; }

  void Write(float* acc, const std::vector<fv>& db2, const std::vector<fv>& gw,
             const std::vector<fv>& gb) const {
    float* adb2 = acc + nuk;
    float* adk1 = adb2 + k;
    float* adb1 = adk1 + 9 * cin * c;
    for (int64_t kb = 0; kb < k; kb += L) Store(adb2 + kb, db2[kb / L]);
    for (int64_t cb = 0; cb < c; cb += L) {
      for (int64_t tap = 0; tap < 9 * cin; ++tap) {
        Store(adk1 + tap * c + cb, gw[cb / L * 9 * cin + tap]);
      }
      Store(adb1 + cb, gb[cb / L]);
    }
  }

  // The totals' first nuk floats (dU, or the chunks' parts of dk2 summed) into du or dk2.
  void CopyOut(const float* total, float* du, float* dk2, float* db2, float* dk1,
               float* db1) const {
    const int64_t nk1 = 9 * cin * c;
    std::copy(total, total + nuk, dk2 != nullptr ? dk2 : du);
    std::copy(total + nuk, total + nuk + k, db2);
    std::copy(total + nuk + k, total + nuk + k + nk1, dk1);
    std::copy(total + nuk + k + nk1, total + used(), db1);
  }
};

// ParallelFor's pool for work inside a task: the calling thread does it all.
struct OneThread {
  int64_t num_threads() const { return 1; }
  template <typename T>
  void Schedule(T&&) {}
};

// Where a chunk sums its dU [P, C, K]: in place in its partial (`acc`), or, with the kernel's
// gradient as the output, the thread's buffer (aligned), which the chunk then transforms into
// `acc` (FilterGrad on OneThread).
inline float* ChunkDu(bool kernel_grad, int64_t floats, float* acc) {
  if (!kernel_grad) return acc;
  thread_local std::vector<float> du;
  du.resize(floats + kAlignPad);
  return AlignUp(du.data());
}

// h_out, arg1_out: nullptr (inference), or where the first layer's output and argmax go
// [N, hp, wp, C] (training).
template <int CIN, typename Pool>
void TwoLayerForward(Pool& pool, const TwoLayers& t, const float* x, const float* k1,
                     const float* b1, bool relu1, const float* u, const float* b2, bool relu2,
                     float* y, int8_t* arg, float* h_out, int8_t* arg1_out) {
  const int64_t k = t.sy.c, image = t.s1.hp * t.s1.wp * t.s1.cout;
  ParallelFor(pool, t.s1.n, [&](int64_t b) {
    const TwoLayerScratch buf = TwoLayerBuffers(t, ForwardPlaneFloats(t.sx, k));
    float* const h = h_out != nullptr ? h_out + b * image : buf.h;
    int8_t* const arg1 = h_out != nullptr ? arg1_out + b * image : buf.arg;
    ImageForward<CIN>(t.s1, x + b * t.s1.h * t.s1.w * t.s1.cin, k1, b1, relu1, h, arg1);
    WinogradImageForward<2>(t.sx, k, h, b, u, buf.planes,
                         [&](const TileRows& r, const float* m, int64_t plane) {
                           OutputPoolRows(t.sy, m, plane, r, b2, relu2, y, arg);
                         });
  });
}

// h, arg1: the forward's h_out, arg1_out.
template <int CIN, typename Pool>
void TwoLayerBackward(Pool& pool, const TwoLayers& t, const float* x, const float* h,
                      const int8_t* arg1, const float* ut, const int8_t* arg2, const float* dy,
                      float* dk1, float* db1, float* du, float* db2, float* dk2) {
  const int64_t c = t.sx.c, k = t.sy.c, cin = t.s1.cin, image = t.s1.hp * t.s1.wp * c;
  // Per chunk: dU [16, C, K] (or its part of dk2 [9, C, K]), db2 [K], dk1 [3, 3, Cin, C],
  // db1 [C], padded to whole vectors.
  const bool kernel_grad = dk2 != nullptr;
  const TwoLayerGradSums sums{(kernel_grad ? 9 : 16) * c * k, k, c, cin};
  const int64_t nu = (sums.used() + kAlignPad - 1) / kAlignPad * kAlignPad;
  const int64_t chunks = GradChunks(t.s1.n);
  std::unique_ptr<float[]> partial_buffer(new float[chunks * nu + kAlignPad]);
  float* const partial = AlignUp(partial_buffer.get());
  const auto out_grad = [&](const TileRows& r, float* dm, int64_t plane, fv* db_acc) {
    OutputPoolGradRows(t.sy, dy, arg2, r, dm, plane, db_acc);
  };
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const TwoLayerScratch buf = TwoLayerBuffers(t, BackwardPlaneFloats(t.sx, k));
    float* acc = partial + chunk * nu;  // Written, not zeroed: see WinogradFusedBackward.
    float* du_acc = ChunkDu(kernel_grad, 16 * c * k, acc);
    std::vector<fv> db2_acc(k / L, Splat(0.0f));
    std::vector<fv> gw(9 * cin * (c / L), Splat(0.0f));  // [block][tap, ci]
    std::vector<fv> gb(c / L, Splat(0.0f));
    const int64_t first = t.s1.n * chunk / chunks;
    for (int64_t b = first; b < t.s1.n * (chunk + 1) / chunks; ++b) {
      const float* xb = x + b * t.s1.h * t.s1.w * cin;
      WinogradImageBackward<2>(t.sx, k, h + b * image, b, ut, out_grad, buf.planes, buf.dh,
                               du_acc, b == first, db2_acc.data());
      for (int64_t cb = 0; cb < c; cb += L) {
        BackwardBlock<CIN, 1, true>(t.s1, xb, arg1 + b * image, buf.dh,
                                    gw.data() + cb / L * 9 * cin, gb.data() + cb / L, cb);
      }
    }
    if (kernel_grad) {
      OneThread one;
      FilterGrad(one, 2, du_acc, c, k, acc);
    }
    sums.Write(acc, db2_acc, gw, gb);
  });
  sums.CopyOut(SumChunks(pool, partial, chunks, nu, sums.used()), du, dk2, db2, dk1, db1);
}

// The second layer as F(5x5, 3x3) (t.sx.m == 5): an image has few tiles (the CNN's 2x2), so the
// products run on a group of images' tiles at once (kGroupTiles or more): per plane one
// [tiles, C] x [C, K] product for the group, U's plane read once for it, and dU's sums over the
// group's tiles, not one image's 4. Per group, in cache: h, the planes V and M (or dM) and U.
constexpr int64_t kGroupTiles = 32;

inline int64_t GroupImages(const Tiles& sx) {
  return std::max<int64_t>(1, kGroupTiles / (sx.th * sx.tw));
}

// A group's plane of `channels`-channel tiles, in floats: one cache line more than its tiles.
// Without it the planes (32 tiles x 32 or 64 channels: 4 or 8 KB) lie a power of two apart, and
// a tile's 49 values, one per plane, all fall in the same set of the 8-way L1 cache: the
// transforms that read or write them ran 2-3 times slower (Zen 3, per image: input transform
// 4.5 -> 1.3 us, pooled outputs 7.0 -> 3.0, their gradient 9.3 -> 3.1).
inline int64_t GroupPlane(int64_t tiles, int64_t channels) { return tiles * channels + kAlignPad; }

// A group's scratch: its planes (V and M or dM), an image's conv outputs per channel block
// (OutputPoolImage5), and h, dh and the argmax of the image being transformed (inference's h is
// transformed right after the first layer writes it, so one image's is enough).
inline TwoLayerScratch GroupBuffers(const TwoLayers& t, int64_t images) {
  const int64_t tiles = images * t.sx.th * t.sx.tw;
  return TwoLayerBuffers(t, Planes(5) * (GroupPlane(tiles, t.sx.c) + GroupPlane(tiles, t.sy.c)),
                         25 * t.sx.th * t.sx.tw);
}

template <int CIN, typename Pool>
void TwoLayerForward5(Pool& pool, const TwoLayers& t, const float* x, const float* k1,
                      const float* b1, bool relu1, const float* u, const float* b2, bool relu2,
                      float* y, int8_t* arg, float* h_out, int8_t* arg1_out) {
  constexpr int64_t P = Planes(5);
  const Shape& s1 = t.s1;
  const int64_t c = t.sx.c, k = t.sy.c, image = s1.hp * s1.wp * c;
  const int64_t per = t.sx.th * t.sx.tw, group = GroupImages(t.sx), block = group * per;
  const int64_t pv = GroupPlane(block, c), pm = GroupPlane(block, k);
  ParallelFor(pool, (t.s1.n + group - 1) / group, [&](int64_t g) {
    const TwoLayerScratch buf = GroupBuffers(t, group);
    float* v = buf.planes;
    float* m = v + P * pv;
    const int64_t b0 = g * group, count = std::min(group, t.s1.n - b0);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t b = b0 + i;
      float* const h = h_out != nullptr ? h_out + b * image : buf.h;
      int8_t* const arg1 = h_out != nullptr ? arg1_out + b * image : buf.arg;
      ImageForward<CIN>(s1, x + b * s1.h * s1.w * s1.cin, k1, b1, relu1, h, arg1);
      InputTransformRows<5>(t.sx, h, TileRows{0, 0, t.sx.th}, v + i * per * c, pv);
    }
    for (int p = 0; p < P; ++p) {
      Gemm(v + p * pv, c, 1, u + p * c * k, k, m + p * pm, k, count * per, c, k, false);
    }
    for (int64_t i = 0; i < count; ++i) {
      OutputPoolImage5(t.sy, m + i * per * k, pm, b0 + i, b2, relu2, y, arg, buf.conv);
    }
  });
}

// Chunks of two groups (at most kWinogradGradChunks; at least two where there are two groups),
// each summed as groups. Each chunk sums a dU of 49 planes (400 KB for the CNN), and summing
// the chunks' dU costs: chunks of one group took 10 % longer at batch 128 (16 chunks, not 8;
// Zen 3). With dk2 out, each chunk's dU becomes its [9, C, K] part of dk2 while in L2, and the
// chunks sum those (session 33's Xeon: the backward 3 % faster on one thread at batch 512, 5 MB
// less memory; the compiled step within noise). One group a chunk (4 at batch 32, not 2) was
// 5 % slower at batch 32 to 128 even so.
template <int CIN, typename Pool>
void TwoLayerBackward5(Pool& pool, const TwoLayers& t, const float* x, const float* h,
                       const int8_t* arg1, const float* ut, const int8_t* arg2, const float* dy,
                       float* dk1, float* db1, float* du, float* db2, float* dk2) {
  constexpr int64_t P = Planes(5);
  const Shape& s1 = t.s1;
  const int64_t c = t.sx.c, k = t.sy.c, cin = s1.cin, image = s1.hp * s1.wp * c;
  const int64_t per = t.sx.th * t.sx.tw, group = GroupImages(t.sx), block = group * per;
  const int64_t pv = GroupPlane(block, c), pm = GroupPlane(block, k);
  const int64_t pooled = (5 * t.sy.th / 2) * (5 * t.sy.tw / 2) * k;  // An image's dy and arg2.
  const bool kernel_grad = dk2 != nullptr;  // Per chunk: dU (or its part of dk2), db2, dk1, db1.
  const TwoLayerGradSums sums{(kernel_grad ? 9 : P) * c * k, k, c, cin};
  const int64_t nu = (sums.used() + kAlignPad - 1) / kAlignPad * kAlignPad;
  const int64_t groups = (t.s1.n + group - 1) / group;
  const int64_t chunks = std::min(GradChunks(t.s1.n), std::max(std::min<int64_t>(groups, 2),
                                                                (groups + 1) / 2));
  std::unique_ptr<float[]> partial_buffer(new float[chunks * nu + kAlignPad]);
  float* const partial = AlignUp(partial_buffer.get());
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const TwoLayerScratch buf = GroupBuffers(t, group);
    float* v = buf.planes;  // Then dV, plane by plane.
    float* dm = v + P * pv;
    float* acc = partial + chunk * nu;  // Written, not zeroed: see WinogradFusedBackward.
    float* du_acc = ChunkDu(kernel_grad, P * c * k, acc);
    std::vector<fv> db2_acc(k / L, Splat(0.0f));
    std::vector<fv> gw(9 * cin * (c / L), Splat(0.0f));  // [block][tap, ci]
    std::vector<fv> gb(c / L, Splat(0.0f));
    const int64_t first = t.s1.n * chunk / chunks, last = t.s1.n * (chunk + 1) / chunks;
    for (int64_t b0 = first; b0 < last; b0 += group) {
      const int64_t count = std::min(group, last - b0);
      for (int64_t i = 0; i < count; ++i) {
        if (i + 1 < count) Prefetch(h + (b0 + i + 1) * image, image * sizeof(float));  // Its h.
        // And its pooled gradient and argmax: dy comes from the Dense layer's backward, from
        // memory at large batches (a sampling profile at batch 512 put 38 % of
        // OutputPoolGradImage5's time on its first load of dy; BENCHMARKS.md, session 35).
        if (b0 + i + 1 < last) {
          Prefetch(dy + (b0 + i + 1) * pooled, pooled * sizeof(float));
          Prefetch(arg2 + (b0 + i + 1) * pooled, pooled);
        }
        InputTransformRows<5>(t.sx, h + (b0 + i) * image, TileRows{0, 0, t.sx.th},
                              v + i * per * c, pv);
        OutputPoolGradImage5(t.sy, dy, arg2, b0 + i, dm + i * per * k, pm, db2_acc.data(),
                             buf.conv);
      }
      for (int p = 0; p < P; ++p) {
        float* vp = v + p * pv;
        const float* dmp = dm + p * pm;
        Gemm(vp, 1, c, dmp, k, du_acc + p * c * k, k, c, count * per, k, b0 > first);
        Gemm(dmp, k, 1, ut + p * k * c, c, vp, c, count * per, k, c, false);
      }
      for (int64_t i = 0; i < count; ++i) {
        const int64_t b = b0 + i;
        if (b + 1 < last) {  // The next image's argmax (used below), and the next group's first h.
          Prefetch(arg1 + (b + 1) * image, image);
          if (i + 1 == count) Prefetch(h + (b + 1) * image, image * sizeof(float));
        }
        ZeroUncovered(t.sx, buf.dh);
        InputGradRows<5>(t.sx, v + i * per * c, pv, TileRows{0, 0, t.sx.th}, buf.dh);
        for (int64_t cb = 0; cb < c; cb += L) {
          BackwardBlock<CIN, 1, true>(s1, x + b * s1.h * s1.w * cin, arg1 + b * image,
                                      buf.dh, gw.data() + cb / L * 9 * cin, gb.data() + cb / L,
                                      cb);
        }
      }
    }
    if (kernel_grad) {
      OneThread one;
      FilterGrad(one, 5, du_acc, c, k, acc);
    }
    sums.Write(acc, db2_acc, gw, gb);
  });
  sums.CopyOut(SumChunks(pool, partial, chunks, nu, sums.used()), du, dk2, db2, dk1, db1);
}

// x [N, H, W, Cin] with Cin < 8 (the direct kernel's), k1 [3, 3, Cin, C], u [16, C, K] (U^T
// [16, K, C] for the gradient), or [49, C, K] (F(5x5, 3x3): the pooled output's sides hp2 and
// wp2 multiples of 5), y [N, hp2, wp2, K]; C and K multiples of L. With F(5x5, 3x3) t.s1 and
// t.sx are h's first 5 th + 2 rows and 5 tw + 2 columns, which its tiles' 7x7 windows cover (12
// of the CNN's 13): the first layer computes only those, and training's h and argmax hold only
// those (a sixth less to write and read back than all 13x13, and no zeros for the rest: on
// session 34's Xeon 2-3 % off the op).
ffi::Error TwoLayerShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> k1d,
                          ffi::Span<const int64_t> ud, ffi::Span<const int64_t> yd,
                          bool transposed, TwoLayers* t) {
  if (ffi::Error e = CheckShapes(xd, k1d, &t->s1); e.failure()) return e;
  if (t->s1.cin >= 8) {
    return ffi::Error::InvalidArgument("fashion_jax two conv layers: the first needs Cin < 8");
  }
  const std::vector<int64_t> hd = {t->s1.n, t->s1.hp, t->s1.wp, t->s1.cout};
  if (ud.size() != 3 || ud[0] != Planes(5)) {
    return FusedShapes(ffi::Span<const int64_t>(hd), ud, yd, transposed, true, &t->sx, &t->sy);
  }
  const int64_t c = t->s1.cout, k = yd.size() == 4 ? yd[3] : 0;
  const int64_t ph = (t->s1.hp - 2) / 2, pw = (t->s1.wp - 2) / 2;
  const int64_t uc = transposed ? 2 : 1, uk = transposed ? 1 : 2;
  if (t->s1.hp < 4 || t->s1.wp < 4 || ph % 5 != 0 || pw % 5 != 0 || c % L != 0 || k % L != 0 ||
      ud[uc] != c || ud[uk] != k || yd[0] != t->s1.n || yd[1] != ph || yd[2] != pw) {
    return ffi::Error::InvalidArgument(
        "fashion_jax two conv layers (F(5x5, 3x3)): expected U [49, C, K] (U^T [49, K, C] for "
        "the gradient) and y [N, (hp-2)/2, (wp-2)/2, K] with both sides multiples of 5, C and "
        "K multiples of " + std::to_string(L));
  }
  const int64_t th = 2 * ph / 5, tw = 2 * pw / 5;
  t->s1.hp = 5 * th + 2;
  t->s1.wp = 5 * tw + 2;
  t->sx = Tiles{t->s1.n, t->s1.hp, t->s1.wp, c, th, tw, 5};
  t->sy = Tiles{t->s1.n, t->s1.hp, t->s1.wp, k, th, tw, 5};
  return ffi::Error::Success();
}

template <typename Pool>
void TwoLayerForwardCore(Pool& pool, const TwoLayers& t, const float* x, const float* k1,
                         const float* b1, bool relu1, const float* u, const float* b2, bool relu2,
                         float* y, int8_t* arg, float* h_out = nullptr,
                         int8_t* arg1_out = nullptr) {
#define FJ_CALL(C)                                                                          \
  if (t.sx.m == 5) {                                                                        \
    TwoLayerForward5<C>(pool, t, x, k1, b1, relu1, u, b2, relu2, y, arg, h_out, arg1_out);  \
  } else {                                                                                  \
    TwoLayerForward<C>(pool, t, x, k1, b1, relu1, u, b2, relu2, y, arg, h_out, arg1_out);   \
  }
  FJ_DISPATCH_CIN(t.s1.cin, FJ_CALL)
#undef FJ_CALL
}

template <typename Pool>
void TwoLayerBackwardCore(Pool& pool, const TwoLayers& t, const float* x, const float* h,
                          const int8_t* arg1, const float* ut, const int8_t* arg2,
                          const float* dy, float* dk1, float* db1, float* du, float* db2,
                          float* dk2 = nullptr) {
  if (t.s1.n == 0) {  // No images: zero gradients. (Each chunk writes its sums from its images;
                      // with none, F(5x5, 3x3) had no chunk at all and every gradient, and
                      // F(2x2, 3x3) dU, was whatever the buffers held: garbage, often NaN.)
    const int64_t c = t.sx.c, k = t.sy.c;
    std::fill(dk1, dk1 + 9 * t.s1.cin * c, 0.0f);
    std::fill(db1, db1 + c, 0.0f);
    std::fill(db2, db2 + k, 0.0f);
    if (dk2 != nullptr) {
      std::fill(dk2, dk2 + 9 * c * k, 0.0f);
    } else {
      std::fill(du, du + Planes(t.sx.m) * c * k, 0.0f);
    }
    return;
  }
#define FJ_CALL(C)                                                                    \
  if (t.sx.m == 5) {                                                                  \
    TwoLayerBackward5<C>(pool, t, x, h, arg1, ut, arg2, dy, dk1, db1, du, db2, dk2);  \
  } else {                                                                            \
    TwoLayerBackward<C>(pool, t, x, h, arg1, ut, arg2, dy, dk1, db1, du, db2, dk2);   \
  }
  FJ_DISPATCH_CIN(t.s1.cin, FJ_CALL)
#undef FJ_CALL
}

// The op takes the second layer's kernel k2 [3, 3, C, K] and its Winograd tile (2 or 5) and
// makes U (U^T for the gradient) itself, into the calling thread's buffer, and the gradient
// returns dk2, transformed back from dU in the op: no filter-transform ops around it, their
// three 400 KB planes for the CNN through memory and their dispatches (at batch 32 on session
// 31's Xeon ~0.1 ms of a 1.7 ms step). The shapes: as TwoLayerShapes with U's.
ffi::Error TwoLayerKernelShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> k1d,
                                ffi::Span<const int64_t> k2d, ffi::Span<const int64_t> yd,
                                int32_t tile, bool transposed, TwoLayers* t) {
  if (k2d.size() != 4 || k2d[0] != 3 || k2d[1] != 3 || k1d.size() != 4 || k2d[2] != k1d[3] ||
      yd.size() != 4 || k2d[3] != yd[3] || (tile != 2 && tile != 5)) {
    return ffi::Error::InvalidArgument(
        "fashion_jax two conv layers: expected the second kernel [3, 3, C, K] (C the first "
        "kernel's outputs, K y's channels) and tile 2 or 5");
  }
  const std::vector<int64_t> ud = {Planes(tile), transposed ? k2d[3] : k2d[2],
                                   transposed ? k2d[2] : k2d[3]};
  return TwoLayerShapes(xd, k1d, ffi::Span<const int64_t>(ud), yd, transposed, t);
}

// U [P, C, K] (transposed: U^T [P, K, C]) of k2 into `buffer` (resized; 64-byte aligned).
template <typename Pool>
float* SecondLayerU(Pool& pool, const TwoLayers& t, const float* k2, bool transposed,
                    std::vector<float>& buffer) {
  const int64_t c = t.sx.c, k = t.sy.c;
  buffer.resize(Planes(t.sx.m) * c * k + kAlignPad);
  float* u = AlignUp(buffer.data());
  FilterTransform(pool, int(t.sx.m), k2, c, k, transposed, u);
  return u;
}

// The forward (training's also returns h [N, hp, wp, C] and the first layer's argmax).
ffi::Error TwoLayerForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> k1, ffi::Buffer<ffi::F32> b1,
                               ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> b2,
                               ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> arg,
                               float* h, int64_t h_count, int8_t* arg1, int64_t arg1_count,
                               int32_t relu1, int32_t relu2, int32_t tile) {
  TwoLayers t;
  if (ffi::Error e = TwoLayerKernelShapes(x.dimensions(), k1.dimensions(), k2.dimensions(),
                                          y->dimensions(), tile, false, &t);
      e.failure()) {
    return e;
  }
  const int64_t nh = t.s1.n * t.s1.hp * t.s1.wp * t.s1.cout;
  if (h != nullptr && (h_count != nh || arg1_count != nh)) {
    return ffi::Error::InvalidArgument("fashion_jax two conv layers: h's shape differs");
  }
  if (b1.element_count() != static_cast<size_t>(t.s1.cout) ||
      b2.element_count() != static_cast<size_t>(t.sy.c) ||
      arg->element_count() != y->element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax two conv layers: expected b1 [C], b2 [K] and "
                                       "the argmax y's shape");
  }
  thread_local std::vector<float> u_buffer;
  const float* u = SecondLayerU(pool, t, k2.typed_data(), false, u_buffer);
  TwoLayerForwardCore(pool, t, x.typed_data(), k1.typed_data(), b1.typed_data(), relu1 != 0, u,
                      b2.typed_data(), relu2 != 0, y->typed_data(), arg->typed_data(), h, arg1);
  return ffi::Error::Success();
}

ffi::Error TwoLayerForwardHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> k1, ffi::Buffer<ffi::F32> b1,
                                  ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> b2,
                                  ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> arg,
                                  int32_t relu1, int32_t relu2, int32_t tile) {
  return TwoLayerForwardImpl(pool, x, k1, b1, k2, b2, y, arg, nullptr, 0, nullptr, 0, relu1,
                             relu2, tile);
}

ffi::Error TwoLayerTrainForwardHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::F32> k1, ffi::Buffer<ffi::F32> b1,
                                       ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> b2,
                                       ffi::ResultBuffer<ffi::F32> y,
                                       ffi::ResultBuffer<ffi::S8> arg,
                                       ffi::ResultBuffer<ffi::F32> h,
                                       ffi::ResultBuffer<ffi::S8> arg1, int32_t relu1,
                                       int32_t relu2, int32_t tile) {
  return TwoLayerForwardImpl(pool, x, k1, b1, k2, b2, y, arg, h->typed_data(),
                             int64_t(h->element_count()), arg1->typed_data(),
                             int64_t(arg1->element_count()), relu1, relu2, tile);
}

// The gradients from x, the forward's h and argmaxes, and k2; dk1 [3, 3, Cin, C] gives the
// first layer's shape.
ffi::Error TwoLayerBackwardHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::S8> arg1,
                                   ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::S8> arg2,
                                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk1,
                                   ffi::ResultBuffer<ffi::F32> db1,
                                   ffi::ResultBuffer<ffi::F32> dk2,
                                   ffi::ResultBuffer<ffi::F32> db2, int32_t tile) {
  TwoLayers t;
  if (ffi::Error e = TwoLayerKernelShapes(x.dimensions(), dk1->dimensions(), k2.dimensions(),
                                          dy.dimensions(), tile, true, &t);
      e.failure()) {
    return e;
  }
  const size_t nh = t.s1.n * t.s1.hp * t.s1.wp * t.s1.cout;
  if (h.element_count() != nh || arg1.element_count() != nh ||
      arg2.element_count() != dy.element_count() || db1->element_count() != size_t(t.s1.cout) ||
      dk2->element_count() != k2.element_count() || db2->element_count() != size_t(t.sy.c)) {
    return ffi::Error::InvalidArgument("fashion_jax two conv layers gradient: shapes differ");
  }
  thread_local std::vector<float> ut_buffer;
  const float* ut = SecondLayerU(pool, t, k2.typed_data(), true, ut_buffer);
  TwoLayerBackwardCore(pool, t, x.typed_data(), h.typed_data(), arg1.typed_data(), ut,
                       arg2.typed_data(), dy.typed_data(), dk1->typed_data(), db1->typed_data(),
                       nullptr, db2->typed_data(), dk2->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// BatchNorm with batch statistics, then ReLU (cnn_bn's Conv-BN-ReLU layers). XLA:CPU ran it as
// separate full-size passes (y - mean; the ReLU mask, g and g * x-hat materialized for the
// gradient's sums; then dy); here two passes each way, over y (and dz) only:
//   statistics: per channel, the sums of y and y^2;
//   forward:    z = max((y - mean) a + t, 0), a = scale / sqrt(var + eps) and t the BatchNorm's
//               bias, from the statistics by the caller (which also averages them over
//               devices), optionally with `pad` zero rows and columns around each image (the
//               SAME padding of the convolution that follows); y - mean first, as flax does: a
//               y + (t - mean a) lost digits where |mean| >> the standard deviation;
//   gradient:   g = dz where that is > 0, else 0 (like jax.nn.relu's at 0); per channel the sums
//               of g and g (y - mean); then dy = c1 g + c2 + c3 (y - mean), c1-c3 per channel
//               from those sums (by the caller).
// coef [3 or 6, C] holds a, t, mean (and c1, c2, c3).
// y is [N, H, W, C] or [P, C] (taken as P rows of one pixel), C a multiple of L; a padded z or
// dz is [N, H + 2 pad, W + 2 pad, C]. Sums are taken per fixed chunk of image rows, then over the
// chunks in order, so they do not depend on the thread count.

struct BnShape {
  int64_t rows, h, w, c, pad;  // rows: N * H image rows of W pixels.
};

constexpr int64_t kBnChunkPixels = 512;
inline int64_t BnRowsPerChunk(const BnShape& s) {
  return std::max<int64_t>(1, kBnChunkPixels / s.w);
}
inline int64_t BnChunks(const BnShape& s) {
  return (s.rows + BnRowsPerChunk(s) - 1) / BnRowsPerChunk(s);
}

// Where image row r's first pixel is in the padded layout, in floats.
inline int64_t BnPaddedRow(const BnShape& s, int64_t r) {
  const int64_t wp = s.w + 2 * s.pad;
  return ((r / s.h * (s.h + 2 * s.pad) + r % s.h + s.pad) * wp + s.pad) * s.c;
}

// row(r, acc) for each image row, a chunk of rows per task; acc: the chunk's `sums` * C / L
// vectors, zeroed first. With sums > 0 returns the per-channel totals [sums, C] in `out`.
template <typename Pool, typename F>
void BnRows(Pool& pool, const BnShape& s, int sums, float* out, const F& row) {
  const int64_t chunks = BnChunks(s), per = BnRowsPerChunk(s), width = sums * s.c;
  std::vector<fv> partial(chunks * width / L);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    fv* acc = partial.data() + chunk * width / L;
    for (int64_t v = 0; v < width / L; ++v) acc[v] = Splat(0.0f);
    for (int64_t r = chunk * per; r < std::min(s.rows, (chunk + 1) * per); ++r) row(r, acc);
  });
  if (sums > 0) {
    const float* total =
        SumChunks(pool, reinterpret_cast<float*>(partial.data()), chunks, width, width);
    std::copy(total, total + width, out);
  }
}

// The normalized input before the ReLU, the same expression in every kernel (so the gradient's
// mask is the forward's exactly).
inline fv BnPre(const fv x, const float* coef, int64_t c, int64_t ch) {
  return (x - Load(coef + 2 * c + ch)) * Load(coef + ch) + Load(coef + c + ch);
}

template <typename Pool>
void BnStatsCore(Pool& pool, const BnShape& s, const float* y, float* sums) {
  const int64_t cv = s.c / L;
  BnRows(pool, s, 2, sums, [&](int64_t r, fv* acc) {
    for (const float* p = y + r * s.w * s.c; p < y + (r + 1) * s.w * s.c; p += s.c) {
      for (int64_t v = 0; v < cv; ++v) {
        const fv x = Load(p + v * L);
        acc[v] += x;
        acc[cv + v] += x * x;
      }
    }
  });
}

template <typename Pool>
void BnReluForwardCore(Pool& pool, const BnShape& s, const float* y, const float* coef,
                       float* z) {
  const int64_t c = s.c, wp = s.w + 2 * s.pad;
  const fv zero = Splat(0.0f);
  BnRows(pool, s, 0, nullptr, [&](int64_t r, fv*) {
    float* zr = z + BnPaddedRow(s, r);
    if (s.pad > 0) {  // This row's border pixels, and the image's border rows at its edges.
      std::fill(zr - s.pad * c, zr, 0.0f);
      std::fill(zr + s.w * c, zr + (s.w + s.pad) * c, 0.0f);
      if (r % s.h == 0) std::fill(zr - (s.pad * wp + s.pad) * c, zr - s.pad * c, 0.0f);
      if (r % s.h == s.h - 1) {
        std::fill(zr + (s.w + s.pad) * c, zr + (s.w + s.pad + s.pad * wp) * c, 0.0f);
      }
    }
    const float* yr = y + r * s.w * c;
    for (int64_t x = 0; x < s.w; ++x) {
      for (int64_t ch = 0; ch < c; ch += L) {
        const fv pre = BnPre(Load(yr + x * c + ch), coef, c, ch);
        Store(zr + x * c + ch, pre < zero ? zero : pre);  // NaN passes through, like jnp.maximum.
      }
    }
  });
}

// The gradient's two passes for any g: grad.Row(r) gives row r's g(x, i, ch, y), the gradient
// reaching the ReLU's output at pixel x of image row r, channels [ch, ch + L) (i = x C + ch; y
// there). sums [2, C]: of g and of g (y - mean); then dy = c1 g + c2 + c3 (y - mean). (Pixels
// and channel blocks as two loops: a division per vector for them made these passes 2x slower.)
template <typename Pool, typename G>
void BnGradSums(Pool& pool, const BnShape& s, const float* y, const float* coef, const G& grad,
                float* sums) {
  const int64_t c = s.c, cv = c / L;
  BnRows(pool, s, 2, sums, [&](int64_t r, fv* acc) {
    const float* yr = y + r * s.w * c;
    const auto g_of = grad.Row(r);
    for (int64_t x = 0; x < s.w; ++x) {
      for (int64_t ch = 0; ch < c; ch += L) {
        const int64_t i = x * c + ch;
        const fv yv = Load(yr + i);
        const fv g = g_of(x, i, ch, yv);
        acc[ch / L] += g;
        acc[cv + ch / L] += g * (yv - Load(coef + 2 * c + ch));
      }
    }
  });
}

template <typename Pool, typename G>
void BnGrad(Pool& pool, const BnShape& s, const float* y, const float* coef, const G& grad,
            float* dy) {
  const int64_t c = s.c;
  BnRows(pool, s, 0, nullptr, [&](int64_t r, fv*) {
    const float* yr = y + r * s.w * c;
    float* dyr = dy + r * s.w * c;
    const auto g_of = grad.Row(r);
    for (int64_t x = 0; x < s.w; ++x) {
      for (int64_t ch = 0; ch < c; ch += L) {
        const int64_t i = x * c + ch;
        const fv yv = Load(yr + i);
        const fv g = g_of(x, i, ch, yv);
        Store(dyr + i, Load(coef + 3 * c + ch) * g + Load(coef + 4 * c + ch) +
                           Load(coef + 5 * c + ch) * (yv - Load(coef + 2 * c + ch)));
      }
    }
  });
}

// g = dz (laid out like z, padded or not) where the ReLU is on, else 0.
struct ReluGrad {
  const BnShape& s;
  const float* dz;
  const float* coef;
  auto Row(int64_t r) const {
    const float* dzr = dz + BnPaddedRow(s, r);
    return [this, dzr](int64_t, int64_t i, int64_t ch, fv yv) {
      return BnPre(yv, coef, s.c, ch) > Splat(0.0f) ? Load(dzr + i) : Splat(0.0f);
    };
  }
};

template <typename Pool>
void BnReluGradSumsCore(Pool& pool, const BnShape& s, const float* y, const float* dz,
                        const float* coef, float* sums) {
  BnGradSums(pool, s, y, coef, ReluGrad{s, dz, coef}, sums);
}

template <typename Pool>
void BnReluGradCore(Pool& pool, const BnShape& s, const float* y, const float* dz,
                    const float* coef, float* dy) {
  BnGrad(pool, s, y, coef, ReluGrad{s, dz, coef}, dy);
}

// With a 2x2 max-pool after the ReLU (the last BatchNorm of each cnn_bn block; H and W even):
// the forward writes the pooled z [N, H/2, W/2, C] and its argmax (PoolStore's: the first
// maximal tap in row-major order, kNoTap where the pooled value is 0, i.e. the ReLU is off for
// the whole window), and the gradient arrives as dz of the pooled z, reaching the winning tap
// only. The full-size z, the pool's pass over it and its gradient's full-size pass are gone.
template <typename Pool>
void BnReluPoolForwardCore(Pool& pool, const BnShape& s, const float* y, const float* coef,
                           float* z, int8_t* arg) {
  const int64_t c = s.c, w2 = s.w / 2, pooled_rows = s.rows / 2;
  const int64_t per = BnRowsPerChunk(s);
  ParallelFor(pool, (pooled_rows + per - 1) / per, [&](int64_t chunk) {
    for (int64_t pr = chunk * per; pr < std::min(pooled_rows, (chunk + 1) * per); ++pr) {
      const float* y0 = y + 2 * pr * s.w * c;  // The window's two rows (H even: one image).
      const float* y1 = y0 + s.w * c;
      for (int64_t j = 0; j < w2; ++j) {
        for (int64_t ch = 0; ch < c; ch += L) {
          const int64_t at = 2 * j * c + ch, o = (pr * w2 + j) * c + ch;
          const fv taps[4] = {
              BnPre(Load(y0 + at), coef, c, ch), BnPre(Load(y0 + at + c), coef, c, ch),
              BnPre(Load(y1 + at), coef, c, ch), BnPre(Load(y1 + at + c), coef, c, ch)};
          PoolStore(taps, Splat(0.0f), true, z + o, arg + o);
        }
      }
    }
  });
}

// The gradient's two passes with the pool, a 2x2 window at a time (its first row's task takes
// both rows): g = dz of the pooled output at the window's winning tap, else 0 (kNoTap: the ReLU
// was off), so each window's argmax and dz are loaded once for its four pixels, and the sums
// take the winning tap's y only. (Per pixel, with the argmax re-read and compared for each,
// these passes ran at a third of the statistics pass's bytes per second.)
template <typename Pool, typename F>
void BnPoolWindows(Pool& pool, const BnShape& s, int sums, float* out, const F& window) {
  const int64_t c = s.c, w2 = s.w / 2;
  BnRows(pool, s, sums, out, [&](int64_t r, fv* acc) {
    if (r % 2) return;
    const int64_t yr = r * s.w * c, pr = r / 2 * w2 * c;
    for (int64_t j = 0; j < w2; ++j) {
      for (int64_t ch = 0; ch < c; ch += L) {
        const int64_t o = pr + j * c + ch;
        // Offsets of the window's taps (row-major) from y's row r, channel block ch.
        const int64_t at[4] = {yr + 2 * j * c + ch, yr + (2 * j + 1) * c + ch,
                               yr + (s.w + 2 * j) * c + ch, yr + (s.w + 2 * j + 1) * c + ch};
        window(acc, at, Widen(window.arg + o), Load(window.dz + o), ch);
      }
    }
  });
}

struct PoolGradInputs {  // What both passes read: y, the pooled dz and argmax, the coefficients.
  const BnShape& s;
  const float* y;
  const float* dz;
  const int8_t* arg;
  const float* coef;
};

struct PoolSums : PoolGradInputs {
  void operator()(fv* acc, const int64_t (&at)[4], iv which, fv d, int64_t ch) const {
    fv yw = Load(y + at[0]);  // The winning tap's y (any where there is none: g is 0 there).
    for (int t = 1; t < 4; ++t) yw = which == SplatI(t) ? Load(y + at[t]) : yw;
    const fv g = which != SplatI(kNoTap) ? d : Splat(0.0f);
    acc[ch / L] += g;
    acc[s.c / L + ch / L] += g * (yw - Load(coef + 2 * s.c + ch));
  }
};

struct PoolDy : PoolGradInputs {
  float* dy;
  void operator()(fv*, const int64_t (&at)[4], iv which, fv d, int64_t ch) const {
    const int64_t c = s.c;
    const fv c1 = Load(coef + 3 * c + ch), c2 = Load(coef + 4 * c + ch),
             c3 = Load(coef + 5 * c + ch), mean = Load(coef + 2 * c + ch);
    for (int t = 0; t < 4; ++t) {
      const fv g = which == SplatI(t) ? d : Splat(0.0f);
      Store(dy + at[t], c1 * g + c2 + c3 * (Load(y + at[t]) - mean));
    }
  }
};

template <typename Pool>
void BnReluPoolGradSumsCore(Pool& pool, const BnShape& s, const float* y, const float* dz,
                            const int8_t* arg, const float* coef, float* sums) {
  BnPoolWindows(pool, s, 2, sums, PoolSums{{s, y, dz, arg, coef}});
}

template <typename Pool>
void BnReluPoolGradCore(Pool& pool, const BnShape& s, const float* y, const float* dz,
                        const int8_t* arg, const float* coef, float* dy) {
  BnPoolWindows(pool, s, 0, nullptr, PoolDy{{s, y, dz, arg, coef}, dy});
}

// y [N, H, W, C] or [P, C]; padded (z or dz: [N, H + 2 pad, W + 2 pad, C], or y's shape with pad
// 0), coef [rows, C] with at least coef_rows rows.
ffi::Error BnShapes(ffi::Span<const int64_t> yd, ffi::Span<const int64_t> padded,
                    ffi::Span<const int64_t> coef, int64_t coef_rows, int32_t pad, BnShape* s) {
  const bool image = yd.size() == 4, ok_rank = image || yd.size() == 2;
  const int64_t c = ok_rank ? yd[yd.size() - 1] : 0;
  *s = image ? BnShape{yd[0] * yd[1], yd[1], yd[2], c, pad} : BnShape{ok_rank ? yd[0] : 0, 1, 1,
                                                                      c, 0};
  bool ok = ok_rank && c > 0 && c % L == 0 && s->rows > 0 && s->w > 0 && pad >= 0 &&
            (image || pad == 0) && padded.size() == yd.size() && coef.size() == 2 &&
            coef[0] == coef_rows && coef[1] == c;
  for (size_t d = 0; ok && d < yd.size(); ++d) {
    ok = padded[d] == yd[d] + (d == 1 || d == 2 ? 2 * pad : 0);
  }
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "fashion_jax batchnorm+relu: expected y [N, H, W, C] or [P, C] with C % " +
        std::to_string(L) + " == 0, z/dz [N, H + 2 pad, W + 2 pad, C] and coefficients [" +
        std::to_string(coef_rows) + ", C]");
  }
  return ffi::Error::Success();
}

ffi::Error BnStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> sums) {
  BnShape s;
  if (ffi::Error e = BnShapes(y.dimensions(), y.dimensions(), sums->dimensions(), 2, 0, &s);
      e.failure()) {
    return e;
  }
  BnStatsCore(pool, s, y.typed_data(), sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnReluForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                         ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> z,
                         int32_t pad) {
  BnShape s;
  if (ffi::Error e = BnShapes(y.dimensions(), z->dimensions(), coef.dimensions(), 3, pad, &s);
      e.failure()) {
    return e;
  }
  BnReluForwardCore(pool, s, y.typed_data(), coef.typed_data(), z->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnReluGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                          ffi::Buffer<ffi::F32> dz, ffi::Buffer<ffi::F32> coef,
                          ffi::ResultBuffer<ffi::F32> sums, int32_t pad) {
  BnShape s;
  if (ffi::Error e = BnShapes(y.dimensions(), dz.dimensions(), coef.dimensions(), 3, pad, &s);
      e.failure()) {
    return e;
  }
  if (sums->element_count() != static_cast<size_t>(2 * s.c)) {
    return ffi::Error::InvalidArgument("fashion_jax batchnorm+relu gradient sums: expected [2, C]");
  }
  BnReluGradSumsCore(pool, s, y.typed_data(), dz.typed_data(), coef.typed_data(),
                     sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnReluGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dz,
                      ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> dy, int32_t pad) {
  BnShape s;
  if (ffi::Error e = BnShapes(y.dimensions(), dz.dimensions(), coef.dimensions(), 6, pad, &s);
      e.failure()) {
    return e;
  }
  if (dy->element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax batchnorm+relu gradient: dy differs from y");
  }
  BnReluGradCore(pool, s, y.typed_data(), dz.typed_data(), coef.typed_data(), dy->typed_data());
  return ffi::Error::Success();
}

// y [N, H, W, C] with H and W even and C a multiple of L; the pooled z/dz and argmax
// [N, H/2, W/2, C]; coef [coef_rows, C].
ffi::Error BnPoolShapes(ffi::Span<const int64_t> yd, ffi::Span<const int64_t> zd,
                        ffi::Span<const int64_t> argd, ffi::Span<const int64_t> coef,
                        int64_t coef_rows, BnShape* s) {
  const bool ok = yd.size() == 4 && yd[0] > 0 && yd[1] > 0 && yd[2] > 0 && yd[1] % 2 == 0 &&
                  yd[2] % 2 == 0 && yd[3] > 0 && yd[3] % L == 0 && zd.size() == 4 &&
                  zd[0] == yd[0] && zd[1] == yd[1] / 2 && zd[2] == yd[2] / 2 && zd[3] == yd[3] &&
                  argd.size() == 4 && std::equal(argd.begin(), argd.end(), zd.begin()) &&
                  coef.size() == 2 && coef[0] == coef_rows && coef[1] == yd[3];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "fashion_jax batchnorm+relu+pool: expected y [N, H, W, C] with H, W even and C % " +
        std::to_string(L) + " == 0, z/dz and argmax [N, H/2, W/2, C], coefficients [" +
        std::to_string(coef_rows) + ", C]");
  }
  *s = BnShape{yd[0] * yd[1], yd[1], yd[2], yd[3], 0};
  return ffi::Error::Success();
}

ffi::Error BnReluPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                             ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> z,
                             ffi::ResultBuffer<ffi::S8> arg) {
  BnShape s;
  if (ffi::Error e = BnPoolShapes(y.dimensions(), z->dimensions(), arg->dimensions(),
                                  coef.dimensions(), 3, &s);
      e.failure()) {
    return e;
  }
  BnReluPoolForwardCore(pool, s, y.typed_data(), coef.typed_data(), z->typed_data(),
                        arg->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnReluPoolGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                              ffi::Buffer<ffi::F32> dz, ffi::Buffer<ffi::S8> arg,
                              ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> sums) {
  BnShape s;
  if (ffi::Error e = BnPoolShapes(y.dimensions(), dz.dimensions(), arg.dimensions(),
                                  coef.dimensions(), 3, &s);
      e.failure()) {
    return e;
  }
  if (sums->element_count() != static_cast<size_t>(2 * s.c)) {
    return ffi::Error::InvalidArgument("fashion_jax batchnorm+relu+pool gradient sums: "
                                       "expected [2, C]");
  }
  BnReluPoolGradSumsCore(pool, s, y.typed_data(), dz.typed_data(), arg.typed_data(),
                         coef.typed_data(), sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnReluPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                          ffi::Buffer<ffi::F32> dz, ffi::Buffer<ffi::S8> arg,
                          ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> dy) {
  BnShape s;
  if (ffi::Error e = BnPoolShapes(y.dimensions(), dz.dimensions(), arg.dimensions(),
                                  coef.dimensions(), 6, &s);
      e.failure()) {
    return e;
  }
  if (dy->element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax batchnorm+relu+pool gradient: dy differs "
                                       "from y");
  }
  BnReluPoolGradCore(pool, s, y.typed_data(), dz.typed_data(), arg.typed_data(),
                     coef.typed_data(), dy->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Dropout's keep mask (fashion_jax/kernels/dropout.py): bitwise jax.random.bernoulli(key, p,
// shape) for a threefry2x32 key with float32 p and jax_threefry_partitionable (jax's default).
// Element i takes threefry2x32(key, (i >> 32, i & 0xffffffff)), its two words xor-ed (jax's
// random bits), the top 23 bits as a float u in [0, 1) (jax.random.uniform) and keeps u < p.
// XLA:CPU runs the hash's 20 rounds as a rolled loop over whole arrays (two uint32 arrays read
// and written per round): 2.2 ms for cnn_bn's three masks at batch 128; here each vector of
// counters stays in registers.

typedef uint32_t uv __attribute__((vector_size(4 * L)));  // L uint32

template <int R>
inline uv Rotl(uv x) { return (x << R) | (x >> (32 - R)); }

constexpr int kStreams = 4;  // Vectors hashed side by side: each round's three steps are serial.

template <int R0, int R1, int R2, int R3>
inline void FourRounds(uv (&x0)[kStreams], uv (&x1)[kStreams]) {
  for (int r : {R0, R1, R2, R3}) {
#pragma GCC unroll 4
    for (int v = 0; v < kStreams; ++v) {
      x0[v] += x1[v];
      x1[v] = (x1[v] << r) | (x1[v] >> (32 - r));
      x1[v] ^= x0[v];
    }
  }
}

inline void AddKeys(uv (&x0)[kStreams], uv (&x1)[kStreams], uint32_t a, uint32_t b) {
#pragma GCC unroll 4
  for (int v = 0; v < kStreams; ++v) x0[v] += a, x1[v] += b;
}

// threefry2x32 of kStreams x L counter pairs (x0, x1) under the key (k0, k1); leaves both words
// xor-ed in x0.
inline void Threefry2x32Bits(uint32_t k0, uint32_t k1, uv (&x0)[kStreams], uv (&x1)[kStreams]) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  AddKeys(x0, x1, k0, k1);
  FourRounds<13, 15, 26, 6>(x0, x1);
  AddKeys(x0, x1, k1, k2 + 1u);
  FourRounds<17, 29, 16, 24>(x0, x1);
  AddKeys(x0, x1, k2, k0 + 2u);
  FourRounds<13, 15, 26, 6>(x0, x1);
  AddKeys(x0, x1, k0, k1 + 3u);
  FourRounds<17, 29, 16, 24>(x0, x1);
  AddKeys(x0, x1, k1, k2 + 4u);
  FourRounds<13, 15, 26, 6>(x0, x1);
  AddKeys(x0, x1, k2, k0 + 5u);
#pragma GCC unroll 4
  for (int v = 0; v < kStreams; ++v) x0[v] ^= x1[v];
}

constexpr int64_t kMaskChunk = 1 << 14;  // Elements per task (a multiple of kStreams * L).

// mask[i] = 1 where element i is kept, else 0, for i in [0, n).
template <typename Pool>
void KeepMaskCore(Pool& pool, uint32_t k0, uint32_t k1, float p, int64_t n, uint8_t* mask) {
  uv lane;
  for (int j = 0; j < L; ++j) lane[j] = j;
  ParallelFor(pool, (n + kMaskChunk - 1) / kMaskChunk, [&](int64_t chunk) {
    const int64_t end = std::min(n, (chunk + 1) * kMaskChunk);
    for (int64_t i = chunk * kMaskChunk; i < end; i += kStreams * L) {
      // The indices i + j do not cross a multiple of 2^32: i and 2^32 are multiples of 4 L.
      uv hi[kStreams], bits[kStreams];
      for (int v = 0; v < kStreams; ++v) {
        hi[v] = uv{} + uint32_t(uint64_t(i) >> 32);
        bits[v] = uint32_t(i + v * L) + lane;
      }
      Threefry2x32Bits(k0, k1, hi, bits);  // hi becomes the bits.
      uint8_t keep[kStreams * L];
      for (int v = 0; v < kStreams; ++v) {
        const uv one = (hi[v] >> 9) | 0x3F800000u;  // A float in [1, 2): jax's uniform + 1.
        const fv u = (fv)one - 1.0f;  // A vector cast: the same bits.
        const bv kept = Narrow(-(u < Splat(p)));  // 1 where kept.
        std::memcpy(keep + v * L, &kept, L);
      }
      std::memcpy(mask + i, keep, std::min<int64_t>(end - i, kStreams * L));
    }
  });
}

ffi::Error KeepMask(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key,
                    ffi::ResultBuffer<ffi::PRED> mask, float p) {
  if (key.element_count() != 2) {
    return ffi::Error::InvalidArgument("fashion_jax keep mask: expected a threefry2x32 key of "
                                       "two uint32");
  }
  const uint32_t* k = key.typed_data();
  KeepMaskCore(pool, k[0], k[1], p, static_cast<int64_t>(mask->element_count()),
               reinterpret_cast<uint8_t*>(mask->typed_data()));
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Dense layers' matmuls (fashion_jax/kernels/dense.py): y = x w, and the gradients dx = dy w^T and
// dw = x^T dy, on the register-blocked micro-kernel above (Gemm). XLA:CPU ran the classic CNN's
// Dense(1600 -> 128) on two Zen 5 cores (peak ~460 GFLOP/s) at 200-350 GFLOP/s at batch 512 and
// at 66-110 at batch 32; these at 260-400 (BENCHMARKS.md). Every output element is one
// accumulator summed over the whole contraction in order (also where it is split into parts:
// GemmBlock's `accumulate`), so results do not depend on the thread count or how the work is
// split.

struct DenseShape {
  int64_t b, d, h;  // x [b, d], w [d, h]
};

constexpr int64_t kDenseRows = 4 * kGemmRows;      // Forward: about this many rows of y per task.
constexpr int64_t kDenseDepth = 256;               // Forward: rows of w per part.
// Backward: rows of w (dx's columns) per task; on NEON 48, three whole blocks of 4 vectors (8 x 5 =
// 40 left a 2-vector tail in every slab).
constexpr int64_t kDenseGradRows = kWideNeon ? 48 : 8 * kGemmRows;
constexpr int64_t kDenseGradDepth = 128;           // Backward: dw's images per part.

// y [b, h] = x [b, d] w [d, h], h a multiple of L. Per task a slab of rows of x, and the
// contraction in parts of kDenseDepth: each part of w (128 KB at h = 128) is read from L2 by
// every row block of the slab. (With one pass over all of w per 6 rows, the CNN's 819 KB w
// streamed from L3 for each block: on Zen 3, 512 KB L2, these parts made the layer 25-35 %
// faster at batch 512 and 15-25 % at 32 and 128, bitwise the same; measured with AVX2 only.)
// At least two tasks per thread, and a multiple of the thread count.
template <typename Pool>
void DenseForwardCore(Pool& pool, const DenseShape& s, const float* x, const float* w, float* y) {
  if (s.d == 0) {  // An empty contraction: zeros (the parts below write y only from w's rows).
    std::fill(y, y + s.b * s.h, 0.0f);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tasks = std::max<int64_t>(2 * threads, (s.b + kDenseRows - 1) / kDenseRows);
  tasks = (tasks + threads - 1) / threads * threads;
  tasks = std::max<int64_t>(1, std::min(tasks, (s.b + kGemmRows - 1) / kGemmRows));
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t r0 = s.b * task / tasks, rows = s.b * (task + 1) / tasks - r0;
    for (int64_t k0 = 0; k0 < s.d; k0 += kDenseDepth) {
      Gemm(x + r0 * s.d + k0, s.d, 1, w + k0 * s.h, s.h, y + r0 * s.h, s.h, rows,
           std::min(kDenseDepth, s.d - k0), s.h, k0 > 0);
    }
  });
}

// dx [b, d] = dy [b, h] w^T and dw [d, h] = x^T dy, per task a slab of w's rows (dx's columns,
// dw's rows). dw: x read in place (6 of its columns are a block's rows). dx, two ways: for
// small batches the transposed store (GemmBlock's T) of w dy^T, w's rows read in place and dy^T
// packed once per call (its columns padded to a multiple of L); else dy times the slab of w
// transposed into the thread's buffer. The store costs ~2 cycles per element of dx, the
// transpose ~1.4 per element of w: the slab wins from about b = 2/3 h (measured on Zen 5, one
// thread: at h = 128, b = 32 0.13 against 0.19 ms, b = 512 1.8 against 2.2 ms).
template <typename Pool>
void DenseBackwardCore(Pool& pool, const DenseShape& s, const float* x, const float* w,
                       const float* dy, float* dx, float* dw) {
  if (s.b == 0) {  // No rows: dw = x^T dy is zeros (the parts below write dw only from rows of
                   // x; with none it was whatever the buffer held), dx is empty.
    std::fill(dw, dw + s.d * s.h, 0.0f);
    return;
  }
  const bool transposed_store = 3 * s.b < 2 * s.h || s.d % L != 0;  // Slabs: whole vectors.
  const int64_t bp = (s.b + L - 1) / L * L;
  thread_local std::vector<float> packed;  // dy^T [h, bp], read by every task of this call.
  if (transposed_store) {
    packed.assign(s.h * bp, 0.0f);
    for (int64_t i = 0; i < s.b; ++i) {
      for (int64_t k = 0; k < s.h; ++k) packed[k * bp + i] = dy[i * s.h + k];
    }
  }
  const float* dyt = packed.data();
  const int64_t slabs = (s.d + kDenseGradRows - 1) / kDenseGradRows;
  ParallelFor(pool, 2 * slabs, [&](int64_t task) {
    const int64_t r0 = task / 2 * kDenseGradRows, rows = std::min(kDenseGradRows, s.d - r0);
    if (task % 2 == 1) {  // In parts of the batch: 9-13 % off the backward at batch 512 (Zen 3).
      for (int64_t i0 = 0; i0 < s.b; i0 += kDenseGradDepth) {
        // The next part's columns of x, a row apart (6.4 KB for the CNN: no prefetcher follows).
        for (int64_t i = i0 + kDenseGradDepth; i < std::min(s.b, i0 + 2 * kDenseGradDepth); ++i) {
          Prefetch(x + i * s.d + r0, rows * sizeof(float));
        }
        Gemm(x + i0 * s.d + r0, 1, s.d, dy + i0 * s.h, s.h, dw + r0 * s.h, s.h, rows,
             std::min(kDenseGradDepth, s.b - i0), s.h, i0 > 0);
      }
    } else if (transposed_store) {
      Gemm<true>(w + r0 * s.h, s.h, 1, dyt, bp, dx + r0, s.d, rows, s.h, bp, false, s.b);
    } else {
      thread_local std::vector<float> slab;  // w[r0 : r0 + rows]^T [h, rows]
      slab.resize(s.h * kDenseGradRows);
      for (int64_t j = 0; j < rows; ++j) {
        for (int64_t k = 0; k < s.h; ++k) slab[k * rows + j] = w[(r0 + j) * s.h + k];
      }
      Gemm(dy, s.h, 1, slab.data(), rows, dx + r0, s.d, s.b, s.h, rows, false);
    }
  });
}

ffi::Error DenseShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                       ffi::Span<const int64_t> yd, DenseShape* s) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] || yd[0] != xd[0] ||
      yd[1] != wd[1] || wd[1] % L != 0) {
    return ffi::Error::InvalidArgument(
        "fashion_jax dense: expected x [B, D], w [D, H], y [B, H] with H a multiple of " +
        std::to_string(L));
  }
  *s = {xd[0], xd[1], wd[1]};
  return ffi::Error::Success();
}

ffi::Error DenseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  DenseShape s;
  if (ffi::Error e = DenseShapes(x.dimensions(), w.dimensions(), y->dimensions(), &s);
      e.failure()) {
    return e;
  }
  DenseForwardCore(pool, s, x.typed_data(), w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error DenseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dw) {
  DenseShape s;
  if (ffi::Error e = DenseShapes(x.dimensions(), w.dimensions(), dy.dimensions(), &s);
      e.failure()) {
    return e;
  }
  if (dx->element_count() != x.element_count() || dw->element_count() != w.element_count()) {
    return ffi::Error::InvalidArgument("fashion_jax dense gradient: shapes differ");
  }
  DenseBackwardCore(pool, s, x.typed_data(), w.typed_data(), dy.typed_data(), dx->typed_data(),
                    dw->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// 6. Adam's update of one parameter (fashion_jax/kernels/adam.py) in one pass over its arrays:
//   m = (1 - b1) g + b1 m,   v = (1 - b2) g^2 + b2 v,
//   p = p + step ((m / c1) / (sqrt(v / c2 + eps_root) + eps) + weight_decay p)
// in optax.adam's (adamw's) order of operations (step = -learning rate, c1 = 1 - b1^t,
// c2 = 1 - b2^t; the weight decay term only where it is not 0), in
// place: p, m and v are aliased to the outputs; on a skipped step (a non-finite loss or gradient)
// nothing is written. XLA:CPU ran optax's update with the train step's guard as four passes over
// the arrays (the gradient's squares, then m, v and p, each select a loop of its own): for the
// CNN's Dense(1600 -> 128) kernel ~0.4 ms of a 2.6 ms step at batch 32 on Zen 3.

// The square root of each lane, correctly rounded (IEEE), as XLA's: the vector instruction
// (GCC's vector extensions have none; a lane-by-lane std::sqrt stays scalar for errno), one of
// the vector's own width. (16 lanes as two 256-bit halves through memory stalled on store
// forwarding: Adam's update of 16K elements took 23 us on a Zen 4 core instead of 8.)
inline fv Sqrt(fv x) {
  fv r;
#if defined(__AVX512F__)
  if constexpr (L == 16) {
    __m512 z;
    std::memcpy(&z, &x, sizeof(z));
    z = _mm512_sqrt_ps(z);
    std::memcpy(&r, &z, sizeof(z));
    return r;
  }
#endif
#if defined(__AVX__)
  static_assert(L % 4 == 0);
  if constexpr (L % 8 == 0) {
    for (int i = 0; i < L; i += 8) {
      __m256 h;
      std::memcpy(&h, reinterpret_cast<const float*>(&x) + i, sizeof(h));
      h = _mm256_sqrt_ps(h);
      std::memcpy(reinterpret_cast<float*>(&r) + i, &h, sizeof(h));
    }
    return r;
  }
#endif
#if defined(__SSE2__) || defined(__aarch64__)
  for (int i = 0; i < L; i += 4) {
#if defined(__SSE2__)
    __m128 q;
    std::memcpy(&q, reinterpret_cast<const float*>(&x) + i, sizeof(q));
    q = _mm_sqrt_ps(q);
#else
    float32x4_t q;
    std::memcpy(&q, reinterpret_cast<const float*>(&x) + i, sizeof(q));
    q = vsqrtq_f32(q);
#endif
    std::memcpy(reinterpret_cast<float*>(&r) + i, &q, sizeof(q));
  }
#else
  for (int i = 0; i < L; ++i) r[i] = std::sqrt(x[i]);
#endif
  return r;
}
inline float Sqrt(float x) { return std::sqrt(x); }

struct AdamConstants {
  float b1, b2, one_minus_b1, one_minus_b2, eps, eps_root;  // 1 - b as optax rounds it
  float weight_decay;                                        // AdamW's; 0: Adam
  float step, c1, c2;                                        // this step's
};

// C1, C2: whether to divide by c1, c2. Where one is exactly 1 (1 - b^t rounds to 1 in float32
// once b^t < 2^-25: after ~160 steps for b1 = 0.9, ~17,300 for b2 = 0.999), its division is
// skipped, which gives the same bits (x / 1 is x). Each division is a sixth of the loop's time
// with its arrays in cache (one core, the CNN's 204,800-element Dense kernel: 176 us with both,
// 148 with one, 124 with none; BENCHMARKS.md, session 35).
template <bool C1, bool C2, typename T>
inline void AdamUpdate(const AdamConstants& k, T g, T& p, T& m, T& v) {
  m = k.one_minus_b1 * g + k.b1 * m;
  v = k.one_minus_b2 * (g * g) + k.b2 * v;
  const T u = (C1 ? m / k.c1 : m) / (Sqrt((C2 ? v / k.c2 : v) + k.eps_root) + k.eps);
  p = p + k.step * (k.weight_decay != 0.0f ? u + k.weight_decay * p : u);
}

constexpr int64_t kAdamChunk = 1 << 14;  // Elements per task (a multiple of L).

// The update of n elements from p_in, m_in, v_in into p, m, v (the same arrays, or copied to them
// first); with `skip`, only the copies.
template <typename Pool>
void AdamCore(Pool& pool, const AdamConstants& k, bool skip, int64_t n, const float* g,
              const float* p_in, const float* m_in, const float* v_in, float* p, float* m,
              float* v) {
  for (const auto& [in, out] : {std::pair(p_in, p), std::pair(m_in, m), std::pair(v_in, v)}) {
    if (in != out) std::memcpy(out, in, n * sizeof(float));
  }
  if (skip) return;
  const auto update = [&](auto c1, auto c2) {  // std::bool_constant: the divisions to make.
    ParallelFor(pool, (n + kAdamChunk - 1) / kAdamChunk, [&](int64_t chunk) {
      const int64_t end = std::min(n, (chunk + 1) * kAdamChunk);
      int64_t i = chunk * kAdamChunk;
      for (; i + L <= end; i += L) {
        fv pi = Load(p + i), mi = Load(m + i), vi = Load(v + i);
        AdamUpdate<c1(), c2()>(k, Load(g + i), pi, mi, vi);
        Store(p + i, pi), Store(m + i, mi), Store(v + i, vi);
      }
      for (; i < end; ++i) AdamUpdate<c1(), c2()>(k, g[i], p[i], m[i], v[i]);
    });
  };
  using Divide = std::true_type;
  using Skip = std::false_type;
  if (k.c1 != 1.0f) {
    k.c2 != 1.0f ? update(Divide{}, Divide{}) : update(Divide{}, Skip{});
  } else {
    k.c2 != 1.0f ? update(Skip{}, Divide{}) : update(Skip{}, Skip{});
  }
}

// g, p, m, v, scalars [step, c1, c2, skip] -> p, m, v (adam.py aliases them to p, m, v)
ffi::Error Adam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> p,
                ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> scalars,
                ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> m_out,
                ffi::ResultBuffer<ffi::F32> v_out, float b1, float b2, float one_minus_b1,
                float one_minus_b2, float eps, float eps_root, float weight_decay) {
  const size_t n = g.element_count();
  if (p.element_count() != n || m.element_count() != n || v.element_count() != n ||
      p_out->element_count() != n || m_out->element_count() != n ||
      v_out->element_count() != n || scalars.element_count() != 4) {
    return ffi::Error::InvalidArgument("fashion_jax adam: g, p, m, v and the outputs must have "
                                       "one size, the scalars 4");
  }
  const float* s = scalars.typed_data();
  const AdamConstants k{b1,  b2,       one_minus_b1, one_minus_b2, eps, eps_root, weight_decay,
                        s[0], s[1], s[2]};
  AdamCore(pool, k, s[3] != 0.0f, static_cast<int64_t>(n), g.typed_data(), p.typed_data(),
           m.typed_data(), v.typed_data(), p_out->typed_data(), m_out->typed_data(),
           v_out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#if !defined(FJ_PART) || FJ_PART == 2  // The other handlers and the C functions.
// What this build uses, for logs and benchmarks: "lanes=16 isa=avx512f,avx2,fma".
extern "C" const char* FjKernelInfo() {
  static const std::string info = [] {
    std::string isa;
    auto add = [&isa](const char* name) { isa += (isa.empty() ? "" : ",") + std::string(name); };
#if defined(__AVX512F__)
    add("avx512f");
#endif
#if defined(__AVX512BF16__)
    add("avx512bf16");
#endif
#if defined(__AVX2__)
    add("avx2");
#endif
#if defined(__FMA__)
    add("fma");
#endif
#if defined(__SSE2__) && !defined(__AVX2__)
    add("sse2");
#endif
#if defined(__ARM_FEATURE_SVE)
    add("sve");
#endif
#if defined(__ARM_NEON)
    add("neon");
#endif
    if (isa.empty()) add("generic");
    return "lanes=" + std::to_string(L) + " isa=" + isa;
  }();
  return info.c_str();
}

// The machine's peak, measured (the benchmark's MFU and HFU divide by it). cpuinfo's "cpu MHz" is
// the nominal clock in many VMs (2,596 MHz on a Zen 5 VM whose cores ran at 3,700-4,250 under
// load), and the FLOP per cycle of a vector width differ between cores (Zen 4 executes a 512-bit
// FMA as two 256-bit halves, Zen 5 in one): so each of `threads` threads times a loop of
// independent multiply-adds at the widest vector width the CPU has (found at run time, whatever
// this build's target), and a chain of dependent integer additions (one per cycle) for the clock.
namespace {
namespace peak {

#if defined(__aarch64__)
#define FJ_VREG "+w"  // A vector register operand (inline asm constraint).
#else
#define FJ_VREG "+x"
#endif

// kAcc (12 or 16) independent accumulator chains of `kLanes`-float vectors: enough to cover the
// FMA latency (4 cycles) on 2-4 pipes without spilling (AVX2 has 16 registers: 12 there). Named
// variables, not an array (GCC kept the array on the stack). A macro that defines each function
// whole, with its ISA: Clang checks an asm operand's width against the ISA of the function the
// asm is written in (not the one it is inlined into), so a template could not hold it.
typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));

// One multiply-add on a chain, kept in a register: the empty asm stops the compiler from
// collapsing or reordering the loop.
#define FJ_FMA(a)    \
  a = a * m + c;     \
  __asm__ volatile("" : FJ_VREG(a));
#define FJ_FMA_FUNCTION(name, isa, v, kAcc)                                                      \
  isa void name(int64_t iters, float* sink) {                                                    \
    static_assert(kAcc == 12 || kAcc == 16);                                                     \
    const v m = v{} + 0.999999f, c = v{} + 0.000001f; /* Converges to 1 (no denormals). */      \
    v a0 = v{}, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4,                              \
      a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10,            \
      a11 = a0 + 11, a12 = a0 + 12, a13 = a0 + 13, a14 = a0 + 14, a15 = a0 + 15;                 \
    for (int64_t i = 0; i < iters; ++i) {                                                        \
      FJ_FMA(a0) FJ_FMA(a1) FJ_FMA(a2) FJ_FMA(a3) FJ_FMA(a4) FJ_FMA(a5)                          \
      FJ_FMA(a6) FJ_FMA(a7) FJ_FMA(a8) FJ_FMA(a9) FJ_FMA(a10) FJ_FMA(a11)                        \
      if (kAcc == 16) {                                                                          \
        FJ_FMA(a12) FJ_FMA(a13) FJ_FMA(a14) FJ_FMA(a15)                                          \
      }                                                                                          \
    }                                                                                            \
    v total = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;                      \
    if (kAcc == 16) total += a12 + a13 + a14 + a15;                                              \
    *sink = total[0];                                                                            \
  }

#if defined(__x86_64__)
FJ_FMA_FUNCTION(Fma16, __attribute__((target("avx512f"))), v16, 16)
FJ_FMA_FUNCTION(Fma8, __attribute__((target("avx2,fma"))), v8, 12)
FJ_FMA_FUNCTION(Fma4, , v4, 12)  // SSE2: mul + add.
int WidestLanes() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
  return 4;
}
int Accumulators(int lanes) { return lanes == 16 ? 16 : 12; }
void Fma(int lanes, int64_t iters, float* sink) {
  lanes == 16 ? Fma16(iters, sink) : lanes == 8 ? Fma8(iters, sink) : Fma4(iters, sink);
}
#elif defined(__aarch64__)
int WidestLanes() { return 4; }  // NEON (SVE's width varies; its peak is not measured yet).
int Accumulators(int) { return 16; }
FJ_FMA_FUNCTION(Fma4x16, , v4, 16)
void Fma(int, int64_t iters, float* sink) { Fma4x16(iters, sink); }
#endif
#undef FJ_FMA_FUNCTION
#undef FJ_FMA

// Eight dependent integer additions per iteration, one cycle each on any core (the loop's own
// counter runs beside them). Of a register, not a constant: Intel's cores from Golden Cove on
// (Sapphire and Granite Rapids Xeons) fold additions of an immediate in the renamer, several a
// cycle (a chain of `add $1` ran at 18,900 "MHz" on one; `add %reg` at its real ~3,600).
void AddChain(int64_t iters, int64_t* sink) {
  int64_t x = 0, one = 1;
  __asm__ volatile("" : "+r"(one));  // Unknown to the compiler: no immediate operand.
  for (int64_t i = 0; i < iters; ++i) {
    for (int r = 0; r < 8; ++r) {
      x += one;
      __asm__ volatile("" : "+r"(x));
    }
  }
  *sink = x;
}

// Runs body(t) on `threads` threads released together; returns the seconds the fastest took. The
// fastest, not the slowest: on a shared VM one virtual core may be descheduled for a while (seen
// on a 2-core Zen 3 VM: the pair at half its rate for seconds), which only ever slows a thread,
// and the peak is what every core can do while all run.
template <typename F>
double Timed(int threads, const F& body) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  std::vector<double> seconds(threads);
  std::chrono::steady_clock::time_point start;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      body(t);
      seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& thread : pool) thread.join();
  return *std::min_element(seconds.begin(), seconds.end());
}

// Times `run(iters)` on every thread for about `seconds`: the count is calibrated on one thread.
// Returns the seconds and sets `iters`.
template <typename F>
double Calibrated(int threads, double seconds, const F& run, int64_t* iters) {
  int64_t n = 1 << 14;
  double dt;
  while ((dt = Timed(1, [&](int t) { run(t, n); })) < 0.01) n *= 4;
  *iters = std::max<int64_t>(1, static_cast<int64_t>(n * seconds / dt));
  return Timed(threads, [&](int t) { run(t, *iters); });
}

}  // namespace peak
}  // namespace

// Measures the CPU's multiply-add peak on `threads` threads for about `seconds`: writes GFLOP/s
// (all threads together, each at the fastest one's rate: Timed) and the clock in MHz (the same
// thread's: all run alike). `lanes`: in, the vector width to time (0: the widest this CPU has);
// out, the width timed. Returns 0; -1 where this architecture has no measurement, -2 where the
// CPU lacks the width asked for.
extern "C" int FjMeasurePeak(int threads, double seconds, double* gflops, double* mhz,
                             int* lanes) {
#if defined(__x86_64__) || defined(__aarch64__)
  threads = std::max(threads, 1);
  const int widest = peak::WidestLanes();
  if (*lanes != 0 && (*lanes > widest || (*lanes != 4 && *lanes != 8 && *lanes != 16))) return -2;
  const int width = *lanes != 0 ? *lanes : widest;
  std::vector<float> fsink(threads);
  std::vector<int64_t> isink(threads);
  int64_t n;
  double dt = peak::Calibrated(
      threads, seconds / 2, [&](int t, int64_t i) { peak::Fma(width, i, &fsink[t]); }, &n);
  *gflops = 2.0 * width * peak::Accumulators(width) * n * threads / dt / 1e9;
  dt = peak::Calibrated(
      threads, seconds / 2, [&](int t, int64_t i) { peak::AddChain(i, &isink[t]); }, &n);
  *mhz = 8.0 * n / dt / 1e6;
  *lanes = width;
  return 0;
#else
  (void)threads, (void)seconds, (void)gflops, (void)mhz, (void)lanes;
  return -1;
#endif
}

#endif  // FJ_PART 2

namespace {

// Bindings shared by handlers of one signature.
// The thread pool and three float32 arrays: the start of the three-argument bindings below.
inline auto ThreeFloatArgs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

// x, kernel, bias -> pooled y, argmax; relu (the pooled forwards)
inline auto ConvPoolBinding() {
  return ThreeFloatArgs()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::S8>>()
      .Attr<int32_t>("relu");
}

// two float32 arrays -> one (the plain convolutions, the direct one's kernel gradient, the
// dense forward)
inline auto PlainConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// three float32 arrays -> two (the gradients of the plain Winograd convolution and the dense)
inline auto PlainGradBinding() {
  return ThreeFloatArgs()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// y, dz, coef -> sums or dy; pad (the BatchNorm + ReLU gradient passes)
inline auto BnReluGradBinding() {
  return ThreeFloatArgs()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int32_t>("pad");
}

// y, pooled dz, argmax, coef -> sums or dy (with the pool)
inline auto BnReluPoolGradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

#if !defined(FJ_PART) || FJ_PART == 1  // The conv+pool, Winograd and two-layer handlers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FjConvPoolForward, ConvPoolForward, ConvPoolBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjConvPoolBackward, ConvPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradConvPoolForward, WinogradConvPoolForward,
                              ConvPoolBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradConvPoolBackward, WinogradConvPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradConvForward, WinogradConvForward, PlainConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradConvBackward, WinogradConvBackward, PlainGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjFilterTransform, FilterTransformHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjFilterTransformGrad, FilterTransformGradHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// x, k1, b1, k2, b2 -> y, argmax (training's forward adds h and the first layer's argmax).
inline auto TwoLayerForwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::S8>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjTwoLayerForward, TwoLayerForwardHandler,
                              TwoLayerForwardBinding()
                                  .Attr<int32_t>("relu1")
                                  .Attr<int32_t>("relu2")
                                  .Attr<int32_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjTwoLayerTrainForward, TwoLayerTrainForwardHandler,
                              TwoLayerForwardBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int32_t>("relu1")
                                  .Attr<int32_t>("relu2")
                                  .Attr<int32_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjTwoLayerBackward, TwoLayerBackwardHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("tile"));

#endif  // FJ_PART 1

#if !defined(FJ_PART) || FJ_PART == 2  // The other handlers and the C functions.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnStats, BnStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluForward, BnReluForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("pad"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluGradSums, BnReluGradSums, BnReluGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluGrad, BnReluGrad, BnReluGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluPoolForward, BnReluPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluPoolGradSums, BnReluPoolGradSums, BnReluPoolGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjBnReluPoolGrad, BnReluPoolGrad, BnReluPoolGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjDirectConvForward, DirectConvForward, PlainConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjDirectConvBackward, DirectConvBackward, PlainConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjDenseForward, DenseForward, PlainConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjDenseBackward, DenseBackward, PlainGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjAdam, Adam,
                              ThreeFloatArgs()  // g, p, m, then v and the scalars
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // p, m, v
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjKeepMask, KeepMask,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("p"));
#endif  // FJ_PART 2
