// SinKD: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in sinkhorn.cu.
// Validates what the kernels rely on, allocates outputs and workspace, launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/sinkhorn_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

void check_options(double temperature, double epsilon, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon > 0, "epsilon must be > 0, got ", epsilon);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& temperature_t,
    const at::Tensor& epsilon_t, int64_t n_iters, const at::Tensor& scale_t) {
  const double temperature = float_arg(temperature_t, "temperature");
  const double epsilon = float_arg(epsilon_t, "epsilon");
  const double scale = float_arg(scale_t, "scale");
  TORCH_CHECK_VALUE(student_logits.is_cuda(), "student_logits must be a CUDA tensor");
  check_cuda(teacher_logits, student_logits, "teacher_logits");
  check_options(temperature, epsilon, scale);
  TORCH_CHECK_VALUE(n_iters >= 1, "n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && student_logits.size(1) >= 1,
                    "student_logits must be [B, C] with C >= 1, got ", student_logits.sizes());
  const int64_t B = student_logits.size(0), C = student_logits.size(1), Bt = teacher_logits.size(0);
  TORCH_CHECK_VALUE(teacher_logits.dim() == 2 && teacher_logits.size(1) == C, "teacher_logits must be [B', ", C,
                    "], got ", teacher_logits.sizes());
  const auto acc = acc_type(student_logits.scalar_type());
  TORCH_CHECK_VALUE(teacher_logits.scalar_type() == acc, "teacher_logits must be ", acc, ", got ",
                    teacher_logits.scalar_type());
  const DType dtype = dtype_code(student_logits.scalar_type());
  c10::cuda::CUDAGuard guard(student_logits.device());
  const auto zs = student_logits.stride(1) == 1 && B > 0 ? student_logits : student_logits.contiguous();
  const auto zt = teacher_logits.contiguous();
  const auto opts = zt.options();
  at::Tensor loss = at::zeros({}, opts);  // the loss is returned in the accumulation dtype
  at::Tensor probs_s = at::zeros({B, C}, opts), probs_t = at::zeros({Bt, C}, opts);
  at::Tensor cost = at::empty({B, Bt}, opts);
  // the increments a [n, B] then b [n, B'], one after the other (the op's `steps`); `state` is the
  // CPU kernel's and stays empty here
  at::Tensor steps = at::empty({n_iters, B + Bt}, opts);  // every entry written by the kernels
  at::Tensor state = at::empty({0}, opts.dtype(at::kDouble));
  if (B == 0 || Bt == 0) return {loss, probs_s, probs_t, cost, steps, state};  // an empty plan: loss 0
  const SinkhornProblem p{dtype, B, Bt, C, n_iters, temperature, epsilon, scale};
  at::Tensor workspace = at::empty({sinkhorn_fwd_workspace_size(p)}, opts);
  check_launch(sinkhorn_fwd_cuda(p, zs.data_ptr(), zs.stride(0), zt.data_ptr(), loss.data_ptr(), probs_s.data_ptr(),
                                 probs_t.data_ptr(), cost.data_ptr(), steps.data_ptr(),
                                 static_cast<char*>(steps.data_ptr()) + n_iters * B * steps.element_size(),
                                 workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "sinkhorn");
  return {loss, probs_s, probs_t, cost, steps, state};
}

at::Tensor sinkhorn_bwd(const at::Tensor& grad, const at::Tensor& student_logits, const at::Tensor& probs_s,
                        const at::Tensor& probs_t, const at::Tensor& cost, const at::Tensor& steps,
                        const at::Tensor& state, const at::Tensor& temperature_t, const at::Tensor& epsilon_t,
                        const at::Tensor& scale_t) {
  const double temperature = float_arg(temperature_t, "temperature");
  const double epsilon = float_arg(epsilon_t, "epsilon");
  const double scale = float_arg(scale_t, "scale");
  TORCH_CHECK_VALUE(student_logits.is_cuda(), "student_logits must be a CUDA tensor");
  check_options(temperature, epsilon, scale);
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && student_logits.size(1) >= 1,
                    "student_logits must be [B, C] with C >= 1, got ", student_logits.sizes());
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one element, got ", grad.numel());
  check_cuda(grad, student_logits, "grad");
  const auto acc = acc_type(student_logits.scalar_type());
  const char* names[] = {"student_probs", "teacher_probs", "cost", "steps"};
  const at::Tensor* saved[] = {&probs_s, &probs_t, &cost, &steps};
  for (int k = 0; k < 4; ++k) {
    check_cuda(*saved[k], student_logits, names[k]);
    TORCH_CHECK_VALUE(saved[k]->scalar_type() == acc && saved[k]->dim() == 2, names[k], " must be a 2-D ", acc,
                      " tensor");
  }
  const int64_t B = student_logits.size(0), C = student_logits.size(1), Bt = probs_t.size(0);
  const int64_t n_iters = steps.size(0);
  TORCH_CHECK_VALUE(probs_s.size(0) == B && probs_s.size(1) == C && probs_t.size(1) == C,
                    "probabilities must be [B, C] and [B', C]");
  TORCH_CHECK_VALUE(cost.size(0) == B && cost.size(1) == Bt, "cost must be [B, B'], got ", cost.sizes());
  TORCH_CHECK_VALUE(n_iters >= 1 && steps.size(1) == B + Bt, "steps must be [n_iters, B + B'], got ", steps.sizes());
  (void)state;  // the CPU kernel's backward state; empty here
  const DType dtype = dtype_code(student_logits.scalar_type());
  c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor grad_student = at::zeros({B, C}, student_logits.options());
  if (B == 0 || Bt == 0) return grad_student;
  const auto g_scalar = grad.to(acc).contiguous();
  const auto ps = probs_s.contiguous(), pt = probs_t.contiguous(), W = cost.contiguous();
  const auto increments = steps.contiguous();
  const auto* a_hist = static_cast<const char*>(increments.data_ptr());
  const auto* b_hist = a_hist + n_iters * B * increments.element_size();
  const SinkhornProblem p{dtype, B, Bt, C, n_iters, temperature, epsilon, scale};
  at::Tensor workspace = at::empty({sinkhorn_bwd_workspace_size(p)}, ps.options());
  check_launch(sinkhorn_bwd_cuda(p, g_scalar.data_ptr(), ps.data_ptr(), pt.data_ptr(), W.data_ptr(), a_hist, b_hist,
                                 grad_student.data_ptr(), workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "sinkhorn");
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("sinkhorn_fwd", &sinkhorn_fwd);
  m.impl("sinkhorn_bwd", &sinkhorn_bwd);
}

}  // namespace cuda
}  // namespace kdloss
