// fastgan_ext: the C++/CUDA backend of fastgan's fused ops.
//
// The op contract (schemas in ops.cpp, semantics in fastgan/ops/contract.py) is implemented twice: CPU kernels
// (bn_act.cpp, sigmoid_bce.cpp) and CUDA kernels (bn_act.cu, sigmoid_bce.cu).  This header holds what both
// share: the argument checks and output allocation (defined in ops.cpp), and the per-element maths.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace fastgan_ext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The activation codes, as kernels/activations.py defines them (tests/test_bn_act.py checks that they match).
enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3 };

// z (N, C, *spatial) seen as M = N*L rows by C channels, L = prod(spatial).  Two dense layouts:
//   channels_last: element (m, c) at m*C + c   (channels_last(_3d), 2-D (N, C), or L == 1)
//   otherwise:     element (n, c, l) at (n*C + c)*L + l   (contiguous NCHW)
// Every tensor a kernel reads or writes alongside z (dy, y, dz) has z's layout.
struct ZLayout {
  int64_t C, L, M;
  bool channels_last;
};

// ---------------------------------------------------------------------------------------------- host (ops.cpp)

// Checks z (float dtype, fewer than 2^31 elements, dense) and returns its layout.
ZLayout check_z(const char* op, const Tensor& z);

// Statistics dtype: fp32, or fp64 for fp64 z.
at::ScalarType stat_dtype(const Tensor& z);

// The outputs of channel_stats, and the running stats as the kernels update them (contiguous, statistics
// dtype: a temporary when the caller's buffer is not; store_running_stats copies it back).
struct StatsArgs {
  ZLayout z_layout;
  Tensor mean, invstd, running_mean, running_var;  // running_* undefined when not tracked
};
StatsArgs channel_stats_args(const Tensor& z, const OptTensor& running_mean, const OptTensor& running_var);
void store_running_stats(const StatsArgs& args, const OptTensor& running_mean, const OptTensor& running_var);

// The inputs of bn_act / bn_act_backward as the kernels read them: dy in z's layout (undefined in the
// forward), and per-channel vectors contiguous in the statistics dtype (undefined when absent).
struct BnActArgs {
  ZLayout z_layout;
  Tensor z, dy, mean, invstd, weight, bias;
  int act;
  bool normalize() const { return mean.defined(); }
  bool affine() const { return weight.defined(); }
};
BnActArgs bn_act_args(const char* op, const Tensor* dy, const Tensor& z, const OptTensor& mean,
                      const OptTensor& invstd, const OptTensor& weight, const OptTensor& bias, int64_t act);

// Checks the logits of sigmoid_bce: float dtype, fewer than 2^31 elements, dense (any dim order).
void check_logits(const Tensor& logits);

// Kernel outputs; NaN-filled while poisoning is on (tests turn it on so that unwritten elements show).
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
Tensor empty_output_like(const Tensor& t);

// ---------------------------------------------------------------------------------------------- host + device

// Comparisons are ordered so that NaN propagates as in torch.
template <typename A>
C10_HOST_DEVICE inline A activate(A pre, int act, A slope) {
  switch (act) {
    case kRelu: return pre < A(0) ? A(0) : pre;
    case kLeakyRelu: return pre < A(0) ? pre * slope : pre;
    case kTanh: return std::tanh(pre);
    default: return pre;
  }
}

// dy * act'(pre)
template <typename A>
C10_HOST_DEVICE inline A activation_grad(A dy, A pre, int act, A slope) {
  switch (act) {
    case kRelu: return pre <= A(0) ? A(0) : dy;
    case kLeakyRelu: return pre > A(0) ? dy : dy * slope;
    case kTanh: {
      const A t = std::tanh(pre);
      return dy * (A(1) - t * t);
    }
    default: return dy;
  }
}

// Count, mean and M2 = sum((x - mean)^2) of a set of values; merge() is Chan et al.'s pairwise update.
template <typename A>
struct Moments {
  A count, mean, m2;

  C10_HOST_DEVICE void merge(const Moments& other) {
    const A n = count + other.count;
    const A w = n > A(0) ? other.count / n : A(0);
    const A delta = other.mean - mean;
    mean += delta * w;
    m2 += other.m2 + delta * delta * count * w;
    count = n;
  }
};

}  // namespace fastgan_ext
