// CPU kernels: at::parallel_for over channels or rows, at::vec::Vectorized within a run.
//
// Precision. Sums are accumulated in short float (or double) vector blocks that are flushed into
// double accumulators, so an error cannot grow with the run length. The statistics use sums
// shifted by the channel's first element k:
//     mean = k + sum(x - k) / n,   var = (sum((x - k)^2) - sum(x - k)^2 / n) / n,
// which cancels nothing when |mean| >> std (unlike the raw sum of squares). Outputs are written as
// (x - mean) * scale + shift rather than x * scale + (shift - mean * scale): the latter rounds at
// the magnitude of mean * scale, which for mean = 1e4 and std = 1 costs about 1e-3 in float32.
//
// Determinism. Every partial sum is owned by a fixed run of the input (a row, or a fixed block of
// rows), never by a thread, and partials are combined in index order. The bits do not depend on the
// thread count or on which path (fused or split) ran.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../bn_ext.h"

namespace bn_ext {
namespace cpu {
namespace {

using at::vec::Vectorized;

template <typename T>
using math_t = at::opmath_type<T>;  // float for float16/bfloat16/float32, double for float64

// Loads and stores `kWidth` elements of T as two Vectorized<math_t<T>>.
template <typename T, typename = void>
struct VecIO {
  using V = Vectorized<T>;
  static constexpr int64_t kWidth = 2 * V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};

template <typename T>
struct VecIO<T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>> {
  using V = Vectorized<float>;
  static constexpr int64_t kWidth = Vectorized<T>::size();  // == 2 * V::size()
  static void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};

// Vector iterations between flushes of a float accumulator into double: keeps the relative
// rounding error of a block sum below ~64 ulp whatever the run length.
constexpr int64_t kFlushEvery = 64;

template <typename M>
double hsum(const Vectorized<M>& v) {
  __at_align__ M buf[Vectorized<M>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<M>::size(); ++i) s += buf[i];
  return s;
}

// ---- reductions over one contiguous run -----------------------------------------------------

// Two sums over the n elements of a run, accumulated in vector blocks of at most kFlushEvery
// steps that are flushed into the double totals s1, s2. `step(i, a1, b1, a2, b2)` adds elements
// [i, i + kWidth) to the four vector accumulators; `tail(i, s1, s2)` adds element i.
template <typename T, typename Step, typename Tail>
void two_sums_run(int64_t n, const Step& step, const Tail& tail, double& s1, double& s2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const int64_t vec_end = n - n % IO::kWidth;
  int64_t i = 0;
  while (i < vec_end) {
    const int64_t block_end = std::min(vec_end, i + kFlushEvery * IO::kWidth);
    V a1(0), a2(0), b1(0), b2(0);
    for (; i < block_end; i += IO::kWidth) step(i, a1, b1, a2, b2);
    s1 += hsum(a1 + b1);
    s2 += hsum(a2 + b2);
  }
  for (; i < n; ++i) tail(i, s1, s2);
}

// s1 += sum(x - k), s2 += sum((x - k)^2) over x[0, n).
template <typename T>
void shifted_moments_run(const T* x, int64_t n, math_t<T> k, double& s1, double& s2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V kv(k);
  two_sums_run<T>(
      n,
      [&](int64_t i, V& a1, V& b1, V& a2, V& b2) {
        V a, b;
        IO::load(x + i, a, b);
        a = a - kv;
        b = b - kv;
        a1 = a1 + a;
        b1 = b1 + b;
        a2 = at::vec::fmadd(a, a, a2);
        b2 = at::vec::fmadd(b, b, b2);
      },
      [&](int64_t i, double& t1, double& t2) {
        const math_t<T> d = static_cast<math_t<T>>(x[i]) - k;
        t1 += d;
        t2 += static_cast<double>(d) * d;
      },
      s1, s2);
}

// s1 += sum(dy), s2 += sum(dy * (x - mu)) over [0, n).
template <typename T>
void centered_dot_run(const T* dy, const T* x, int64_t n, math_t<T> mu, double& s1,
                      double& s2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V muv(mu);
  two_sums_run<T>(
      n,
      [&](int64_t i, V& a1, V& b1, V& a2, V& b2) {
        V ga, gb, xa, xb;
        IO::load(dy + i, ga, gb);
        IO::load(x + i, xa, xb);
        a1 = a1 + ga;
        b1 = b1 + gb;
        a2 = at::vec::fmadd(ga, xa - muv, a2);
        b2 = at::vec::fmadd(gb, xb - muv, b2);
      },
      [&](int64_t i, double& t1, double& t2) {
        const math_t<T> g = static_cast<math_t<T>>(dy[i]);
        t1 += g;
        t2 += static_cast<double>(g) * (static_cast<math_t<T>>(x[i]) - mu);
      },
      s1, s2);
}

// ---- elementwise over one contiguous run ----------------------------------------------------

// y = (x - mu) * alpha + beta
template <typename T>
void affine_run(const T* x, T* y, int64_t n, math_t<T> mu, math_t<T> alpha, math_t<T> beta) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V muv(mu), av(alpha), bv(beta);
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t i = 0; i < vec_end; i += IO::kWidth) {
    V a, b;
    IO::load(x + i, a, b);
    IO::store(y + i, at::vec::fmadd(a - muv, av, bv), at::vec::fmadd(b - muv, av, bv));
  }
  for (int64_t i = vec_end; i < n; ++i) {
    y[i] = static_cast<T>((static_cast<math_t<T>>(x[i]) - mu) * alpha + beta);
  }
}

// dx = dy * a + (x - mu) * b + d
template <typename T>
void affine2_run(const T* dy, const T* x, T* dx, int64_t n, math_t<T> a, math_t<T> mu,
                 math_t<T> b, math_t<T> d) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V av(a), muv(mu), bv(b), dv(d);
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t i = 0; i < vec_end; i += IO::kWidth) {
    V g0, g1, x0, x1;
    IO::load(dy + i, g0, g1);
    IO::load(x + i, x0, x1);
    IO::store(dx + i, at::vec::fmadd(g0, av, at::vec::fmadd(x0 - muv, bv, dv)),
              at::vec::fmadd(g1, av, at::vec::fmadd(x1 - muv, bv, dv)));
  }
  for (int64_t i = vec_end; i < n; ++i) {
    const math_t<T> g = static_cast<math_t<T>>(dy[i]);
    dx[i] = static_cast<T>(g * a + ((static_cast<math_t<T>>(x[i]) - mu) * b + d));
  }
}

// ---- per-channel coefficients (double, then rounded once to the math type) --------------------

struct Moments {
  double mean;
  double var;  // biased
};

Moments moments_from_shifted(double k, double s1, double s2, int64_t n) {
  const double m1 = s1 / n;
  const double v = s2 / n - m1 * m1;
  return {k + m1, v < 0 ? 0.0 : v};  // clamps rounding residue; a NaN stays NaN (not max())
}

inline double invstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

template <typename M>
M opt_at(const Tensor& t, int64_t c, M fallback) {
  return t.defined() ? t.data_ptr<M>()[c] : fallback;
}

// y = (x - mean) * scale + shift with scale = w / sqrt(var + eps), shift = b.
template <typename M>
struct AffineCoefs {
  std::vector<M> mu, alpha, beta;
};

template <typename M>
AffineCoefs<M> normalize_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                               const Tensor& bias, double eps) {
  const int64_t C = mean.numel();
  AffineCoefs<M> k{std::vector<M>(C), std::vector<M>(C), std::vector<M>(C)};
  for (int64_t c = 0; c < C; ++c) {
    k.mu[c] = mean.data_ptr<M>()[c];
    k.alpha[c] = static_cast<M>(opt_at<M>(weight, c, 1) * invstd_of(var.data_ptr<M>()[c], eps));
    k.beta[c] = opt_at<M>(bias, c, 0);
  }
  return k;
}

// Training backward, per channel, with w' = w * invstd:
//   dx = w' * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)
//      = dy * a + (x - mean) * b + d,
//   a = w',  b = -w' * invstd^2 * sum_dy_xmu / n,  d = -w' * sum_dy / n.
struct BackwardCoefs {
  double a, b, d;
};

BackwardCoefs backward_coefs(double w, double invstd, double sum_dy, double sum_dy_xmu,
                             double n) {
  const double a = w * invstd;
  return {a, -a * invstd * invstd * sum_dy_xmu / n, -a * sum_dy / n};
}

// ---- layouts -------------------------------------------------------------------------------
//
// Contiguous (N, C, S): the unit of work is a run of S elements for one (n, c).
// Channels-last (N*S rows of C): the unit is a row; per-channel quantities are vectors over c.
// Channels-last reductions split the rows into fixed blocks, each reducing into its own partial
// vector; the blocks are then summed in order.

// Rows per channels-last reduction block. The block's float accumulators are flushed into its
// double partial once, so this also bounds their accumulation length.
constexpr int64_t kRowsPerBlock = kFlushEvery;

// For each channel, f(c, s1, s2) of two row-block reductions in channels-last layout.
// `accumulate(row_begin, row_end, acc1, acc2)` adds its rows into float/double accumulators
// of length C (type A).
template <typename A, typename Accumulate, typename Finish>
void channels_last_reduce(int64_t rows, int64_t C, const Accumulate& accumulate,
                          const Finish& finish) {
  const int64_t block = kRowsPerBlock;
  const int64_t blocks = (rows + block - 1) / block;
  std::vector<double> partial(static_cast<size_t>(blocks) * 2 * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> acc1(C), acc2(C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc1.begin(), acc1.end(), A(0));
      std::fill(acc2.begin(), acc2.end(), A(0));
      accumulate(b * block, std::min(rows, (b + 1) * block), acc1.data(), acc2.data());
      double* p = partial.data() + b * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        p[c] = acc1[c];
        p[C + c] = acc2[c];
      }
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        s1 += partial[b * 2 * C + c];
        s2 += partial[b * 2 * C + C + c];
      }
      finish(c, s1, s2);
    }
  });
}

// acc1[c] += x[r, c] - k[c], acc2[c] += (x[r, c] - k[c])^2 for rows r in [r0, r1).
template <typename T>
void shifted_moments_rows(const T* x, int64_t r0, int64_t r1, int64_t C, const math_t<T>* k,
                          math_t<T>* acc1, math_t<T>* acc2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = C - C % IO::kWidth;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * C;
    for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
      V a, b;
      IO::load(row + c, a, b);
      a = a - V::loadu(k + c);
      b = b - V::loadu(k + c + h);
      (V::loadu(acc1 + c) + a).store(acc1 + c);
      (V::loadu(acc1 + c + h) + b).store(acc1 + c + h);
      at::vec::fmadd(a, a, V::loadu(acc2 + c)).store(acc2 + c);
      at::vec::fmadd(b, b, V::loadu(acc2 + c + h)).store(acc2 + c + h);
    }
    for (int64_t c = vec_end; c < C; ++c) {
      const math_t<T> d = static_cast<math_t<T>>(row[c]) - k[c];
      acc1[c] += d;
      acc2[c] += d * d;
    }
  }
}

// acc1[c] += dy[r, c], acc2[c] += dy[r, c] * (x[r, c] - mu[c]) for rows r in [r0, r1).
template <typename T>
void centered_dot_rows(const T* dy, const T* x, int64_t r0, int64_t r1, int64_t C,
                       const math_t<T>* mu, math_t<T>* acc1, math_t<T>* acc2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = C - C % IO::kWidth;
  for (int64_t r = r0; r < r1; ++r) {
    const T* grow = dy + r * C;
    const T* xrow = x + r * C;
    for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
      V g0, g1, x0, x1;
      IO::load(grow + c, g0, g1);
      IO::load(xrow + c, x0, x1);
      (V::loadu(acc1 + c) + g0).store(acc1 + c);
      (V::loadu(acc1 + c + h) + g1).store(acc1 + c + h);
      at::vec::fmadd(g0, x0 - V::loadu(mu + c), V::loadu(acc2 + c)).store(acc2 + c);
      at::vec::fmadd(g1, x1 - V::loadu(mu + c + h), V::loadu(acc2 + c + h)).store(acc2 + c + h);
    }
    for (int64_t c = vec_end; c < C; ++c) {
      const math_t<T> g = static_cast<math_t<T>>(grow[c]);
      acc1[c] += g;
      acc2[c] += g * (static_cast<math_t<T>>(xrow[c]) - mu[c]);
    }
  }
}

// y[r, c] = (x[r, c] - mu[c]) * alpha[c] + beta[c] for every row.
template <typename T>
void affine_rows(const T* x, T* y, int64_t rows, int64_t C, const math_t<T>* mu,
                 const math_t<T>* alpha, const math_t<T>* beta) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = C - C % IO::kWidth;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
      for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
        V a, b;
        IO::load(xr + c, a, b);
        IO::store(yr + c,
                  at::vec::fmadd(a - V::loadu(mu + c), V::loadu(alpha + c), V::loadu(beta + c)),
                  at::vec::fmadd(b - V::loadu(mu + c + h), V::loadu(alpha + c + h),
                                 V::loadu(beta + c + h)));
      }
      for (int64_t c = vec_end; c < C; ++c) {
        yr[c] = static_cast<T>((static_cast<math_t<T>>(xr[c]) - mu[c]) * alpha[c] + beta[c]);
      }
    }
  });
}

// dx[r, c] = dy[r, c] * a[c] + (x[r, c] - mu[c]) * b[c] + d[c] for every row.
template <typename T>
void affine2_rows(const T* dy, const T* x, T* dx, int64_t rows, int64_t C, const math_t<T>* a,
                  const math_t<T>* mu, const math_t<T>* b, const math_t<T>* d) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = C - C % IO::kWidth;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = dy + r * C;
      const T* xr = x + r * C;
      T* dr = dx + r * C;
      for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
        V g0, g1, x0, x1;
        IO::load(gr + c, g0, g1);
        IO::load(xr + c, x0, x1);
        const V o0 = at::vec::fmadd(
            g0, V::loadu(a + c),
            at::vec::fmadd(x0 - V::loadu(mu + c), V::loadu(b + c), V::loadu(d + c)));
        const V o1 = at::vec::fmadd(
            g1, V::loadu(a + c + h),
            at::vec::fmadd(x1 - V::loadu(mu + c + h), V::loadu(b + c + h), V::loadu(d + c + h)));
        IO::store(dr + c, o0, o1);
      }
      for (int64_t c = vec_end; c < C; ++c) {
        const math_t<T> g = static_cast<math_t<T>>(gr[c]);
        dr[c] = static_cast<T>(g * a[c] + ((static_cast<math_t<T>>(xr[c]) - mu[c]) * b[c] + d[c]));
      }
    }
  });
}

// ---- whole-tensor kernels, per layout ---------------------------------------------------------

// Channel c's runs in contiguous layout are x + (n * C + c) * S for n in [0, N).
// Channels are processed whole by one thread when there are enough of them to keep every thread
// busy; a channel's second visit then hits cache (two passes over memory instead of three).
bool parallel_over_channels(const Geometry& g) {
  return g.C >= 4 * static_cast<int64_t>(at::get_num_threads());
}

template <typename T>
Moments contiguous_channel_moments(const T* x, const Geometry& g, int64_t c) {
  using M = math_t<T>;
  const M k = static_cast<M>(x[c * g.S]);
  double s1 = 0, s2 = 0;
  for (int64_t n = 0; n < g.N; ++n) {
    double r1 = 0, r2 = 0;
    shifted_moments_run(x + (n * g.C + c) * g.S, g.S, k, r1, r2);
    s1 += r1;
    s2 += r2;
  }
  return moments_from_shifted(k, s1, s2, g.count());
}

// Per-(n, c) run sums computed in parallel over runs, summed over n in order; identical to
// contiguous_channel_moments bit for bit.
template <typename T, typename RunFn, typename Finish>
void contiguous_reduce_by_runs(const Geometry& g, const RunFn& run, const Finish& finish) {
  std::vector<double> partial(static_cast<size_t>(g.N) * g.C * 2);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double r1 = 0, r2 = 0;
      run(i / g.C, i % g.C, r1, r2);
      partial[2 * i] = r1;
      partial[2 * i + 1] = r2;
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < g.N; ++n) {
      s1 += partial[2 * (n * g.C + c)];
      s2 += partial[2 * (n * g.C + c) + 1];
    }
    finish(c, s1, s2);
  }
}

template <typename T>
void batch_stats_impl(const Tensor& xt, const Geometry& g, Tensor& mean, Tensor& var) {
  using M = math_t<T>;
  const T* x = xt.const_data_ptr<T>();
  M* mean_p = mean.data_ptr<M>();
  M* var_p = var.data_ptr<M>();
  const auto store = [&](int64_t c, Moments m) {
    mean_p[c] = static_cast<M>(m.mean);
    var_p[c] = static_cast<M>(m.var);
  };
  if (g.layout == Layout::kContiguous) {
    if (parallel_over_channels(g)) {
      at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) store(c, contiguous_channel_moments(x, g, c));
      });
    } else {
      contiguous_reduce_by_runs<T>(
          g,
          [&](int64_t n, int64_t c, double& r1, double& r2) {
            shifted_moments_run(x + (n * g.C + c) * g.S, g.S, static_cast<M>(x[c * g.S]), r1, r2);
          },
          [&](int64_t c, double s1, double s2) {
            store(c, moments_from_shifted(static_cast<M>(x[c * g.S]), s1, s2, g.count()));
          });
    }
    return;
  }
  std::vector<M> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) k[c] = static_cast<M>(x[c]);
  channels_last_reduce<M>(
      g.N * g.S, g.C,
      [&](int64_t r0, int64_t r1, M* a1, M* a2) {
        shifted_moments_rows(x, r0, r1, g.C, k.data(), a1, a2);
      },
      [&](int64_t c, double s1, double s2) {
        store(c, moments_from_shifted(k[c], s1, s2, g.count()));
      });
}

template <typename T>
void normalize_impl(const Tensor& xt, const Geometry& g, const AffineCoefs<math_t<T>>& k,
                    Tensor& yt) {
  const T* x = xt.const_data_ptr<T>();
  T* y = yt.data_ptr<T>();
  if (g.layout == Layout::kContiguous) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % g.C;
        affine_run(x + i * g.S, y + i * g.S, g.S, k.mu[c], k.alpha[c], k.beta[c]);
      }
    });
    return;
  }
  affine_rows(x, y, g.N * g.S, g.C, k.mu.data(), k.alpha.data(), k.beta.data());
}

template <typename T>
void train_forward_impl(const Tensor& xt, const Geometry& g, const Tensor& weight,
                        const Tensor& bias, double eps, Tensor& yt, Tensor& mean, Tensor& var) {
  using M = math_t<T>;
  if (g.layout == Layout::kContiguous && parallel_over_channels(g)) {
    // One thread owns a channel: its statistics, then its output while the runs are still in
    // cache.
    const T* x = xt.const_data_ptr<T>();
    T* y = yt.data_ptr<T>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Moments m = contiguous_channel_moments(x, g, c);
        const M mu = static_cast<M>(m.mean);
        const M v = static_cast<M>(m.var);
        mean.data_ptr<M>()[c] = mu;
        var.data_ptr<M>()[c] = v;
        const M alpha = static_cast<M>(opt_at<M>(weight, c, 1) * invstd_of(v, eps));
        const M beta = opt_at<M>(bias, c, 0);
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c) * g.S;
          affine_run(x + off, y + off, g.S, mu, alpha, beta);
        }
      }
    });
    return;
  }
  batch_stats_impl<T>(xt, g, mean, var);
  normalize_impl<T>(xt, g, normalize_coefs<M>(mean, var, weight, bias, eps), yt);
}

template <typename T>
void backward_reduce_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                          const Tensor& mean, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using M = math_t<T>;
  const T* dy = dyt.const_data_ptr<T>();
  const T* x = xt.const_data_ptr<T>();
  const M* mu = mean.const_data_ptr<M>();
  M* s1p = sum_dy.data_ptr<M>();
  M* s2p = sum_dy_xmu.data_ptr<M>();
  const auto store = [&](int64_t c, double s1, double s2) {
    s1p[c] = static_cast<M>(s1);
    s2p[c] = static_cast<M>(s2);
  };
  if (g.layout == Layout::kContiguous) {
    contiguous_reduce_by_runs<T>(
        g,
        [&](int64_t n, int64_t c, double& r1, double& r2) {
          const int64_t off = (n * g.C + c) * g.S;
          centered_dot_run(dy + off, x + off, g.S, mu[c], r1, r2);
        },
        store);
    return;
  }
  channels_last_reduce<M>(
      g.N * g.S, g.C,
      [&](int64_t r0, int64_t r1, M* a1, M* a2) { centered_dot_rows(dy, x, r0, r1, g.C, mu, a1, a2); },
      store);
}

// dx = dy * a + (x - mu) * b + d with per-channel a, mu, b, d.
template <typename T>
void affine2_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                  const std::vector<math_t<T>>& a, const std::vector<math_t<T>>& mu,
                  const std::vector<math_t<T>>& b, const std::vector<math_t<T>>& d, Tensor& dxt) {
  const T* dy = dyt.const_data_ptr<T>();
  const T* x = xt.const_data_ptr<T>();
  T* dx = dxt.data_ptr<T>();
  if (g.layout == Layout::kContiguous) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % g.C;
        affine2_run(dy + i * g.S, x + i * g.S, dx + i * g.S, g.S, a[c], mu[c], b[c], d[c]);
      }
    });
    return;
  }
  affine2_rows(dy, x, dx, g.N * g.S, g.C, a.data(), mu.data(), b.data(), d.data());
}

template <typename T>
void backward_input_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                         const Tensor& mean, const Tensor& var, const Tensor& weight,
                         const Tensor& sum_dy, const Tensor& sum_dy_xmu, double n, double eps,
                         Tensor& dxt) {
  using M = math_t<T>;
  const int64_t C = g.C;
  std::vector<M> a(C), mu(C), b(C), d(C);
  const bool training = sum_dy.defined();
  if (!training) {
    // Eval: dx = dy * w * invstd, which is normalize() applied to dy with mean 0 and no bias.
    // x is not read, so an inf in x cannot turn into a NaN gradient (as in torch).
    normalize_impl<T>(dyt, g, normalize_coefs<M>(at::zeros_like(mean), var, weight, Tensor(), eps),
                      dxt);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const double w = opt_at<M>(weight, c, 1);
    const double invstd = invstd_of(var.data_ptr<M>()[c], eps);
    mu[c] = mean.data_ptr<M>()[c];
    const BackwardCoefs k = backward_coefs(w, invstd, sum_dy.data_ptr<M>()[c],
                                           sum_dy_xmu.data_ptr<M>()[c], n);
    a[c] = static_cast<M>(k.a);
    b[c] = static_cast<M>(k.b);
    d[c] = static_cast<M>(k.d);
  }
  affine2_impl<T>(dyt, xt, g, a, mu, b, d, dxt);
}

template <typename T>
void train_backward_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                         const Tensor& mean, const Tensor& var, const Tensor& weight, double eps,
                         Tensor& dxt, Tensor& grad_weight, Tensor& grad_bias) {
  using M = math_t<T>;
  const M* mu = mean.const_data_ptr<M>();
  const M* vp = var.const_data_ptr<M>();
  M* gw = grad_weight.data_ptr<M>();
  M* gb = grad_bias.data_ptr<M>();
  if (g.layout == Layout::kContiguous && parallel_over_channels(g)) {
    // One thread owns a channel: reduce its runs, then write dx while they are in cache.
    const T* dy = dyt.const_data_ptr<T>();
    const T* x = xt.const_data_ptr<T>();
    T* dx = dxt.data_ptr<T>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          double r1 = 0, r2 = 0;
          const int64_t off = (n * g.C + c) * g.S;
          centered_dot_run(dy + off, x + off, g.S, mu[c], r1, r2);
          s1 += r1;
          s2 += r2;
        }
        // Round the sums as backward_reduce would, so both paths give the same bits.
        const double sum_dy = static_cast<M>(s1), sum_dy_xmu = static_cast<M>(s2);
        const double invstd = invstd_of(vp[c], eps);
        gb[c] = static_cast<M>(sum_dy);
        gw[c] = static_cast<M>(sum_dy_xmu * invstd);
        const BackwardCoefs k =
            backward_coefs(opt_at<M>(weight, c, 1), invstd, sum_dy, sum_dy_xmu, g.count());
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c) * g.S;
          affine2_run(dy + off, x + off, dx + off, g.S, static_cast<M>(k.a), mu[c],
                      static_cast<M>(k.b), static_cast<M>(k.d));
        }
      }
    });
    return;
  }
  Tensor sum_dy = at::empty_like(grad_bias), sum_dy_xmu = at::empty_like(grad_weight);
  backward_reduce_impl<T>(dyt, xt, g, mean, sum_dy, sum_dy_xmu);
  for (int64_t c = 0; c < g.C; ++c) {
    gb[c] = sum_dy.data_ptr<M>()[c];
    gw[c] = static_cast<M>(sum_dy_xmu.data_ptr<M>()[c] * invstd_of(vp[c], eps));
  }
  backward_input_impl<T>(dyt, xt, g, mean, var, weight, sum_dy, sum_dy_xmu,
                         static_cast<double>(g.count()), eps, dxt);
}

#define BN_EXT_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

}  // namespace

// ---- entry points (bn_ext.h) ----------------------------------------------------------------

void batch_stats(const Tensor& x, const Geometry& g, Tensor& mean, Tensor& var) {
  BN_EXT_DISPATCH(x, "bn_ext::batch_stats", [&] { batch_stats_impl<scalar_t>(x, g, mean, var); });
}

void normalize(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var,
               const Tensor& weight, const Tensor& bias, double eps, Tensor& y) {
  BN_EXT_DISPATCH(x, "bn_ext::normalize", [&] {
    normalize_impl<scalar_t>(x, g, normalize_coefs<math_t<scalar_t>>(mean, var, weight, bias, eps),
                             y);
  });
}

void train_forward(const Tensor& x, const Geometry& g, const Tensor& weight, const Tensor& bias,
                   double eps, Tensor& y, Tensor& mean, Tensor& var) {
  BN_EXT_DISPATCH(x, "bn_ext::train_forward",
                  [&] { train_forward_impl<scalar_t>(x, g, weight, bias, eps, y, mean, var); });
}

void backward_reduce(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                     const Tensor& var, double eps, Tensor& sum_dy, Tensor& sum_dy_xmu,
                     Tensor& grad_weight, Tensor& grad_bias) {
  BN_EXT_DISPATCH(x, "bn_ext::backward_reduce", [&] {
    using M = math_t<scalar_t>;
    backward_reduce_impl<scalar_t>(dy, x, g, mean, sum_dy, sum_dy_xmu);
    for (int64_t c = 0; c < g.C; ++c) {
      grad_bias.data_ptr<M>()[c] = sum_dy.data_ptr<M>()[c];
      grad_weight.data_ptr<M>()[c] =
          static_cast<M>(sum_dy_xmu.data_ptr<M>()[c] * invstd_of(var.data_ptr<M>()[c], eps));
    }
  });
}

void backward_input(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, const Tensor& sum_dy,
                    const Tensor& sum_dy_xmu, const Tensor& count, double eps, Tensor& dx) {
  BN_EXT_DISPATCH(x, "bn_ext::backward_input", [&] {
    const double n = sum_dy.defined() ? count.item<double>() : 0.0;
    backward_input_impl<scalar_t>(dy, x, g, mean, var, weight, sum_dy, sum_dy_xmu, n, eps, dx);
  });
}

void train_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, double eps, Tensor& dx,
                    Tensor& grad_weight, Tensor& grad_bias) {
  BN_EXT_DISPATCH(x, "bn_ext::train_backward", [&] {
    train_backward_impl<scalar_t>(dy, x, g, mean, var, weight, eps, dx, grad_weight, grad_bias);
  });
}

void running_stats_update(Tensor& running_mean, Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, const Tensor& count,
                          c10::optional<double> momentum) {
  double m = momentum.value_or(0.0);
  if (num_batches_tracked.defined()) {
    int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
    *nbt += 1;
    if (!momentum.has_value()) m = 1.0 / static_cast<double>(*nbt);
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_ext::running_stats_update", [&] {
    const double n = static_cast<double>(count.item<scalar_t>());
    // Unbiased variance; with n == 1 it is undefined, as in torch (inf/nan).
    const double unbias = n / (n - 1);
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const scalar_t* bm = mean.const_data_ptr<scalar_t>();
    const scalar_t* bv = var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      rm[c] = static_cast<scalar_t>((1 - m) * rm[c] + m * bm[c]);
      rv[c] = static_cast<scalar_t>((1 - m) * rv[c] + m * unbias * bv[c]);
    }
  });
}

}  // namespace cpu
}  // namespace bn_ext
