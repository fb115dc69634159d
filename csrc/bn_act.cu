// CUDA kernels of channel_stats, bn_act and bn_act_backward (contract: fastgan/ops/contract.py).
//
// Reductions (the statistics; sum(g) and sum(g*xhat) in the backward) give each block a tile of channels and
// a split of the rows, and write per-(split, channel) partials that a per-channel finalize kernel merges:
//   channels_last: thread (x, y) owns VEC adjacent channels and strides over the rows by blockDim.y;
//   NCHW:          a block owns one channel, and its threads stride over that channel's VEC-vectors.
// Threads accumulate in registers; a block merges them with warp shuffles, then across warps in shared memory.
// Elementwise passes (bn_act, and dz in the backward) stride over the VEC-vectors of the whole tensor.
// VEC = 16 bytes / element size when the inner dimension (C; L for NCHW) and every pointer allow 16-byte
// accesses, else 1.  Accumulation in fp32 (fp64 for fp64 z).  Indices are 32-bit: z has < 2^31 elements.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace fastgan_ext {
namespace {

constexpr int kThreads = 256;  // per block, in every kernel here
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSplits = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load(const T* p, unsigned i) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + i);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, unsigned i, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p + i) = v;
}

// ---------------------------------------------------------------------------------------------- reductions

template <typename A>
struct Sums {
  A g, gx;
  __device__ void merge(const Sums& other) {
    g += other.g;
    gx += other.gx;
  }
};

template <typename A>
__device__ Moments<A> shfl_xor(const Moments<A>& s, unsigned mask) {
  return {__shfl_xor_sync(0xffffffffu, s.count, mask), __shfl_xor_sync(0xffffffffu, s.mean, mask),
          __shfl_xor_sync(0xffffffffu, s.m2, mask)};
}

template <typename A>
__device__ Sums<A> shfl_xor(const Sums<A>& s, unsigned mask) {
  return {__shfl_xor_sync(0xffffffffu, s.g, mask), __shfl_xor_sync(0xffffffffu, s.gx, mask)};
}

// Merges the values of the threads that share threadIdx.x; the result is valid where threadIdx.y == 0.
// blockDim.x divides 32, so a warp holds 32/blockDim.x rows of every column.  All threads must call it.
template <typename S>
__device__ S merge_over_rows(S s) {
  __shared__ S warp_totals[kThreads];  // [warp][column]
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (unsigned mask = blockDim.x; mask < 32; mask *= 2) s.merge(shfl_xor(s, mask));
  if (lane < blockDim.x) warp_totals[warp * blockDim.x + lane] = s;
  __syncthreads();
  if (tid < blockDim.x) {
    s = warp_totals[tid];
    for (unsigned w = 1; w < kWarps; ++w) s.merge(warp_totals[w * blockDim.x + tid]);
  }
  __syncthreads();
  return s;
}

// The channel of this thread's first slot.
template <int VEC>
__device__ __forceinline__ unsigned first_channel(bool channels_last) {
  return channels_last ? (blockIdx.x * blockDim.x + threadIdx.x) * VEC : blockIdx.x;
}

// Calls f(offset) for each VEC-vector of rows [begin, end) that this thread reads; slot j of a vector is
// channel first_channel() + j with channels_last, first_channel() otherwise.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_vector(unsigned begin, unsigned end, unsigned C, unsigned L,
                                                bool channels_last, F f) {
  const unsigned c = first_channel<VEC>(channels_last);
  if (channels_last) {
    if (c >= C) return;
    for (unsigned m = begin + threadIdx.y; m < end; m += blockDim.y) f(m * C + c);
  } else {
    for (unsigned m = begin + threadIdx.y * VEC; m < end; m += blockDim.y * VEC) {
      const unsigned n = m / L;
      f((n * C + c) * L + (m - n * L));
    }
  }
}

// Merges each slot over the block (all slots of a thread, without channels_last) and stores the
// per-(split, channel) partial with store(channel, value).
template <int VEC, typename S, typename Store>
__device__ __forceinline__ void store_partials(S (&slots)[VEC], unsigned C, bool channels_last, Store store) {
  const unsigned c = first_channel<VEC>(channels_last);
  if (channels_last) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const S s = merge_over_rows(slots[j]);
      if (threadIdx.y == 0 && c + j < C) store(c + j, s);
    }
  } else {
#pragma unroll
    for (int j = 1; j < VEC; ++j) slots[0].merge(slots[j]);
    const S s = merge_over_rows(slots[0]);
    if (threadIdx.y == 0) store(c, s);
  }
}

// Welford moments of each channel over the rows of split blockIdx.y.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(const T* __restrict__ z, A* __restrict__ part_mean, A* __restrict__ part_m2, unsigned C,
                   unsigned L, unsigned M, unsigned rows_per_split, bool channels_last) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, M);
  Moments<A> slots[VEC] = {};
  A count = A(0);
  for_each_vector<VEC>(begin, end, C, L, channels_last, [&](unsigned i) {
    const Pack<T, VEC> x = load<VEC>(z, i);
    count += A(1);
    const A w = A(1) / count;  // every slot has seen the same count
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = A(x.v[j]) - slots[j].mean;
      slots[j].mean += d * w;
      slots[j].m2 += d * (A(x.v[j]) - slots[j].mean);
    }
  });
#pragma unroll
  for (int j = 0; j < VEC; ++j) slots[j].count = count;
  store_partials<VEC>(slots, C, channels_last, [&](unsigned c, const Moments<A>& s) {
    part_mean[size_t(blockIdx.y) * C + c] = s.mean;
    part_m2[size_t(blockIdx.y) * C + c] = s.m2;
  });
}

// Merges the split moments; writes mean, invstd (biased variance) and updates the running stats (unbiased).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_moments_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, A* __restrict__ mean,
                            A* __restrict__ invstd, A* __restrict__ running_mean, A* __restrict__ running_var,
                            unsigned C, unsigned M, unsigned rows_per_split, unsigned splits, A momentum, A eps) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Moments<A> total{A(0), A(0), A(0)};
  for (unsigned s = 0; s < splits; ++s) {
    const A rows = A(min(rows_per_split, M - s * rows_per_split));
    total.merge(Moments<A>{rows, part_mean[size_t(s) * C + c], part_m2[size_t(s) * C + c]});
  }
  const A var = total.m2 / total.count;
  mean[c] = total.mean;
  invstd[c] = A(1) / std::sqrt(var + eps);
  if (running_mean != nullptr) {
    running_mean[c] = (A(1) - momentum) * running_mean[c] + momentum * total.mean;
    running_var[c] = (A(1) - momentum) * running_var[c] + momentum * var * (total.count / (total.count - A(1)));
  }
}

// sum(g) and sum(g*xhat) of each channel over the rows of split blockIdx.y, g = dy*act'(pre) recomputed from z.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ z, const A* __restrict__ mean,
                     const A* __restrict__ invstd, const A* __restrict__ weight, const A* __restrict__ bias,
                     A* __restrict__ part_g, A* __restrict__ part_gx, unsigned C, unsigned L, unsigned M,
                     unsigned rows_per_split, bool channels_last, int act, A slope) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, M);
  const unsigned c = first_channel<VEC>(channels_last);
  A mu[VEC], inv[VEC], gamma[VEC], beta[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const unsigned cj = min(channels_last ? c + j : c, C - 1);  // slots past C are never read
    mu[j] = mean[cj];
    inv[j] = invstd[cj];
    gamma[j] = weight != nullptr ? weight[cj] : A(1);
    beta[j] = bias != nullptr ? bias[cj] : A(0);
  }
  Sums<A> slots[VEC] = {};
  for_each_vector<VEC>(begin, end, C, L, channels_last, [&](unsigned i) {
    const Pack<T, VEC> x = load<VEC>(z, i), g = load<VEC>(dy, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A xhat = (A(x.v[j]) - mu[j]) * inv[j];
      const A gj = activation_grad(A(g.v[j]), xhat * gamma[j] + beta[j], act, slope);
      slots[j].g += gj;
      slots[j].gx += gj * xhat;
    }
  });
  store_partials<VEC>(slots, C, channels_last, [&](unsigned c, const Sums<A>& s) {
    part_g[size_t(blockIdx.y) * C + c] = s.g;
    part_gx[size_t(blockIdx.y) * C + c] = s.gx;
  });
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_sums_kernel(const A* __restrict__ part_g, const A* __restrict__ part_gx, A* __restrict__ sum_g,
                         A* __restrict__ sum_gx, unsigned C, unsigned splits) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A g = A(0), gx = A(0);
  for (unsigned s = 0; s < splits; ++s) {
    g += part_g[size_t(s) * C + c];
    gx += part_gx[size_t(s) * C + c];
  }
  sum_g[c] = g;
  sum_gx[c] = gx;
}

// ---------------------------------------------------------------------------------------------- elementwise

// Channel of element i; with VEC > 1 a vector holds channels c..c+VEC-1 (channels_last) or only c (NCHW).
__device__ __forceinline__ unsigned channel_of(unsigned i, unsigned C, unsigned L, bool channels_last) {
  return channels_last ? i % C : i / L % C;
}

// y = act((z - mean)*invstd*gamma + beta), or act(z) without mean.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    bn_act_kernel(const T* __restrict__ z, T* __restrict__ y, const A* __restrict__ mean,
                  const A* __restrict__ invstd, const A* __restrict__ weight, const A* __restrict__ bias,
                  unsigned numel, unsigned C, unsigned L, bool channels_last, int act, A slope) {
  for (unsigned i = (blockIdx.x * kThreads + threadIdx.x) * VEC; i < numel; i += gridDim.x * kThreads * VEC) {
    const Pack<T, VEC> x = load<VEC>(z, i);
    const unsigned c = channel_of(i, C, L, channels_last);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A pre = A(x.v[j]);
      if (mean != nullptr) {
        const unsigned cj = channels_last ? c + j : c;
        const A scale = invstd[cj] * (weight != nullptr ? weight[cj] : A(1));
        pre = (pre - mean[cj]) * scale + (bias != nullptr ? bias[cj] : A(0));
      }
      out.v[j] = T(activate(pre, act, slope));
    }
    store<VEC>(y, i, out);
  }
}

// dz = gamma*invstd*(g - sum_g/M - xhat*sum_gx/M) with batch statistics (sum_g given), gamma*invstd*g with
// running statistics, g = dy*act'(z) without BN.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    bn_act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz,
                           const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ weight,
                           const A* __restrict__ bias, const A* __restrict__ sum_g, const A* __restrict__ sum_gx,
                           A inv_m, unsigned numel, unsigned C, unsigned L, bool channels_last, int act, A slope) {
  for (unsigned i = (blockIdx.x * kThreads + threadIdx.x) * VEC; i < numel; i += gridDim.x * kThreads * VEC) {
    const Pack<T, VEC> x = load<VEC>(z, i), g = load<VEC>(dy, i);
    const unsigned c = channel_of(i, C, L, channels_last);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (mean == nullptr) {
        out.v[j] = T(activation_grad(A(g.v[j]), A(x.v[j]), act, slope));
        continue;
      }
      const unsigned cj = channels_last ? c + j : c;
      const A xhat = (A(x.v[j]) - mean[cj]) * invstd[cj];
      const A gamma = weight != nullptr ? weight[cj] : A(1);
      A gj = activation_grad(A(g.v[j]), xhat * gamma + (bias != nullptr ? bias[cj] : A(0)), act, slope);
      if (sum_g != nullptr) gj = gj - sum_g[cj] * inv_m - xhat * (sum_gx[cj] * inv_m);
      out.v[j] = T(gj * gamma * invstd[cj]);
    }
    store<VEC>(dz, i, out);
  }
}

// ---------------------------------------------------------------------------------------------- launch helpers

int multiprocessors(c10::DeviceIndex device) {
  static std::atomic<int> counts[C10_COMPILE_TIME_MAX_GPUS];
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T>
bool can_vectorize(const Geometry& g, std::initializer_list<const Tensor*> tensors) {
  constexpr int64_t vec = 16 / sizeof(T);
  if ((g.channels_last ? g.C : g.L) % vec != 0) return false;
  for (const Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  }
  return true;
}

// Calls f(std::integral_constant<int, VEC>) with the widest VEC allowed.
template <typename T, typename F>
void with_vec(bool vectorize, F f) {
  if (vectorize) {
    f(std::integral_constant<int, int(16 / sizeof(T))>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

struct ReducePlan {
  dim3 grid, block;
  unsigned rows_per_split, splits;
};

// Enough (channel tile, split) blocks to fill the device, each thread reading a few vectors at least.
template <int VEC>
ReducePlan reduce_plan(const Geometry& g, int sms) {
  unsigned tx = 1, tiles = unsigned(g.C);
  int64_t min_rows = int64_t(kThreads) * VEC * 4, row_align = VEC;
  if (g.channels_last) {
    const int64_t groups = ceil_div(g.C, VEC);
    while (tx < 32 && tx < groups) tx *= 2;
    tiles = ceil_div(groups, tx);
    min_rows = int64_t(kThreads / tx) * 4;
    row_align = 1;
  }
  int64_t splits = std::min<int64_t>(ceil_div(8 * sms, tiles), ceil_div(g.M, min_rows));
  splits = std::clamp<int64_t>(splits, 1, kMaxSplits);
  const int64_t rows = ceil_div(ceil_div(g.M, splits), row_align) * row_align;
  splits = ceil_div(g.M, rows);
  return {dim3(tiles, unsigned(splits)), dim3(tx, kThreads / tx), unsigned(rows), unsigned(splits)};
}

unsigned elementwise_blocks(int64_t numel, int vec, int sms) {
  return std::max(1u, std::min(ceil_div(numel, int64_t(kThreads) * vec), unsigned(8 * sms)));
}

template <typename A>
const A* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// ---------------------------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> channel_stats(const Tensor& z, const OptTensor& running_mean,
                                         const OptTensor& running_var, double momentum, double eps) {
  const c10::cuda::CUDAGuard guard(z.device());
  StatsArgs args = channel_stats_args(z, running_mean, running_var);
  const Geometry& g = args.geo;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(can_vectorize<scalar_t>(g, {&z}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const ReducePlan p = reduce_plan<VEC>(g, sms);
      Tensor part = at::empty({2, p.splits, g.C}, args.mean.options());
      A* part_mean = part.mutable_data_ptr<A>();
      A* part_m2 = part_mean + p.splits * g.C;
      moments_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), part_mean, part_m2, g.C, g.L, g.M, p.rows_per_split, g.channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_moments_kernel<A><<<ceil_div(g.C, kThreads), kThreads, 0, stream>>>(
          part_mean, part_m2, args.mean.mutable_data_ptr<A>(), args.invstd.mutable_data_ptr<A>(),
          args.running_mean.defined() ? args.running_mean.mutable_data_ptr<A>() : nullptr,
          args.running_var.defined() ? args.running_var.mutable_data_ptr<A>() : nullptr, g.C, g.M,
          p.rows_per_split, p.splits, A(momentum), A(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  store_running_stats(args, running_mean, running_var);
  return {args.mean, args.invstd};
}

Tensor bn_act(const Tensor& z, const OptTensor& mean, const OptTensor& invstd, const OptTensor& weight,
              const OptTensor& bias, bool /*batch_stats*/, int64_t act, double slope) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BnActArgs args = bn_act_args("bn_act", nullptr, z, mean, invstd, weight, bias, act);
  const Geometry& g = args.geo;
  Tensor y = empty_output_like(z);
  if (z.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act", [&] {
    using A = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(can_vectorize<scalar_t>(g, {&z, &y}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      bn_act_kernel<scalar_t, VEC><<<elementwise_blocks(z.numel(), VEC, sms), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), data_or_null<A>(args.mean),
          data_or_null<A>(args.invstd), data_or_null<A>(args.weight), data_or_null<A>(args.bias), z.numel(), g.C,
          g.L, g.channels_last, args.act, A(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward(const Tensor& dy, const Tensor& z, const OptTensor& mean,
                                                   const OptTensor& invstd, const OptTensor& weight,
                                                   const OptTensor& bias, bool batch_stats, int64_t act,
                                                   double slope) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BnActArgs args = bn_act_args("bn_act_backward", &dy, z, mean, invstd, weight, bias, act);
  const Geometry& g = args.geo;
  const auto stats_options = z.options().dtype(stat_dtype(z));
  Tensor dz = empty_output_like(z);
  Tensor dweight = empty_output({args.affine() ? g.C : 0}, stats_options);
  Tensor dbias = empty_output({args.affine() ? g.C : 0}, stats_options);
  if (z.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dz, dweight, dbias};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(can_vectorize<scalar_t>(g, {&z, &args.dy, &dz}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const A* sum_g = nullptr;
      const A* sum_gx = nullptr;
      Tensor sums;
      if (args.normalize() && (batch_stats || args.affine())) {
        const ReducePlan p = reduce_plan<VEC>(g, sms);
        Tensor part = at::empty({2, p.splits, g.C}, stats_options);
        A* part_g = part.mutable_data_ptr<A>();
        A* part_gx = part_g + p.splits * g.C;
        grad_sums_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(
            args.dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), args.mean.const_data_ptr<A>(),
            args.invstd.const_data_ptr<A>(), data_or_null<A>(args.weight), data_or_null<A>(args.bias), part_g,
            part_gx, g.C, g.L, g.M, p.rows_per_split, g.channels_last, args.act, A(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dbias = sum(g) and dweight = sum(g*xhat); without weight the sums go to a scratch buffer
        if (!args.affine()) sums = at::empty({2, g.C}, stats_options);
        A* out_g = args.affine() ? dbias.mutable_data_ptr<A>() : sums.mutable_data_ptr<A>();
        A* out_gx = args.affine() ? dweight.mutable_data_ptr<A>() : out_g + g.C;
        finalize_sums_kernel<A><<<ceil_div(g.C, kThreads), kThreads, 0, stream>>>(part_g, part_gx, out_g, out_gx,
                                                                                   g.C, p.splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (batch_stats) {
          sum_g = out_g;
          sum_gx = out_gx;
        }
      }
      bn_act_backward_kernel<scalar_t, VEC><<<elementwise_blocks(z.numel(), VEC, sms), kThreads, 0, stream>>>(
          args.dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(),
          data_or_null<A>(args.mean), data_or_null<A>(args.invstd), data_or_null<A>(args.weight),
          data_or_null<A>(args.bias), sum_g, sum_gx, A(1) / A(g.M), z.numel(), g.C, g.L, g.channels_last,
          args.act, A(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dz, dweight, dbias};
}

}  // namespace
}  // namespace fastgan_ext

TORCH_LIBRARY_IMPL(fastgan_ext, CUDA, m) {
  m.impl("channel_stats", &fastgan_ext::channel_stats);
  m.impl("bn_act", &fastgan_ext::bn_act);
  m.impl("bn_act_backward", &fastgan_ext::bn_act_backward);
}
