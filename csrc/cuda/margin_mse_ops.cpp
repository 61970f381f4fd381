// Margin-MSE: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in margin_mse.cu.
// Validates what the kernels rely on, allocates outputs, and launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kdloss/margin_mse_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int64_t kNone = 0;
// Shared memory holds 2·(n+1) accumulators per block (emb kernels); 48 KiB default limit.
constexpr int64_t kMaxNegativesEmb = 2047;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t, " (expected float32/float64/bfloat16/float16)");
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(),
                    ", got ", t.device());
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "kdloss margin_mse CUDA launch failed: ", cudaGetErrorString(err));
}

MarginMSEProblem make_problem(const at::Tensor& student, const at::Tensor& teacher, int64_t B, int64_t n,
                              bool teacher_is_scores, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction code must be 0, 1 or 2, got ", reduction);
  check_cuda(teacher, student, "teacher");
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc, "teacher must be ", acc, ", got ", teacher.scalar_type());
  const int64_t cols = teacher_is_scores ? n + 1 : n;
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == B && teacher.size(1) == cols,
                    "teacher must have shape [", B, ", ", cols, "], got ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.is_contiguous(), "teacher must be contiguous");
  return {dtype_code(student.scalar_type()), B, n, teacher.data_ptr(), teacher_is_scores,
          static_cast<int>(reduction)};
}

at::Tensor allocate_loss(const at::Tensor& like, int64_t reduction, int64_t B, int64_t n) {
  return reduction == kNone ? at::empty({B, n}, like.options()) : at::empty({}, like.options());
}

at::Tensor workspace(const at::Tensor& like, int64_t B) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({margin_mse_workspace_size(B)}, like.options().dtype(acc));
}

at::Tensor checked_grad(const at::Tensor& grad, const at::Tensor& like, int64_t reduction, int64_t B, int64_t n) {
  check_cuda(grad, like, "grad");
  TORCH_CHECK_VALUE(reduction == kNone ? grad.numel() == B * n : grad.numel() == 1, "grad has ",
                    grad.numel(), " elements, which does not match the reduction");
  return grad.to(like.scalar_type()).contiguous();
}

void check_scores(const at::Tensor& pos, const at::Tensor& neg) {
  TORCH_CHECK_VALUE(pos.is_cuda(), "student_pos must be a CUDA tensor");
  check_cuda(neg, pos, "student_neg");
  TORCH_CHECK_VALUE(pos.dim() == 1 && neg.dim() == 2 && neg.size(0) == pos.size(0),
                    "expected student_pos [B] and student_neg [B, n], got ", pos.sizes(), " and ", neg.sizes());
  TORCH_CHECK_VALUE(neg.scalar_type() == pos.scalar_type(), "student_neg must have the dtype of student_pos");
}

at::Tensor margin_mse_fwd(const at::Tensor& student_pos, const at::Tensor& student_neg,
                          const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction) {
  check_scores(student_pos, student_neg);
  const c10::cuda::CUDAGuard guard(student_pos.device());
  const int64_t B = student_neg.size(0), n = student_neg.size(1);
  const auto tea = teacher.contiguous();
  const auto problem = make_problem(student_pos, tea, B, n, teacher_is_scores, reduction);
  const auto pos = student_pos.contiguous(), neg = student_neg.contiguous();
  at::Tensor out = allocate_loss(pos, reduction, B, n);
  at::Tensor ws = workspace(pos, B);
  check_launch(margin_mse_fwd_cuda(problem, {pos.data_ptr(), neg.data_ptr()}, out.data_ptr(), ws.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> margin_mse_bwd(const at::Tensor& grad, const at::Tensor& student_pos,
                                                  const at::Tensor& student_neg, const at::Tensor& teacher,
                                                  bool teacher_is_scores, int64_t reduction) {
  check_scores(student_pos, student_neg);
  const c10::cuda::CUDAGuard guard(student_pos.device());
  const int64_t B = student_neg.size(0), n = student_neg.size(1);
  const auto tea = teacher.contiguous();
  const auto problem = make_problem(student_pos, tea, B, n, teacher_is_scores, reduction);
  const auto pos = student_pos.contiguous(), neg = student_neg.contiguous();
  const auto g = checked_grad(grad, pos, reduction, B, n);
  at::Tensor grad_pos = at::empty({B}, pos.options());
  at::Tensor grad_neg = at::empty({B, n}, pos.options());
  check_launch(margin_mse_bwd_cuda(problem, {pos.data_ptr(), neg.data_ptr()}, g.data_ptr(), grad_pos.data_ptr(),
                                   grad_neg.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {grad_pos, grad_neg};
}

at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

MarginMSEEmbeddings embeddings(const at::Tensor& q, const at::Tensor& p, const at::Tensor& negs) {
  return {q.data_ptr(), p.data_ptr(), negs.data_ptr(), q.size(1), q.stride(0), p.stride(0),
          negs.stride(0), negs.stride(1)};
}

void check_embeddings(const at::Tensor& q, const at::Tensor& p, const at::Tensor& negs) {
  TORCH_CHECK_VALUE(q.is_cuda(), "query must be a CUDA tensor");
  check_cuda(p, q, "positive");
  check_cuda(negs, q, "negatives");
  TORCH_CHECK_VALUE(q.dim() == 2 && p.sizes() == q.sizes() && negs.dim() == 3 && negs.size(0) == q.size(0) &&
                        negs.size(2) == q.size(1),
                    "expected query [B, D], positive [B, D], negatives [B, n, D], got ", q.sizes(), ", ",
                    p.sizes(), ", ", negs.sizes());
  TORCH_CHECK_VALUE(p.scalar_type() == q.scalar_type() && negs.scalar_type() == q.scalar_type(),
                    "query, positive and negatives must share one dtype");
  TORCH_CHECK_VALUE(negs.size(1) <= kMaxNegativesEmb, "the CUDA kernel supports at most ", kMaxNegativesEmb,
                    " negatives per query, got ", negs.size(1));
}

at::Tensor margin_mse_emb_fwd(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                              const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction) {
  check_embeddings(query, positive, negatives);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = negatives.size(0), n = negatives.size(1);
  const auto tea = teacher.contiguous();
  const auto problem = make_problem(query, tea, B, n, teacher_is_scores, reduction);
  const auto q = unit_inner_stride(query), p = unit_inner_stride(positive), negs = unit_inner_stride(negatives);
  at::Tensor out = allocate_loss(q, reduction, B, n);
  at::Tensor ws = workspace(q, B);
  check_launch(margin_mse_emb_fwd_cuda(problem, embeddings(q, p, negs), out.data_ptr(), ws.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_mse_emb_bwd(const at::Tensor& grad, const at::Tensor& query,
                                                              const at::Tensor& positive,
                                                              const at::Tensor& negatives,
                                                              const at::Tensor& teacher, bool teacher_is_scores,
                                                              int64_t reduction) {
  check_embeddings(query, positive, negatives);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = negatives.size(0), n = negatives.size(1), D = negatives.size(2);
  const auto tea = teacher.contiguous();
  const auto problem = make_problem(query, tea, B, n, teacher_is_scores, reduction);
  const auto q = unit_inner_stride(query), p = unit_inner_stride(positive), negs = unit_inner_stride(negatives);
  const auto g = checked_grad(grad, q, reduction, B, n);
  at::Tensor grad_q = at::empty({B, D}, q.options());
  at::Tensor grad_p = at::empty({B, D}, q.options());
  at::Tensor grad_n = at::empty({B, n, D}, q.options());
  check_launch(margin_mse_emb_bwd_cuda(problem, embeddings(q, p, negs), g.data_ptr(), grad_q.data_ptr(),
                                       grad_p.data_ptr(), grad_n.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {grad_q, grad_p, grad_n};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("margin_mse_fwd", &margin_mse_fwd);
  m.impl("margin_mse_bwd", &margin_mse_bwd);
  m.impl("margin_mse_emb_fwd", &margin_mse_emb_fwd);
  m.impl("margin_mse_emb_bwd", &margin_mse_emb_bwd);
}

}  // namespace cuda
}  // namespace kdloss
