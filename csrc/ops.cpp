// The fastgan_ext schemas, and the argument checks and output allocation that the CPU and CUDA kernels share.
// Fake (meta) kernels and autograd are registered from Python (fastgan/ops/ext_ops.py, through
// fastgan.ops.contract.register).
#include "fastgan_ext.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

namespace fastgan_ext {
namespace {

std::atomic<bool> poison_outputs{false};

bool set_poison_outputs(bool enabled) { return poison_outputs.exchange(enabled); }

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_size(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ", t.numel(),
                    " elements, more than the 2^31 - 1 that the kernels' int32 indexing allows; split the batch");
}

// A (C,) vector beside z: on z's device, float, C elements; returned contiguous in ``dtype``.
Tensor channel_vector(const char* op, const char* name, const Tensor& t, const Tensor& z, int64_t C,
                      at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == z.device(), op, ": ", name, " is on ", t.device(), " but z is on ", z.device(),
                    "; move both to one device");
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C,
                    ",) to match the channels of z (shape ", z.sizes(), "), got ", t.sizes());
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();  // as is: no dispatch
}

// Same element offsets as z's dense layout (strides of dims of size 1 do not matter).
bool same_layout(const Tensor& t, const Tensor& z) {
  if (t.sizes() != z.sizes()) return false;
  for (int64_t d = 0; d < z.dim(); ++d) {
    if (z.size(d) > 1 && t.stride(d) != z.stride(d)) return false;
  }
  return true;
}

}  // namespace

at::ScalarType stat_dtype(const Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

ZLayout check_z(const char* op, const Tensor& z) {
  TORCH_CHECK_TYPE(is_float(z.scalar_type()), op, ": z must be float32, float16, bfloat16 or float64, got ",
                   z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 2, op, ": z must have shape (N, C, *spatial), got ", z.sizes());
  check_size(op, "z", z);
  const bool nchw = z.is_contiguous();
  const bool channels_last = (z.dim() == 4 && z.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (z.dim() == 5 && z.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK_VALUE(nchw || channels_last, op, ": z must be dense, contiguous (NCHW) or channels_last, got sizes ",
                    z.sizes(), " and strides ", z.strides(), "; call .contiguous() first");
  int64_t L = 1;
  for (int64_t d = 2; d < z.dim(); ++d) L *= z.size(d);
  return ZLayout{z.size(1), L, z.size(0) * L, !nchw || L == 1};
}

StatsArgs channel_stats_args(const Tensor& z, const OptTensor& running_mean, const OptTensor& running_var) {
  const char* op = "channel_stats";
  const ZLayout z_layout = check_z(op, z);
  TORCH_CHECK_VALUE(z_layout.M > 0 && z_layout.C > 0, op, ": z has no values per channel, got shape ", z.sizes());
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": give both running_mean and running_var, or neither");
  const auto options = z.options().dtype(stat_dtype(z));
  StatsArgs args{z_layout, empty_output({z_layout.C}, options), empty_output({z_layout.C}, options), {}, {}};
  if (running_mean.has_value()) {
    TORCH_CHECK_VALUE(z_layout.M > 1, op, ": updating the running variance needs more than one value per channel, "
                      "got z of shape ", z.sizes());
    args.running_mean = channel_vector(op, "running_mean", *running_mean, z, z_layout.C, stat_dtype(z));
    args.running_var = channel_vector(op, "running_var", *running_var, z, z_layout.C, stat_dtype(z));
  }
  return args;
}

void store_running_stats(const StatsArgs& args, const OptTensor& running_mean, const OptTensor& running_var) {
  if (!args.running_mean.defined()) return;
  if (!args.running_mean.is_same(*running_mean)) running_mean->copy_(args.running_mean);
  if (!args.running_var.is_same(*running_var)) running_var->copy_(args.running_var);
}

BnActArgs bn_act_args(const char* op, const Tensor* dy, const Tensor& z, const OptTensor& mean,
                      const OptTensor& invstd, const OptTensor& weight, const OptTensor& bias, int64_t act) {
  const ZLayout z_layout = check_z(op, z);
  TORCH_CHECK_VALUE(act >= kNone && act <= kTanh, op,
                    ": act must be 0 (none), 1 (relu), 2 (leaky_relu) or 3 (tanh), got ", act);
  TORCH_CHECK_VALUE(mean.has_value() == invstd.has_value(), op, ": give both mean and invstd, or neither");
  TORCH_CHECK_VALUE(weight.has_value() == bias.has_value(), op, ": give both weight and bias, or neither");
  TORCH_CHECK_VALUE(mean.has_value() || !weight.has_value(), op, ": weight and bias need mean and invstd");
  BnActArgs args{z_layout, z, {}, {}, {}, {}, {}, static_cast<int>(act)};
  const at::ScalarType stats = stat_dtype(z);
  if (mean.has_value()) {
    for (const auto& [name, t] : {std::pair{"mean", &*mean}, std::pair{"invstd", &*invstd}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == stats, op, ": ", name, " must be ", stats, " for ", z.scalar_type(),
                       " z (as channel_stats returns it), got ", t->scalar_type());
    }
    args.mean = channel_vector(op, "mean", *mean, z, z_layout.C, stats);
    args.invstd = channel_vector(op, "invstd", *invstd, z, z_layout.C, stats);
  }
  if (weight.has_value()) {
    args.weight = channel_vector(op, "weight", *weight, z, z_layout.C, stats);
    args.bias = channel_vector(op, "bias", *bias, z, z_layout.C, stats);
  }
  if (dy != nullptr) {
    TORCH_CHECK_VALUE(dy->device() == z.device(), op, ": dy is on ", dy->device(), " but z is on ", z.device());
    TORCH_CHECK_TYPE(dy->scalar_type() == z.scalar_type(), op, ": dy must have z's dtype ", z.scalar_type(),
                     ", got ", dy->scalar_type());
    TORCH_CHECK_VALUE(dy->sizes() == z.sizes(), op, ": dy must have z's shape ", z.sizes(), ", got ", dy->sizes());
    // Autograd may hand over dy in another memory format, or expanded: the kernels read it in z's layout.
    args.dy = same_layout(*dy, z) ? *dy : at::empty_like(z).copy_(*dy);
  }
  return args;
}

void check_logits(const Tensor& logits) {
  TORCH_CHECK_TYPE(is_float(logits.scalar_type()),
                   "sigmoid_bce: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  check_size("sigmoid_bce", "logits", logits);
  TORCH_CHECK_VALUE(logits.is_non_overlapping_and_dense(), "sigmoid_bce: logits must be dense, got sizes ",
                    logits.sizes(), " and strides ", logits.strides(), "; call .contiguous() first");
}

Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  return poison_outputs.load() ? t.fill_(NAN) : t;
}

Tensor empty_output_like(const Tensor& t) {
  Tensor out = at::empty_like(t);
  return poison_outputs.load() ? out.fill_(NAN) : out;
}

}  // namespace fastgan_ext

TORCH_LIBRARY(fastgan_ext, m) {
  m.def("channel_stats(Tensor z, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps)"
        " -> (Tensor, Tensor)");
  m.def("bn_act(Tensor z, Tensor? mean, Tensor? invstd, Tensor? weight, Tensor? bias, bool batch_stats, int act,"
        " float slope) -> Tensor");
  m.def("bn_act_backward(Tensor dy, Tensor z, Tensor? mean, Tensor? invstd, Tensor? weight, Tensor? bias,"
        " bool batch_stats, int act, float slope) -> (Tensor, Tensor, Tensor)");
  m.def("sigmoid_bce(Tensor logits, float target) -> (Tensor, Tensor)");
  // Test hook: fill every kernel output with NaN first (returns the previous setting).
  m.def("_poison_outputs(bool enabled) -> bool", &fastgan_ext::set_poison_outputs);
}

// channel_stats is not differentiable (the contract calls it on z.detach()): autograd passes through it.
TORCH_LIBRARY_IMPL(fastgan_ext, Autograd, m) {
  m.impl("channel_stats", torch::CppFunction::makeFallthrough());
}
