// PLD: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue around the launchers in plackett_luce.cu.
// Validates what the kernels rely on, allocates outputs and workspaces, launches on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/plackett_luce_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

// Validated inputs of one call and the launcher's problem description.
struct Call {
  at::Tensor student, teacher, labels, permutation;
  PlackettLuceProblem problem;
};

Call prepare(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
             const c10::optional<at::Tensor>& teacher_permutation, double temperature, int64_t ignore_index,
             int64_t reduction_code) {
  TORCH_CHECK_VALUE(student.is_cuda(), "student_logits must be a CUDA tensor");
  const Reduction reduction = check_reduction(reduction_code);
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be [R, C], got ", student.sizes());
  const int64_t R = student.size(0), C = student.size(1);
  TORCH_CHECK_VALUE(C >= 1, "student_logits must have at least one class, got C = ", C);
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 classes are supported");
  TORCH_CHECK_VALUE(R <= std::numeric_limits<int32_t>::max(), "the CUDA kernel supports at most 2^31 - 1 rows, got ",
                    R);
  check_cuda(teacher, student, "teacher_logits");
  check_cuda(labels, student, "labels");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher_logits must have shape ", student.sizes(), ", got ",
                    teacher.sizes());
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc, "teacher_logits must be ", acc, ", got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == R,
                    "labels must be int64 of shape [", R, "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
  Call call{unit_inner_stride(student), teacher.contiguous(), labels.contiguous(), at::Tensor(), {}};
  if (teacher_permutation.has_value()) {
    const auto& perm = *teacher_permutation;
    check_cuda(perm, student, "teacher_permutation");
    TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong && perm.sizes() == student.sizes(),
                      "teacher_permutation must be int64 of shape ", student.sizes(), ", got ", perm.scalar_type(), " ",
                      perm.sizes());
    call.permutation = perm.contiguous();
  }
  call.problem = {dtype_code(student.scalar_type()),
                  R,
                  C,
                  call.student.data_ptr(),
                  R > 0 ? call.student.stride(0) : C,
                  call.teacher.data_ptr(),
                  call.labels.data_ptr<int64_t>(),
                  call.permutation.defined() ? call.permutation.data_ptr<int64_t>() : nullptr,
                  temperature,
                  ignore_index,
                  reduction};
  return call;
}

std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& labels,
                                                     const c10::optional<at::Tensor>& teacher_permutation,
                                                     const at::Tensor& temperature, int64_t ignore_index,
                                                     int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Call call = prepare(student, teacher, labels, teacher_permutation, float_arg(temperature, "temperature"),
                            ignore_index, reduction);
  const auto& p = call.problem;
  // the loss is returned in the accumulation dtype (rounded to the student's in Python outside autocast)
  const auto loss_opts = call.student.options().dtype(acc_type(call.student.scalar_type()));
  at::Tensor out = p.reduction == Reduction::kNone ? at::empty({p.rows}, loss_opts) : at::empty({}, loss_opts);
  at::Tensor order = at::empty({p.rows, p.classes}, call.student.options().dtype(at::kInt));
  size_t bytes = 0;
  check_launch(plackett_luce_fwd_workspace(p, &bytes), "plackett_luce");
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, call.student.options().dtype(at::kByte));
  check_launch(plackett_luce_fwd_cuda(p, out.data_ptr(), order.data_ptr<int32_t>(), ws.data_ptr(), bytes,
                                      c10::cuda::getCurrentCUDAStream()),
               "plackett_luce");
  return {out, order};
}

at::Tensor plackett_luce_bwd(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& labels, const at::Tensor& order, const at::Tensor& temperature,
                             int64_t ignore_index, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Call call =
      prepare(student, teacher, labels, c10::nullopt, float_arg(temperature, "temperature"), ignore_index, reduction);
  const auto& p = call.problem;
  const auto g = checked_grad(grad, student, p.reduction, {p.rows}, acc_type(student.scalar_type()));
  check_cuda(order, student, "order");
  TORCH_CHECK_VALUE(order.scalar_type() == at::kInt && order.sizes() == student.sizes(),
                    "order must be int32 of shape ", student.sizes(), ", got ", order.scalar_type(), " ",
                    order.sizes());
  const auto ord = order.contiguous();
  at::Tensor grad_student = at::zeros({p.rows, p.classes}, call.student.options());
  const size_t bytes = plackett_luce_bwd_workspace(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, call.student.options().dtype(at::kByte));
  check_launch(plackett_luce_bwd_cuda(p, ord.data_ptr<int32_t>(), g.data_ptr(), grad_student.data_ptr(), ws.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()),
               "plackett_luce");
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("plackett_luce_fwd", &plackett_luce_fwd);
  m.impl("plackett_luce_bwd", &plackett_luce_bwd);
}

}  // namespace cuda
}  // namespace kdloss
