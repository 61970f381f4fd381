// TRG contrastive loss: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue; the op contract is documented once, in
// kdloss/_ops/token_contrastive.py. The logits L = u vᵀ / τ are streamed in column strips of at
// most kStrip columns (cuBLAS through ATen), each consumed by the kernels of token_contrastive.cu and
// dropped: extra memory is one [M, kStrip] strip plus O(M·E), never an M × M matrix.
//   forward:  per strip, S = u v_Jᵀ; fold S into the rows' online log-sum-exp (and the strip's
//             column log-sum-exps when symmetric); then the positive logits and the loss.
//   backward: per strip, recompute S, turn it into G_J (the logits' gradient) in place, then
//             ∂u += G_J v_J and ∂v_J = G_Jᵀ u. cuBLAS GEMMs are deterministic on a given GPU and
//             ∂u is accumulated strip after strip in a fixed order: no atomics, no host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/token_contrastive_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int64_t kStrip = 512;  // columns of L per strip

struct Inputs {
  at::Tensor u, v;
  ContrastiveProblem problem;
};

Inputs prepare(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature, bool symmetric,
               int64_t reduction_code) {
  TORCH_CHECK_VALUE(student.is_cuda(), "student must be a CUDA tensor");
  check_cuda(teacher, student, "teacher");
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.sizes() == student.sizes(),
                    "student and teacher must both be [M, E], got ", student.sizes(), " and ", teacher.sizes());
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(student.scalar_type() == acc && teacher.scalar_type() == acc,
                    "student and teacher must be float32 or float64 (the accumulation dtype), got ",
                    student.scalar_type(), " and ", teacher.scalar_type());
  const Reduction reduction = check_reduction(reduction_code);
  const double tau = float_arg(temperature, "temperature");
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "temperature must be a finite number > 0, got ", tau);
  return {student.contiguous(),
          teacher.contiguous(),
          {dtype_code(acc), student.size(0), student.size(1), 1.0 / tau, symmetric, reduction}};
}

int64_t strip_width(int64_t M) { return std::min(kStrip, M); }

// S [M, width] = u v[j0 : j0 + width]ᵀ (raw dot products), at the start of the flat buffer.
at::Tensor strip_logits(const at::Tensor& buffer, const at::Tensor& u, const at::Tensor& v, int64_t j0, int64_t width) {
  at::Tensor S = buffer.narrow(0, 0, u.size(0) * width).view({u.size(0), width});
  at::mm_out(S, u, v.narrow(0, j0, width).t());
  return S;
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                         const at::Tensor& temperature, bool symmetric,
                                                         int64_t reduction_code) {
  c10::cuda::CUDAGuard guard(student.device());
  // the strip GEMMs stay in the accumulation dtype: an enclosing autocast must not reroute them
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = prepare(student, teacher, temperature, symmetric, reduction_code);
  const ContrastiveProblem& p = in.problem;
  const auto opts = in.u.options();
  const int64_t M = p.nodes;
  at::Tensor lse = at::zeros({2, M}, opts);
  // the loss is returned in the accumulation dtype (rounded to the input's in Python outside autocast)
  at::Tensor loss = p.reduction == Reduction::kNone ? at::empty({M}, opts) : at::zeros({}, opts);
  if (M == 0) return {loss, lse};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t W = strip_width(M);
  const at::Tensor buffer = at::empty({M * W}, opts), running = at::empty({2, M}, opts);
  for (int64_t j0 = 0; j0 < M; j0 += W) {
    const int64_t width = std::min(W, M - j0);
    const at::Tensor S = strip_logits(buffer, in.u, in.v, j0, width);
    check_launch(contrastive_fwd_strip_cuda(p, S.data_ptr(), j0, width, running.data_ptr(), lse.data_ptr(), stream),
                 "token_contrastive");
  }
  const at::Tensor workspace = at::empty({contrastive_workspace_size(M)}, opts);
  check_launch(contrastive_fwd_finish_cuda(p, in.u.data_ptr(), in.v.data_ptr(), running.data_ptr(), lse.data_ptr(),
                                           loss.data_ptr(), workspace.data_ptr(), stream),
               "token_contrastive");
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd(const at::Tensor& grad, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& lse_in,
                                                         const at::Tensor& temperature, bool symmetric,
                                                         int64_t reduction_code, bool need_student, bool need_teacher) {
  c10::cuda::CUDAGuard guard(student.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = prepare(student, teacher, temperature, symmetric, reduction_code);
  const ContrastiveProblem& p = in.problem;
  const auto opts = in.u.options();
  const int64_t M = p.nodes, E = p.E;
  check_cuda(lse_in, in.u, "lse");
  TORCH_CHECK_VALUE(
      lse_in.scalar_type() == in.u.scalar_type() && lse_in.dim() == 2 && lse_in.size(0) == 2 && lse_in.size(1) == M,
      "lse must be [2, M] of dtype ", in.u.scalar_type(), ", got ", lse_in.sizes(), " ", lse_in.scalar_type());
  const at::Tensor g = checked_grad(grad, in.u, p.reduction, {M}, in.u.scalar_type());
  at::Tensor grad_u = at::zeros({M, E}, opts);
  at::Tensor grad_v = need_teacher ? at::empty({M, E}, opts) : at::zeros({M, E}, opts);
  if (M == 0 || E == 0 || (!need_student && !need_teacher)) {
    if (need_teacher) grad_v.zero_();
    return {grad_u, grad_v};
  }
  const at::Tensor lse = lse_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t W = strip_width(M);
  const at::Tensor buffer = at::empty({M * W}, opts);
  for (int64_t j0 = 0; j0 < M; j0 += W) {
    const int64_t width = std::min(W, M - j0);
    const at::Tensor G = strip_logits(buffer, in.u, in.v, j0, width);
    check_launch(contrastive_bwd_strip_cuda(p, g.data_ptr(), lse.data_ptr(), G.data_ptr(), j0, width, stream),
                 "token_contrastive");
    if (need_student) grad_u.addmm_(G, in.v.narrow(0, j0, width));
    if (need_teacher) {
      at::Tensor rows = grad_v.narrow(0, j0, width);
      at::mm_out(rows, G.t(), in.u);
    }
  }
  return {grad_u, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("token_contrastive_fwd", &token_contrastive_fwd);
  m.impl("token_contrastive_bwd", &token_contrastive_bwd);
}

}  // namespace cuda
}  // namespace kdloss
