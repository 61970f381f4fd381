// Margin-MSE: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in margin_mse.cu.
// Validates what the kernels rely on, allocates outputs, and launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/margin_mse_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

// Shared memory holds 2·(n+1) accumulators per block (emb kernels); 48 KiB default limit.
constexpr int64_t kMaxNegativesEmb = 2047;

void check_launch(cudaError_t err) { cuda::check_launch(err, "margin_mse"); }

MarginMSEProblem make_problem(const at::Tensor& student, const at::Tensor& teacher, int64_t B, int64_t n,
                              bool teacher_is_scores, Reduction reduction) {
  check_cuda(teacher, student, "teacher");
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc, "teacher must be ", acc, ", got ", teacher.scalar_type());
  const int64_t cols = teacher_is_scores ? n + 1 : n;
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == B && teacher.size(1) == cols, "teacher must have shape [",
                    B, ", ", cols, "], got ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.is_contiguous(), "teacher must be contiguous");
  return {dtype_code(student.scalar_type()), B, n, teacher.data_ptr(), teacher_is_scores, reduction};
}

// The loss is returned in the accumulation dtype (rounded to the students' dtype in Python outside autocast).
at::Tensor allocate_loss(const at::Tensor& like, Reduction reduction, int64_t B, int64_t n) {
  const auto opts = like.options().dtype(acc_type(like.scalar_type()));
  return reduction == Reduction::kNone ? at::empty({B, n}, opts) : at::empty({}, opts);
}

at::Tensor workspace(const at::Tensor& like, int64_t B) {
  // the kernels' wide type: fp64 for fp32 and fp64 data, fp32 for bf16/fp16
  const auto st = like.scalar_type();
  const auto wide = st == at::kDouble || st == at::kFloat ? at::kDouble : at::kFloat;
  return at::empty({margin_mse_workspace_size(B)}, like.options().dtype(wide));
}

void check_scores(const at::Tensor& pos, const at::Tensor& neg) {
  TORCH_CHECK_VALUE(pos.is_cuda(), "student_pos must be a CUDA tensor");
  check_cuda(neg, pos, "student_neg");
  TORCH_CHECK_VALUE(pos.dim() == 1 && neg.dim() == 2 && neg.size(0) == pos.size(0),
                    "expected student_pos [B] and student_neg [B, n], got ", pos.sizes(), " and ", neg.sizes());
  TORCH_CHECK_VALUE(neg.scalar_type() == pos.scalar_type(), "student_neg must have the dtype of student_pos");
}

// Validated, contiguous inputs of one scores call and the launcher's problem description.
struct ScoresCall {
  at::Tensor pos, neg, tea;
  int64_t B, n;
  MarginMSEProblem problem;
  MarginMSEScores scores() const { return {pos.data_ptr(), neg.data_ptr()}; }
};

ScoresCall prepare_scores(const at::Tensor& student_pos, const at::Tensor& student_neg, const at::Tensor& teacher,
                          bool teacher_is_scores, int64_t reduction_code) {
  check_scores(student_pos, student_neg);
  const Reduction reduction = check_reduction(reduction_code);
  ScoresCall call{student_pos.contiguous(), student_neg.contiguous(), teacher.contiguous(),
                  student_neg.size(0),      student_neg.size(1),      {}};
  call.problem = make_problem(call.pos, call.tea, call.B, call.n, teacher_is_scores, reduction);
  return call;
}

at::Tensor margin_mse_fwd(const at::Tensor& student_pos, const at::Tensor& student_neg, const at::Tensor& teacher,
                          bool teacher_is_scores, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student_pos.device());
  const auto call = prepare_scores(student_pos, student_neg, teacher, teacher_is_scores, reduction);
  at::Tensor out = allocate_loss(call.pos, call.problem.reduction, call.B, call.n);
  at::Tensor ws = workspace(call.pos, call.B);
  check_launch(margin_mse_fwd_cuda(call.problem, call.scores(), out.data_ptr(), ws.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> margin_mse_bwd(const at::Tensor& grad, const at::Tensor& student_pos,
                                                  const at::Tensor& student_neg, const at::Tensor& teacher,
                                                  bool teacher_is_scores, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student_pos.device());
  const auto call = prepare_scores(student_pos, student_neg, teacher, teacher_is_scores, reduction);
  const auto g =
      checked_grad(grad, call.pos, call.problem.reduction, {call.B, call.n}, acc_type(call.pos.scalar_type()));
  at::Tensor grad_pos = at::empty({call.B}, call.pos.options());
  at::Tensor grad_neg = at::empty({call.B, call.n}, call.pos.options());
  check_launch(margin_mse_bwd_cuda(call.problem, call.scores(), g.data_ptr(), grad_pos.data_ptr(), grad_neg.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()));
  return {grad_pos, grad_neg};
}

MarginMSEEmbeddings embeddings(const at::Tensor& q, const at::Tensor& p, const at::Tensor& negs) {
  return {q.data_ptr(), p.data_ptr(), negs.data_ptr(), q.size(1),
          q.stride(0),  p.stride(0),  negs.stride(0),  negs.stride(1)};
}

void check_embeddings(const at::Tensor& q, const at::Tensor& p, const at::Tensor& negs) {
  TORCH_CHECK_VALUE(q.is_cuda(), "query must be a CUDA tensor");
  check_cuda(p, q, "positive");
  check_cuda(negs, q, "negatives");
  TORCH_CHECK_VALUE(q.dim() == 2 && p.sizes() == q.sizes() && negs.dim() == 3 && negs.size(0) == q.size(0) &&
                        negs.size(2) == q.size(1),
                    "expected query [B, D], positive [B, D], negatives [B, n, D], got ", q.sizes(), ", ", p.sizes(),
                    ", ", negs.sizes());
  TORCH_CHECK_VALUE(p.scalar_type() == q.scalar_type() && negs.scalar_type() == q.scalar_type(),
                    "query, positive and negatives must share one dtype");
  TORCH_CHECK_VALUE(negs.size(1) <= kMaxNegativesEmb, "the CUDA kernel supports at most ", kMaxNegativesEmb,
                    " negatives per query, got ", negs.size(1));
}

// Validated inputs (unit inner stride) of one embeddings call and the launcher's problem.
struct EmbeddingsCall {
  at::Tensor q, p, negs, tea;
  int64_t B, n, D;
  MarginMSEProblem problem;
  MarginMSEEmbeddings rows() const { return embeddings(q, p, negs); }
};

EmbeddingsCall prepare_embeddings(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                                  const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction_code) {
  check_embeddings(query, positive, negatives);
  const Reduction reduction = check_reduction(reduction_code);
  EmbeddingsCall call{unit_inner_stride(query),
                      unit_inner_stride(positive),
                      unit_inner_stride(negatives),
                      teacher.contiguous(),
                      negatives.size(0),
                      negatives.size(1),
                      negatives.size(2),
                      {}};
  call.problem = make_problem(call.q, call.tea, call.B, call.n, teacher_is_scores, reduction);
  return call;
}

at::Tensor margin_mse_emb_fwd(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                              const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(query.device());
  const auto call = prepare_embeddings(query, positive, negatives, teacher, teacher_is_scores, reduction);
  at::Tensor out = allocate_loss(call.q, call.problem.reduction, call.B, call.n);
  at::Tensor ws = workspace(call.q, call.B);
  check_launch(margin_mse_emb_fwd_cuda(call.problem, call.rows(), out.data_ptr(), ws.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_mse_emb_bwd(const at::Tensor& grad, const at::Tensor& query,
                                                                  const at::Tensor& positive,
                                                                  const at::Tensor& negatives,
                                                                  const at::Tensor& teacher, bool teacher_is_scores,
                                                                  int64_t reduction) {
  const c10::cuda::CUDAGuard guard(query.device());
  const auto call = prepare_embeddings(query, positive, negatives, teacher, teacher_is_scores, reduction);
  const auto g = checked_grad(grad, call.q, call.problem.reduction, {call.B, call.n}, acc_type(call.q.scalar_type()));
  at::Tensor grad_q = at::empty({call.B, call.D}, call.q.options());
  at::Tensor grad_p = at::empty({call.B, call.D}, call.q.options());
  at::Tensor grad_n = at::empty({call.B, call.n, call.D}, call.q.options());
  check_launch(margin_mse_emb_bwd_cuda(call.problem, call.rows(), g.data_ptr(), grad_q.data_ptr(), grad_p.data_ptr(),
                                       grad_n.data_ptr(), c10::cuda::getCurrentCUDAStream()));
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
