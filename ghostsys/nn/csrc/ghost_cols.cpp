// Fused training-mode ghost batch norm for (M, C), channels_last and NCHW memory, on the CPU.
//
// Memory (M, *S, C) read as (G, n, C) with n = (M / G) * prod(S): each ghost group is n contiguous rows of C
// channels, so every loop below runs along C over contiguous memory and vectorizes. One call does what the
// ATen formulation ("cols") needs about 25 small ops for: the per-op dispatch cost (~5-10 us each) is what made
// the layer 1.8-2.6x nn.BatchNorm on SimpleNet's (256, 300) / (256, 512) layers, not the arithmetic.
//
// Numerics: two passes (mean, then the centred sum of squares), as ATen's "cols"; float32 partial sums run over
// at most kBlock rows and are carried on in double, so rounding grows with kBlock, not with n. Long groups take the
// two passes block by block (kBlock rows, still in cache for the second) and merge the blocks' moments in double
// (Chan et al.), so memory is read once for the statistics. The backward is the closed form
// dx = a*dy + b*(x - mean) + k per (group, channel) from sum(dy) and sum(dy * (x - mean)).
//
// Built and loaded by ghostsys/nn/fused.py (g++ -O3, no -march: one binary for every x86-64; the hot loops get an
// AVX2 clone chosen at load time by GCC's target_clones, so a home directory shared by unlike nodes is safe).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr int64_t kBlock = 64;  // float partial sums over at most this many rows (see the header)
constexpr int64_t kTileRows = 32;  // groups of up to this many rows go by channel tiles, longer ones by rows
static_assert(kTileRows <= kBlock, "tiles sum all their rows in T: at most kBlock of them");
constexpr int64_t kGrainValues = 32768;  // below this many values a thread's wake-up costs more than it saves

#define GS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GS_CLONES
#endif

// One tile of channels [c0, c0 + L) of one group (n <= kTileRows rows, row stride C), L = W (a compile-time width
// the loops unroll and vectorize over) or, for the last tile of a C that W does not divide, the runtime w < W. The
// running sums live in registers and the tile's rows (n * L values) stay in L1 between the passes. n <= kBlock, so
// float sums over all n rows keep kBlock's rounding bound without a double carry.
template <typename T, int W, bool Full>
GS_INLINE void forward_tile(const T* __restrict__ x, T* __restrict__ y, int64_t w, const T* __restrict__ weight,
                            const T* __restrict__ bias, T* __restrict__ mean, T* __restrict__ invstd,
                            T* __restrict__ var, int64_t n, int64_t C, T eps) {
  const int64_t L = Full ? W : w;
  T s[W], m[W];
  for (int64_t j = 0; j < L; ++j) s[j] = T(0);
  for (int64_t i = 0; i < n; ++i)  // pass 1: sums
    for (int64_t j = 0; j < L; ++j) s[j] += x[i * C + j];
  const T inv_n = T(1) / T(n);
  for (int64_t j = 0; j < L; ++j) {
    m[j] = s[j] * inv_n;
    s[j] = T(0);
  }
  for (int64_t i = 0; i < n; ++i)  // pass 2: centred sums of squares
    for (int64_t j = 0; j < L; ++j) {
      const T d = x[i * C + j] - m[j];
      s[j] += d * d;
    }
  const T unbiased = n > 1 ? T(1) / T(n - 1) : T(NAN);  // BatchNorm's running variance is unbiased
  T scale[W], shift[W];
  for (int64_t j = 0; j < L; ++j) {
    const T inv = T(1) / std::sqrt(s[j] * inv_n + eps);
    mean[j] = m[j];
    invstd[j] = inv;
    var[j] = s[j] * unbiased;
    scale[j] = weight ? inv * weight[j] : inv;
    shift[j] = bias ? bias[j] : T(0);
  }
  for (int64_t i = 0; i < n; ++i)  // pass 3: y = (x - mean) * scale + bias, centred as the statistics are
    for (int64_t j = 0; j < L; ++j) y[i * C + j] = (x[i * C + j] - m[j]) * scale[j] + shift[j];
}

template <typename T>
GS_INLINE void forward_tiles(int64_t g0, int64_t g1, const T* x, T* y, const T* w, const T* b, T* mean, T* invstd,
                             T* var, int64_t n, int64_t C, T eps) {
  constexpr int W = 64 / sizeof(T);  // one cache line of channels; wider tiles spill (measured: 32 floats 1.8x slower at n = 4)
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t o = g * n * C, p = g * C;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W)
      forward_tile<T, W, true>(x + o + c0, y + o + c0, W, w ? w + c0 : nullptr, b ? b + c0 : nullptr, mean + p + c0,
                               invstd + p + c0, var + p + c0, n, C, eps);
    if (c0 < C)
      forward_tile<T, W, false>(x + o + c0, y + o + c0, C - c0, w ? w + c0 : nullptr, b ? b + c0 : nullptr,
                                mean + p + c0, invstd + p + c0, var + p + c0, n, C, eps);
  }
}

// One tile of the backward (widths and rows as forward_tile): sum(dy), sum(dy * (x - mean)) in registers, then dx
// (when asked) and the per-group terms of dweight (sum dy * xhat) and dbias (sum dy).
template <typename T, int W, bool Full>
GS_INLINE void backward_tile(const T* __restrict__ dy, const T* __restrict__ x, int64_t w, const T* __restrict__ mean,
                             const T* __restrict__ invstd, const T* __restrict__ weight, T* __restrict__ dx,
                             T* __restrict__ gw, T* __restrict__ gb, int64_t n, int64_t C) {
  const int64_t L = Full ? W : w;
  T s1[W], s2[W];
  for (int64_t j = 0; j < L; ++j) s1[j] = s2[j] = T(0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < L; ++j) {
      const T d = dy[i * C + j];
      s1[j] += d;
      s2[j] += d * (x[i * C + j] - mean[j]);
    }
  const T inv_n = T(1) / T(n);
  T a[W], bx[W], k[W];
  for (int64_t j = 0; j < L; ++j) {
    const T sdy = s1[j], sdyx = s2[j];
    const T inv = invstd[j];
    a[j] = weight ? inv * weight[j] : inv;
    bx[j] = -a[j] * inv * inv * sdyx * inv_n;
    k[j] = -a[j] * sdy * inv_n;
    gb[j] = sdy;
    gw[j] = sdyx * inv;
  }
  // dx = a*dy + b*(x - mean) + k: centred, so a small variance next to a large mean does not cancel b*x against
  // b*mean (measured: 2x the float32 reference's error at 2 rows per group with b*x + k').
  if (dx)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < L; ++j)
        dx[i * C + j] = a[j] * dy[i * C + j] + bx[j] * (x[i * C + j] - mean[j]) + k[j];
}

template <typename T>
GS_INLINE void backward_tiles(int64_t g0, int64_t g1, const T* dy, const T* x, const T* mean, const T* invstd,
                              const T* w, T* dx, T* gw, T* gb, int64_t n, int64_t C) {
  constexpr int W = 64 / sizeof(T);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t o = g * n * C, p = g * C;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W)
      backward_tile<T, W, true>(dy + o + c0, x + o + c0, W, mean + p + c0, invstd + p + c0, w ? w + c0 : nullptr,
                                dx ? dx + o + c0 : nullptr, gw + p + c0, gb + p + c0, n, C);
    if (c0 < C)
      backward_tile<T, W, false>(dy + o + c0, x + o + c0, C - c0, mean + p + c0, invstd + p + c0,
                                 w ? w + c0 : nullptr, dx ? dx + o + c0 : nullptr, gw + p + c0, gb + p + c0, n, C);
  }
}

// Long groups (n > kTileRows): whole rows at a time, so memory is read front to back. Channel tiles would stride
// by the row length, and rows a power-of-two apart land in the same few L1 sets (measured: (256, 512) at G = 2 took
// 1.3x as long as G = 16). Per-channel sums live in arrays of C; float partial sums over kBlock rows go on in double.
template <typename T>
struct Rows {
  std::vector<T> p1, p2, c1, c2, c3;
  std::vector<double> a1, a2;
  explicit Rows(int64_t C) : p1(C), p2(C), c1(C), c2(C), c3(C), a1(C), a2(C) {}
};

// The backward's sums, per channel: sdy[c] = sum_i dy[i, c] and sdyx[c] = sum_i dy[i, c] * (x[i, c] - mean[c]).
template <typename T>
GS_INLINE void row_sums(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ mean, int64_t n,
                        int64_t C, Rows<T>& r, T* __restrict__ sdy, T* __restrict__ sdyx) {
  T* __restrict__ p1 = r.p1.data();
  T* __restrict__ p2 = r.p2.data();
  std::fill(r.a1.begin(), r.a1.end(), 0.0);
  std::fill(r.a2.begin(), r.a2.end(), 0.0);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    std::fill(r.p1.begin(), r.p1.end(), T(0));
    std::fill(r.p2.begin(), r.p2.end(), T(0));
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict__ dr = dy + i * C;
      const T* __restrict__ xr = x + i * C;
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += dr[c];
        p2[c] += dr[c] * (xr[c] - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      r.a1[c] += p1[c];
      r.a2[c] += p2[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sdy[c] = T(r.a1[c]);
    sdyx[c] = T(r.a2[c]);
  }
}

// Per channel, the mean and the centred sum of squares of n rows: each block of kBlock rows is summed, centred on its
// own mean and summed again while it is still in cache, and merged into running (count, mean, M2) in double:
// M2 += M2_b + delta^2 * n_a * n_b / (n_a + n_b), delta = mean_b - mean_a (Chan, Golub, LeVeque 1979). One read of
// the group from memory instead of two (WRN-28-10's channels_last groups are 5-40 MB).
template <typename T>
GS_INLINE void row_moments(const T* __restrict__ x, int64_t n, int64_t C, Rows<T>& r, T* __restrict__ mean,
                           T* __restrict__ ss) {
  T* __restrict__ p1 = r.p1.data();
  T* __restrict__ bm = r.p2.data();
  double* __restrict__ am = r.a1.data();
  double* __restrict__ a2 = r.a2.data();
  std::fill(r.a1.begin(), r.a1.end(), 0.0);
  std::fill(r.a2.begin(), r.a2.end(), 0.0);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock), nb = i1 - i0;
    std::fill(r.p1.begin(), r.p1.end(), T(0));
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < C; ++c) p1[c] += x[i * C + c];
    const T inv_nb = T(1) / T(nb);
    for (int64_t c = 0; c < C; ++c) {
      bm[c] = p1[c] * inv_nb;
      p1[c] = T(0);
    }
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const T d = x[i * C + c] - bm[c];
        p1[c] += d * d;
      }
    const double na = double(i0), w = double(nb) / double(i1), cross = na * double(nb) / double(i1);
    for (int64_t c = 0; c < C; ++c) {
      const double delta = double(bm[c]) - am[c];
      am[c] += delta * w;
      a2[c] += double(p1[c]) + delta * delta * cross;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = T(am[c]);
    ss[c] = T(a2[c]);
  }
}

template <typename T>
GS_INLINE void forward_rows(int64_t g0, int64_t g1, const T* x, T* y, const T* w, const T* b, T* mean, T* invstd,
                            T* var, int64_t n, int64_t C, T eps) {
  Rows<T> r(C);
  T* __restrict__ scale = r.c1.data();
  T* __restrict__ shift = r.c2.data();
  const T inv_n = T(1) / T(n), unbiased = T(1) / T(n - 1);  // n > kTileRows > 1
  for (int64_t g = g0; g < g1; ++g) {
    const T* __restrict__ xg = x + g * n * C;
    T* __restrict__ yg = y + g * n * C;
    T* __restrict__ mg = mean + g * C;
    T* __restrict__ ig = invstd + g * C;
    T* __restrict__ vg = var + g * C;
    row_moments(xg, n, C, r, mg, vg);  // vg: the centred sums of squares, then the variances
    for (int64_t c = 0; c < C; ++c) {
      const T ss = vg[c];
      ig[c] = T(1) / std::sqrt(ss * inv_n + eps);
      vg[c] = ss * unbiased;
      scale[c] = w ? ig[c] * w[c] : ig[c];
      shift[c] = b ? b[c] : T(0);
    }
    for (int64_t i = 0; i < n; ++i)  // centred, as forward_tile
      for (int64_t c = 0; c < C; ++c) yg[i * C + c] = (xg[i * C + c] - mg[c]) * scale[c] + shift[c];
  }
}

template <typename T>
GS_INLINE void backward_rows(int64_t g0, int64_t g1, const T* dy, const T* x, const T* mean, const T* invstd,
                             const T* w, T* dx, T* gw, T* gb, int64_t n, int64_t C) {
  Rows<T> r(C);
  T* __restrict__ a = r.c1.data();
  T* __restrict__ bx = r.c2.data();
  T* __restrict__ k = r.c3.data();
  const T inv_n = T(1) / T(n);
  for (int64_t g = g0; g < g1; ++g) {
    const T* __restrict__ xg = x + g * n * C;
    const T* __restrict__ dyg = dy + g * n * C;
    const T* __restrict__ mg = mean + g * C;
    const T* __restrict__ ig = invstd + g * C;
    T* __restrict__ sdy = gb + g * C;
    T* __restrict__ sdyx = gw + g * C;
    row_sums(dyg, xg, mg, n, C, r, sdy, sdyx);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = w ? ig[c] * w[c] : ig[c];
      bx[c] = -a[c] * ig[c] * ig[c] * sdyx[c] * inv_n;
      k[c] = -a[c] * sdy[c] * inv_n;
      sdyx[c] *= ig[c];  // sum(dy * (x - mean)) * invstd = sum(dy * xhat)
    }
    if (dx) {
      T* __restrict__ dxg = dx + g * n * C;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < C; ++c)  // centred, as backward_tile
          dxg[i * C + c] = a[c] * dyg[i * C + c] + bx[c] * (xg[i * C + c] - mg[c]) + k[c];
    }
  }
}

template <typename T>
GS_INLINE void forward_groups(int64_t g0, int64_t g1, const T* x, T* y, const T* w, const T* b, T* mean, T* invstd,
                              T* var, int64_t n, int64_t C, T eps) {
  if (n > kTileRows)
    forward_rows<T>(g0, g1, x, y, w, b, mean, invstd, var, n, C, eps);
  else
    forward_tiles<T>(g0, g1, x, y, w, b, mean, invstd, var, n, C, eps);
}

template <typename T>
GS_INLINE void backward_groups(int64_t g0, int64_t g1, const T* dy, const T* x, const T* mean, const T* invstd,
                               const T* w, T* dx, T* gw, T* gb, int64_t n, int64_t C) {
  if (n > kTileRows)
    backward_rows<T>(g0, g1, dy, x, mean, invstd, w, dx, gw, gb, n, C);
  else
    backward_tiles<T>(g0, g1, dy, x, mean, invstd, w, dx, gw, gb, n, C);
}

// ---- NCHW (planar) memory: (M, C, S) with S > 1 contiguous values per (sample, channel) ----------------------
// A (group, channel) pair is m rows of S contiguous values, C*S apart. Each pair is reduced on its own (pairs run in
// parallel): per row, V partial sums in T along S (element-wise, so it vectorizes without reassociating), the rows
// carried on in double. ATen's own NCHW statistics loop is scalar, which is why this beats nn.BatchNorm there.
template <typename T>
GS_INLINE double row_sum(const T* __restrict__ r, int64_t S, T center, bool square) {
  constexpr int V = 64 / sizeof(T);
  T acc[V] = {};
  int64_t s = 0;
  if (square) {
    for (; s + V <= S; s += V)
      for (int j = 0; j < V; ++j) {
        const T d = r[s + j] - center;
        acc[j] += d * d;
      }
  } else {
    for (; s + V <= S; s += V)
      for (int j = 0; j < V; ++j) acc[j] += r[s + j];
  }
  double total = 0.0;
  for (; s < S; ++s) total += square ? double(r[s] - center) * double(r[s] - center) : double(r[s]);
  for (int j = 0; j < V; ++j) total += acc[j];
  return total;
}

template <typename T>
GS_INLINE void forward_planar(int64_t p0, int64_t p1, const T* x, T* y, const T* w, const T* b, T* mean, T* invstd,
                              T* var, int64_t m, int64_t C, int64_t S, T eps) {
  const double inv_n = 1.0 / double(m * S), unbiased = 1.0 / double(m * S - 1);  // m * S > 1: S > 1 here
  for (int64_t p = p0; p < p1; ++p) {  // p = g * C + c, the layout of mean/invstd/var
    const int64_t g = p / C, c = p % C;
    const T* xp = x + (g * m * C + c) * S;
    T* yp = y + (g * m * C + c) * S;
    double sum = 0.0;
    for (int64_t i = 0; i < m; ++i) sum += row_sum(xp + i * C * S, S, T(0), false);
    const T mu = T(sum * inv_n);
    double ss = 0.0;  // centred, in a second pass (a one-pass merge of row moments measured 1.1-1.4x slower)
    for (int64_t i = 0; i < m; ++i) ss += row_sum(xp + i * C * S, S, mu, true);
    const T inv = T(1.0 / std::sqrt(ss * inv_n + double(eps)));
    mean[p] = mu;
    invstd[p] = inv;
    var[p] = T(ss * unbiased);
    const T scale = w ? inv * w[c] : inv, shift = b ? b[c] : T(0);
    for (int64_t i = 0; i < m; ++i) {
      const T* __restrict__ xr = xp + i * C * S;
      T* __restrict__ yr = yp + i * C * S;
      for (int64_t s = 0; s < S; ++s) yr[s] = (xr[s] - mu) * scale + shift;  // centred, as the other paths
    }
  }
}

template <typename T>
GS_INLINE void backward_planar(int64_t p0, int64_t p1, const T* dy, const T* x, const T* mean, const T* invstd,
                               const T* w, T* dx, T* gw, T* gb, int64_t m, int64_t C, int64_t S) {
  constexpr int V = 64 / sizeof(T);
  const T inv_n = T(1) / T(m * S);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t g = p / C, c = p % C, o = (g * m * C + c) * S;
    const T mu = mean[p], inv = invstd[p];
    double sdy = 0.0, sdyx = 0.0;
    for (int64_t i = 0; i < m; ++i) {  // sum(dy) and sum(dy * (x - mean)), V lanes each, as row_sum
      const T* __restrict__ dr = dy + o + i * C * S;
      const T* __restrict__ xr = x + o + i * C * S;
      T a1[V] = {}, a2[V] = {};
      int64_t s = 0;
      for (; s + V <= S; s += V)
        for (int j = 0; j < V; ++j) {
          a1[j] += dr[s + j];
          a2[j] += dr[s + j] * (xr[s + j] - mu);
        }
      for (; s < S; ++s) {
        sdy += dr[s];
        sdyx += double(dr[s]) * double(xr[s] - mu);
      }
      for (int j = 0; j < V; ++j) {
        sdy += a1[j];
        sdyx += a2[j];
      }
    }
    gb[p] = T(sdy);
    gw[p] = T(sdyx * inv);  // sum(dy * xhat)
    if (!dx) continue;
    const T a = w ? inv * w[c] : inv;
    const T bx = -a * inv * inv * T(sdyx) * inv_n, k = -a * T(sdy) * inv_n;
    for (int64_t i = 0; i < m; ++i) {
      const T* __restrict__ dr = dy + o + i * C * S;
      const T* __restrict__ xr = x + o + i * C * S;
      T* __restrict__ out = dx + o + i * C * S;
      for (int64_t s = 0; s < S; ++s) out[s] = a * dr[s] + bx * (xr[s] - mu) + k;  // centred, as backward_tile
    }
  }
}

// Non-template entry points: target_clones needs plain functions; the templates above inline into each clone.
GS_CLONES void forward_f(int64_t g0, int64_t g1, const float* x, float* y, const float* w, const float* b, float* m,
                         float* i, float* v, int64_t n, int64_t C, float eps) {
  forward_groups<float>(g0, g1, x, y, w, b, m, i, v, n, C, eps);
}
GS_CLONES void forward_d(int64_t g0, int64_t g1, const double* x, double* y, const double* w, const double* b,
                         double* m, double* i, double* v, int64_t n, int64_t C, double eps) {
  forward_groups<double>(g0, g1, x, y, w, b, m, i, v, n, C, eps);
}
GS_CLONES void backward_f(int64_t g0, int64_t g1, const float* dy, const float* x, const float* m, const float* i,
                          const float* w, float* dx, float* gw, float* gb, int64_t n, int64_t C) {
  backward_groups<float>(g0, g1, dy, x, m, i, w, dx, gw, gb, n, C);
}
GS_CLONES void backward_d(int64_t g0, int64_t g1, const double* dy, const double* x, const double* m, const double* i,
                          const double* w, double* dx, double* gw, double* gb, int64_t n, int64_t C) {
  backward_groups<double>(g0, g1, dy, x, m, i, w, dx, gw, gb, n, C);
}
GS_CLONES void forward_planar_f(int64_t p0, int64_t p1, const float* x, float* y, const float* w, const float* b,
                                float* m, float* i, float* v, int64_t rows, int64_t C, int64_t S, float eps) {
  forward_planar<float>(p0, p1, x, y, w, b, m, i, v, rows, C, S, eps);
}
GS_CLONES void forward_planar_d(int64_t p0, int64_t p1, const double* x, double* y, const double* w, const double* b,
                                double* m, double* i, double* v, int64_t rows, int64_t C, int64_t S, double eps) {
  forward_planar<double>(p0, p1, x, y, w, b, m, i, v, rows, C, S, eps);
}
GS_CLONES void backward_planar_f(int64_t p0, int64_t p1, const float* dy, const float* x, const float* m,
                                 const float* i, const float* w, float* dx, float* gw, float* gb, int64_t rows,
                                 int64_t C, int64_t S) {
  backward_planar<float>(p0, p1, dy, x, m, i, w, dx, gw, gb, rows, C, S);
}
GS_CLONES void backward_planar_d(int64_t p0, int64_t p1, const double* dy, const double* x, const double* m,
                                 const double* i, const double* w, double* dx, double* gw, double* gb, int64_t rows,
                                 int64_t C, int64_t S) {
  backward_planar<double>(p0, p1, dy, x, m, i, w, dx, gw, gb, rows, C, S);
}
inline void forward_planar_any(int64_t p0, int64_t p1, const float* x, float* y, const float* w, const float* b,
                               float* m, float* i, float* v, int64_t rows, int64_t C, int64_t S, double eps) {
  forward_planar_f(p0, p1, x, y, w, b, m, i, v, rows, C, S, static_cast<float>(eps));
}
inline void forward_planar_any(int64_t p0, int64_t p1, const double* x, double* y, const double* w, const double* b,
                               double* m, double* i, double* v, int64_t rows, int64_t C, int64_t S, double eps) {
  forward_planar_d(p0, p1, x, y, w, b, m, i, v, rows, C, S, eps);
}
inline void backward_planar_any(int64_t p0, int64_t p1, const float* dy, const float* x, const float* m,
                                const float* i, const float* w, float* dx, float* gw, float* gb, int64_t rows,
                                int64_t C, int64_t S) {
  backward_planar_f(p0, p1, dy, x, m, i, w, dx, gw, gb, rows, C, S);
}
inline void backward_planar_any(int64_t p0, int64_t p1, const double* dy, const double* x, const double* m,
                                const double* i, const double* w, double* dx, double* gw, double* gb, int64_t rows,
                                int64_t C, int64_t S) {
  backward_planar_d(p0, p1, dy, x, m, i, w, dx, gw, gb, rows, C, S);
}
inline void forward_any(int64_t g0, int64_t g1, const float* x, float* y, const float* w, const float* b, float* m,
                        float* i, float* v, int64_t n, int64_t C, double eps) {
  forward_f(g0, g1, x, y, w, b, m, i, v, n, C, static_cast<float>(eps));
}
inline void forward_any(int64_t g0, int64_t g1, const double* x, double* y, const double* w, const double* b,
                        double* m, double* i, double* v, int64_t n, int64_t C, double eps) {
  forward_d(g0, g1, x, y, w, b, m, i, v, n, C, eps);
}
inline void backward_any(int64_t g0, int64_t g1, const float* dy, const float* x, const float* m, const float* i,
                         const float* w, float* dx, float* gw, float* gb, int64_t n, int64_t C) {
  backward_f(g0, g1, dy, x, m, i, w, dx, gw, gb, n, C);
}
inline void backward_any(int64_t g0, int64_t g1, const double* dy, const double* x, const double* m, const double* i,
                         const double* w, double* dx, double* gw, double* gb, int64_t n, int64_t C) {
  backward_d(g0, g1, dy, x, m, i, w, dx, gw, gb, n, C);
}

// running <- running + factor * (mean over the G rows of src - running), GhostBatchNorm's "mean" policy: a lerp,
// as Tensor.lerp_ computes it. Group-major sums run along C (vectorized) over the (G, C) moments.
template <typename T>
GS_INLINE void running_step_impl(const T* __restrict__ src, T* __restrict__ running, int64_t G, int64_t C,
                                 double factor) {
  std::vector<T> sum(src, src + C);
  for (int64_t g = 1; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) sum[c] += src[g * C + c];
  const T f = T(factor), inv_g = T(1) / T(G);
  for (int64_t c = 0; c < C; ++c) running[c] += f * (sum[c] * inv_g - running[c]);
}
// out[c] = sum over the G rows of the (G, C) src: dweight and dbias from their per-group terms.
template <typename T>
GS_INLINE void sum_groups_impl(const T* __restrict__ src, T* __restrict__ out, int64_t G, int64_t C) {
  std::copy(src, src + C, out);
  for (int64_t g = 1; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) out[c] += src[g * C + c];
}
GS_CLONES void sum_groups(const float* src, float* out, int64_t G, int64_t C) { sum_groups_impl(src, out, G, C); }
GS_CLONES void sum_groups(const double* src, double* out, int64_t G, int64_t C) { sum_groups_impl(src, out, G, C); }

GS_CLONES void running_step(const float* src, float* running, int64_t G, int64_t C, double factor) {
  running_step_impl<float>(src, running, G, C, factor);
}
GS_CLONES void running_step(const double* src, double* running, int64_t G, int64_t C, double factor) {
  running_step_impl<double>(src, running, G, C, factor);
}

int64_t grain(int64_t n, int64_t C) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, n * C)); }

// NCHW-like: contiguous with more than one value per (sample, channel); read by the planar kernels.
bool planar(const Tensor& t) { return t.dim() > 2 && t.numel() != t.size(0) * t.size(1) && t.is_contiguous(); }

bool cols_dense(const Tensor& t) {
  if (t.dim() == 2 || t.numel() == t.size(0) * t.size(1)) return t.is_contiguous();  // no spatial extent
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// In parallel: cols(g0, g1) over ranges of groups, or for NCHW memory planar(p0, p1, rows, S) over ranges of
// (group, channel) pairs; each task gets at least kGrainValues values.
template <typename Cols, typename Planar>
void over_blocks(const Tensor& x, int64_t groups, const Cols& cols, const Planar& planar_fn) {
  const int64_t C = x.size(1), n = x.numel() / (groups * C);
  if (planar(x)) {
    const int64_t rows = x.size(0) / groups, S = n / rows;
    at::parallel_for(0, groups * C, grain(n, 1), [&](int64_t p0, int64_t p1) { planar_fn(p0, p1, rows, S); });
  } else {
    at::parallel_for(0, groups, grain(n, C), cols);
  }
}

void check_param(const std::optional<Tensor>& p, const Tensor& x, const char* name) {
  if (!p || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1) && p->is_contiguous() && p->scalar_type() == x.scalar_type() &&
                  p->device() == x.device(),
              "ghostsys::ghost_cols: ", name, " must be a contiguous (C,) tensor of the input's dtype and device");
}

const Tensor* opt(const std::optional<Tensor>& p) { return p && p->defined() ? &*p : nullptr; }

// (y, mean, invstd, unbiased var); running buffers, when given, take one EMA step with `factor` toward the mean
// over groups of the group means and unbiased variances (GhostBatchNorm's "mean" policy).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& x, int64_t groups,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias,
                                                        const std::optional<Tensor>& running_mean,
                                                        const std::optional<Tensor>& running_var, double factor,
                                                        double eps) {
  TORCH_CHECK(x.device().is_cpu(), "ghostsys::ghost_cols runs on the CPU");
  TORCH_CHECK(x.dim() >= 2 && groups >= 1 && x.size(0) % groups == 0 && x.size(0) > 0,
              "ghostsys::ghost_cols: the batch (", x.dim() ? x.size(0) : 0, ") must split into ", groups, " groups");
  TORCH_CHECK(x.size(1) > 0 && x.numel() > 0, "ghostsys::ghost_cols: the input has no values");
  TORCH_CHECK(planar(x) || cols_dense(x), "ghostsys::ghost_cols: the input must be dense: (M, C), NCHW or channels_last");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  check_param(running_mean, x, "running_mean");
  check_param(running_var, x, "running_var");
  const int64_t C = x.size(1), n = x.numel() / (groups * C);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({groups, C}, x.options());
  Tensor invstd = at::empty({groups, C}, x.options());
  Tensor var = at::empty({groups, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_cols_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = opt(weight) ? weight->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = opt(bias) ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>();
    scalar_t *ip = invstd.data_ptr<scalar_t>(), *vp = var.data_ptr<scalar_t>();
    over_blocks(
        x, groups, [&](int64_t g0, int64_t g1) { forward_any(g0, g1, xp, yp, wp, bp, mp, ip, vp, n, C, eps); },
        [&](int64_t p0, int64_t p1, int64_t rows, int64_t S) {
          forward_planar_any(p0, p1, xp, yp, wp, bp, mp, ip, vp, rows, C, S, eps);
        });
    for (const Tensor* buf : {opt(running_mean), opt(running_var)}) {
      if (!buf) continue;
      running_step(buf == opt(running_mean) ? mp : vp, buf->data_ptr<scalar_t>(), groups, C, factor);
    }
  });
  return {y, mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& invstd, const std::optional<Tensor>& weight,
                                                 int64_t groups, bool need_dx) {
  const int64_t C = x.size(1), n = x.numel() / (groups * C);
  // The kernel reads dy with x's strides: autograd may hand over an expanded or otherwise strided gradient.
  Tensor g = dy.strides() == x.strides() ? dy : at::empty_like(x).copy_(dy);
  Tensor dx = need_dx ? at::empty_like(x) : Tensor();
  Tensor gw = at::empty({groups, C}, x.options()), gb = at::empty({groups, C}, x.options());
  Tensor dw = at::empty({C}, x.options()), db = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_cols_backward", [&] {
    const scalar_t* wp = opt(weight) ? weight->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t *gwp = gw.data_ptr<scalar_t>(), *gbp = gb.data_ptr<scalar_t>();
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    over_blocks(
        x, groups, [&](int64_t g0, int64_t g1) { backward_any(g0, g1, gp, xp, mp, ip, wp, dxp, gwp, gbp, n, C); },
        [&](int64_t p0, int64_t p1, int64_t rows, int64_t S) {
          backward_planar_any(p0, p1, gp, xp, mp, ip, wp, dxp, gwp, gbp, rows, C, S);
        });
    sum_groups(gwp, dw.data_ptr<scalar_t>(), groups, C);
    sum_groups(gbp, db.data_ptr<scalar_t>(), groups, C);
  });
  return {dx, dw, db};
}

class GhostColsFunction : public torch::autograd::Function<GhostColsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                               double factor, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd, var] = forward_impl(x, groups, weight, bias, running_mean, running_var, factor, eps);
    for (const Tensor* buf : {opt(running_mean), opt(running_var)})
      if (buf) buf->unsafeGetTensorImpl()->bump_version();
    ctx->save_for_backward({x, opt(weight) ? *weight : Tensor(), mean, invstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = opt(bias) != nullptr;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The backward is raw loops, not differentiable ops: refuse a second derivative rather than return a wrong one.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ghostsys: GhostBatchNorm impl='fused' is differentiable once; for create_graph=True use "
                "impl='vectorized'");
    auto saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    std::optional<Tensor> w = weight.defined() ? std::optional<Tensor>(weight) : std::nullopt;
    auto [dx, dw, db] = backward_impl(grads[0], saved[0], saved[2], saved[3], w, ctx->saved_data["groups"].toInt(),
                                      ctx->needs_input_grad(0));
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {dx, Tensor(), weight.defined() ? dw : Tensor(), has_bias ? db : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> ghost_cols_autograd(const Tensor& x, int64_t groups,
                                                       const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias,
                                                       const std::optional<Tensor>& running_mean,
                                                       const std::optional<Tensor>& running_var, double factor,
                                                       double eps) {
  auto out = GhostColsFunction::apply(x, groups, weight, bias, running_mean, running_var, factor, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> ghost_cols_cpu(const Tensor& x, int64_t groups, const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& running_mean,
                                                  const std::optional<Tensor>& running_var, double factor,
                                                  double eps) {
  auto [y, mean, invstd, var] = forward_impl(x, groups, weight, bias, running_mean, running_var, factor, eps);
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY(ghostsys, m) {
  m.def(
      "ghost_cols(Tensor x, int groups, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float factor, float eps) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(ghostsys, CPU, m) { m.impl("ghost_cols", &ghost_cols_cpu); }
TORCH_LIBRARY_IMPL(ghostsys, Autograd, m) { m.impl("ghost_cols", &ghost_cols_autograd); }
