// Self-test of the native kernels without XLA: it includes conv_pool.cc, runs each kernel's
// core on random inputs (serially) and compares with plain loops in double precision.
// tests/test_native_selftest.py builds it with AddressSanitizer and UndefinedBehaviorSanitizer
// for this CPU's levels, and for 64-bit Arm (NEON) to run under qemu-user:
//
//   g++ -std=gnu++17 -O1 -fsanitize=address,undefined -march=x86-64-v3 -DFJ_LANES=8
//       -isystem "$(python -c 'import jax; print(jax.ffi.include_dir())')" selftest.cc -o t; ./t
//
// Exit status 0 and "selftest: N checks passed" when every output matches.

#include "conv_pool.cc"

#include <cmath>
#include <cstdio>
#include <random>

namespace {

using SerialPool = OneThread;  // For ParallelFor: no helper threads, the caller does all the work.

int checks = 0, failures = 0;

template <typename T>
void Expect(const char* what, const std::vector<T>& got, const std::vector<double>& want,
            double tol) {
  ++checks;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]) / (1.0 + std::fabs(want[i]));
    if (!(err <= worst)) worst = err, at = i;  // NaN counts as the worst.
  }
  if (got.size() != want.size() || !(worst <= tol)) {
    ++failures;
    std::printf("FAIL %s (L=%d): max error %g at %zu: got %g, want %g\n", what, L, worst, at,
                double(got[at]), want[at]);
  }
}

void Check(bool ok, const char* what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (L=%d)\n", what, L);
  }
}

std::vector<float> Random(std::mt19937& rng, size_t size, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(size);
  for (float& f : v) f = normal(rng);
  return v;
}

// A layer's problem: x [n, h, w, c], kernel [3, 3, c, k], bias [k], pooled [n, hp, wp, k].
struct Problem {
  int n, h, w, c, k;
  int hp() const { return (h - 2) / 2; }
  int wp() const { return (w - 2) / 2; }
  size_t xi(int b, int i, int j, int ci) const { return ((size_t(b) * h + i) * w + j) * c + ci; }
  size_t ki(int ky, int kx, int ci, int co) const { return ((ky * 3 + kx) * size_t(c) + ci) * k + co; }
  size_t yi(int b, int i, int j, int co) const { return ((size_t(b) * hp() + i) * wp() + j) * k + co; }
};

// The reference: conv (VALID) + bias at output (oi, oj), in double.
double ConvAt(const Problem& p, const std::vector<float>& x, const std::vector<float>& kern,
              const std::vector<float>& bias, int b, int oi, int oj, int co) {
  double sum = bias[co];
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx)
      for (int ci = 0; ci < p.c; ++ci)
        sum += double(x[p.xi(b, oi + ky, oj + kx, ci)]) * kern[p.ki(ky, kx, ci, co)];
  return sum;
}

// The layer's outputs, given the kernel's taps for the backward, and every gradient from the
// gradient dy of the pooled output routed through those taps (4: none).
struct Reference {
  std::vector<double> y, dx, dk, db;
};

Reference Compute(const Problem& p, const std::vector<float>& x, const std::vector<float>& kern,
                  const std::vector<float>& bias, bool relu, const std::vector<int8_t>& tap,
                  const std::vector<float>& dy) {
  Reference r{std::vector<double>(size_t(p.n) * p.hp() * p.wp() * p.k), std::vector<double>(x.size()),
              std::vector<double>(kern.size()), std::vector<double>(p.k)};
  for (int b = 0; b < p.n; ++b)
    for (int i = 0; i < p.hp(); ++i)
      for (int j = 0; j < p.wp(); ++j)
        for (int co = 0; co < p.k; ++co) {
          double best = -INFINITY;
          for (int q = 0; q < 4; ++q) best = std::max(best, ConvAt(p, x, kern, bias, b, 2 * i + q / 2, 2 * j + q % 2, co));
          const size_t o = p.yi(b, i, j, co);
          r.y[o] = relu ? std::max(best, 0.0) : best;
          if (tap[o] > 3) continue;
          const int oi = 2 * i + tap[o] / 2, oj = 2 * j + tap[o] % 2;
          r.db[co] += dy[o];
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
              for (int ci = 0; ci < p.c; ++ci) {
                r.dk[p.ki(ky, kx, ci, co)] += double(dy[o]) * x[p.xi(b, oi + ky, oj + kx, ci)];
                r.dx[p.xi(b, oi + ky, oj + kx, ci)] += double(dy[o]) * kern[p.ki(ky, kx, ci, co)];
              }
        }
  return r;
}

// The taps agree with the reference wherever the window's maximum is clear (not a near-tie
// that float rounding may decide either way) and the ReLU is not near its threshold.
void ExpectTaps(const char* what, const Problem& p, const std::vector<float>& x,
                const std::vector<float>& kern, const std::vector<float>& bias, bool relu,
                const std::vector<int8_t>& tap) {
  ++checks;
  int wrong = 0;
  for (int b = 0; b < p.n; ++b)
    for (int i = 0; i < p.hp(); ++i)
      for (int j = 0; j < p.wp(); ++j)
        for (int co = 0; co < p.k; ++co) {
          double v[4];
          for (int q = 0; q < 4; ++q) v[q] = ConvAt(p, x, kern, bias, b, 2 * i + q / 2, 2 * j + q % 2, co);
          int best = 0;
          for (int q = 1; q < 4; ++q) best = v[q] > v[best] ? q : best;
          bool clear = true;
          for (int q = 0; q < 4; ++q) clear &= q == best || v[best] - v[q] > 1e-3;
          if (!clear || (relu && std::fabs(v[best]) < 1e-3)) continue;
          const int want = relu && v[best] <= 0 ? kNoTap : best;
          wrong += tap[p.yi(b, i, j, co)] != want;
        }
  if (wrong) {
    ++failures;
    std::printf("FAIL %s (L=%d): %d taps differ\n", what, L, wrong);
  }
}

// U = G g G^T per (input, output) channel pair, as fashion_jax.kernels.winograd does: G of
// F(2x2, 3x3) (m = 2, 4 rows), of F(4x4, 3x3) (m = 4, 6 rows) or of F(5x5, 3x3) (m = 5, 7).
const double kG2[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
const double kG4[6][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6},
                          {-1. / 6, 1. / 6, -1. / 6}, {1. / 24, 1. / 12, 1. / 6},
                          {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
const double kG5[7][3] = {{-1. / 2, 0, 0},           {-1. / 3, -1. / 3, -1. / 3},
                          {1. / 9, -1. / 9, 1. / 9},  {1. / 36, 1. / 18, 1. / 9},
                          {-1. / 60, 1. / 30, -1. / 15}, {32. / 45, 16. / 45, 8. / 45},
                          {0, 0, 1}};
inline double G(int m, int a, int k) { return m == 5 ? kG5[a][k] : m == 4 ? kG4[a][k] : kG2[a][k]; }

std::vector<float> FilterTransform(const Problem& p, const std::vector<float>& kern, bool transposed,
                                   int m = 2) {
  const int n = m + 2;
  std::vector<float> u(n * n * size_t(p.c) * p.k);
  for (int a = 0; a < n; ++a)
    for (int e = 0; e < n; ++e)
      for (int ci = 0; ci < p.c; ++ci)
        for (int co = 0; co < p.k; ++co) {
          double sum = 0;
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) sum += G(m, a, ky) * G(m, e, kx) * kern[p.ki(ky, kx, ci, co)];
          const size_t plane = (a * n + e) * size_t(p.c) * p.k;
          u[plane + (transposed ? size_t(co) * p.c + ci : size_t(ci) * p.k + co)] = float(sum);
        }
  return u;
}

std::vector<float> FilterTransformGrad(const Problem& p, const std::vector<float>& du, int m = 2) {
  const int n = m + 2;
  std::vector<float> dk(9 * size_t(p.c) * p.k);
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx)
      for (int ci = 0; ci < p.c; ++ci)
        for (int co = 0; co < p.k; ++co) {
          double sum = 0;
          for (int a = 0; a < n; ++a)
            for (int e = 0; e < n; ++e)
              sum += G(m, a, ky) * G(m, e, kx) * du[(a * n + e) * size_t(p.c) * p.k + size_t(ci) * p.k + co];
          dk[p.ki(ky, kx, ci, co)] = float(sum);
        }
  return dk;
}

void TestConvPool(std::mt19937& rng, const Problem& p, bool winograd, bool relu) {
  SerialPool pool;
  char what[160];
  std::snprintf(what, sizeof(what), "%s n=%d %dx%d c=%d k=%d relu=%d", winograd ? "winograd" : "direct",
                p.n, p.h, p.w, p.c, p.k, relu);
  const std::vector<float> x = Random(rng, size_t(p.n) * p.h * p.w * p.c, 1.0f);
  const std::vector<float> kern = Random(rng, 9 * size_t(p.c) * p.k, 0.3f);
  const std::vector<float> bias = Random(rng, p.k, 0.5f);
  const size_t ny = size_t(p.n) * p.hp() * p.wp() * p.k;
  // dx starts as NaN: the kernels must write all of it (an odd last row or column no window
  // covers gets zeros).
  std::vector<float> y(ny), dx(x.size(), NAN), dk(kern.size()), db(p.k);
  std::vector<int8_t> tap(ny);
  const std::vector<float> dy = Random(rng, ny, 1.0f);
  if (winograd) {
    const Tiles sx{p.n, p.h, p.w, p.c, p.hp(), p.wp()}, sy{p.n, p.h, p.w, p.k, p.hp(), p.wp()};
    WinogradConvPoolForwardCore(pool, sx, sy, x.data(), FilterTransform(p, kern, false).data(),
                                bias.data(), relu, y.data(), tap.data());
    std::vector<float> du(16 * size_t(p.c) * p.k, NAN);  // All of it written (no images: zeros).
    WinogradConvPoolBackwardCore(pool, sx, sy, x.data(), FilterTransform(p, kern, true).data(),
                                 tap.data(), dy.data(), dx.data(), du.data(), db.data());
    dk = FilterTransformGrad(p, du);
  } else {
    const Shape s{p.n, p.h, p.w, p.c, p.k, p.hp(), p.wp()};
    ConvPoolForwardCore(pool, s, x.data(), kern.data(), bias.data(), relu, y.data(), tap.data());
    ConvPoolBackwardCore(pool, s, x.data(), tap.data(), dy.data(), dk.data(), db.data());
  }
  const Reference r = Compute(p, x, kern, bias, relu, tap, dy);
  std::string name(what);
  Expect((name + ": y").c_str(), y, r.y, 1e-5);
  ExpectTaps((name + ": taps").c_str(), p, x, kern, bias, relu, tap);
  Expect((name + ": dkernel").c_str(), dk, r.dk, 2e-5 * p.n * p.hp() * p.wp());
  Expect((name + ": dbias").c_str(), db, r.db, 1e-5 * p.n * p.hp() * p.wp());
  if (winograd) Expect((name + ": dx").c_str(), dx, r.dx, 1e-4);
}

// The fused plain convolution (no pool, no bias): y [n, h-2, w-2, k] and every gradient from
// dy, against the direct sums (h-2 and w-2 multiples of the tile size, as the kernels require;
// native.py pads other sizes). Winograd F(m x m, 3 x 3) (direct = false; dx too) or the direct
// kernel (few input channels; the kernel gradient only, its input gradient is XLA's).
void TestConv(std::mt19937& rng, const Problem& p, bool direct = false, int m = 2) {
  SerialPool pool;
  char what[160];
  std::snprintf(what, sizeof(what), "%s conv n=%d %dx%d c=%d k=%d",
                direct ? "direct" : m == 4 ? "winograd F(4x4)" : "winograd", p.n, p.h, p.w, p.c,
                p.k);
  const int oh = p.h - 2, ow = p.w - 2;
  const std::vector<float> x = Random(rng, size_t(p.n) * p.h * p.w * p.c, 1.0f);
  const std::vector<float> kern = Random(rng, 9 * size_t(p.c) * p.k, 0.3f);
  const std::vector<float> zero(p.k, 0.0f);
  const size_t ny = size_t(p.n) * oh * ow * p.k;
  const std::vector<float> dy = Random(rng, ny, 1.0f);
  std::vector<float> y(ny), dx(x.size(), NAN), du((m + 2) * (m + 2) * size_t(p.c) * p.k);
  const int th = (p.h - 2) / m, tw = (p.w - 2) / m;
  const Tiles sx{p.n, p.h, p.w, p.c, th, tw, m}, sy{p.n, p.h, p.w, p.k, th, tw, m};
  std::vector<float> dk(kern.size(), NAN);
  if (direct) {
    const Shape s{p.n, p.h, p.w, p.c, p.k, p.hp(), p.wp()};
    DirectConvForwardCore(pool, s, x.data(), kern.data(), y.data());
    DirectConvBackwardCore(pool, s, x.data(), dy.data(), dk.data());
  } else {
    WinogradConvForwardCore(pool, sx, sy, x.data(), FilterTransform(p, kern, false, m).data(),
                            y.data());
    WinogradConvBackwardCore(pool, sx, sy, x.data(), FilterTransform(p, kern, true, m).data(),
                             dy.data(), dx.data(), du.data());
    dk = FilterTransformGrad(p, du, m);
  }
  std::vector<double> y_want(ny), dx_want(x.size()), dk_want(kern.size());
  for (int b = 0; b < p.n; ++b)
    for (int i = 0; i < oh; ++i)
      for (int j = 0; j < ow; ++j)
        for (int co = 0; co < p.k; ++co) {
          const size_t o = ((size_t(b) * oh + i) * ow + j) * p.k + co;
          y_want[o] = ConvAt(p, x, kern, zero, b, i, j, co);
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
              for (int ci = 0; ci < p.c; ++ci) {
                dk_want[p.ki(ky, kx, ci, co)] += double(dy[o]) * x[p.xi(b, i + ky, j + kx, ci)];
                dx_want[p.xi(b, i + ky, j + kx, ci)] += double(dy[o]) * kern[p.ki(ky, kx, ci, co)];
              }
        }
  std::string name(what);
  // F(4x4, 3x3)'s transforms (factors up to 8, sixths in G) round more: measured up to 7e-5 on
  // these outputs (std ~5), 1.1e-6 RMS relative error against 2.2e-7 for the direct sums in
  // float32 (fashion_jax/kernels/winograd.py).
  Expect((name + ": y").c_str(), y, y_want, m == 4 ? 2e-4 : 1e-5);
  if (!direct) Expect((name + ": dx").c_str(), dx, dx_want, 1e-4);
  Expect((name + ": dkernel").c_str(), dk, dk_want, 2e-5 * p.n * oh * ow);
}

std::vector<double> AsDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The two-layer op's random inputs: p the first layer (c < 8), p2 the second (k2 outputs, its
// U and U^T for F(m x m, 3 x 3)), dy its pooled output's gradient; s1 the first layer's shape.
struct TwoLayerInputs {
  Problem p, p2;
  Shape s1;
  std::vector<float> x, k1, b1, kern2, b2, u, ut, dy;

  TwoLayerInputs(std::mt19937& rng, const Problem& first, int k2, int m)
      : p(first), p2{first.n, first.hp(), first.wp(), first.k, k2},
        s1{p.n, p.h, p.w, p.c, p.k, p.hp(), p.wp()} {
    x = Random(rng, size_t(p.n) * p.h * p.w * p.c, 1.0f);
    k1 = Random(rng, 9 * size_t(p.c) * p.k, 0.3f);
    b1 = Random(rng, p.k, 0.5f);
    kern2 = Random(rng, 9 * size_t(p2.c) * p2.k, 0.1f);
    b2 = Random(rng, p2.k, 0.5f);
    u = FilterTransform(p2, kern2, false, m);
    ut = FilterTransform(p2, kern2, true, m);
    dy = Random(rng, size_t(p.n) * p2.hp() * p2.wp() * k2, 1.0f);
  }
  size_t nh() const { return size_t(p.n) * p.hp() * p.wp() * p.k; }
};

// The op's three calls: inference's forward, then training's (which also returns h and the first
// layer's taps, the backward's inputs), then the backward from training's residuals, returning
// dU, and again returning the second kernel's gradient dk2 (the handlers' form). Outputs start
// as NaN or -1, so each must be written. h and arg1 have t.s1's shape (F(5x5, 3x3): only the
// rows and columns its tiles read).
struct TwoLayerRun {
  static size_t Floats(const Shape& s) { return size_t(s.n) * s.hp * s.wp * s.cout; }

  std::vector<float> y, y_train, h, du, db2, dk1, db1, dk2, db2_again, dk1_again, db1_again;
  std::vector<int8_t> arg2, arg2_train, arg1;

  TwoLayerRun(const TwoLayers& t, const TwoLayerInputs& in, bool relu)
      : y(in.dy.size(), NAN), y_train(in.dy.size(), NAN), h(Floats(t.s1), NAN),
        du(in.u.size(), NAN),
        db2(in.p2.k, NAN), dk1(in.k1.size(), NAN), db1(in.p.k, NAN), dk2(in.kern2.size(), NAN),
        db2_again(in.p2.k, NAN), dk1_again(in.k1.size(), NAN), db1_again(in.p.k, NAN),
        arg2(in.dy.size(), -1), arg2_train(in.dy.size(), -1), arg1(Floats(t.s1), -1) {
    SerialPool pool;
    TwoLayerForwardCore(pool, t, in.x.data(), in.k1.data(), in.b1.data(), relu, in.u.data(),
                        in.b2.data(), relu, y.data(), arg2.data());
    TwoLayerForwardCore(pool, t, in.x.data(), in.k1.data(), in.b1.data(), relu, in.u.data(),
                        in.b2.data(), relu, y_train.data(), arg2_train.data(), h.data(),
                        arg1.data());
    TwoLayerBackwardCore(pool, t, in.x.data(), h.data(), arg1.data(), in.ut.data(), arg2.data(),
                         in.dy.data(), dk1.data(), db1.data(), du.data(), db2.data());
    TwoLayerBackwardCore(pool, t, in.x.data(), h.data(), arg1.data(), in.ut.data(), arg2.data(),
                         in.dy.data(), dk1_again.data(), db1_again.data(), nullptr,
                         db2_again.data(), dk2.data());
  }

  // dk2 is the kernels' filter gradient of dU to rounding (each chunk of images transforms its
  // own part of dU, and the parts are summed), and the other gradients are the same, bitwise.
  void CheckKernelGradient(const TwoLayers& t, const std::string& name, double tol) const {
    SerialPool pool;
    std::vector<float> want(dk2.size(), NAN);
    FilterGrad(pool, int(t.sx.m), du.data(), t.sx.c, t.sy.c, want.data());
    Expect((name + ": dk2").c_str(), dk2, AsDouble(want), tol);
    Check(db2_again == db2 && dk1_again == dk1 && db1_again == db1,
          (name + ": the gradients beside dk2").c_str());
  }
};

// The two-layer op (the CNN's pair as one) against the two layers' own kernels, which the tests
// above check against the direct sums: outputs and taps bitwise, gradients to rounding (they are
// summed in other chunks). p: the first layer (c < 8); k2: the second layer's outputs.
void TestTwoLayers(std::mt19937& rng, const Problem& p, int k2, bool relu) {
  SerialPool pool;
  char what[160];
  std::snprintf(what, sizeof(what), "two layers n=%d %dx%d c=%d k=%d k2=%d relu=%d", p.n, p.h, p.w,
                p.c, p.k, k2, relu);
  const TwoLayerInputs in(rng, p, k2, 2);
  const Problem& p2 = in.p2;
  // Separately.
  const Tiles sx{p2.n, p2.h, p2.w, p2.c, p2.hp(), p2.wp()}, sy{p2.n, p2.h, p2.w, k2, p2.hp(), p2.wp()};
  std::vector<float> h(in.nh()), y(in.dy.size()), dh(in.nh()), du(in.u.size()), db2(k2),
      dk1(in.k1.size()), db1(p.k);
  std::vector<int8_t> arg1(in.nh()), arg2(in.dy.size());
  ConvPoolForwardCore(pool, in.s1, in.x.data(), in.k1.data(), in.b1.data(), relu, h.data(),
                      arg1.data());
  WinogradConvPoolForwardCore(pool, sx, sy, h.data(), in.u.data(), in.b2.data(), relu, y.data(),
                              arg2.data());
  WinogradConvPoolBackwardCore(pool, sx, sy, h.data(), in.ut.data(), arg2.data(), in.dy.data(),
                               dh.data(), du.data(), db2.data());
  ConvPoolBackwardCore(pool, in.s1, in.x.data(), arg1.data(), dh.data(), dk1.data(), db1.data());
  // As one op.
  const TwoLayerRun r(TwoLayers{in.s1, sx, sy}, in, relu);
  std::string name(what);
  const double scale = double(p.n) * p.hp() * p.wp();
  r.CheckKernelGradient(TwoLayers{in.s1, sx, sy}, name, 1e-6 * scale);
  Expect((name + ": y").c_str(), r.y, AsDouble(y), 0.0);
  Expect((name + ": training's y").c_str(), r.y_train, AsDouble(y), 0.0);
  Expect((name + ": training's h").c_str(), r.h, AsDouble(h), 0.0);
  Check(r.arg2 == arg2 && r.arg2_train == arg2 && r.arg1 == arg1, (name + ": taps").c_str());
  Expect((name + ": du").c_str(), r.du, AsDouble(du), 1e-5 * scale);
  Expect((name + ": db2").c_str(), r.db2, AsDouble(db2), 1e-5 * scale);
  Expect((name + ": dk1").c_str(), r.dk1, AsDouble(dk1), 1e-5 * scale);
  Expect((name + ": db1").c_str(), r.db1, AsDouble(db1), 1e-5 * scale);
}

// The two-layer op with its second layer as F(5x5, 3x3) (its pooled output's sides multiples of
// 5; groups of images, GroupImages), in the shapes TwoLayerShapes gives it: h and the first
// layer's taps bitwise the first layer's own kernel's where the tiles read them, training's y
// and taps bitwise inference's, and y, the second layer's taps and every gradient against the
// direct sums in double (the gradients routed through the op's taps).
void TestTwoLayers5(std::mt19937& rng, const Problem& p, int k2, bool relu) {
  SerialPool pool;
  char what[160];
  std::snprintf(what, sizeof(what), "two layers F(5x5) n=%d %dx%d c=%d k=%d k2=%d relu=%d", p.n,
                p.h, p.w, p.c, p.k, k2, relu);
  const TwoLayerInputs in(rng, p, k2, 5);
  const Problem& p2 = in.p2;
  std::vector<float> h(in.nh());
  std::vector<int8_t> arg1(in.nh());
  ConvPoolForwardCore(pool, in.s1, in.x.data(), in.k1.data(), in.b1.data(), relu, h.data(),
                      arg1.data());
  // The shapes as the op's handlers make them (h only as far as the tiles read).
  const int th = 2 * p2.hp() / 5, tw = 2 * p2.wp() / 5;
  const std::vector<int64_t> xd{p.n, p.h, p.w, p.c}, k1d{3, 3, p.c, p.k},
      ud{Planes(5), p2.c, k2}, yd{p.n, p2.hp(), p2.wp(), k2};
  TwoLayers t;
  const ffi::Error shaped =
      TwoLayerShapes(ffi::Span<const int64_t>(xd), ffi::Span<const int64_t>(k1d),
                     ffi::Span<const int64_t>(ud), ffi::Span<const int64_t>(yd), false, &t);
  Check(!shaped.failure() && t.sx.m == 5 && t.sx.th == th && t.sx.tw == tw,
        (std::string(what) + ": the op's shapes").c_str());
  if (shaped.failure()) return;
  const TwoLayerRun r(t, in, relu);
  std::string name(what);
  const double scale = double(p.n) * p2.hp() * p2.wp();
  r.CheckKernelGradient(t, name, 1e-6 * scale);
  Expect((name + ": training's y").c_str(), r.y_train, AsDouble(r.y), 0.0);
  // Training's h and taps: the first layer's in the rows and columns the second layer reads
  // (5 th + 2 and 5 tw + 2; the shape leaves some unread), and nothing else.
  const int rows = 5 * th + 2, cols = 5 * tw + 2;
  Check(t.s1.hp == rows && t.s1.wp == cols && (rows < p.hp() || cols < p.wp()),
        (name + ": h holds the rows and columns read, and some are not").c_str());
  std::vector<double> h_read;
  std::vector<int8_t> arg1_read;
  for (size_t i = 0; i < h.size(); ++i) {
    const int row = int(i / (size_t(p.wp()) * p.k) % p.hp()), col = int(i / p.k % p.wp());
    if (row < rows && col < cols) {
      h_read.push_back(h[i]);
      arg1_read.push_back(arg1[i]);
    }
  }
  Expect((name + ": training's h").c_str(), r.h, h_read, 0.0);
  Check(r.arg2_train == r.arg2 && r.arg1 == arg1_read, (name + ": training's taps").c_str());
  const Reference r2 = Compute(p2, h, in.kern2, in.b2, relu, r.arg2, in.dy);
  // F(5x5, 3x3)'s transforms round more than F(2x2, 3x3)'s (winograd.py: RMS error 1.9e-6 of
  // the outputs' RMS against 1.9e-7); the bound is F(4x4)'s.
  Expect((name + ": y").c_str(), r.y, r2.y, 2e-4);
  ExpectTaps((name + ": taps").c_str(), p2, h, in.kern2, in.b2, relu, r.arg2);
  Expect((name + ": dkernel2").c_str(), FilterTransformGrad(p2, r.du, 5), r2.dk, 2e-5 * scale);
  Expect((name + ": dk2").c_str(), r.dk2, r2.dk, 2e-5 * scale);
  Expect((name + ": db2").c_str(), r.db2, r2.db, 1e-5 * scale);
  const std::vector<float> dh(r2.dx.begin(), r2.dx.end());
  const Reference r1 = Compute(p, in.x, in.k1, in.b1, relu, arg1, dh);
  const double scale1 = double(p.n) * p.hp() * p.wp();
  Expect((name + ": dk1").c_str(), r.dk1, r1.dk, 2e-5 * scale1);
  Expect((name + ": db1").c_str(), r.db1, r1.db, 1e-5 * scale1);
}

// BatchNorm + ReLU: y [rows of w pixels, c] (h rows an image), every kernel against double
// loops; the padded output's border must be zeros, the padded gradient's border ignored (it is
// filled with NaN here).
void TestBatchNormRelu(std::mt19937& rng, int n, int h, int w, int c, int pad) {
  const BnShape s{int64_t(n) * h, h, w, c, pad};
  const int hp = h + 2 * pad, wp = w + 2 * pad;
  const size_t count = size_t(n) * h * w, padded = size_t(n) * hp * wp;
  std::vector<float> y = Random(rng, count * c, 1.5f);
  for (size_t i = 0; i < y.size(); ++i) y[i] += i % c == 1 ? 0.0f : 2.0f;
  for (size_t p = 0; p < count; ++p) y[p * c] = 3.0f;  // A constant channel: variance 0.
  auto padded_at = [&](size_t p) {  // Pixel p of y in the padded layout.
    const size_t b = p / (size_t(h) * w), i = p / w % h, j = p % w;
    return (b * hp + i + pad) * wp + j + pad;
  };
  SerialPool pool;
  std::vector<float> sums(2 * c);
  BnStatsCore(pool, s, y.data(), sums.data());
  std::vector<double> want(2 * c, 0.0);
  for (size_t p = 0; p < count; ++p)
    for (int ch = 0; ch < c; ++ch) want[ch] += y[p * c + ch], want[c + ch] += double(y[p * c + ch]) * y[p * c + ch];
  Expect("bn stats", sums, want, 1e-6 * count);
  // Coefficients: a (some negative), t, mean, c1, c2, c3.
  std::vector<float> coef = Random(rng, 6 * c, 1.0f);
  for (int ch = 0; ch < c; ++ch) coef[2 * c + ch] = float(want[ch] / count);
  std::vector<float> z(padded * c, NAN);
  BnReluForwardCore(pool, s, y.data(), coef.data(), z.data());
  std::vector<double> z_want(padded * c, 0.0);
  for (size_t p = 0; p < count; ++p)
    for (int ch = 0; ch < c; ++ch) {
      const double pre = (double(y[p * c + ch]) - coef[2 * c + ch]) * coef[ch] + coef[c + ch];
      z_want[padded_at(p) * c + ch] = std::max(0.0, pre);
    }
  Expect("bn+relu forward (border zeros)", z, z_want, 1e-6);
  std::vector<float> dz = Random(rng, padded * c, 1.0f);
  std::vector<bool> interior(padded, false);
  for (size_t p = 0; p < count; ++p) interior[padded_at(p)] = true;
  for (size_t q = 0; q < padded; ++q)
    if (!interior[q]) std::fill(dz.begin() + q * c, dz.begin() + (q + 1) * c, NAN);
  BnReluGradSumsCore(pool, s, y.data(), dz.data(), coef.data(), sums.data());
  std::vector<double> g(count * c), gsum_want(2 * c, 0.0), dy_want(count * c);
  for (size_t p = 0; p < count; ++p) {
    // The pixel's row of dz, found once: with the index inside the channel loop, Clang 14 at -O2
    // vectorized that loop with a wrong address (a crash; nothing overflows, UBSan is silent;
    // -fwrapv or -fno-vectorize avoided it too).
    const float* dz_p = dz.data() + padded_at(p) * c;
    for (int ch = 0; ch < c; ++ch) {
      const size_t i = p * c + ch;
      const bool on = (double(y[i]) - coef[2 * c + ch]) * coef[ch] + coef[c + ch] > 0;
      g[i] = on ? dz_p[ch] : 0.0;
      gsum_want[ch] += g[i];
      gsum_want[c + ch] += g[i] * (double(y[i]) - coef[2 * c + ch]);
      dy_want[i] = coef[3 * c + ch] * g[i] + coef[4 * c + ch] + coef[5 * c + ch] * (double(y[i]) - coef[2 * c + ch]);
    }
  }
  Expect("bn+relu gradient sums", sums, gsum_want, 1e-5 * count);
  std::vector<float> dy(count * c, NAN);
  BnReluGradCore(pool, s, y.data(), dz.data(), coef.data(), dy.data());
  Expect("bn+relu gradient", dy, dy_want, 1e-5);
}

// BatchNorm + ReLU + 2x2 max-pool: the pooled output against double loops; the argmax a maximal
// tap, the first of planted exact ties, kNoTap for a planted window whose ReLU is off; then both
// gradient passes from the pooled dz through the kernel's own argmax.
void TestBatchNormReluPool(std::mt19937& rng, int n, int h, int w, int c) {
  const BnShape s{int64_t(n) * h, h, w, c, 0};
  const int h2 = h / 2, w2 = w / 2;
  const size_t count = size_t(n) * h * w, pooled = size_t(n) * h2 * w2;
  std::vector<float> y = Random(rng, count * c, 1.5f);
  std::vector<float> coef = Random(rng, 6 * c, 1.0f);  // a, t, mean, c1, c2, c3
  for (int ch = 0; ch < c; ++ch) {
    coef[ch] = (ch % 3 == 0 ? -1.0f : 1.0f) * (0.5f + 0.25f * std::fabs(coef[ch]));
    coef[c + ch] = std::max(-2.0f, std::min(2.0f, coef[c + ch]));
  }
  auto at = [&](int b, int i, int j, int ch) { return ((size_t(b) * h + i) * w + j) * c + ch; };
  for (int b = 0; b < n; ++b)
    for (int ch = 0; ch < c; ++ch) {
      const float up = coef[2 * c + ch] + (coef[ch] > 0 ? 12.0f : -12.0f);  // pre >= 4
      const float down = coef[2 * c + ch] - (coef[ch] > 0 ? 12.0f : -12.0f);  // pre <= -4
      // Window (0, 0): taps 1 and 3 tie above the others, so tap 1 wins.
      y[at(b, 0, 1, ch)] = y[at(b, 1, 1, ch)] = up;
      y[at(b, 0, 0, ch)] = y[at(b, 1, 0, ch)] = down;
      // Window (0, 1): the ReLU off at every tap.
      for (int q = 0; q < 4; ++q) y[at(b, q / 2, 2 + q % 2, ch)] = down;
    }
  auto pre = [&](size_t i) {
    const int ch = int(i % c);
    return (double(y[i]) - coef[2 * c + ch]) * coef[ch] + coef[c + ch];
  };
  SerialPool pool;
  std::vector<float> z(pooled * c, NAN);
  std::vector<int8_t> arg(pooled * c, 99);
  BnReluPoolForwardCore(pool, s, y.data(), coef.data(), z.data(), arg.data());
  std::vector<double> z_want(pooled * c);
  bool taps_ok = true;
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < h2; ++i)
      for (int j = 0; j < w2; ++j)
        for (int ch = 0; ch < c; ++ch) {
          const size_t o = ((size_t(b) * h2 + i) * w2 + j) * c + ch;
          double best = -1e300;
          for (int q = 0; q < 4; ++q) best = std::max(best, pre(at(b, 2 * i + q / 2, 2 * j + q % 2, ch)));
          z_want[o] = std::max(0.0, best);
          const int tap = arg[o];
          if (best > 1e-4) {
            taps_ok &= tap >= 0 && tap < 4 &&
                       pre(at(b, 2 * i + tap / 2, 2 * j + tap % 2, ch)) >= best - 1e-5 * (1 + best);
          } else if (best < -1e-4) {
            taps_ok &= tap == kNoTap;
          }
          if (i == 0 && j == 0) taps_ok &= tap == 1;
          if (i == 0 && j == 1) taps_ok &= tap == kNoTap && z[o] == 0.0f;
        }
  Expect("bn+relu+pool forward", z, z_want, 1e-6);
  Check(taps_ok, "bn+relu+pool argmax: a maximal tap, the first of ties, kNoTap when off");
  const std::vector<float> dz = Random(rng, pooled * c, 1.0f);
  std::vector<double> gsum_want(2 * c, 0.0), dy_want(count * c);
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < h; ++i)
      for (int j = 0; j < w; ++j)
        for (int ch = 0; ch < c; ++ch) {
          const size_t e = at(b, i, j, ch), o = ((size_t(b) * h2 + i / 2) * w2 + j / 2) * c + ch;
          const double g = arg[o] == 2 * (i % 2) + j % 2 ? dz[o] : 0.0;
          const double centered = double(y[e]) - coef[2 * c + ch];
          gsum_want[ch] += g;
          gsum_want[c + ch] += g * centered;
          dy_want[e] = coef[3 * c + ch] * g + coef[4 * c + ch] + coef[5 * c + ch] * centered;
        }
  std::vector<float> sums(2 * c, NAN), dy(count * c, NAN);
  BnReluPoolGradSumsCore(pool, s, y.data(), dz.data(), arg.data(), coef.data(), sums.data());
  Expect("bn+relu+pool gradient sums", sums, gsum_want, 1e-5 * count);
  BnReluPoolGradCore(pool, s, y.data(), dz.data(), arg.data(), coef.data(), dy.data());
  Expect("bn+relu+pool gradient", dy, dy_want, 1e-5);
}

// threefry2x32 (20 rounds) one pair at a time, written from the Threefry paper's description:
// the reference for the vector code.
void ScalarThreefry(const uint32_t key[2], uint32_t x[2]) {
  static const int kRot[8] = {13, 15, 26, 6, 17, 29, 16, 24};
  const uint32_t ks[3] = {key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDAu};
  x[0] += ks[0], x[1] += ks[1];
  for (int group = 0; group < 5; ++group) {
    for (int r = 0; r < 4; ++r) {
      const int rot = kRot[4 * (group % 2) + r];
      x[0] += x[1];
      x[1] = (x[1] << rot) | (x[1] >> (32 - rot));
      x[1] ^= x[0];
    }
    x[0] += ks[(group + 1) % 3], x[1] += ks[(group + 2) % 3] + uint32_t(group + 1);
  }
}

// The scalar reference against Random123's known answers, the vector hash against both (every
// lane its own counter pair), then the keep mask against the reference: jax's uniform float
// from the xor-ed words, kept where below p; n short of a vector, of kStreams vectors and of a
// chunk, and p = 0 and 1.
// A NaN among a window's four outputs (in lane 0, at each set of taps): the pooled value is NaN,
// as XLA's max gives it, and the gradient goes to the last NaN tap, with and without the ReLU;
// the other lanes pool as before (the first maximum, or the ReLU off).
void TestPoolNaN() {
  bool ok = true;
  for (bool relu : {false, true}) {
    const float add = relu ? -10.0f : 0.5f, taps[4] = {1.0f, 3.0f, 2.0f, 3.0f};
    for (int nans = 1; nans < 16; ++nans) {
      fv out[4];
      for (int q = 0; q < 4; ++q) {
        out[q] = Splat(taps[q]);
        if (nans >> q & 1) out[q][0] = NAN;
      }
      float y[L];
      int8_t arg[L];
      PoolStore(out, Splat(add), relu, y, arg);
      ok = ok && std::isnan(y[0]) && arg[0] == (nans >= 8 ? 3 : nans >= 4 ? 2 : nans >= 2 ? 1 : 0);
      for (int i = 1; i < L; ++i) {
        ok = ok && y[i] == (relu ? 0.0f : 3.5f) && arg[i] == (relu ? kNoTap : 1);
      }
    }
  }
  Check(ok, "pool: a NaN output makes the pooled value NaN and takes the gradient");
}

void TestKeepMask() {
  const uint32_t kat[3][6] = {  // key, counter, result
      {0, 0, 0, 0, 0x6b200159u, 0x99ba4efeu},
      {~0u, ~0u, ~0u, ~0u, 0x1cb996fcu, 0xbb002be7u},
      {0x13198a2eu, 0x03707344u, 0x243f6a88u, 0x85a308d3u, 0xc4923a9cu, 0x483df7a0u}};
  bool scalar_ok = true, vector_ok = true;
  for (const auto& t : kat) {
    uint32_t x[2] = {t[2], t[3]};
    ScalarThreefry(t, x);
    scalar_ok &= x[0] == t[4] && x[1] == t[5];
    uv x0[kStreams], x1[kStreams];
    for (int v = 0; v < kStreams; ++v) {
      for (int j = 0; j < L; ++j) {
        x0[v][j] = t[2] + uint32_t(v * L + j), x1[v][j] = t[3] - uint32_t(j);
      }
    }
    Threefry2x32Bits(t[0], t[1], x0, x1);
    for (int v = 0; v < kStreams; ++v) {
      for (int j = 0; j < L; ++j) {
        uint32_t want[2] = {t[2] + uint32_t(v * L + j), t[3] - uint32_t(j)};
        ScalarThreefry(t, want);
        vector_ok &= x0[v][j] == (want[0] ^ want[1]);
        if (v == 0 && j == 0) vector_ok &= x0[v][j] == (t[4] ^ t[5]);
      }
    }
  }
  Check(scalar_ok, "threefry2x32 reference: Random123's known answers");
  Check(vector_ok, "threefry2x32 vectors: the reference's bits in every lane");
  SerialPool pool;
  const uint32_t key[2] = {0x9e3779b9u, 42u};
  for (int64_t n : {int64_t(1), int64_t(L - 1), int64_t(kStreams * L + 3), kMaskChunk,
                    2 * kMaskChunk + 5}) {
    for (float p : {0.9f, 0.0f, 1.0f}) {
      std::vector<uint8_t> mask(n + 1, 7);  // One byte past the end must stay untouched.
      KeepMaskCore(pool, key[0], key[1], p, n, mask.data());
      bool ok = mask[n] == 7;
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t x[2] = {uint32_t(uint64_t(i) >> 32), uint32_t(i)};
        ScalarThreefry(key, x);
        const uint32_t one = ((x[0] ^ x[1]) >> 9) | 0x3F800000u;
        float u;
        std::memcpy(&u, &one, 4);
        ok &= mask[i] == ((u - 1.0f) < p ? 1 : 0);
        kept += mask[i];
      }
      ok &= p != 0.0f || kept == 0;
      ok &= p != 1.0f || kept == n;
      Check(ok, "keep mask: the reference's bits, u < p, nothing written past n");
    }
  }
}

}  // namespace

// The micro-kernel's row split against sums in double: C (+)= A B, A read transposed in place
// (as dU's V^T), and the transposed store of the first `valid` columns (as dx's).
void TestGemm(std::mt19937& rng, int rows, int n, int cols) {
  const std::vector<float> a = Random(rng, size_t(rows) * n, 1.0f),
                           b = Random(rng, size_t(n) * cols, 1.0f),
                           c0 = Random(rng, size_t(rows) * cols, 1.0f);
  std::vector<double> want(c0.size()), want_acc(c0.size());
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      double sum = 0;
      for (int p = 0; p < n; ++p) sum += double(a[size_t(i) * n + p]) * b[size_t(p) * cols + j];
      want[size_t(i) * cols + j] = sum;
      want_acc[size_t(i) * cols + j] = sum + c0[size_t(i) * cols + j];
    }
  }
  std::vector<float> c(c0.size(), NAN), at(a.size());
  Gemm(a.data(), n, 1, b.data(), cols, c.data(), cols, rows, n, cols, false);
  Expect("gemm", c, want, 1e-5);
  for (int i = 0; i < rows; ++i) {
    for (int p = 0; p < n; ++p) at[size_t(p) * rows + i] = a[size_t(i) * n + p];
  }
  c = c0;
  Gemm(at.data(), 1, rows, b.data(), cols, c.data(), cols, rows, n, cols, true);
  Expect("gemm, A transposed, accumulated", c, want_acc, 1e-5);
  const int valid = cols - L / 2;  // C^T [cols, rows]; the last half vector of columns unstored.
  std::vector<float> ct(size_t(cols) * rows, 7.0f);
  std::vector<double> want_t(ct.size(), 7.0);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < valid; ++j) want_t[size_t(j) * rows + i] = want[size_t(i) * cols + j];
  }
  Gemm<true>(a.data(), n, 1, b.data(), cols, ct.data(), rows, rows, n, cols, false, valid);
  Expect("gemm, transposed store", ct, want_t, 1e-5);
}

// The dense layer's matmuls against sums in double: y = x w, dx = dy w^T, dw = x^T dy.
void TestDense(std::mt19937& rng, int b, int d, int h) {
  const DenseShape s{b, d, h};
  const std::vector<float> x = Random(rng, size_t(b) * d, 1.0f), w = Random(rng, size_t(d) * h, 0.1f),
                           dy = Random(rng, size_t(b) * h, 1.0f);
  std::vector<float> y(size_t(b) * h, NAN), dx(x.size(), NAN), dw(w.size(), NAN);
  SerialPool pool;
  DenseForwardCore(pool, s, x.data(), w.data(), y.data());
  DenseBackwardCore(pool, s, x.data(), w.data(), dy.data(), dx.data(), dw.data());
  std::vector<double> want_y(y.size()), want_dx(dx.size()), want_dw(dw.size());
  for (int i = 0; i < b; ++i) {
    for (int k = 0; k < h; ++k) {
      for (int j = 0; j < d; ++j) {
        want_y[size_t(i) * h + k] += double(x[size_t(i) * d + j]) * w[size_t(j) * h + k];
        want_dx[size_t(i) * d + j] += double(dy[size_t(i) * h + k]) * w[size_t(j) * h + k];
        want_dw[size_t(j) * h + k] += double(x[size_t(i) * d + j]) * dy[size_t(i) * h + k];
      }
    }
  }
  // float32's rounding of a sum grows with the square root of its length: y sums d products
  // (1,600 at 16 lanes: its sums' scale is 4, and a draw of inputs gave 1.2e-5 there), dx h, dw b.
  const auto bound = [](int terms) { return 1e-5 * std::max(1.0, std::sqrt(terms / 400.0)); };
  Expect("dense y", y, want_y, bound(d));
  Expect("dense dx", dx, want_dx, bound(h));
  Expect("dense dw", dw, want_dw, 1e-5 * std::max(1.0, std::sqrt(b / 35.0)));
}

// The vector square root: each lane bitwise std::sqrt's (IEEE, correctly rounded, as XLA's),
// zeros, subnormals and infinities included.
void TestSqrt(std::mt19937& rng) {
  std::vector<float> x = Random(rng, 64 * L, 100.0f);
  for (float& e : x) e = std::fabs(e);
  x[0] = 0.0f, x[1] = -0.0f, x[2] = 1e-40f, x[3] = INFINITY, x[4] = 2.0f;
  for (size_t i = 0; i < x.size(); i += L) {
    const fv r = Sqrt(Load(x.data() + i));
    for (int j = 0; j < L; ++j) {
      const float got = r[j], want = std::sqrt(x[i + j]);
      Check(std::memcmp(&got, &want, sizeof(want)) == 0, "sqrt: a lane differs from std::sqrt");
    }
  }
}

// Adam's update against optax's formula in double: in place over several tasks and a tail shorter
// than a vector, into other arrays (copied first), and a skipped step (only the copies).
void TestAdam(std::mt19937& rng, int64_t n, bool in_place, bool skip, float weight_decay = 0) {
  const std::vector<float> g = Random(rng, n, 1.0f), p0 = Random(rng, n, 1.0f),
                           m0 = Random(rng, n, 0.1f);
  std::vector<float> v0 = Random(rng, n, 0.01f);
  for (float& e : v0) e = std::fabs(e);
  // A large step, so p's rounding does not hide the update's.
  const AdamConstants k{0.9f, 0.999f, 0.1f, 0.001f, 1e-8f, 0.0f, weight_decay, -0.5f, 0.271f,
                        0.002997f};
  std::vector<double> want_p(n), want_m(n), want_v(n);
  for (int64_t i = 0; i < n; ++i) {
    want_m[i] = skip ? m0[i] : double(k.one_minus_b1) * g[i] + double(k.b1) * m0[i];
    want_v[i] = skip ? v0[i] : double(k.one_minus_b2) * g[i] * g[i] + double(k.b2) * v0[i];
    want_p[i] = skip ? p0[i]
                     : p0[i] + double(k.step) * ((want_m[i] / k.c1) /
                                                     (std::sqrt(want_v[i] / k.c2 + k.eps_root) +
                                                      k.eps) +
                                                 double(weight_decay) * p0[i]);
  }
  std::vector<float> p = p0, m = m0, v = v0;
  SerialPool pool;
  if (in_place) {
    AdamCore(pool, k, skip, n, g.data(), p.data(), m.data(), v.data(), p.data(), m.data(),
             v.data());
  } else {
    std::fill(p.begin(), p.end(), NAN), std::fill(m.begin(), m.end(), NAN);
    std::fill(v.begin(), v.end(), NAN);
    AdamCore(pool, k, skip, n, g.data(), p0.data(), m0.data(), v0.data(), p.data(), m.data(),
             v.data());
  }
  const std::string what = std::string(weight_decay ? "adamw" : "adam") +
                           (in_place ? "" : ", other arrays") + (skip ? ", skipped" : "");
  Expect((what + ": p").c_str(), p, want_p, skip ? 0.0 : 1e-5);
  Expect((what + ": m").c_str(), m, want_m, skip ? 0.0 : 1e-6);
  Expect((what + ": v").c_str(), v, want_v, skip ? 0.0 : 1e-6);
}

// The filter transform and its gradient (the Winograd layers' U, U^T and the kernel's gradient)
// against the double-precision sums above: each tile; C or K over one block of L, and over the
// 4 vectors FilterTransformCore stores at a time (5 L: one more); rows (C, or K transposed) over
// its 8 a task, with a short last task where L < 16.
template <const auto& G, const auto& GT>
void RunFilter(SerialPool& pool, const std::vector<float>& kern, const std::vector<float>& du,
               int c, int k, std::vector<float>& u, std::vector<float>& ut,
               std::vector<float>& dk) {
  FilterTransformCore<G>(pool, kern.data(), c, k, false, u.data());
  FilterTransformCore<G>(pool, kern.data(), c, k, true, ut.data());
  FilterGradCore<G, GT>(pool, du.data(), c, k, dk.data());
}

void TestFilterTransforms(std::mt19937& rng) {
  SerialPool pool;
  for (int m : {2, 4, 5}) {
    for (const auto& [c, k] : {std::pair{L, 2 * L}, std::pair{3 * L, L}, std::pair{2 * L, 3 * L},
                               std::pair{L, 5 * L}, std::pair{5 * L, 2 * L}}) {
      const Problem p{1, 8, 8, c, k};
      const std::vector<float> kern = Random(rng, 9 * size_t(c) * k, 0.3f);
      const std::vector<float> du = Random(rng, size_t(m + 2) * (m + 2) * c * k, 1.0f);
      char what[96];
      std::vector<float> u(du.size(), NAN), ut(du.size(), NAN), dk(kern.size(), NAN);
      if (m == 2) RunFilter<kWino2G, kWino2GT>(pool, kern, du, c, k, u, ut, dk);
      if (m == 4) RunFilter<kWino4G, kWino4GT>(pool, kern, du, c, k, u, ut, dk);
      if (m == 5) RunFilter<kWino5G, kWino5GT>(pool, kern, du, c, k, u, ut, dk);
      std::snprintf(what, sizeof(what), "filter transform F(%dx%d) c=%d k=%d", m, m, c, k);
      Expect(what, u, AsDouble(FilterTransform(p, kern, false, m)), 1e-6);
      std::snprintf(what, sizeof(what), "filter transform F(%dx%d) c=%d k=%d, transposed", m, m,
                    c, k);
      Expect(what, ut, AsDouble(FilterTransform(p, kern, true, m)), 1e-6);
      std::snprintf(what, sizeof(what), "filter transform gradient F(%dx%d) c=%d k=%d", m, m, c, k);
      Expect(what, dk, AsDouble(FilterTransformGrad(p, du, m)), 1e-6);
    }
  }
}

int main() {
  std::mt19937 rng(0);
  TestFilterTransforms(rng);
  for (bool relu : {false, true}) {
    // The direct kernel: compile-time and run-time channel counts, one or two channel blocks
    // (and a second image chunk), odd sizes, the smallest input.
    TestConvPool(rng, {3, 28, 28, 1, 2 * L}, false, relu);
    TestConvPool(rng, {11, 13, 11, 3, 3 * L}, false, relu);
    TestConvPool(rng, {2, 6, 7, 5, L}, false, relu);
    TestConvPool(rng, {1, 4, 4, 2, L}, false, relu);
    // The fused Winograd layer: the CNN's second layer, the micro-kernel's row and column
    // remainders, more images than the gradient's chunks, the smallest input.
    TestConvPool(rng, {3, 13, 13, 2 * L, 4 * L}, true, relu);
    TestConvPool(rng, {2, 9, 11, L, 3 * L}, true, relu);
    TestConvPool(rng, {17, 6, 6, L, L}, true, relu);
    TestConvPool(rng, {1, 4, 4, 3 * L, 2 * L}, true, relu);
    // An empty batch: zero gradients (no image writes them).
    TestConvPool(rng, {0, 13, 13, 2 * L, L}, true, relu);
    TestConvPool(rng, {0, 10, 10, 1, L}, false, relu);
  }
  TestPoolNaN();
  // The fused plain convolution: several blocks of tile rows per image (30 -> 14 tiles a row,
  // 3 rows a block, the last one short), cnn_bn's 14 x 14 layers, tall and narrow, more images
  // than the gradient's chunks, the smallest input.
  TestConv(rng, {2, 30, 30, L, 2 * L});
  TestConv(rng, {2, 16, 16, 2 * L, L});  // 7 x 7 tiles: one block, a tile row over kBlockTiles.
  TestConv(rng, {3, 18, 6, 2 * L, 3 * L});
  TestConv(rng, {17, 6, 8, L, L});
  TestConv(rng, {1, 4, 4, L, L});
  // F(4x4, 3x3): cnn_bn's 28 x 28 layer (7 x 7 tiles, one block), several blocks with the last
  // one short, tall and narrow with channel remainders, more images than the gradient's chunks,
  // the smallest input.
  TestConv(rng, {2, 30, 30, 2 * L, 2 * L}, false, 4);
  TestConv(rng, {2, 50, 46, L, 3 * L}, false, 4);
  TestConv(rng, {3, 18, 6, 3 * L, L}, false, 4);
  TestConv(rng, {17, 6, 10, L, L}, false, 4);
  TestConv(rng, {1, 6, 6, L, L}, false, 4);
  // The direct kernel's plain convolution: cnn_bn's first layer (SAME-padded 28x28, 1 -> 32
  // channels at 16 lanes), run-time channel counts and odd channel blocks, the smallest input.
  TestConv(rng, {3, 30, 30, 1, 2 * L}, true);
  TestConv(rng, {11, 8, 6, 5, 3 * L}, true);
  TestConv(rng, {1, 4, 4, 3, L}, true);
  // The two-layer op: the CNN's pair (at 16 lanes: 1 -> 32 -> 64 channels on 28x28), odd sizes
  // and several input channels, more images than the gradient's chunks, the smallest second layer.
  for (bool relu : {false, true}) {
    TestTwoLayers(rng, {3, 28, 28, 1, 2 * L}, 4 * L, relu);
    TestTwoLayers(rng, {2, 13, 11, 3, L}, 3 * L, relu);
    TestTwoLayers(rng, {17, 10, 10, 2, L}, L, relu);
  }
  // ... with its second layer as F(5x5, 3x3): the CNN's pair (2x2 tiles an image, a group
  // part-filled), more images than fit a group in chunks of 5-6 (groups of 8 cut short), 4x2
  // tiles (groups of 4), 6x6 tiles (36: one image a group).
  for (bool relu : {false, true}) {
    TestTwoLayers5(rng, {3, 28, 28, 1, 2 * L}, 4 * L, relu);
    TestTwoLayers5(rng, {17, 28, 28, 2, L}, L, relu);
    TestTwoLayers5(rng, {2, 48, 28, 1, L}, 2 * L, relu);
  }
  TestTwoLayers5(rng, {1, 68, 68, 1, L}, L, true);
  TestTwoLayers(rng, {0, 10, 10, 2, L}, L, true);  // An empty batch: zero gradients.
  TestTwoLayers5(rng, {0, 28, 28, 1, L}, L, true);
  // BatchNorm + ReLU: images (several chunks of rows, the last one short; odd sizes; padding 1
  // and 2) and [P, C] rows (one pixel each).
  TestBatchNormRelu(rng, 5, 28, 28, 2 * L, 1);
  TestBatchNormRelu(rng, 3, 7, 9, 3 * L, 2);
  TestBatchNormRelu(rng, 2, 14, 14, 4 * L, 0);
  TestBatchNormRelu(rng, 1100, 1, 1, L, 0);
  // With the pool: cnn_bn's two shapes (several chunks of rows), a small odd-numbered batch.
  TestBatchNormReluPool(rng, 3, 28, 28, 2 * L);
  TestBatchNormReluPool(rng, 2, 14, 14, 4 * L);
  TestBatchNormReluPool(rng, 3, 4, 6, L);
  TestKeepMask();
  // The micro-kernel's rows split into blocks of at most 6 (every split from 1 to 7 blocks: even,
  // with one to five blocks a row longer), column remainders of 1 to 3 vectors.
  for (int rows = 1; rows <= 40; ++rows) TestGemm(rng, rows, 5 + rows % 3, (1 + rows % 5) * L);
  // Dense: the CNN's Dense(1600 -> 128) at 16 lanes on a batch of 35 (row blocks of 6, the last
  // short; the input gradient's transposed store, its batch padded to whole vectors; 34 slabs
  // of w, the last short), one row (the weight gradient's contraction of 1), widths of 1, 3 and
  // 5 vectors (the micro-kernel's column remainders); the input gradient through transposed
  // slabs of w (batches from 2/3 of the width: several slabs, the last short; one slab); an
  // input width that is not whole vectors at such a batch (the transposed store then); the
  // forward's contraction in parts (100 L rows of w: 800 at 8 lanes, the last part short) and
  // the weight gradient's over a batch in three parts, the last short.
  TestDense(rng, 35, 100 * L, 8 * L);
  TestDense(rng, 300, 40 * L, 2 * L);
  TestDense(rng, 1, 5 * L, 3 * L);
  TestDense(rng, 7, 57 * L, 5 * L);
  TestDense(rng, 4, L, 2 * L);
  TestDense(rng, 70, 7 * L, 2 * L);
  TestDense(rng, 13, L, L);
  TestDense(rng, 30, 37, 2 * L);
  TestDense(rng, 0, 3 * L, 2 * L);  // No rows: dw zeros. No contraction: y zeros.
  TestDense(rng, 5, 0, 2 * L);
  // Adam: several tasks and a tail (in place), a tail alone (into other arrays), skipped steps,
  // AdamW.
  TestSqrt(rng);
  TestAdam(rng, 3 * kAdamChunk + L + 3, true, false);
  TestAdam(rng, 5, false, false);
  TestAdam(rng, kAdamChunk + 1, true, true);
  TestAdam(rng, 2 * L + 1, false, true);
  TestAdam(rng, kAdamChunk + L + 1, true, false, 0.3f);  // AdamW's weight decay (a large one).
  // The peak measurement (its threads and calibration under the sanitizers; its figures are
  // checked in tests/test_native.py, on the machine itself): the widest width, then an unknown one.
  double gflops = 0, mhz = 0;
  int lanes = 0;
  const int status = FjMeasurePeak(2, 0.002, &gflops, &mhz, &lanes);
  Check(status == 0 && gflops > 0 && mhz > 0 && (lanes == 4 || lanes == 8 || lanes == 16),
        "FjMeasurePeak: the widest width");
  lanes = 3;
  Check(FjMeasurePeak(1, 0.002, &gflops, &mhz, &lanes) == -2, "FjMeasurePeak: 3 lanes refused");
  if (failures) {
    std::printf("selftest: %d of %d checks failed (%s)\n", failures, checks, FjKernelInfo());
    return 1;
  }
  std::printf("selftest: %d checks passed (%s)\n", checks, FjKernelInfo());
  return 0;
}
