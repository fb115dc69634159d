// CUDA kernel of sigmoid_bce (contract: fastgan/ops/contract.py): loss and gradient in one pass.
//
//   loss     = mean(max(l, 0) - t*l + log1p(exp(-|l|)))
//   dloss/dl = (sigmoid(l) - t) / n
//
// One block walks the whole (small: one logit per image) logit tensor, so the sum is deterministic and needs
// no second kernel; it reduces with warp shuffles, then across warps in shared memory.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastgan_ext {
namespace {

constexpr int kThreads = 1024;

template <typename T, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads)
    sigmoid_bce_kernel(const T* __restrict__ logits, T* __restrict__ grad, A* __restrict__ loss, unsigned n,
                       A target) {
  const A inv_n = A(1) / A(n);
  A total = A(0);
  // Dense: logits and grad (empty_like) share strides, so one flat index walks both.
  for (unsigned i = threadIdx.x; i < n; i += kThreads) {
    const A x = A(logits[i]);
    const A e = std::exp(-std::abs(x));
    total += (x > A(0) ? x : A(0)) - target * x + std::log1p(e);
    const A sigmoid = x >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
    grad[i] = T((sigmoid - target) * inv_n);
  }
  for (unsigned mask = 16; mask > 0; mask /= 2) total += __shfl_xor_sync(0xffffffffu, total, mask);
  __shared__ A warp_totals[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = A(0);
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_totals[w];
    *loss = sum * inv_n;
  }
}

std::tuple<Tensor, Tensor> sigmoid_bce(const Tensor& logits, double target) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_logits(logits);
  Tensor loss = empty_output({}, logits.options().dtype(stat_dtype(logits)));
  Tensor grad = empty_output_like(logits);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_bce", [&] {
    using A = at::opmath_type<scalar_t>;
    sigmoid_bce_kernel<scalar_t><<<1, kThreads, 0, stream>>>(logits.const_data_ptr<scalar_t>(),
                                                               grad.mutable_data_ptr<scalar_t>(),
                                                               loss.mutable_data_ptr<A>(), logits.numel(), A(target));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

}  // namespace
}  // namespace fastgan_ext

TORCH_LIBRARY_IMPL(fastgan_ext, CUDA, m) { m.impl("sigmoid_bce", &fastgan_ext::sigmoid_bce); }
