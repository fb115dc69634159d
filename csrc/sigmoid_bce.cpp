// CPU kernel of sigmoid_bce (contract: fastgan/ops/contract.py): loss and gradient in one pass.
//
//   loss     = mean(max(l, 0) - t*l + log1p(exp(-|l|)))
//   dloss/dl = (sigmoid(l) - t) / n
//
// Partial sums over fixed chunks, added in chunk order: the loss does not depend on the number of threads.
#include "fastgan_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace fastgan_ext {
namespace {

constexpr int64_t kChunk = 4096;

std::tuple<Tensor, Tensor> sigmoid_bce(const Tensor& logits, double target) {
  check_logits(logits);
  Tensor loss = empty_output({}, logits.options().dtype(stat_dtype(logits)));
  Tensor grad = empty_output_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_bce", [&] {
    using A = at::opmath_type<scalar_t>;
    // Dense: logits and grad (empty_like) share strides, so one flat index walks both.
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = logits.numel();
    const A t = A(target), inv_n = A(1) / A(n);
    std::vector<A> partial((n + kChunk - 1) / kChunk, A(0));
    at::parallel_for(0, static_cast<int64_t>(partial.size()), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        A total = A(0);
        for (int64_t i = k * kChunk; i < std::min(n, (k + 1) * kChunk); ++i) {
          const A x = A(l[i]);
          const A e = std::exp(-std::abs(x));
          total += (x > A(0) ? x : A(0)) - t * x + std::log1p(e);
          const A sigmoid = x >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
          out[i] = scalar_t((sigmoid - t) * inv_n);
        }
        partial[k] = total;
      }
    });
    A total = A(0);
    for (const A p : partial) total += p;
    *loss.mutable_data_ptr<A>() = total * inv_n;
  });
  return {loss, grad};
}

}  // namespace
}  // namespace fastgan_ext

TORCH_LIBRARY_IMPL(fastgan_ext, CPU, m) { m.impl("sigmoid_bce", &fastgan_ext::sigmoid_bce); }
