// CUDA kernels of channel_stats, bn_act and bn_act_backward (contract: fastgan/ops/contract.py).
//
// Every pass with BN runs on one plan (ReducePlan): a grid of (channel tile, row split) blocks, in which
//   channels_last: thread (x, y) owns VEC adjacent channels and strides over the split's rows by blockDim.y;
//   NCHW:          a block owns one channel, and its threads stride over that channel's VEC-vectors.
// A thread's channels never change, so the elementwise passes load their per-channel constants once.  A thread
// loads a batch of vectors of the tensors it reads before it uses the first (batched): kLoadsInFlight 16-byte
// loads in flight.  Reductions (the statistics; sum(g) and sum(g*xhat) in the backward) accumulate in
// registers, merge the threads of a block with warp shuffles then shared memory, and write per-(split, channel)
// partials; a finalize kernel merges each channel's partials with a block of threads (each a strided subset, in
// order), then the threads in a fixed tree.  Activation-only passes stride over the VEC-vectors of the flat
// tensor, in batches too.  With BN, pre = (z - mean)*(invstd*gamma) + beta in every pass, the forward's rounding.
// VEC = 16 bytes / element size when the inner dimension (C; L for NCHW) and every pointer allow 16-byte
// accesses, else 1.  Accumulation in fp32 (fp64 for fp64 z).  Indices are 32-bit: z has < 2^31 elements.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
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
constexpr int kLoadsInFlight = 4;  // 16-byte loads a thread issues before it uses the first (over all its tensors)
constexpr int kFinalizeColumns = 8;  // channels per finalize block; its kThreads / 8 rows of threads split the partials
constexpr int64_t kMaxSplits = 1024;

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

// z as the kernels see it: M = N*L rows of C channels, NCHW or channels_last (ZLayout, in 32 bits).
struct Layout {
  unsigned C, M;
  at::cuda::detail::IntDivider<unsigned> L;  // n, l of row m = n*L + l without a division instruction
  bool channels_last;
};

// ---------------------------------------------------------------------------------------------- traversal

// Vectors of each of N tensors that a thread loads per batch: kLoadsInFlight loads in all.
template <int N>
constexpr int kUnroll = std::max(1, kLoadsInFlight / N);

// Calls f(i, x) for m = first, first + step, ... < end, where i = offset(m) and x[t] is the VEC-vector of
// tensors[t] at element i.  Loads a batch of kUnroll<N> vectors of every tensor before the batch's first call.  No
// load is predicated: past the end a batch loads row `last` (a valid row, whose vector it does not use), so that
// the compiler cannot make the later loads of a batch wait on the first.
template <int VEC, int N, typename T, typename Offset, typename F>
__device__ __forceinline__ void batched(unsigned first, unsigned end, unsigned step, unsigned last, Offset offset,
                                        const T* const (&tensors)[N], F f) {
  constexpr int U = kUnroll<N>;
  for (unsigned m = first; m < end; m += U * step) {
    unsigned at[U];
    Pack<T, VEC> x[U][N];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      at[k] = offset(min(m + k * step, last));
#pragma unroll
      for (int t = 0; t < N; ++t) x[k][t] = load<VEC>(tensors[t], at[k]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (m + k * step < end) f(at[k], x[k]);
    }
  }
}

// The channel of this thread's first slot.
template <int VEC>
__device__ __forceinline__ unsigned first_channel(bool channels_last) {
  return channels_last ? (blockIdx.x * blockDim.x + threadIdx.x) * VEC : blockIdx.x;
}

// Calls f(i, x) (see batched) for each VEC-vector of rows [begin, end) that this thread reads; slot j of a vector
// is channel first_channel() + j with channels_last, first_channel() otherwise.
template <int VEC, int N, typename T, typename F>
__device__ __forceinline__ void for_each_vector(const Layout& z, unsigned begin, unsigned end,
                                                const T* const (&tensors)[N], F f) {
  const unsigned c = first_channel<VEC>(z.channels_last);
  if (z.channels_last) {
    if (c >= z.C) return;
    batched<VEC>(begin + threadIdx.y, end, blockDim.y, end - 1, [&](unsigned m) { return m * z.C + c; }, tensors,
                 f);
  } else {
    batched<VEC>(begin + threadIdx.y * VEC, end, blockDim.y * VEC, end - VEC, [&](unsigned m) {
      const auto nl = z.L.divmod(m);
      return (nl.div * z.C + c) * z.L.divisor + nl.mod;
    }, tensors, f);
  }
}

// Calls f(i, x) (see batched) for the VEC-vectors of a flat tensor of numel elements, grid-strided.
template <int VEC, int N, typename T, typename F>
__device__ __forceinline__ void for_each_flat_vector(unsigned numel, const T* const (&tensors)[N], F f) {
  batched<VEC>((blockIdx.x * kThreads + threadIdx.x) * VEC, numel, gridDim.x * kThreads * VEC, numel - VEC,
               [](unsigned m) { return m; }, tensors, f);
}

// Per-channel vectors at this thread's VEC slots (all the same channel without channels_last); slots past C
// repeat the last channel and are never stored.
template <int VEC, typename A>
__device__ __forceinline__ void channel_values(const Layout& z, const A* v, A fallback, A (&out)[VEC]) {
  const unsigned c = first_channel<VEC>(z.channels_last);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = v != nullptr ? v[min(z.channels_last ? c + j : c, z.C - 1)] : fallback;
}

// The BN constants of this thread's VEC slots: pre = (z - mean)*scale + beta, scale = invstd*gamma.
template <int VEC, typename A>
struct ChannelAffine {
  A mean[VEC], invstd[VEC], scale[VEC], beta[VEC];
};

template <int VEC, typename A>
__device__ __forceinline__ ChannelAffine<VEC, A> channel_affine(const Layout& z, const A* mean, const A* invstd,
                                                                const A* weight, const A* bias) {
  ChannelAffine<VEC, A> k;
  channel_values<VEC>(z, mean, A(0), k.mean);
  channel_values<VEC>(z, invstd, A(0), k.invstd);
  channel_values<VEC>(z, weight, A(1), k.scale);
  channel_values<VEC>(z, bias, A(0), k.beta);
#pragma unroll
  for (int j = 0; j < VEC; ++j) k.scale[j] *= k.invstd[j];
  return k;
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

// Merges each slot over the block (all slots of a thread, without channels_last) and stores the
// per-(split, channel) partial with store(channel, value).
template <int VEC, typename S, typename Store>
__device__ __forceinline__ void store_partials(S (&slots)[VEC], const Layout& z, Store store) {
  const unsigned c = first_channel<VEC>(z.channels_last);
  if (z.channels_last) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const S s = merge_over_rows(slots[j]);
      if (threadIdx.y == 0 && c + j < z.C) store(c + j, s);
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
    moments_kernel(const T* __restrict__ z, A* __restrict__ part_mean, A* __restrict__ part_m2, Layout layout,
                   unsigned rows_per_split) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, layout.M);
  Moments<A> slots[VEC] = {};
  A count = A(0);
  const T* tensors[1] = {z};
  for_each_vector<VEC>(layout, begin, end, tensors, [&](unsigned, const Pack<T, VEC> (&x)[1]) {
    count += A(1);
    const A w = A(1) / count;  // every slot has seen the same count
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = A(x[0].v[j]) - slots[j].mean;
      slots[j].mean += d * w;
      slots[j].m2 += d * (A(x[0].v[j]) - slots[j].mean);
    }
  });
#pragma unroll
  for (int j = 0; j < VEC; ++j) slots[j].count = count;
  store_partials<VEC>(slots, layout, [&](unsigned c, const Moments<A>& s) {
    part_mean[size_t(blockIdx.y) * layout.C + c] = s.mean;
    part_m2[size_t(blockIdx.y) * layout.C + c] = s.m2;
  });
}

// Merges the split moments; writes mean, invstd (biased variance) and updates the running stats (unbiased).
// Block (kFinalizeColumns, kThreads / kFinalizeColumns): a column per channel, its rows merge strided splits.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_moments_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, A* __restrict__ mean,
                            A* __restrict__ invstd, A* __restrict__ running_mean, A* __restrict__ running_var,
                            unsigned C, unsigned M, unsigned rows_per_split, unsigned splits, A momentum, A eps) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  Moments<A> total{A(0), A(0), A(0)};
  if (c < C) {
    for (unsigned s = threadIdx.y; s < splits; s += blockDim.y) {
      const A rows = A(min(rows_per_split, M - s * rows_per_split));
      total.merge(Moments<A>{rows, part_mean[size_t(s) * C + c], part_m2[size_t(s) * C + c]});
    }
  }
  total = merge_over_rows(total);
  if (threadIdx.y != 0 || c >= C) return;
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
                     A* __restrict__ part_g, A* __restrict__ part_gx, Layout layout, unsigned rows_per_split,
                     int act, A slope) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, layout.M);
  const ChannelAffine<VEC, A> k = channel_affine<VEC>(layout, mean, invstd, weight, bias);
  Sums<A> slots[VEC] = {};
  const T* tensors[2] = {z, dy};
  for_each_vector<VEC>(layout, begin, end, tensors, [&](unsigned, const Pack<T, VEC> (&x)[2]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = A(x[0].v[j]) - k.mean[j];
      const A gj = activation_grad(A(x[1].v[j]), d * k.scale[j] + k.beta[j], act, slope);
      slots[j].g += gj;
      slots[j].gx += gj * (d * k.invstd[j]);
    }
  });
  store_partials<VEC>(slots, layout, [&](unsigned c, const Sums<A>& s) {
    part_g[size_t(blockIdx.y) * layout.C + c] = s.g;
    part_gx[size_t(blockIdx.y) * layout.C + c] = s.gx;
  });
}

// sum(g) and sum(g*xhat) per channel from the split partials; blocks as finalize_moments_kernel's.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_sums_kernel(const A* __restrict__ part_g, const A* __restrict__ part_gx, A* __restrict__ sum_g,
                         A* __restrict__ sum_gx, unsigned C, unsigned splits) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  Sums<A> total{A(0), A(0)};
  if (c < C) {
    for (unsigned s = threadIdx.y; s < splits; s += blockDim.y) {
      total.merge(Sums<A>{part_g[size_t(s) * C + c], part_gx[size_t(s) * C + c]});
    }
  }
  total = merge_over_rows(total);
  if (threadIdx.y != 0 || c >= C) return;
  sum_g[c] = total.g;
  sum_gx[c] = total.gx;
}

// ---------------------------------------------------------------------------------------------- elementwise

// y = act((z - mean)*scale + beta), scale = invstd*gamma, on the rows of split blockIdx.y.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    bn_act_kernel(const T* __restrict__ z, T* __restrict__ y, const A* __restrict__ mean,
                  const A* __restrict__ invstd, const A* __restrict__ weight, const A* __restrict__ bias,
                  Layout layout, unsigned rows_per_split, int act, A slope) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, layout.M);
  const ChannelAffine<VEC, A> k = channel_affine<VEC>(layout, mean, invstd, weight, bias);
  const T* tensors[1] = {z};
  for_each_vector<VEC>(layout, begin, end, tensors, [&](unsigned i, const Pack<T, VEC> (&x)[1]) {
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = T(activate((A(x[0].v[j]) - k.mean[j]) * k.scale[j] + k.beta[j], act, slope));
    }
    store<VEC>(y, i, out);
  });
}

// y = act(z), flat.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    act_kernel(const T* __restrict__ z, T* __restrict__ y, unsigned numel, int act, A slope) {
  const T* tensors[1] = {z};
  for_each_flat_vector<VEC>(numel, tensors, [&](unsigned i, const Pack<T, VEC> (&x)[1]) {
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = T(activate(A(x[0].v[j]), act, slope));
    store<VEC>(y, i, out);
  });
}

// dz = gamma*invstd*(g - sum_g/M - xhat*sum_gx/M) with batch statistics (sum_g given), gamma*invstd*g with
// running statistics, on the rows of split blockIdx.y.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    bn_act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz,
                           const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ weight,
                           const A* __restrict__ bias, const A* __restrict__ sum_g, const A* __restrict__ sum_gx,
                           A inv_m, Layout layout, unsigned rows_per_split, int act, A slope) {
  const unsigned begin = blockIdx.y * rows_per_split, end = min(begin + rows_per_split, layout.M);
  // with d = z - mean: pre = d*scale + beta, xhat*sum_gx/M = d*slope_d, sum_g/M = shift
  const ChannelAffine<VEC, A> k = channel_affine<VEC>(layout, mean, invstd, weight, bias);
  A shift[VEC], slope_d[VEC];
  channel_values<VEC>(layout, sum_g, A(0), shift);
  channel_values<VEC>(layout, sum_gx, A(0), slope_d);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    shift[j] *= inv_m;
    slope_d[j] *= inv_m * k.invstd[j];
  }
  const T* tensors[2] = {z, dy};
  for_each_vector<VEC>(layout, begin, end, tensors, [&](unsigned i, const Pack<T, VEC> (&x)[2]) {
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = A(x[0].v[j]) - k.mean[j];
      const A gj = activation_grad(A(x[1].v[j]), d * k.scale[j] + k.beta[j], act, slope);
      out.v[j] = T((gj - shift[j] - d * slope_d[j]) * k.scale[j]);
    }
    store<VEC>(dz, i, out);
  });
}

// dz = dy*act'(z), flat.
template <typename T, int VEC, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz, unsigned numel,
                        int act, A slope) {
  const T* tensors[2] = {z, dy};
  for_each_flat_vector<VEC>(numel, tensors, [&](unsigned i, const Pack<T, VEC> (&x)[2]) {
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = T(activation_grad(A(x[1].v[j]), A(x[0].v[j]), act, slope));
    store<VEC>(dz, i, out);
  });
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
bool can_vectorize(const ZLayout& g, std::initializer_list<const Tensor*> tensors) {
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

// Blocks of (channel tile, row split) for every pass with BN: enough splits that each SM holds
// kBlocksPerSm blocks (kMaxSplits at most), each thread reading at least kLoadsInFlight vectors.
constexpr int kBlocksPerSm = 2048 / kThreads;  // the threads an sm_90 SM holds, in blocks

template <int VEC>
ReducePlan reduce_plan(const ZLayout& g, int sms) {
  unsigned tx = 1, tiles = unsigned(g.C);
  int64_t min_rows = int64_t(kThreads) * VEC * kLoadsInFlight, row_align = VEC;
  if (g.channels_last) {
    const int64_t groups = ceil_div(g.C, VEC);
    while (tx < 32 && tx < groups) tx *= 2;
    tiles = ceil_div(groups, tx);
    min_rows = int64_t(kThreads / tx) * kLoadsInFlight;
    row_align = 1;
  }
  int64_t splits = std::min<int64_t>(ceil_div(int64_t(kBlocksPerSm) * sms, tiles), ceil_div(g.M, min_rows));
  splits = std::clamp<int64_t>(splits, 1, kMaxSplits);
  const int64_t rows = ceil_div(ceil_div(g.M, splits), row_align) * row_align;
  splits = ceil_div(g.M, rows);
  return {dim3(tiles, unsigned(splits)), dim3(tx, kThreads / tx), unsigned(rows), unsigned(splits)};
}

Layout layout_of(const ZLayout& g) {
  return {unsigned(g.C), unsigned(g.M), at::cuda::detail::IntDivider<unsigned>(unsigned(std::max<int64_t>(g.L, 1))),
          g.channels_last};
}

const dim3 kFinalizeBlock(kFinalizeColumns, kThreads / kFinalizeColumns);

unsigned finalize_blocks(const ZLayout& g) { return ceil_div(g.C, kFinalizeColumns); }

unsigned flat_blocks(int64_t numel, int vec, int sms) {
  return std::max(1u, std::min(ceil_div(numel, int64_t(kThreads) * vec * kLoadsInFlight), unsigned(kBlocksPerSm * sms)));
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
  const ZLayout& g = args.z_layout;
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
      moments_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(z.const_data_ptr<scalar_t>(), part_mean,
                                                                     part_m2, layout_of(g), p.rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_moments_kernel<A><<<finalize_blocks(g), kFinalizeBlock, 0, stream>>>(
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
  const ZLayout& g = args.z_layout;
  Tensor y = empty_output_like(z);
  if (z.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act", [&] {
    using A = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(can_vectorize<scalar_t>(g, {&z, &y}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if (!args.normalize()) {
        act_kernel<scalar_t, VEC><<<flat_blocks(z.numel(), VEC, sms), kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), z.numel(), args.act, A(slope));
      } else {
        const ReducePlan p = reduce_plan<VEC>(g, sms);
        bn_act_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), args.mean.const_data_ptr<A>(),
            args.invstd.const_data_ptr<A>(), data_or_null<A>(args.weight), data_or_null<A>(args.bias),
            layout_of(g), p.rows_per_split, args.act, A(slope));
      }
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
  const ZLayout& g = args.z_layout;
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
      if (!args.normalize()) {
        act_backward_kernel<scalar_t, VEC><<<flat_blocks(z.numel(), VEC, sms), kThreads, 0, stream>>>(
            args.dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(),
            z.numel(), args.act, A(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const ReducePlan p = reduce_plan<VEC>(g, sms);
      const A* sum_g = nullptr;
      const A* sum_gx = nullptr;
      Tensor sums;
      if (batch_stats || args.affine()) {
        Tensor part = at::empty({2, p.splits, g.C}, stats_options);
        A* part_g = part.mutable_data_ptr<A>();
        A* part_gx = part_g + p.splits * g.C;
        grad_sums_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(
            args.dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), args.mean.const_data_ptr<A>(),
            args.invstd.const_data_ptr<A>(), data_or_null<A>(args.weight), data_or_null<A>(args.bias), part_g,
            part_gx, layout_of(g), p.rows_per_split, args.act, A(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dbias = sum(g) and dweight = sum(g*xhat); without weight the sums go to a scratch buffer
        if (!args.affine()) sums = at::empty({2, g.C}, stats_options);
        A* out_g = args.affine() ? dbias.mutable_data_ptr<A>() : sums.mutable_data_ptr<A>();
        A* out_gx = args.affine() ? dweight.mutable_data_ptr<A>() : out_g + g.C;
        finalize_sums_kernel<A><<<finalize_blocks(g), kFinalizeBlock, 0, stream>>>(part_g, part_gx, out_g, out_gx,
                                                                                   g.C, p.splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (batch_stats) {
          sum_g = out_g;
          sum_gx = out_gx;
        }
      }
      bn_act_backward_kernel<scalar_t, VEC><<<p.grid, p.block, 0, stream>>>(
          args.dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(),
          args.mean.const_data_ptr<A>(), args.invstd.const_data_ptr<A>(), data_or_null<A>(args.weight),
          data_or_null<A>(args.bias), sum_g, sum_gx, A(1) / A(g.M), layout_of(g), p.rows_per_split, args.act,
          A(slope));
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
