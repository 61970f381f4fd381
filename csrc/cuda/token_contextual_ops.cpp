// TRG contextual loss: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue; the op contract is documented once, in
// kdloss/_ops/token_contextual.py. Runs the similarity GEMMs chunk by chunk (cuBLAS through ATen;
// half-precision inputs accumulate into fp32 with bmm's out_dtype form) and the row kernels of
// token_contextual.cu on each chunk, so extra memory is a few chunk buffers of at most
// kChunkElements each, never a [B, N, N] tensor (spec §5.2–5.3).
//   gradient: per chunk, S and T (recomputed in the backward for reduction none; taken from the
//   forward's buffers when it precomputes the gradient of a scalar loss and one chunk holds all
//   rows), W = (dS + dSᵀ)/√Ds, grad rows = W · F_s
//   (for bf16/fp16 students W is split into hi + lo half-precision parts: two tensor-core GEMMs
//   with fp32 accumulation give the fp32 result to ~16 bits).
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "kdloss/cuda_ops_utils.h"
#include "kdloss/token_contextual_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int64_t kChunkElements = int64_t(1) << 24;  // B·rows·N per similarity buffer (64 MiB fp32)

struct Shape {
  int64_t B, N, Ds, Dt;
};

Shape check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.is_cuda(), "student must be a CUDA tensor");
  check_cuda(teacher, student, "teacher");
  dtype_code(student.scalar_type());
  dtype_code(teacher.scalar_type());
  TORCH_CHECK_VALUE(student.dim() == 3 && teacher.dim() == 3, "student and teacher must be [B, N, D]");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
                    "student and teacher must share B and N, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(2) > 0 && teacher.size(2) > 0, "token widths must be positive");
  return {student.size(0), student.size(1), student.size(2), teacher.size(2)};
}

// The GEMM operand of one side: detached, contiguous; fp64 when the accumulation is fp64, else
// fp32/bf16/fp16 as given (half precision multiplies on tensor cores, accumulating in fp32).
at::Tensor gemm_operand(const at::Tensor& x, at::ScalarType acc) {
  const auto t = x.scalar_type();
  const bool keep = acc == at::kDouble ? t == at::kDouble : t != at::kDouble;
  return (keep ? x.detach() : x.detach().to(acc)).contiguous();
}

int64_t chunk_rows(const Shape& s) { return std::clamp<int64_t>(kChunkElements / (s.B * s.N), 1, s.N); }

// A contiguous [B, rows, N] view at the start of a flat chunk buffer.
at::Tensor chunk_view(const at::Tensor& flat, const Shape& s, int64_t rows) {
  return flat.narrow(0, 0, s.B * rows * s.N).view({s.B, rows, s.N});
}

// out [B, rows, N] (acc) = x[:, i0 : i0 + rows] · x[b]ᵀ per image: raw dot products.
void gram_rows(at::Tensor out, const at::Tensor& x, int64_t i0, int64_t rows) {
  const at::Tensor a = x.narrow(1, i0, rows);
  const at::Tensor bt = x.transpose(1, 2);
  if (x.scalar_type() == out.scalar_type()) {
    at::bmm_out(out, a, bt);
  } else {
    at::bmm_out(out, a, bt, out.scalar_type());
  }
}

// The chunk's student and teacher similarity rows, computed into the starts of buf_s / buf_t.
std::pair<at::Tensor, at::Tensor> chunk_similarities(const at::Tensor& buf_s, const at::Tensor& buf_t,
                                                     const at::Tensor& xs, const at::Tensor& xt, const Shape& s,
                                                     int64_t i0, int64_t rows) {
  at::Tensor sims_s = chunk_view(buf_s, s, rows), sims_t = chunk_view(buf_t, s, rows);
  gram_rows(sims_s, xs, i0, rows);
  gram_rows(sims_t, xt, i0, rows);
  return {sims_s, sims_t};
}

ContextualChunk chunk_of(const Shape& s, at::ScalarType acc, int64_t i0, int64_t rows) {
  return {dtype_code(acc), s.B, s.N, i0, rows, 1.0 / std::sqrt(double(s.Ds)), 1.0 / std::sqrt(double(s.Dt))};
}

// Chunk buffers of the similarity rows (acc) and, for bf16/fp16 students, of the split weights.
struct ChunkBuffers {
  int64_t R;  // rows per chunk
  at::Tensor s, t, hi, lo, row_max;
  ChunkBuffers(const Shape& sh, const at::Tensor& xs, const at::TensorOptions& opts, bool split) : R(chunk_rows(sh)) {
    s = at::empty({sh.B * R * sh.N}, opts);
    t = at::empty({sh.B * R * sh.N}, opts);
    if (split) {
      hi = at::empty({sh.B * R * sh.N}, xs.options());
      lo = at::empty({sh.B * R * sh.N}, xs.options());
      row_max = at::empty({sh.B * R}, opts);
    }
  }
};

bool half_precision(const at::Tensor& xs) { return xs.scalar_type() == at::kBFloat16 || xs.scalar_type() == at::kHalf; }

// out [B, N, Ds] (any float dtype) ← ∂loss/∂student for the upstream gradient g: per chunk, S and T
// (recomputed, or, with `reuse`, the single chunk's similarities the forward left in buf), then
// W = (dS + dSᵀ)/√Ds and the rows W · F_s (one GEMM; two for bf16/fp16, hi + lo).
void gradient_into(at::Tensor& out, const at::Tensor& g, Reduction reduction, const at::Tensor& xs,
                   const at::Tensor& xt, const at::Tensor& stats_s, const at::Tensor& stats_t, const at::Tensor& rho,
                   const Shape& s, at::ScalarType acc, ChunkBuffers& buf, bool reuse) {
  const bool split = half_precision(xs);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t i0 = 0; i0 < s.N; i0 += buf.R) {
    const int64_t rows = std::min(buf.R, s.N - i0);
    const auto [sims_s, sims_t] = reuse ? std::make_pair(chunk_view(buf.s, s, rows), chunk_view(buf.t, s, rows))
                                        : chunk_similarities(buf.s, buf.t, xs, xt, s, i0, rows);
    check_launch(
        contextual_bwd_weights_cuda(chunk_of(s, acc, i0, rows), reduction, g.data_ptr(), stats_s.data_ptr(),
                                    stats_t.data_ptr(), rho.data_ptr(), sims_s.data_ptr(), sims_t.data_ptr(),
                                    split ? static_cast<int>(dtype_code(xs.scalar_type())) : kNoSplit,
                                    split ? buf.row_max.data_ptr() : nullptr, split ? buf.hi.data_ptr() : nullptr,
                                    split ? buf.lo.data_ptr() : nullptr, stream),
        "token_contextual");
    at::Tensor rows_grad;
    if (split) {
      rows_grad = at::bmm(chunk_view(buf.hi, s, rows), xs, at::kFloat);
      rows_grad.add_(at::bmm(chunk_view(buf.lo, s, rows), xs, at::kFloat));
      rows_grad.mul_(buf.row_max.narrow(0, 0, s.B * rows).view({s.B, rows, 1}));
    } else {
      rows_grad = at::bmm(sims_s, xs);
    }
    out.narrow(1, i0, rows).copy_(rows_grad);
  }
}

// Forward; with with_grad and a scalar reduction it also returns the gradient for an upstream
// gradient of 1 (accumulation dtype), computed while the similarities are at hand: when one chunk
// holds every row (B·N² ≤ kChunkElements) nothing is recomputed (3 GEMMs in all, 2 + 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_contextual_fwd(const at::Tensor& student,
                                                                                            const at::Tensor& teacher,
                                                                                            int64_t reduction_code,
                                                                                            bool with_grad) {
  const Shape s = check_inputs(student, teacher);
  const Reduction reduction = check_reduction(reduction_code);
  c10::cuda::CUDAGuard guard(student.device());
  // the chunk GEMMs pick their own dtypes: an enclosing autocast must not reroute them to fp16/bf16
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto acc = acc_type(student.scalar_type());
  const auto opts = student.options().dtype(acc);
  at::Tensor stats_s = at::zeros({2, s.B, s.N}, opts), stats_t = at::zeros({2, s.B, s.N}, opts);
  at::Tensor rho = at::zeros({s.B, s.N}, opts), row_loss = at::zeros({s.B, s.N}, opts);
  const bool precompute = with_grad && reduction != Reduction::kNone;
  at::Tensor grad_unit = at::empty(precompute ? student.sizes() : at::IntArrayRef{0}, opts);
  if (s.B > 0 && s.N > 0) {
    const at::Tensor xs = gemm_operand(student, acc), xt = gemm_operand(teacher, acc);
    ChunkBuffers buf(s, xs, opts, precompute && half_precision(xs));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t i0 = 0; i0 < s.N; i0 += buf.R) {
      const int64_t rows = std::min(buf.R, s.N - i0);
      const auto [sims_s, sims_t] = chunk_similarities(buf.s, buf.t, xs, xt, s, i0, rows);
      check_launch(
          contextual_fwd_rows_cuda(chunk_of(s, acc, i0, rows), sims_s.data_ptr(), sims_t.data_ptr(), stats_s.data_ptr(),
                                   stats_t.data_ptr(), rho.data_ptr(), row_loss.data_ptr(), stream),
          "token_contextual");
    }
    if (precompute) {
      const at::Tensor one = at::ones({}, opts);
      gradient_into(grad_unit, one, reduction, xs, xt, stats_s, stats_t, rho, s, acc, buf, buf.R >= s.N);
    }
  }
  // the loss is returned in the accumulation dtype (rounded to the student's in Python outside autocast)
  at::Tensor loss;
  if (reduction == Reduction::kNone) {
    loss = s.N > 0 ? row_loss.div(double(s.N)) : row_loss;
  } else {
    loss = row_loss.sum();
    if (reduction == Reduction::kMean && s.B * s.N > 0) loss = loss.div(double(s.B) * double(s.N) * double(s.N));
  }
  return {loss, stats_s, stats_t, rho, grad_unit};
}

// t must be a CUDA tensor of dtype acc and shape `lead` + [B, N].
void check_row_state(const at::Tensor& t, const at::Tensor& student, const Shape& s, at::ScalarType acc,
                     const char* name, bool stats) {
  check_cuda(t, student, name);
  const bool shape_ok = stats ? t.dim() == 3 && t.size(0) == 2 && t.size(1) == s.B && t.size(2) == s.N
                              : t.dim() == 2 && t.size(0) == s.B && t.size(1) == s.N;
  TORCH_CHECK_VALUE(t.scalar_type() == acc && shape_ok, name, " must be ", stats ? "[2, B, N]" : "[B, N]", " of dtype ",
                    acc, ", got ", t.sizes(), " ", t.scalar_type());
}

at::Tensor token_contextual_bwd(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& stats_s_in, const at::Tensor& stats_t_in, const at::Tensor& rho_in,
                                int64_t reduction_code) {
  const Shape s = check_inputs(student, teacher);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student.scalar_type());
  check_row_state(stats_s_in, student, s, acc, "stats_student", true);
  check_row_state(stats_t_in, student, s, acc, "stats_teacher", true);
  check_row_state(rho_in, student, s, acc, "rho", false);
  const at::Tensor g = checked_grad(grad, student, reduction, {s.B, s.N}, acc);
  c10::cuda::CUDAGuard guard(student.device());
  // the chunk GEMMs pick their own dtypes: an enclosing autocast must not reroute them to fp16/bf16
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  if (student.numel() == 0) return grad_student;
  const auto opts = student.options().dtype(acc);
  const at::Tensor xs = gemm_operand(student, acc), xt = gemm_operand(teacher, acc);
  const at::Tensor stats_s = stats_s_in.contiguous(), stats_t = stats_t_in.contiguous(), rho = rho_in.contiguous();
  ChunkBuffers buf(s, xs, opts, half_precision(xs));
  gradient_into(grad_student, g, reduction, xs, xt, stats_s, stats_t, rho, s, acc, buf, false);
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("token_contextual_fwd", &token_contextual_fwd);
  m.impl("token_contextual_bwd", &token_contextual_bwd);
}

}  // namespace cuda
}  // namespace kdloss
