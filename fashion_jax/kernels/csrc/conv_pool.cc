// fashion_jax's native CPU kernels for 3x3 convolutions (fashion_jax/native.py
// builds this file and wraps each handler; BENCHMARKS.md has the measurements).
//
// 1. Fused 3x3 VALID convolution + bias + 2x2 VALID max-pooling for few input
//    channels (the first conv of a small CNN). XLA:CPU runs the classic CNN's
//    first conv (1 -> 32 channels) as an im2col matmul with K = 9, which is
//    memory-bound, and then writes, re-reads and scatters the 26x26x32
//    activation for the pool and its gradient. Here each 2x2 pooling window's
//    four conv outputs are computed in registers, pooled, and only the pooled
//    value and its argmax (int8, 0..3, first maximum wins, like
//    reduce_window's transpose) are written. The backward pass recomputes
//    nothing: it routes the pooled gradient to the argmax tap and accumulates
//    the kernel and bias gradients in registers.
// 2. Winograd F(2x2, 3x3) transforms and weight-gradient contraction for wide
//    inputs (further down), around XLA's matmuls.
//
// Layouts: x NHWC float32, kernel HWIO [3, 3, Cin, Cout] float32 with
// Cout a multiple of the vector width (FJ_LANES), bias [Cout]; pooled output
// [N, (H-2)/2, (W-2)/2, Cout].
// Work is split over images, fixed image chunks or Winograd planes (partial
// sums added in a fixed order, so results do not depend on the thread count)
// and run on XLA's intra-op thread pool.
//
// The vector code uses GCC/Clang vector extensions, so it compiles for any
// target; fashion_jax builds it with -march=native on the machine it runs on.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector width: 8 floats (AVX2's registers, two NEON registers) or 4 or 16 (AVX-512's),
// chosen at build time by native.py (-DFJ_LANES=...; native.lanes() says why 8 is the default).
// Every channel block below is one vector; channel counts must be multiples of it. The code is width-generic: a width wider than the target's registers compiles
// to several instructions per operation (that is how the 16-lane path is tested on AVX2).
#ifndef FJ_LANES
#if defined(__AVX512F__)
#define FJ_LANES 16
#else
#define FJ_LANES 8
#endif
#endif
constexpr int L = FJ_LANES;
static_assert(L == 4 || L == 8 || L == 16, "FJ_LANES must be 4, 8 or 16");

typedef float fv __attribute__((vector_size(4 * L)));     // L floats
typedef int32_t iv __attribute__((vector_size(4 * L)));  // L int32 (masks)
typedef int8_t bv __attribute__((vector_size(L)));       // L int8 (argmax)

inline fv Load(const float* p) {
  fv v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, fv v) { std::memcpy(p, &v, sizeof(v)); }
// Broadcasts as vector-scalar arithmetic, which compiles to one broadcast instruction. (A loop
// over the lanes compiled, with GCC 12 at 16 lanes, to 16 masked broadcasts or stack round trips:
// it made the 16-lane build 1.7x slower than the 8-lane one on AVX-512.)
inline fv Splat(float s) { return -fv{} + s; }  // -0.0 + s is s exactly, even for s = -0.0.
inline iv SplatI(int32_t s) { return iv{} + s; }

struct Shape {
  int64_t n, h, w, cin, cout, hp, wp;
};

// Runs f(i) for i in [0, n) on the calling thread and the pool's threads. The
// caller claims work too, so it never waits for a task that has not started.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
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

// One image, one block of L output channels. CIN > 0: compile-time channel count.
template <int CIN>
void ForwardBlock(const Shape& s, const float* x, const float* k, const float* b, float* y,
                  int8_t* arg, int64_t cb) {
  const int64_t cin = CIN > 0 ? CIN : s.cin;
  std::vector<fv> wheap(CIN > 0 ? 0 : 9 * cin);
  fv wstack[CIN > 0 ? 9 * CIN : 1];
  fv* w = CIN > 0 ? wstack : wheap.data();
  for (int64_t t = 0; t < 9 * cin; ++t) w[t] = Load(k + t * s.cout + cb);
  const fv bias = Load(b + cb);
  for (int64_t i = 0; i < s.hp; ++i) {
    for (int64_t j = 0; j < s.wp; ++j) {
      fv acc[4] = {bias, bias, bias, bias};
      // The 4x4 input patch covers the four 3x3 windows of the pooling window.
      for (int r = 0; r < 4; ++r) {
        for (int c = 0; c < 4; ++c) {
          const float* px = x + ((2 * i + r) * s.w + 2 * j + c) * cin;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const fv xv = Splat(px[ci]);
            for (int dy = 0; dy < 2; ++dy) {
              for (int dx = 0; dx < 2; ++dx) {
                const int ky = r - dy, kx = c - dx;
                if (ky < 0 || ky > 2 || kx < 0 || kx > 2) continue;
                acc[2 * dy + dx] += xv * w[(ky * 3 + kx) * cin + ci];
              }
            }
          }
        }
      }
      fv best = acc[0];
      iv which = SplatI(0);
      for (int q = 1; q < 4; ++q) {
        const iv better = acc[q] > best;  // Strict: the first maximum wins ties.
        best = better ? acc[q] : best;
        which = better ? SplatI(q) : which;
      }
      const int64_t o = (i * s.wp + j) * s.cout + cb;
      Store(y + o, best);
      const bv which_b = __builtin_convertvector(which, bv);
      std::memcpy(arg + o, &which_b, sizeof(which_b));
    }
  }
}

// Kernel and bias gradients of one image, one block, added into gw/gb.
template <int CIN>
void BackwardBlock(const Shape& s, const float* x, const int8_t* arg, const float* dy,
                   fv* gw, fv& gb, int64_t cb) {
  const int64_t cin = CIN > 0 ? CIN : s.cin;
  for (int64_t i = 0; i < s.hp; ++i) {
    for (int64_t j = 0; j < s.wp; ++j) {
      const int64_t o = (i * s.wp + j) * s.cout + cb;
      const fv g = Load(dy + o);
      bv which_b;
      std::memcpy(&which_b, arg + o, sizeof(which_b));
      const iv which = __builtin_convertvector(which_b, iv);
      gb += g;
      const fv zero = Splat(0.0f);
      fv gq[4];
      for (int q = 0; q < 4; ++q) gq[q] = which == SplatI(q) ? g : zero;
      for (int r = 0; r < 4; ++r) {
        for (int c = 0; c < 4; ++c) {
          const float* px = x + ((2 * i + r) * s.w + 2 * j + c) * cin;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const fv xv = Splat(px[ci]);
            for (int ddy = 0; ddy < 2; ++ddy) {
              for (int ddx = 0; ddx < 2; ++ddx) {
                const int ky = r - ddy, kx = c - ddx;
                if (ky < 0 || ky > 2 || kx < 0 || kx > 2) continue;
                gw[(ky * 3 + kx) * cin + ci] += xv * gq[2 * ddy + ddx];
              }
            }
          }
        }
      }
    }
  }
}

template <int CIN>
void Forward(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* k,
             const float* b, float* y, int8_t* arg) {
  const int64_t in_img = s.h * s.w * s.cin, out_img = s.hp * s.wp * s.cout;
  ParallelFor(pool, s.n, [&](int64_t n) {
    for (int64_t cb = 0; cb < s.cout; cb += L) {
      ForwardBlock<CIN>(s, x + n * in_img, k, b, y + n * out_img, arg + n * out_img, cb);
    }
  });
}

constexpr int64_t kGradChunks = 8;  // Fixed, so the summation order is too.

template <int CIN>
void Backward(ffi::ThreadPool& pool, const Shape& s, const float* x, const int8_t* arg,
              const float* dy, float* dk, float* db) {
  const int64_t in_img = s.h * s.w * s.cin, out_img = s.hp * s.wp * s.cout;
  const int64_t chunks = std::max<int64_t>(1, std::min(kGradChunks, s.n));
  const int64_t nk = 9 * s.cin * s.cout;
  std::vector<float> partial(chunks * (nk + s.cout), 0.0f);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t lo = s.n * chunk / chunks, hi = s.n * (chunk + 1) / chunks;
    float* pk = partial.data() + chunk * (nk + s.cout);
    float* pb = pk + nk;
    std::vector<fv> gw(9 * s.cin);
    for (int64_t cb = 0; cb < s.cout; cb += L) {
      std::fill(gw.begin(), gw.end(), Splat(0.0f));
      fv gb = Splat(0.0f);
      for (int64_t n = lo; n < hi; ++n) {
        BackwardBlock<CIN>(s, x + n * in_img, arg + n * out_img, dy + n * out_img, gw.data(),
                           gb, cb);
      }
      for (int64_t t = 0; t < 9 * s.cin; ++t) Store(pk + t * s.cout + cb, gw[t]);
      Store(pb + cb, gb);
    }
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

#define FJ_DISPATCH_CIN(CIN_VALUE, CALL) \
  switch (CIN_VALUE) {                   \
    case 1: CALL(1); break;              \
    case 2: CALL(2); break;              \
    case 3: CALL(3); break;              \
    case 4: CALL(4); break;              \
    default: CALL(0); break;             \
  }

ffi::Error ConvPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> arg) {
  Shape s;
  if (ffi::Error e = CheckShapes(x.dimensions(), kernel.dimensions(), &s); e.failure()) return e;
#define FJ_CALL(C) \
  Forward<C>(pool, s, x.typed_data(), kernel.typed_data(), bias.typed_data(), \
             y->typed_data(), arg->typed_data())
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
  return ffi::Error::Success();
}

ffi::Error ConvPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::S8> arg,
                            ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                            ffi::ResultBuffer<ffi::F32> dbias) {
  Shape s;
  if (ffi::Error e = CheckShapes(x.dimensions(), kernel.dimensions(), &s); e.failure()) return e;
#define FJ_CALL(C) \
  Backward<C>(pool, s, x.typed_data(), arg.typed_data(), dy.typed_data(), \
              dkernel->typed_data(), dbias->typed_data())
  FJ_DISPATCH_CIN(s.cin, FJ_CALL)
#undef FJ_CALL
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Winograd F(2x2, 3x3) conv + 2x2 max-pool (fashion_jax/winograd.py) for wide
// inputs: the channel contractions stay XLA matmuls; these kernels do the
// transforms around them, each in one pass over memory.
//
//   V = B^T d B  for each 4x4 input window d   [B,H,W,C] -> [16, tiles, C]
//   y = max over the tile of A^T M A + bias     [16, tiles, K] -> [B,th,tw,K]
// and their transposes for the backward pass. B^T rows: (1,0,-1,0), (0,1,1,0),
// (0,-1,1,0), (0,1,0,-1); A^T rows: (1,1,1,0), (0,1,-1,-1). Tile (i, j) of
// image b is tile number (b*th + i)*tw + j; its window starts at (2i, 2j).

inline void InputTransform4(const fv d[4], fv t[4]) {  // t = B^T d
  t[0] = d[0] - d[2];
  t[1] = d[1] + d[2];
  t[2] = d[2] - d[1];
  t[3] = d[1] - d[3];
}

inline void InputTransform4T(const fv t[4], fv d[4]) {  // d = B t (the transpose)
  d[0] = t[0];
  d[1] = t[1] - t[2] + t[3];
  d[2] = t[1] + t[2] - t[0];
  d[3] = -t[3];
}

struct Tiles {
  int64_t n, h, w, c, th, tw;
  int64_t count() const { return n * th * tw; }
};

void WinogradInputImage(const Tiles& s, const float* x, float* v, int64_t b) {
  const int64_t plane = s.count() * s.c;
  for (int64_t i = 0; i < s.th; ++i) {
    for (int64_t j = 0; j < s.tw; ++j) {
      const int64_t tile = (b * s.th + i) * s.tw + j;
      for (int64_t cb = 0; cb < s.c; cb += L) {
        fv rows[4][4];  // rows[r][col] = (B^T d)[r][col]
        for (int col = 0; col < 4; ++col) {
          fv d[4];
          for (int r = 0; r < 4; ++r) {
            d[r] = Load(x + (((b * s.h) + 2 * i + r) * s.w + 2 * j + col) * s.c + cb);
          }
          fv t[4];
          InputTransform4(d, t);
          for (int r = 0; r < 4; ++r) rows[r][col] = t[r];
        }
        for (int r = 0; r < 4; ++r) {
          fv t[4];
          InputTransform4(rows[r], t);
          for (int q = 0; q < 4; ++q) Store(v + (r * 4 + q) * plane + tile * s.c + cb, t[q]);
        }
      }
    }
  }
}

// dx of one image: each window's B dV B^T added where the window came from.
void WinogradInputGradImage(const Tiles& s, const float* dv, float* dx, int64_t b) {
  const int64_t plane = s.count() * s.c;
  float* img = dx + b * s.h * s.w * s.c;
  std::fill(img, img + s.h * s.w * s.c, 0.0f);
  for (int64_t i = 0; i < s.th; ++i) {
    for (int64_t j = 0; j < s.tw; ++j) {
      const int64_t tile = (b * s.th + i) * s.tw + j;
      for (int64_t cb = 0; cb < s.c; cb += L) {
        fv rows[4][4];
        for (int r = 0; r < 4; ++r) {
          fv t[4];
          for (int q = 0; q < 4; ++q) t[q] = Load(dv + (r * 4 + q) * plane + tile * s.c + cb);
          InputTransform4T(t, rows[r]);  // rows[r][col]
        }
        for (int col = 0; col < 4; ++col) {
          fv t[4] = {rows[0][col], rows[1][col], rows[2][col], rows[3][col]};
          fv d[4];
          InputTransform4T(t, d);
          for (int r = 0; r < 4; ++r) {
            float* p = img + ((2 * i + r) * s.w + 2 * j + col) * s.c + cb;
            Store(p, Load(p) + d[r]);
          }
        }
      }
    }
  }
}

void WinogradOutputPoolImage(const Tiles& s, const float* m, const float* bias, float* y,
                             int8_t* arg, int64_t b) {
  const int64_t plane = s.count() * s.c;  // s.c is K here.
  for (int64_t t0 = b * s.th * s.tw, tile = t0; tile < t0 + s.th * s.tw; ++tile) {
    for (int64_t kb = 0; kb < s.c; kb += L) {
      fv h[2][4];  // h[a][col] = (A^T m)[a][col]
      for (int col = 0; col < 4; ++col) {
        fv mc[4];
        for (int r = 0; r < 4; ++r) mc[r] = Load(m + (r * 4 + col) * plane + tile * s.c + kb);
        h[0][col] = mc[0] + mc[1] + mc[2];
        h[1][col] = mc[1] - mc[2] - mc[3];
      }
      fv out[4];
      for (int a = 0; a < 2; ++a) {
        out[2 * a] = h[a][0] + h[a][1] + h[a][2];
        out[2 * a + 1] = h[a][1] - h[a][2] - h[a][3];
      }
      fv best = out[0];
      iv which = SplatI(0);
      for (int q = 1; q < 4; ++q) {
        const iv better = out[q] > best;  // Strict: the first maximum wins ties.
        best = better ? out[q] : best;
        which = better ? SplatI(q) : which;
      }
      Store(y + tile * s.c + kb, best + Load(bias + kb));
      const bv which_b = __builtin_convertvector(which, bv);
      std::memcpy(arg + tile * s.c + kb, &which_b, sizeof(which_b));
    }
  }
}

// dM of one image's tiles: the pooled gradient at the winning output, times A (x) A.
void WinogradOutputPoolGradImage(const Tiles& s, const float* dy, const int8_t* arg, float* dm,
                                 int64_t b) {
  const int64_t plane = s.count() * s.c;
  const fv zero = Splat(0.0f);
  for (int64_t t0 = b * s.th * s.tw, tile = t0; tile < t0 + s.th * s.tw; ++tile) {
    for (int64_t kb = 0; kb < s.c; kb += L) {
      const fv g = Load(dy + tile * s.c + kb);
      bv which_b;
      std::memcpy(&which_b, arg + tile * s.c + kb, sizeof(which_b));
      const iv which = __builtin_convertvector(which_b, iv);
      fv go[4];
      for (int q = 0; q < 4; ++q) go[q] = which == SplatI(q) ? g : zero;
      fv h[2][4];  // h[a][col] = sum_b A^T[b][col] go[a][b]
      for (int a = 0; a < 2; ++a) {
        h[a][0] = go[2 * a];
        h[a][1] = go[2 * a] + go[2 * a + 1];
        h[a][2] = go[2 * a] - go[2 * a + 1];
        h[a][3] = -go[2 * a + 1];
      }
      for (int col = 0; col < 4; ++col) {
        const fv rows[4] = {h[0][col], h[0][col] + h[1][col], h[0][col] - h[1][col], -h[1][col]};
        for (int r = 0; r < 4; ++r) Store(dm + (r * 4 + col) * plane + tile * s.c + kb, rows[r]);
      }
    }
  }
}

ffi::Error TilesOf(ffi::Span<const int64_t> image, int64_t c, Tiles* s) {
  if (image.size() != 4 || image[1] < 4 || image[2] < 4 || c % L != 0) {
    return ffi::Error::InvalidArgument("fashion_jax winograd: expected images [N, H, W, C], "
                                       "H, W >= 4, C % " + std::to_string(L) + " == 0");
  }
  *s = Tiles{image[0], image[1], image[2], c, (image[1] - 2) / 2, (image[2] - 2) / 2};
  return ffi::Error::Success();
}

ffi::Error CheckPlanes(ffi::Span<const int64_t> planes, const Tiles& s) {
  if (planes.size() != 3 || planes[0] != 16 || planes[1] != s.count() || planes[2] != s.c) {
    return ffi::Error::InvalidArgument("fashion_jax winograd: expected [16, tiles, channels]");
  }
  return ffi::Error::Success();
}

// The tiles behind a pooled output [N, th, tw, K] (the images [N, 2th+2, 2tw+2, K]
// it pools), checked against the planes [16, tiles, K].
ffi::Error PooledTilesOf(ffi::Span<const int64_t> pooled, ffi::Span<const int64_t> planes,
                         Tiles* s) {
  if (pooled.size() != 4) {
    return ffi::Error::InvalidArgument("fashion_jax winograd: expected pooled [N, th, tw, K]");
  }
  const int64_t image[4] = {pooled[0], 2 * pooled[1] + 2, 2 * pooled[2] + 2, pooled[3]};
  if (ffi::Error e = TilesOf(ffi::Span<const int64_t>(image, 4), pooled[3], s); e.failure()) {
    return e;
  }
  return CheckPlanes(planes, *s);
}

ffi::Error WinogradInput(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> v) {
  Tiles s;
  if (ffi::Error e = TilesOf(x.dimensions(), x.dimensions().back(), &s); e.failure()) return e;
  if (ffi::Error e = CheckPlanes(v->dimensions(), s); e.failure()) return e;
  ParallelFor(pool, s.n, [&](int64_t b) {
    WinogradInputImage(s, x.typed_data(), v->typed_data(), b);
  });
  return ffi::Error::Success();
}

ffi::Error WinogradInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dv,
                             ffi::ResultBuffer<ffi::F32> dx) {
  Tiles s;
  if (ffi::Error e = TilesOf(dx->dimensions(), dx->dimensions().back(), &s); e.failure()) return e;
  if (ffi::Error e = CheckPlanes(dv.dimensions(), s); e.failure()) return e;
  ParallelFor(pool, s.n, [&](int64_t b) {
    WinogradInputGradImage(s, dv.typed_data(), dx->typed_data(), b);
  });
  return ffi::Error::Success();
}

ffi::Error WinogradOutputPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m,
                              ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                              ffi::ResultBuffer<ffi::S8> arg) {
  Tiles s;
  if (ffi::Error e = PooledTilesOf(y->dimensions(), m.dimensions(), &s); e.failure()) return e;
  ParallelFor(pool, s.n, [&](int64_t b) {
    WinogradOutputPoolImage(s, m.typed_data(), bias.typed_data(), y->typed_data(),
                            arg->typed_data(), b);
  });
  return ffi::Error::Success();
}

ffi::Error WinogradOutputPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::S8> arg, ffi::ResultBuffer<ffi::F32> dm) {
  Tiles s;
  if (ffi::Error e = PooledTilesOf(dy.dimensions(), dm->dimensions(), &s); e.failure()) return e;
  ParallelFor(pool, s.n, [&](int64_t b) {
    WinogradOutputPoolGradImage(s, dy.typed_data(), arg.typed_data(), dm->typed_data(), b);
  });
  return ffi::Error::Success();
}

// dU[x] = V[x]^T dM[x] for each of the 16 Winograd planes: the weight gradient's
// contraction over all tiles ([C, tiles] x [tiles, K], small output, very long
// contraction), which XLA:CPU runs at a fraction of its matmul speed. Tiles are
// taken in chunks that stay in cache; for each chunk the blocks of dU are
// accumulated in registers. One plane per work unit, tiles in order:
// deterministic.
constexpr int64_t kTileChunk = 64;

// A CB x (L * KV) block of dU over tiles [t0, t1), accumulated in registers.
template <int CB, int KV>
void WeightGradBlock(const float* v, const float* dm, float* du, int64_t t0, int64_t t1,
                     int64_t c, int64_t k, int64_t c0, int64_t k0) {
  fv acc[CB][KV];
  for (int i = 0; i < CB; ++i) {
    for (int j = 0; j < KV; ++j) acc[i][j] = Load(du + (c0 + i) * k + k0 + L * j);
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float* vr = v + t * c + c0;
    fv m[KV];
    for (int j = 0; j < KV; ++j) m[j] = Load(dm + t * k + k0 + L * j);
    for (int i = 0; i < CB; ++i) {
      const fv b = Splat(vr[i]);
      for (int j = 0; j < KV; ++j) acc[i][j] += b * m[j];
    }
  }
  for (int i = 0; i < CB; ++i) {
    for (int j = 0; j < KV; ++j) Store(du + (c0 + i) * k + k0 + L * j, acc[i][j]);
  }
}

template <int CB>
void WeightGradRows(const float* v, const float* dm, float* du, int64_t t0, int64_t t1,
                    int64_t c, int64_t k, int64_t c0) {
  int64_t k0 = 0;
  for (; k0 + 2 * L <= k; k0 += 2 * L) WeightGradBlock<CB, 2>(v, dm, du, t0, t1, c, k, c0, k0);
  if (k0 < k) WeightGradBlock<CB, 1>(v, dm, du, t0, t1, c, k, c0, k0);  // K % (2L) == L.
}

// 6 x 2L blocks: 12 accumulators, enough independent FMAs to hide their latency.
void WinogradWeightGradPlane(int64_t tiles, int64_t c, int64_t k, const float* v,
                             const float* dm, float* du) {
  std::fill(du, du + c * k, 0.0f);
  for (int64_t t0 = 0; t0 < tiles; t0 += kTileChunk) {
    const int64_t t1 = std::min(tiles, t0 + kTileChunk);
    int64_t c0 = 0;
    for (; c0 + 6 <= c; c0 += 6) WeightGradRows<6>(v, dm, du, t0, t1, c, k, c0);
    switch (c - c0) {  // C % 4 == 0, so 0, 2 or 4 rows are left.
      case 4: WeightGradRows<4>(v, dm, du, t0, t1, c, k, c0); break;
      case 2: WeightGradRows<2>(v, dm, du, t0, t1, c, k, c0); break;
      default: break;
    }
  }
}

ffi::Error WinogradWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::F32> dm, ffi::ResultBuffer<ffi::F32> du) {
  auto vd = v.dimensions(), md = dm.dimensions(), ud = du->dimensions();
  if (vd.size() != 3 || md.size() != 3 || ud.size() != 3 || vd[0] != md[0] || vd[1] != md[1] ||
      ud[0] != vd[0] || ud[1] != vd[2] || ud[2] != md[2] || vd[2] % 4 != 0 || md[2] % L != 0) {
    return ffi::Error::InvalidArgument(
        "fashion_jax winograd weight grad: expected V [P, n, C], dM [P, n, K] -> [P, C, K], "
        "C % 4 == 0, K % " + std::to_string(L) + " == 0");
  }
  const int64_t planes = vd[0], tiles = vd[1], c = vd[2], k = md[2];
  ParallelFor(pool, planes, [&](int64_t x) {
    WinogradWeightGradPlane(tiles, c, k, v.typed_data() + x * tiles * c,
                            dm.typed_data() + x * tiles * k, du->typed_data() + x * c * k);
  });
  return ffi::Error::Success();
}

}  // namespace

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjConvPoolForward, ConvPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjConvPoolBackward, ConvPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradInput, WinogradInput,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradInputGrad, WinogradInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradOutputPool, WinogradOutputPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradOutputPoolGrad, WinogradOutputPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FjWinogradWeightGrad, WinogradWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
