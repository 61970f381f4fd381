// TRG contextual loss: TORCH_LIBRARY_IMPL(kdloss, CUDA) glue; the op contract is documented once, in
// kdloss/_ops/token_contextual.py. Runs the similarity GEMMs chunk by chunk (cuBLAS through ATen;
// half-precision inputs accumulate into fp32 with bmm's out_dtype form) and the row kernels of
// token_contextual.cu on each chunk, so extra memory is a few chunk buffers of at most
// kChunkElements each, never a [B, N, N] tensor (spec §5.2–5.3).
//   chunks: whole images when one image's N² fits a chunk (then S = F Fᵀ is multiplied by blocks of
//   its lower triangle, mirrored), else rows [i0, i0 + R) of every image;
//   gradient: per chunk, S and T (the forward's own, when it precomputes the gradient of a scalar
//   loss chunked by images; recomputed otherwise), W = (dS + dSᵀ)/√Ds, grad rows = W · F_s
//   (for bf16/fp16 students W is split into hi + lo half-precision parts: two tensor-core GEMMs
//   with fp32 accumulation give the fp32 result to ~16 bits).
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

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

// How the similarities are cut into chunks of at most kChunkElements: whole images (all N rows of
// `group` images at a time) when one image's N² fits, so every row's statistics are complete inside
// its chunk and S = F Fᵀ can be multiplied by blocks of its lower triangle; otherwise rows
// [i0, i0 + R) of every image.
struct Plan {
  bool by_images;
  int64_t group, R;
};

Plan plan_of(const Shape& s) {
  if (s.N * s.N <= kChunkElements) return {true, std::clamp<int64_t>(kChunkElements / (s.N * s.N), 1, s.B), s.N};
  return {false, s.B, std::clamp<int64_t>(kChunkElements / (s.B * s.N), 1, s.N)};
}

// The chunks of a plan, in order.
std::vector<ContextualChunk> chunks_of(const Plan& plan, const Shape& s, at::ScalarType acc) {
  std::vector<ContextualChunk> out;
  const double scale_s = 1.0 / std::sqrt(double(s.Ds)), scale_t = 1.0 / std::sqrt(double(s.Dt));
  if (plan.by_images) {
    for (int64_t b0 = 0; b0 < s.B; b0 += plan.group)
      out.push_back({dtype_code(acc), s.B, s.N, 0, s.N, scale_s, scale_t, b0, std::min(plan.group, s.B - b0)});
  } else {
    for (int64_t i0 = 0; i0 < s.N; i0 += plan.R)
      out.push_back({dtype_code(acc), s.B, s.N, i0, std::min(plan.R, s.N - i0), scale_s, scale_t, 0, s.B});
  }
  return out;
}

// A contiguous [images, rows, N] view at the start of a flat chunk buffer.
at::Tensor chunk_view(const at::Tensor& flat, const ContextualChunk& c) {
  return flat.narrow(0, 0, c.images * c.rows * c.n).view({c.images, c.rows, c.n});
}

// a · b (batched) in out's dtype (fp32 accumulation for bf16/fp16 operands).
at::Tensor product(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  return a.scalar_type() == out_dtype ? at::bmm(a, b) : at::bmm(a, b, out_dtype);
}

// Diagonal blocks of the symmetric product: at most kSymBlocks per side, at least kSymMinRows rows
// each (smaller products would be launch-bound).
constexpr int64_t kSymBlocks = 4, kSymMinRows = 256;

// out [images, N, N] (acc) = x xᵀ per image, raw dot products. Only the blocks on and below the
// diagonal are multiplied; each block below it is also copied, transposed, above it: for N ≥ 512
// that is 3/4 (2 blocks) down to 10/16 (4 blocks) of the full product's FLOPs.
void symmetric_gram(at::Tensor out, const at::Tensor& x) {
  const int64_t N = x.size(1);
  const int64_t blocks = std::clamp<int64_t>(N / kSymMinRows, 1, kSymBlocks);
  const auto dtype = out.scalar_type();
  if (blocks == 1) {
    if (x.scalar_type() == dtype) {
      at::bmm_out(out, x, x.transpose(1, 2));
    } else {
      at::bmm_out(out, x, x.transpose(1, 2), dtype);
    }
    return;
  }
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t i0 = bi * N / blocks, ni = (bi + 1) * N / blocks - i0;
    for (int64_t bj = 0; bj <= bi; ++bj) {
      const int64_t j0 = bj * N / blocks, nj = (bj + 1) * N / blocks - j0;
      const at::Tensor block = product(x.narrow(1, i0, ni), x.narrow(1, j0, nj).transpose(1, 2), dtype);
      out.narrow(1, i0, ni).narrow(2, j0, nj).copy_(block);
      if (bj < bi) out.narrow(1, j0, nj).narrow(2, i0, ni).copy_(block.transpose(1, 2));
    }
  }
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
                                                     const at::Tensor& xs, const at::Tensor& xt,
                                                     const ContextualChunk& c) {
  at::Tensor sims_s = chunk_view(buf_s, c), sims_t = chunk_view(buf_t, c);
  if (c.rows == c.n) {  // whole images
    symmetric_gram(sims_s, xs.narrow(0, c.b0, c.images));
    symmetric_gram(sims_t, xt.narrow(0, c.b0, c.images));
  } else {
    gram_rows(sims_s, xs, c.i0, c.rows);
    gram_rows(sims_t, xt, c.i0, c.rows);
  }
  return {sims_s, sims_t};
}

// Chunk buffers of the similarity rows (acc) and, for bf16/fp16 students, of the split weights.
struct ChunkBuffers {
  at::Tensor s, t, hi, lo, row_max;
  ChunkBuffers(const Plan& plan, const Shape& sh, const at::Tensor& xs, const at::TensorOptions& opts, bool split) {
    const int64_t rows = plan.group * plan.R;  // rows of one chunk, all images
    s = at::empty({rows * sh.N}, opts);
    t = at::empty({rows * sh.N}, opts);
    if (split) {
      hi = at::empty({rows * sh.N}, xs.options());
      lo = at::empty({rows * sh.N}, xs.options());
      row_max = at::empty({rows}, opts);
    }
  }
};

bool half_precision(const at::Tensor& xs) { return xs.scalar_type() == at::kBFloat16 || xs.scalar_type() == at::kHalf; }

// out's rows of chunk c ← ∂loss/∂student for the upstream gradient g, from the chunk's similarities
// (overwritten): W = (dS + dSᵀ)/√Ds by the weights kernel, then the rows W · F_s (one GEMM; two for
// bf16/fp16 students, hi + lo).
void chunk_gradient(at::Tensor& out, const at::Tensor& g, Reduction reduction, const at::Tensor& xs,
                    const at::Tensor& stats_s, const at::Tensor& stats_t, const at::Tensor& rho,
                    const ContextualChunk& c, const at::Tensor& sims_s, const at::Tensor& sims_t, ChunkBuffers& buf) {
  const bool split = half_precision(xs);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(
      contextual_bwd_weights_cuda(c, reduction, g.data_ptr(), stats_s.data_ptr(), stats_t.data_ptr(), rho.data_ptr(),
                                  sims_s.data_ptr(), sims_t.data_ptr(),
                                  split ? static_cast<int>(dtype_code(xs.scalar_type())) : kNoSplit,
                                  split ? buf.row_max.data_ptr() : nullptr, split ? buf.hi.data_ptr() : nullptr,
                                  split ? buf.lo.data_ptr() : nullptr, stream),
      "token_contextual");
  const at::Tensor x = xs.narrow(0, c.b0, c.images);
  at::Tensor rows_grad;
  if (split) {
    rows_grad = at::bmm(chunk_view(buf.hi, c), x, at::kFloat);
    rows_grad.add_(at::bmm(chunk_view(buf.lo, c), x, at::kFloat));
    rows_grad.mul_(buf.row_max.narrow(0, 0, c.images * c.rows).view({c.images, c.rows, 1}));
  } else {
    rows_grad = at::bmm(sims_s, x);
  }
  out.narrow(0, c.b0, c.images).narrow(1, c.i0, c.rows).copy_(rows_grad);
}

// Forward; with with_grad and a scalar reduction it also returns the gradient for an upstream
// gradient of 1 (accumulation dtype), computed while the similarities are at hand. Chunked by whole
// images (N² ≤ kChunkElements) nothing is recomputed: per chunk the symmetric products, the row
// kernel, the weights kernel and one gradient GEMM. Chunked by rows, the gradient needs every row's
// statistics first, so a second pass recomputes the similarities.
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
    const Plan plan = plan_of(s);
    ChunkBuffers buf(plan, s, xs, opts, precompute && half_precision(xs));
    const at::Tensor one = at::ones({}, opts);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto chunks = chunks_of(plan, s, acc);
    for (const ContextualChunk& c : chunks) {
      const auto [sims_s, sims_t] = chunk_similarities(buf.s, buf.t, xs, xt, c);
      check_launch(contextual_fwd_rows_cuda(c, sims_s.data_ptr(), sims_t.data_ptr(), stats_s.data_ptr(),
                                            stats_t.data_ptr(), rho.data_ptr(), row_loss.data_ptr(), stream),
                   "token_contextual");
      if (precompute && plan.by_images)
        chunk_gradient(grad_unit, one, reduction, xs, stats_s, stats_t, rho, c, sims_s, sims_t, buf);
    }
    if (precompute && !plan.by_images) {
      for (const ContextualChunk& c : chunks) {
        const auto [sims_s, sims_t] = chunk_similarities(buf.s, buf.t, xs, xt, c);
        chunk_gradient(grad_unit, one, reduction, xs, stats_s, stats_t, rho, c, sims_s, sims_t, buf);
      }
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
  const Plan plan = plan_of(s);
  ChunkBuffers buf(plan, s, xs, opts, half_precision(xs));
  for (const ContextualChunk& c : chunks_of(plan, s, acc)) {
    const auto [sims_s, sims_t] = chunk_similarities(buf.s, buf.t, xs, xt, c);
    chunk_gradient(grad_student, g, reduction, xs, stats_s, stats_t, rho, c, sims_s, sims_t, buf);
  }
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CUDA, m) {
  m.impl("token_contextual_fwd", &token_contextual_fwd);
  m.impl("token_contextual_bwd", &token_contextual_bwd);
}

}  // namespace cuda
}  // namespace kdloss
