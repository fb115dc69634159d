// CPU kernels of channel_stats, bn_act and bn_act_backward (contract: fastgan/ops/contract.py).
//
// Reductions run over fixed splits of kRowsPerSplit rows, in parallel, and merge the per-(split, channel)
// partials in split order: the result does not depend on the number of threads.  Within a split the
// statistics are two-pass (mean, then squared deviations from it); splits merge with Chan's update.
// Accumulation in at::opmath_type: fp32 for fp16/bf16/fp32 storage, fp64 for fp64.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fastgan_ext {
namespace {

constexpr int64_t kRowsPerSplit = 512;
constexpr int64_t kGrain = 32768;  // elements per parallel task in the elementwise passes

int64_t num_splits(const Geometry& g) { return (g.M + kRowsPerSplit - 1) / kRowsPerSplit; }

// Calls f(split, offset, channel) for every element of the rows of each split, the splits in parallel.
template <typename F>
void for_each_split(const Geometry& g, F f) {
  at::parallel_for(0, num_splits(g), 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t m0 = s * kRowsPerSplit, m1 = std::min(m0 + kRowsPerSplit, g.M);
      if (g.channels_last) {
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t c = 0; c < g.C; ++c) f(s, m * g.C + c, c);
      } else {
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t m = m0; m < m1;) {  // runs of contiguous elements within the (n, c) planes
            const int64_t n = m / g.L, l = m - n * g.L, run = std::min(g.L - l, m1 - m);
            const int64_t base = (n * g.C + c) * g.L + l;
            for (int64_t i = 0; i < run; ++i) f(s, base + i, c);
            m += run;
          }
        }
      }
    }
  });
}

// Calls f(offset, channel) for every element, in parallel.
template <typename F>
void for_each_element(const Geometry& g, F f) {
  if (g.channels_last) {
    at::parallel_for(0, g.M, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t c = 0; c < g.C; ++c) f(m * g.C + c, c);
    });
  } else {
    const int64_t planes = g.M / std::max<int64_t>(g.L, 1) * g.C;
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.L, 1)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % g.C;
        for (int64_t l = 0; l < g.L; ++l) f(p * g.L + l, c);
      }
    });
  }
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& z, const OptTensor& running_mean,
                                         const OptTensor& running_var, double momentum, double eps) {
  StatsArgs args = channel_stats_args(z, running_mean, running_var);
  const Geometry g = args.geo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = z.const_data_ptr<scalar_t>();
    const int64_t splits = num_splits(g);
    std::vector<A> sum(splits * g.C, A(0)), m2(splits * g.C, A(0));
    for_each_split(g, [&](int64_t s, int64_t i, int64_t c) { sum[s * g.C + c] += A(x[i]); });
    for (int64_t s = 0; s < splits; ++s) {
      const A rows = A(std::min(kRowsPerSplit, g.M - s * kRowsPerSplit));
      for (int64_t c = 0; c < g.C; ++c) sum[s * g.C + c] /= rows;  // now the split's mean
    }
    for_each_split(g, [&](int64_t s, int64_t i, int64_t c) {
      const A d = A(x[i]) - sum[s * g.C + c];
      m2[s * g.C + c] += d * d;
    });
    A* mean = args.mean.mutable_data_ptr<A>();
    A* invstd = args.invstd.mutable_data_ptr<A>();
    A* rmean = args.running_mean.defined() ? args.running_mean.mutable_data_ptr<A>() : nullptr;
    A* rvar = args.running_var.defined() ? args.running_var.mutable_data_ptr<A>() : nullptr;
    const A m = A(momentum);
    at::parallel_for(0, g.C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments<A> total{A(0), A(0), A(0)};
        for (int64_t s = 0; s < splits; ++s) {
          const A rows = A(std::min(kRowsPerSplit, g.M - s * kRowsPerSplit));
          total.merge(Moments<A>{rows, sum[s * g.C + c], m2[s * g.C + c]});
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

Tensor bn_act(const Tensor& z, const OptTensor& mean, const OptTensor& invstd, const OptTensor& weight,
              const OptTensor& bias, bool /*batch_stats*/, int64_t act, double slope) {
  const BnActArgs args = bn_act_args("bn_act", nullptr, z, mean, invstd, weight, bias, act);
  const Geometry g = args.geo;
  Tensor y = empty_output_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = z.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const A s = A(slope);
    if (!args.normalize()) {
      for_each_element(g, [&](int64_t i, int64_t) { out[i] = scalar_t(activate(A(x[i]), args.act, s)); });
      return;
    }
    // pre = (z - mean)*scale + beta, scale = gamma*invstd
    std::vector<A> scale(g.C), beta(g.C, A(0));
    const A* mu = args.mean.const_data_ptr<A>();
    const A* inv = args.invstd.const_data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      scale[c] = inv[c] * (args.affine() ? args.weight.const_data_ptr<A>()[c] : A(1));
      if (args.affine()) beta[c] = args.bias.const_data_ptr<A>()[c];
    }
    for_each_element(g, [&](int64_t i, int64_t c) {
      out[i] = scalar_t(activate((A(x[i]) - mu[c]) * scale[c] + beta[c], args.act, s));
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward(const Tensor& dy, const Tensor& z, const OptTensor& mean,
                                                   const OptTensor& invstd, const OptTensor& weight,
                                                   const OptTensor& bias, bool batch_stats, int64_t act,
                                                   double slope) {
  const BnActArgs args = bn_act_args("bn_act_backward", &dy, z, mean, invstd, weight, bias, act);
  const Geometry g = args.geo;
  const auto stats_options = z.options().dtype(stat_dtype(z));
  Tensor dz = empty_output_like(z);
  Tensor dweight = empty_output({args.affine() ? g.C : 0}, stats_options);
  Tensor dbias = empty_output({args.affine() ? g.C : 0}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = z.const_data_ptr<scalar_t>();
    const scalar_t* grad = args.dy.const_data_ptr<scalar_t>();
    scalar_t* out = dz.mutable_data_ptr<scalar_t>();
    const A s = A(slope);
    if (!args.normalize()) {
      for_each_element(g, [&](int64_t i, int64_t) {
        out[i] = scalar_t(activation_grad(A(grad[i]), A(x[i]), args.act, s));
      });
      return;
    }
    const A* mu = args.mean.const_data_ptr<A>();
    const A* inv = args.invstd.const_data_ptr<A>();
    std::vector<A> gamma(g.C, A(1)), beta(g.C, A(0));
    if (args.affine()) {
      std::copy_n(args.weight.const_data_ptr<A>(), g.C, gamma.begin());
      std::copy_n(args.bias.const_data_ptr<A>(), g.C, beta.begin());
    }
    // sum(g) and sum(g*xhat) per (split, channel), with g = dy*act'(pre) recomputed from z
    const int64_t splits = num_splits(g);
    std::vector<A> part_g(splits * g.C, A(0)), part_gx(splits * g.C, A(0));
    for_each_split(g, [&](int64_t sp, int64_t i, int64_t c) {
      const A xhat = (A(x[i]) - mu[c]) * inv[c];
      const A gi = activation_grad(A(grad[i]), xhat * gamma[c] + beta[c], args.act, s);
      part_g[sp * g.C + c] += gi;
      part_gx[sp * g.C + c] += gi * xhat;
    });
    std::vector<A> sum_g(g.C, A(0)), sum_gx(g.C, A(0));
    for (int64_t sp = 0; sp < splits; ++sp) {
      for (int64_t c = 0; c < g.C; ++c) {
        sum_g[c] += part_g[sp * g.C + c];
        sum_gx[c] += part_gx[sp * g.C + c];
      }
    }
    if (args.affine()) {
      std::copy(sum_gx.begin(), sum_gx.end(), dweight.mutable_data_ptr<A>());
      std::copy(sum_g.begin(), sum_g.end(), dbias.mutable_data_ptr<A>());
    }
    const A inv_m = A(1) / A(g.M);
    for_each_element(g, [&](int64_t i, int64_t c) {
      const A xhat = (A(x[i]) - mu[c]) * inv[c];
      A gi = activation_grad(A(grad[i]), xhat * gamma[c] + beta[c], args.act, s);
      if (batch_stats) gi = gi - sum_g[c] * inv_m - xhat * (sum_gx[c] * inv_m);
      out[i] = scalar_t(gi * gamma[c] * inv[c]);
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
