// TRG graph loss: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in token_graph.cu.
// Validates what the kernels rely on (shapes, dtypes, devices; neighbour values are range-checked in
// Python — a device-side check would need a host sync — and out-of-range entries act as self-edges
// in the kernels), allocates outputs, builds the backward's transposed edge list with a stable
// device sort (no host sync), and launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/token_graph_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

// Validated, contiguous inputs of one call and the launcher's problem description.
struct Call {
  at::Tensor student, teacher, neighbours;
  TokenGraphProblem problem;
};

Call prepare(const at::Tensor& student_in, const at::Tensor* teacher_in, const at::Tensor& neighbours_in, double sigma,
             int64_t edge, int64_t direction, int64_t reduction_code) {
  TORCH_CHECK_VALUE(student_in.is_cuda(), "student must be a CUDA tensor");
  TORCH_CHECK_VALUE(student_in.dim() == 2, "student must be [M, Ds], got ", student_in.sizes());
  const Reduction reduction = check_reduction(reduction_code);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, "sigma must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(edge == 0 || edge == 1, "edge code must be 0 or 1, got ", edge);
  TORCH_CHECK_VALUE(direction == 0 || direction == 1, "direction code must be 0 or 1, got ", direction);
  const int64_t M = student_in.size(0);
  check_cuda(neighbours_in, student_in, "neighbours");
  TORCH_CHECK_VALUE(neighbours_in.scalar_type() == at::kLong && neighbours_in.dim() == 2 && neighbours_in.size(0) == M,
                    "neighbours must be an int64 tensor [M, k] with M = ", M, ", got ", neighbours_in.scalar_type(),
                    " ", neighbours_in.sizes());
  Call call{student_in.contiguous(), at::Tensor(), neighbours_in.contiguous(), {}};
  int64_t dt = 0;
  if (teacher_in) {
    const auto acc = acc_type(student_in.scalar_type());
    check_cuda(*teacher_in, student_in, "teacher");
    TORCH_CHECK_VALUE(teacher_in->dim() == 2 && teacher_in->size(0) == M && teacher_in->scalar_type() == acc,
                      "teacher must be [M, Dt] with M = ", M, " and dtype ", acc, ", got ", teacher_in->sizes(), " ",
                      teacher_in->scalar_type());
    call.teacher = teacher_in->contiguous();
    dt = call.teacher.size(1);
  }
  call.problem = {dtype_code(student_in.scalar_type()),
                  M,
                  call.neighbours.size(1),
                  student_in.size(1),
                  dt,
                  call.student.data_ptr(),
                  teacher_in ? call.teacher.data_ptr() : nullptr,
                  call.neighbours.data_ptr<int64_t>(),
                  sigma,
                  static_cast<int>(edge),
                  static_cast<int>(direction),
                  reduction};
  return call;
}

std::tuple<at::Tensor, at::Tensor> token_graph_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& neighbours, const at::Tensor& sigma, int64_t edge,
                                                   int64_t direction, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student.device());
  const auto call = prepare(student, &teacher, neighbours, float_arg(sigma, "sigma"), edge, direction, reduction);
  const int64_t M = call.problem.nodes, k = call.problem.k;
  const auto acc_options = call.student.options().dtype(acc_type(call.student.scalar_type()));
  // the loss is returned in the accumulation dtype (rounded to the student's in Python outside autocast)
  at::Tensor loss =
      call.problem.reduction == Reduction::kNone ? at::empty({M}, acc_options) : at::empty({}, acc_options);
  at::Tensor coef = at::empty({M, k}, acc_options);
  at::Tensor workspace = at::empty({token_graph_workspace_size(M, k)}, acc_options);
  check_launch(token_graph_fwd_cuda(call.problem, loss.data_ptr(), coef.data_ptr(), workspace.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               "token_graph");
  return {loss, coef};
}

at::Tensor token_graph_bwd(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& neighbours,
                           const at::Tensor& coef, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student.device());
  const auto call = prepare(student, nullptr, neighbours, 1.0, 0, 0, reduction);
  const int64_t M = call.problem.nodes, k = call.problem.k;
  const auto acc = acc_type(call.student.scalar_type());
  check_cuda(coef, call.student, "coef");
  TORCH_CHECK_VALUE(coef.scalar_type() == acc && coef.sizes() == call.neighbours.sizes(),
                    "coef must be [M, k] of dtype ", acc, ", got ", coef.sizes(), " ", coef.scalar_type());
  const auto g = checked_grad(grad, call.student, call.problem.reduction, {M}, acc);
  at::Tensor out = at::empty({M, call.problem.ds}, call.student.options());
  if (out.numel() == 0) return out;
  const auto c = coef.contiguous();
  const auto index_options = call.neighbours.options();
  at::Tensor in_start = at::empty({M + 1}, index_options), in_edge = at::empty({M * k}, index_options);
  if (M * k > 0) {
    // CSR by neighbour: stable sort of the flat targets gives the edge ids grouped by target in
    // ascending order; row starts by binary search (out-of-range targets fall outside every row).
    auto sorted = at::sort(call.neighbours.reshape({M * k}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    in_edge = std::get<1>(sorted).contiguous();
    in_start = at::searchsorted(std::get<0>(sorted), at::arange(M + 1, index_options)).contiguous();
  }
  check_launch(token_graph_bwd_cuda(call.problem, g.data_ptr(), c.data_ptr(), in_start.data_ptr<int64_t>(),
                                    in_edge.data_ptr<int64_t>(), out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "token_graph");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("token_graph_fwd", &token_graph_fwd);
  m.impl("token_graph_bwd", &token_graph_bwd);
}

}  // namespace cuda
}  // namespace kdloss
