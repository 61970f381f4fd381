// Top-k sparse KL: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in topk_kl.cu.
// Validates what the kernels rely on (shapes, dtypes, devices; ids are range-checked in Python —
// a device-side check would need a host sync — and out-of-range ids are skipped by the kernels),
// allocates outputs, and launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/topk_kl_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

void check_acc(const at::Tensor& t, const at::Tensor& logits, const char* name, at::IntArrayRef shape) {
  check_cuda(t, logits, name);
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Validated, contiguous inputs of one call and the launcher's problem description.
struct Call {
  at::Tensor logits, ids, target, tail, valid, divisor;
  TopKKLProblem problem;
};

Call prepare(const at::Tensor& logits_in, const at::Tensor& ids, const at::Tensor& target_logp,
             const at::Tensor& tail_logp, const at::Tensor& valid, const at::Tensor& divisor,
             const at::Tensor& inv_temperature_t, const at::Tensor& scale_t, bool full_support,
             int64_t reduction_code) {
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK_VALUE(logits_in.dim() == 2 || logits_in.dim() == 3, "logits must be [N, V] or [B, T, V], got ",
                    logits_in.sizes());
  const Reduction reduction = check_reduction(reduction_code);
  const double inv_temperature = float_arg(inv_temperature_t, "inv_temperature");
  const double scale = float_arg(scale_t, "scale");
  TORCH_CHECK_VALUE(std::isfinite(inv_temperature) && inv_temperature > 0, "inv_temperature must be > 0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite");
  const bool batched = logits_in.dim() == 3;
  const int64_t N = batched ? logits_in.size(0) * logits_in.size(1) : logits_in.size(0), V = logits_in.size(-1);
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "the CUDA kernel takes at most 2^31 - 1 rows, got ", N);
  at::Tensor logits = N == 0 ? logits_in : unit_inner_stride(logits_in);
  check_cuda(ids, logits, "ids");
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == N,
                    "ids must be an int64 tensor [N, k] with N = ", N, ", got ", ids.scalar_type(), " ", ids.sizes());
  const int64_t k = ids.size(1);
  check_acc(target_logp, logits, "target_logp", {N, k});
  check_acc(tail_logp, logits, "tail_logp", {N});
  check_acc(divisor, logits, "divisor", {});
  check_cuda(valid, logits, "valid");
  TORCH_CHECK_VALUE(valid.scalar_type() == at::kBool && valid.sizes() == at::IntArrayRef{N}, "valid must be bool [N]");
  Call call{logits,
            ids.contiguous(),
            target_logp.contiguous(),
            tail_logp.contiguous(),
            valid.contiguous(),
            divisor.contiguous(),
            {}};
  call.problem = {dtype_code(logits.scalar_type()),
                  N,
                  V,
                  k,
                  logits.data_ptr(),
                  N > 0 ? logits.stride(batched ? 1 : 0) : V,
                  batched ? std::max<int64_t>(logits.size(1), 1) : std::max<int64_t>(N, 1),
                  batched && N > 0 ? logits.stride(0) : 0,
                  call.ids.data_ptr<int64_t>(),
                  call.target.data_ptr(),
                  call.tail.data_ptr(),
                  call.valid.data_ptr<bool>(),
                  call.divisor.data_ptr(),
                  inv_temperature,
                  scale,
                  full_support,
                  reduction};
  return call;
}

// The forward's outputs, in the accumulation dtype: the loss ([N] for none, else a scalar; rounded to
// the logits' dtype in Python outside autocast), the stats [N, 2] and the per-row workspace.
struct ForwardOutputs {
  at::Tensor loss, stats, workspace;
};

ForwardOutputs forward_outputs(const Call& call) {
  const int64_t N = call.problem.rows;
  const auto acc_options = call.logits.options().dtype(acc_type(call.logits.scalar_type()));
  return {call.problem.reduction == Reduction::kNone ? at::empty({N}, acc_options) : at::empty({}, acc_options),
          at::empty({N, 2}, acc_options), at::empty({topk_kl_workspace_size(N)}, acc_options)};
}

std::tuple<at::Tensor, at::Tensor> topk_kl_fwd(const at::Tensor& logits, const at::Tensor& ids,
                                               const at::Tensor& target_logp, const at::Tensor& tail_logp,
                                               const at::Tensor& valid, const at::Tensor& divisor,
                                               const at::Tensor& inv_temperature, const at::Tensor& scale,
                                               bool full_support, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto call =
      prepare(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale, full_support, reduction);
  const auto out = forward_outputs(call);
  check_launch(topk_kl_fwd_cuda(call.problem, out.loss.data_ptr(), out.stats.data_ptr(), out.workspace.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()),
               "topk_kl");
  return {out.loss, out.stats};
}

at::Tensor topk_kl_bwd(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& logits, const at::Tensor& ids,
                       const at::Tensor& target_logp, const at::Tensor& tail_logp, const at::Tensor& valid,
                       const at::Tensor& divisor, const at::Tensor& inv_temperature, const at::Tensor& scale,
                       bool full_support, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto call =
      prepare(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale, full_support, reduction);
  const int64_t N = call.problem.rows, V = call.problem.vocab;
  check_acc(stats, call.logits, "stats", {N, 2});
  const auto g = checked_grad(grad, call.logits, call.problem.reduction, {N}, acc_type(call.logits.scalar_type()));
  const auto stats_c = stats.contiguous();
  at::Tensor out = at::empty(call.logits.sizes(), call.logits.options());
  check_launch(topk_kl_bwd_cuda(call.problem, g.data_ptr(), stats_c.data_ptr(), out.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()),
               "topk_kl");
  return out;
}

// check_unique cannot raise without a host synchronisation: it is ignored here (a repeated id counts once
// per slot, race-free; kdloss.topk_kl_loss checks the ids in Python unless validate=False).
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_grad(
    const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& target_logp, const at::Tensor& tail_logp,
    const at::Tensor& valid, const at::Tensor& divisor, const at::Tensor& inv_temperature, const at::Tensor& scale,
    bool full_support, int64_t reduction, bool compute_grad, bool /*check_unique*/) {
  if (!compute_grad) {
    auto [loss, stats] = topk_kl_fwd(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                                     full_support, reduction);
    return {loss, stats, at::empty({0}, logits.options())};
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto call =
      prepare(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale, full_support, reduction);
  const auto out = forward_outputs(call);
  at::Tensor grad = at::empty(call.logits.sizes(), call.logits.options());
  check_launch(topk_kl_fwd_grad_cuda(call.problem, out.loss.data_ptr(), out.stats.data_ptr(), out.workspace.data_ptr(),
                                     grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "topk_kl");
  return {out.loss, out.stats, grad};
}

// The one-pass gradient times the upstream gradient, in place (the autograd formula's eager CUDA path):
// rows whose factor is exactly 1 are skipped on the device, without a host synchronisation.
void topk_kl_rescale_(const at::Tensor& grad, const at::Tensor& grad_loss, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(grad.device());
  TORCH_CHECK_VALUE(grad.is_cuda() && grad.is_contiguous() && grad.dim() >= 1,
                    "grad must be a contiguous CUDA tensor, got ", grad.sizes(), " on ", grad.device());
  const int64_t V = grad.size(-1), N = V > 0 ? grad.numel() / V : 0;
  const Reduction code = check_reduction(reduction);
  const auto factor = checked_grad(grad_loss, grad, code, {N}, acc_type(grad.scalar_type()));
  check_launch(topk_kl_rescale_cuda(dtype_code(grad.scalar_type()), grad.data_ptr(), factor.data_ptr(), N, V,
                                    code == Reduction::kNone, c10::cuda::getCurrentCUDAStream()),
               "topk_kl");
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("topk_kl_rescale_", &topk_kl_rescale_);
  m.impl("topk_kl_fwd", &topk_kl_fwd);
  m.impl("topk_kl_bwd", &topk_kl_bwd);
  m.impl("topk_kl_fwd_grad", &topk_kl_fwd_grad);
}

}  // namespace cuda
}  // namespace kdloss
