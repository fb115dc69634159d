// CPU kernels of channel_stats, bn_act and bn_act_backward (contract: fastgan/ops/contract.py).
//
// Vectorised with at::vec::Vectorized (built for the CPU's vector ISA: fastgan/ops/extension.py cpu_flags) along
// the contiguous rows of z: (n, c) planes of L positions in NCHW, whose vectors hold one channel; positions of C
// channels in channels_last, whose vectors hold W adjacent channels.  Vectors never straddle a row, and a row's
// short last vector goes through the same vector code with masked loads and stores, so which vector an element
// falls in, and so its result, depends on the shape alone, never on the threads.
//
// Reductions run over fixed splits of the M = N*L rows (kSplitElems rows of a channel in NCHW; about kSplitElems
// elements of all channels in channels_last), the splits in parallel, and merge the per-(split, channel)
// partials in split order: the result does not depend on the number of threads.  A split stays in the L1/L2
// cache, so the statistics are two-pass within it (mean, then squared deviations from it) while z is read from
// memory once; splits merge with Chan's update.  Sums run in kLanes independent vector accumulators.
// Accumulation in at::opmath_type: fp32 for fp16/bf16/fp32 storage, fp64 for fp64.
//
// Loops copy what they use into locals: a vector store may alias any memory, so values read through a captured
// reference would be reloaded after every store.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace fastgan_ext {
namespace {

constexpr int64_t kSplitElems = 4096;  // per reduction split: rows of a channel (NCHW), elements (channels_last)
constexpr int64_t kGrain = 32768;      // elements per parallel task
constexpr int64_t kFlatRow = 4096;     // elements per row of the activation-only passes, which have no channels
constexpr int kLanes = 4;              // independent accumulators of a sum

template <typename T>
using Vec = at::vec::Vectorized<at::opmath_type<T>>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n (<= W) elements at p, in the accumulation type; lanes past n are 0.
template <typename T>
C10_ALWAYS_INLINE Vec<T> load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return Vec<T>::loadu(p, n);
  } else if (n == Vec<T>::size()) {
    Vec<T> v;
    at::vec::load_to_float(p, v);  // W 16-bit values, 16 bytes
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)));
  }
}

template <typename T>
C10_ALWAYS_INLINE void store(T* p, const Vec<T>& v, int64_t n) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

template <typename V>
C10_ALWAYS_INLINE V zero_past(const V& v, int64_t n) {
  return n >= V::size() ? v : V::set(V(0), v, n);
}

template <typename V>
typename V::value_type lane_sum(const V& v) {  // in lane order
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  typename V::value_type total = 0;
  for (int i = 0; i < V::size(); ++i) total += lanes[i];
  return total;
}

// sum(g) and sum(g*xhat) of the backward, as one accumulator value.
template <typename V>
struct GradSums {
  V g, gx;
  explicit GradSums(const V& g = V(0), const V& gx = V(0)) : g(g), gx(gx) {}
  GradSums& operator+=(const GradSums& o) {
    g += o.g;
    gx += o.gx;
    return *this;
  }
  GradSums operator+(const GradSums& o) const { return GradSums(*this) += o; }
};

// Sum of f(j) for j in [0, count), f(j) into accumulator j % kLanes: kLanes chains of adds, in a fixed order.
template <typename S, typename F>
C10_ALWAYS_INLINE S accumulate(int64_t count, const F& f) {
  S acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = S(0);
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
#pragma GCC unroll 4
    for (int k = 0; k < kLanes; ++k) acc[k] += f(j + k);
  }
  for (int k = 0; j < count; ++j, ++k) acc[k] += f(j);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Calls f(i, n) for the vectors of a run of len elements: n = W, then the short rest.
template <int64_t W, typename F>
C10_ALWAYS_INLINE void for_vectors(int64_t len, const F& f) {
  int64_t i = 0;
  for (; i + W <= len; i += W) f(i, W);
  if (i < len) f(i, len - i);
}

// ---------------------------------------------------------------------------------------------- activations

// tanh(x) = sign(x) (1 - e)/(1 + e), e = exp(-2|x|), the Triton kernels' formula: with at::vec's fast exp
// (exp_u20: within 20 ulp in fp32, exact in fp64) four times cheaper than Vectorized::tanh, and within 1.1e-7 of
// tanh in fp32.  The backward recomputes it from z, so its cost counts twice.  NaN stays NaN.
template <typename V>
C10_ALWAYS_INLINE V tanh(const V& x) {
  const V e = (x.abs() * V(-2)).exp_u20();
  const V t = (V(1) - e) / (V(1) + e);
  return V::blendv(t, V(0) - t, x < V(0));
}

// Comparisons are ordered so that NaN propagates as in torch (and as the scalar activate() of fastgan_ext.h).
template <int Act, typename V>
C10_ALWAYS_INLINE V activate(const V& pre, const V& slope) {
  if constexpr (Act == kRelu) return V::blendv(pre, V(0), pre < V(0));
  if constexpr (Act == kLeakyRelu) return V::blendv(pre, pre * slope, pre < V(0));
  if constexpr (Act == kTanh) return tanh(pre);
  return pre;
}

template <int Act, typename V>
C10_ALWAYS_INLINE V activation_grad(const V& dy, const V& pre, const V& slope) {
  if constexpr (Act == kRelu) return V::blendv(dy, V(0), pre <= V(0));
  if constexpr (Act == kLeakyRelu) return V::blendv(dy * slope, dy, pre > V(0));
  if constexpr (Act == kTanh) {
    const V t = tanh(pre);
    return dy * (V(1) - t * t);
  }
  return dy;
}

// f(std::integral_constant<int, act>): the activation as a compile-time constant of the kernels.
template <typename F>
void with_activation(int act, const F& f) {
  switch (act) {
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kLeakyRelu: return f(std::integral_constant<int, kLeakyRelu>{});
    case kTanh: return f(std::integral_constant<int, kTanh>{});
    default: return f(std::integral_constant<int, kNone>{});
  }
}

// ---------------------------------------------------------------------------------------------- elementwise

// Per-channel constants of the elementwise passes, each padded to whole vectors so that channels_last rows load
// W channels at any vector.
template <typename A, int W, size_t K>
struct ChannelConstants {
  std::vector<A> values;  // K arrays of `stride` values
  int64_t stride;
  explicit ChannelConstants(int64_t C) : values(K * ceil_div(C, W) * W, A(0)), stride(ceil_div(C, W) * W) {}
  A* operator[](size_t k) { return values.data() + k * stride; }
  std::array<const A*, K> pointers() const {
    std::array<const A*, K> p;
    for (size_t k = 0; k < K; ++k) p[k] = values.data() + k * stride;
    return p;
  }
};

// out = op(in, consts) for every vector of z: in = the vectors of the I inputs (z's layout, or a flat run when
// K == 0), consts = the K per-channel constants of the vector's channel(s) (broadcast in NCHW).
template <typename T, size_t I, size_t K, typename Op>
void map_elements(const ZLayout& g, std::array<const T*, I> inputs, T* out, std::array<const at::opmath_type<T>*, K> consts,
                  const Op& op) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const bool flat = K == 0, channels_last = g.channels_last;
  const int64_t numel = g.M * g.C, C = g.C;
  const int64_t len = flat ? kFlatRow : channels_last ? g.C : g.L;
  const int64_t rows = len == 0 ? 0 : ceil_div(numel, len);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t r0, int64_t r1) {
    const std::array<const T*, I> in = inputs;
    T* const y = out;
    const std::array<const at::opmath_type<T>*, K> cs = consts;
    for (int64_t r = r0, channel = r0 % C; r < r1; ++r, channel = channel + 1 == C ? 0 : channel + 1) {
      const int64_t base = r * len, row_len = std::min(len, numel - base);
      std::array<V, K> c;
      const auto vector = [&](int64_t i, int64_t n) {
        std::array<V, I> v;
        for (size_t k = 0; k < I; ++k) v[k] = load(in[k] + base + i, n);
        store(y + base + i, op(v, c), n);
      };
      if (channels_last) {
        for_vectors<W>(row_len, [&](int64_t i, int64_t n) {
          for (size_t k = 0; k < K; ++k) c[k] = V::loadu(cs[k] + i);
          vector(i, n);
        });
      } else {
        for (size_t k = 0; k < K; ++k) c[k] = V(cs[k][channel]);  // the (n, c) plane's channel
        for_vectors<W>(row_len, vector);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------- reductions

// The reduction splits: rows [s*rows, (s+1)*rows) of M.
struct Splits {
  int64_t rows, count;
  int64_t rows_of(int64_t s, int64_t M) const { return std::min(rows, M - s * rows); }
};

Splits splits_of(const ZLayout& g) {
  const int64_t rows = g.channels_last ? std::max<int64_t>(1, kSplitElems / g.C) : kSplitElems;
  return {rows, ceil_div(g.M, rows)};
}

// NCHW: calls f(offset, run) for the runs of channel c in rows [m0, m1): its (n, c) planes, cut to the rows.
template <typename F>
C10_ALWAYS_INLINE void for_each_run(const ZLayout& g, int64_t c, int64_t m0, int64_t m1, const F& f) {
  int64_t n = m0 / g.L, l = m0 - n * g.L;
  for (int64_t m = m0; m < m1; ++n, l = 0) {
    const int64_t run = std::min(g.L - l, m1 - m);
    f((n * g.C + c) * g.L + l, run);
    m += run;
  }
}

// The sum of f(i, n) over the vectors of the run of len elements at offset (the last vector's lanes past n must
// come back 0).
template <typename S, int64_t W, typename F>
C10_ALWAYS_INLINE S sum_run(int64_t offset, int64_t len, const F& f) {
  S total = accumulate<S>(len / W, [&](int64_t j) { return f(offset + j * W, W); });
  if (len % W) total += f(offset + len / W * W, len % W);
  return total;
}

// The per-(split, channel) partials of a reduction, `sums` of them per (split, channel).
template <typename V>
struct Partials {
  int64_t splits, C;
  std::vector<typename V::value_type> values;  // [sum][split][channel]
  Partials(int64_t splits, int64_t C, int sums) : splits(splits), C(C), values(sums * splits * C) {}
  typename V::value_type* at(int k, int64_t s, int64_t c) { return values.data() + (k * splits + s) * C + c; }
};

// ---------------------------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> channel_stats(const Tensor& z, const OptTensor& running_mean,
                                         const OptTensor& running_var, double momentum, double eps) {
  StatsArgs args = channel_stats_args(z, running_mean, running_var);
  const ZLayout g = args.z_layout;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    using V = Vec<scalar_t>;
    constexpr int64_t W = V::size();
    const Splits sp = splits_of(g);
    Partials<V> part(sp.count, g.C, 2);  // the split's mean and M2
    const int64_t units = g.channels_last ? sp.count : sp.count * g.C;  // a split, or a (split, channel)
    const int64_t unit_elems = g.channels_last ? sp.rows * g.C : std::min(sp.rows, g.M);
    at::parallel_for(0, units, std::max<int64_t>(1, kGrain / unit_elems), [&](int64_t u0, int64_t u1) {
      const scalar_t* const x = z.const_data_ptr<scalar_t>();
      const int64_t C = g.C, L = g.L, M = g.M;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t s = g.channels_last ? u : u / C, m0 = s * sp.rows, rows = sp.rows_of(s, M);
        if (g.channels_last) {  // two-pass per vector of W channels, down the split's rows
          for (int64_t c0 = 0; c0 < C; c0 += W) {
            const int64_t n = std::min(W, C - c0);
            const scalar_t* col = x + m0 * C + c0;
            const V mean = accumulate<V>(rows, [&](int64_t m) { return load(col + m * C, n); }) / V(A(rows));
            const V m2 = accumulate<V>(rows, [&](int64_t m) {
              const V d = load(col + m * C, n) - mean;
              return d * d;
            });
            mean.store(part.at(0, s, c0), n);
            m2.store(part.at(1, s, c0), n);
          }
          continue;
        }
        // NCHW: channel c's rows [m0, m0 + rows) are runs within (n, c) planes; two-pass over them
        const int64_t c = u % C;
        const auto over_runs = [&](const auto& f) {
          V total(0);
          for_each_run(g, c, m0, m0 + rows, [&](int64_t offset, int64_t run) { total += sum_run<V, W>(offset, run, f); });
          return lane_sum(total);
        };
        const A mean = over_runs([x](int64_t i, int64_t n) { return load(x + i, n); }) / A(rows);
        const V mean_v(mean);
        *part.at(0, s, c) = mean;
        *part.at(1, s, c) = over_runs([x, mean_v](int64_t i, int64_t n) {
          const V d = zero_past(load(x + i, n) - mean_v, n);
          return d * d;
        });
      }
    });
    A* mean = args.mean.mutable_data_ptr<A>();
    A* invstd = args.invstd.mutable_data_ptr<A>();
    A* rmean = args.running_mean.defined() ? args.running_mean.mutable_data_ptr<A>() : nullptr;
    A* rvar = args.running_var.defined() ? args.running_var.mutable_data_ptr<A>() : nullptr;
    const A m = A(momentum);
    at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / sp.count), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments<A> total{A(0), A(0), A(0)};
        for (int64_t s = 0; s < sp.count; ++s) {
          total.merge(Moments<A>{A(sp.rows_of(s, g.M)), *part.at(0, s, c), *part.at(1, s, c)});
        }
        const A var = total.m2 / total.count;
        mean[c] = total.mean;
        invstd[c] = A(1) / std::sqrt(var + A(eps));
        if (rmean != nullptr) {
          rmean[c] = (A(1) - m) * rmean[c] + m * total.mean;
          rvar[c] = (A(1) - m) * rvar[c] + m * var * (total.count / (total.count - A(1)));
        }
      }
    });
  });
  store_running_stats(args, running_mean, running_var);
  return {args.mean, args.invstd};
}

// pre = (z - mean)*scale + beta, scale = gamma*invstd: the forward and the backward round it alike.
template <typename V>
C10_ALWAYS_INLINE V preactivation(const V& d, const V& scale, const V& beta) {
  return at::vec::fmadd(d, scale, beta);
}

Tensor bn_act(const Tensor& z, const OptTensor& mean, const OptTensor& invstd, const OptTensor& weight,
              const OptTensor& bias, bool /*batch_stats*/, int64_t act, double slope) {
  const BnActArgs args = bn_act_args("bn_act", nullptr, z, mean, invstd, weight, bias, act);
  const ZLayout g = args.z_layout;
  Tensor y = empty_output_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act", [&] {
    using A = at::opmath_type<scalar_t>;
    using V = Vec<scalar_t>;
    constexpr int W = V::size();
    const std::array<const scalar_t*, 1> x{z.const_data_ptr<scalar_t>()};
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const V s(static_cast<A>(slope));
    with_activation(args.act, [&](auto act_constant) {
      constexpr int Act = decltype(act_constant)::value;
      if (!args.normalize()) {
        map_elements<scalar_t, 1, 0>(g, x, out, {}, [s](const std::array<V, 1>& v, const std::array<V, 0>&) {
          return activate<Act>(v[0], s);
        });
        return;
      }
      ChannelConstants<A, W, 3> k(g.C);  // mean, scale, beta
      for (int64_t c = 0; c < g.C; ++c) {
        k[0][c] = args.mean.const_data_ptr<A>()[c];
        k[1][c] = args.invstd.const_data_ptr<A>()[c] * (args.affine() ? args.weight.const_data_ptr<A>()[c] : A(1));
        k[2][c] = args.affine() ? args.bias.const_data_ptr<A>()[c] : A(0);
      }
      map_elements<scalar_t, 1, 3>(g, x, out, k.pointers(), [s](const std::array<V, 1>& v, const std::array<V, 3>& c) {
        return activate<Act>(preactivation(v[0] - c[0], c[1], c[2]), s);
      });
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward(const Tensor& dy, const Tensor& z, const OptTensor& mean,
                                                   const OptTensor& invstd, const OptTensor& weight,
                                                   const OptTensor& bias, bool batch_stats, int64_t act,
                                                   double slope) {
  const BnActArgs args = bn_act_args("bn_act_backward", &dy, z, mean, invstd, weight, bias, act);
  const ZLayout g = args.z_layout;
  const auto stats_options = z.options().dtype(stat_dtype(z));
  Tensor dz = empty_output_like(z);
  Tensor dweight = empty_output({args.affine() ? g.C : 0}, stats_options);
  Tensor dbias = empty_output({args.affine() ? g.C : 0}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    using V = Vec<scalar_t>;
    constexpr int64_t W = V::size();
    const std::array<const scalar_t*, 2> in{z.const_data_ptr<scalar_t>(), args.dy.const_data_ptr<scalar_t>()};
    scalar_t* out = dz.mutable_data_ptr<scalar_t>();
    const V s(static_cast<A>(slope));
    with_activation(args.act, [&](auto act_constant) {
      constexpr int Act = decltype(act_constant)::value;
      if (!args.normalize()) {
        map_elements<scalar_t, 2, 0>(g, in, out, {}, [s](const std::array<V, 2>& v, const std::array<V, 0>&) {
          return activation_grad<Act>(v[1], v[0], s);
        });
        return;
      }
      // per channel: 0 mean, 1 scale = gamma*invstd, 2 beta, 3 invstd, then for dz: 4 sum(g)/M, 5 invstd*sum(g*xhat)/M
      ChannelConstants<A, W, 6> k(g.C);
      for (int64_t c = 0; c < g.C; ++c) {
        k[0][c] = args.mean.const_data_ptr<A>()[c];
        k[3][c] = args.invstd.const_data_ptr<A>()[c];
        k[1][c] = k[3][c] * (args.affine() ? args.weight.const_data_ptr<A>()[c] : A(1));
        k[2][c] = args.affine() ? args.bias.const_data_ptr<A>()[c] : A(0);
      }
      // g = dy*act'(pre) and xhat of the vectors x, dy with the constants c of their channel(s)
      const auto grad_sums = [s](const V& x, const V& dy, const std::array<V, 4>& c) {
        const V d = x - c[0];
        const V gi = activation_grad<Act>(dy, preactivation(d, c[1], c[2]), s);
        return GradSums<V>(gi, gi * (d * c[3]));
      };
      if (batch_stats || args.affine()) {
        // sum(g) and sum(g*xhat) per (split, channel), then per channel in split order
        const Splits sp = splits_of(g);
        Partials<V> part(sp.count, g.C, 2);
        const auto consts = k.pointers();
        const int64_t units = g.channels_last ? sp.count : sp.count * g.C;
        const int64_t unit_elems = g.channels_last ? sp.rows * g.C : std::min(sp.rows, g.M);
        at::parallel_for(0, units, std::max<int64_t>(1, kGrain / unit_elems), [&](int64_t u0, int64_t u1) {
          const scalar_t* const x = in[0];
          const scalar_t* const grad = in[1];
          const int64_t C = g.C, L = g.L, M = g.M;
          for (int64_t u = u0; u < u1; ++u) {
            const int64_t s = g.channels_last ? u : u / C, m0 = s * sp.rows, rows = sp.rows_of(s, M);
            if (g.channels_last) {
              for (int64_t c0 = 0; c0 < C; c0 += W) {
                const int64_t n = std::min(W, C - c0);
                std::array<V, 4> c;
                for (int k = 0; k < 4; ++k) c[k] = V::loadu(consts[k] + c0);
                const int64_t offset = m0 * C + c0;
                const GradSums<V> sums = accumulate<GradSums<V>>(rows, [&](int64_t m) {
                  return grad_sums(load(x + offset + m * C, n), load(grad + offset + m * C, n), c);
                });
                sums.g.store(part.at(0, s, c0), n);
                sums.gx.store(part.at(1, s, c0), n);
              }
              continue;
            }
            const int64_t ch = u % C;
            std::array<V, 4> c;
            for (int k = 0; k < 4; ++k) c[k] = V(consts[k][ch]);
            GradSums<V> total;
            for_each_run(g, ch, m0, m0 + rows, [&](int64_t offset, int64_t run) {
              total += sum_run<GradSums<V>, W>(offset, run, [&](int64_t i, int64_t n) {
                const GradSums<V> t = grad_sums(load(x + i, n), load(grad + i, n), c);
                return GradSums<V>(zero_past(t.g, n), zero_past(t.gx, n));
              });
            });
            *part.at(0, s, ch) = lane_sum(total.g);
            *part.at(1, s, ch) = lane_sum(total.gx);
          }
        });
        std::vector<A> sum_g(g.C, A(0)), sum_gx(g.C, A(0));
        for (int64_t sp_i = 0; sp_i < sp.count; ++sp_i) {
          for (int64_t c = 0; c < g.C; ++c) {
            sum_g[c] += *part.at(0, sp_i, c);
            sum_gx[c] += *part.at(1, sp_i, c);
          }
        }
        if (args.affine()) {
          std::copy_n(sum_gx.begin(), g.C, dweight.mutable_data_ptr<A>());
          std::copy_n(sum_g.begin(), g.C, dbias.mutable_data_ptr<A>());
        }
        if (batch_stats) {
          for (int64_t c = 0; c < g.C; ++c) {
            k[4][c] = sum_g[c] / A(g.M);
            k[5][c] = k[3][c] * (sum_gx[c] / A(g.M));
          }
        }
      }
      // dz = (g - sum(g)/M - xhat*sum(g*xhat)/M) * gamma*invstd, the sums 0 with running statistics
      map_elements<scalar_t, 2, 6>(g, in, out, k.pointers(), [s](const std::array<V, 2>& v, const std::array<V, 6>& c) {
        const V d = v[0] - c[0];
        const V gi = activation_grad<Act>(v[1], preactivation(d, c[1], c[2]), s);
        return (gi - c[4] - d * c[5]) * c[1];
      });
    });
  });
  return {dz, dweight, dbias};
}

}  // namespace
}  // namespace fastgan_ext

TORCH_LIBRARY_IMPL(fastgan_ext, CPU, m) {
  m.impl("channel_stats", &fastgan_ext::channel_stats);
  m.impl("bn_act", &fastgan_ext::bn_act);
  m.impl("bn_act_backward", &fastgan_ext::bn_act_backward);
}
