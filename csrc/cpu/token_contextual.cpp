// TRG token-wise contextual loss, CPU kernels (spec §5.2–5.3). Schemas live in
// kdloss/_ops/token_contextual.py; this file only implements them for the CPU dispatch key.
//
//   student [B, N, Ds] (any float dtype), teacher [B, N, Dt] (accumulation dtype, a constant)
//   S = F_s F_sᵀ/√Ds, T = F_t F_tᵀ/√Dt per image; A = softmax_row(S), P = softmax_row(T)
//   loss = Σ_{b,i,j} (P − A)² / (B·N·N)   (reduction 1; 2 = sum; 0 = [B, N] row means)
//
// Nothing of size N×N is ever stored: work is split into tiles of kTile rows of one image; a tile
// computes its kTile×N similarity rows from the features (dot products vectorised over D) into a
// per-task buffer, uses them and drops them. The forward saves the per-row log-sum-exps of S and T
// (O(B·N)). The backward (spec §5.3) with c_i the per-row scale of G = c (A − P):
//   r_i  = c_i Σ_j (A_ij − P_ij) A_ij                          (pass 1, O(B·N) saved)
//   W_kj = A_kj (c_k(A_kj − P_kj) − r_k) + A_jk (c_j(A_jk − P_jk) − r_j)   (dS + dSᵀ, row k)
//   ∂L/∂F_s[k] = Σ_j W_kj F_s[j] / √Ds                          (pass 2)
// S and T are symmetric, so A_jk = exp(S_kj − lse_s[j]) comes from row k's similarities too: each
// task writes only its own gradient rows (no scatter, no atomics). Reductions go through
// per-row partials and ordered_sum, so results do not depend on the thread count.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kdloss/cpu_exp.h"
#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

constexpr int64_t kNone = 0, kMean = 1, kSum = 2;
constexpr int64_t kTile = 4;

// sims[r·N + j] = scale · ⟨x[i0 + r], x[j]⟩ for r < rows ≤ kTile, j < N; x is one image [N, D].
template <typename in_t>
void similarity_tile(const in_t* x, int64_t N, int64_t D, int64_t i0, int64_t rows, Acc<in_t> scale,
                     Acc<in_t>* sims) {
  using IO = VecIO<in_t>;
  using Vec = typename IO::Vec;
  using acc_t = Acc<in_t>;
  constexpr int64_t V = IO::size();
  for (int64_t j = 0; j < N; ++j) {
    const in_t* xj = x + j * D;
    Vec acc[kTile];
    for (int64_t r = 0; r < kTile; ++r) acc[r] = Vec(acc_t(0));
    int64_t d = 0;
    for (; d + V <= D; d += V) {
      const Vec c = IO::load(xj + d);
      for (int64_t r = 0; r < rows; ++r) acc[r] = at::vec::fmadd(IO::load(x + (i0 + r) * D + d), c, acc[r]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      acc_t s = vec_sum(acc[r]);
      const in_t* xi = x + (i0 + r) * D;
      for (int64_t dd = d; dd < D; ++dd) s += static_cast<acc_t>(xi[dd]) * static_cast<acc_t>(xj[dd]);
      sims[r * N + j] = s * scale;
    }
  }
}

// log Σ_j exp(v[j]) of one row (max-subtracted; N ≥ 1).
template <typename acc_t>
acc_t row_lse(const acc_t* v, int64_t N) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (N >= V) {
    Vec vm = Vec::loadu(v);
    for (j = V; j + V <= N; j += V) vm = at::vec::maximum(vm, Vec::loadu(v + j));
    m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < N; ++j) m = std::max(m, v[j]);
  const Vec vmax(m);
  Vec vs(acc_t(0));
  for (j = 0; j + V <= N; j += V) vs = vs + vexp(Vec::loadu(v + j) - vmax);
  acc_t s = vec_sum(vs);
  for (; j < N; ++j) s += std::exp(v[j] - m);
  return m + std::log(s);
}

struct Problem {
  int64_t B, N, Ds, Dt;
  double scale_s, scale_t;
};

Problem problem_of(const at::Tensor& student, const at::Tensor& teacher) {
  check_cpu_float(student, "student");
  check_cpu_float(teacher, "teacher");
  TORCH_CHECK_VALUE(student.dim() == 3 && teacher.dim() == 3, "student and teacher must be [B, N, D]");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
                    "student and teacher must share B and N, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(2) > 0 && teacher.size(2) > 0, "token widths must be positive");
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc, "teacher must be in the accumulation dtype ", acc,
                    ", got ", teacher.scalar_type());
  Problem p{student.size(0), student.size(1), student.size(2), teacher.size(2), 0, 0};
  p.scale_s = 1.0 / std::sqrt(static_cast<double>(p.Ds));
  p.scale_t = 1.0 / std::sqrt(static_cast<double>(p.Dt));
  return p;
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "reduction code must be 0, 1 or 2, got ", reduction);
}

// Runs body(b, i0, rows, sims_s, sims_t) over every tile of kTile rows, in parallel; the two
// buffers [kTile·N] hold the tile's student and teacher similarity rows.
template <typename scalar_t, typename Body>
void for_each_tile(const Problem& p, const scalar_t* xs, const Acc<scalar_t>* xt, const Body& body) {
  using acc_t = Acc<scalar_t>;
  const int64_t tiles_per_image = (p.N + kTile - 1) / kTile;
  const int64_t tiles = p.B * tiles_per_image;
  const int64_t work = kTile * p.N * (p.Ds + p.Dt);
  at::parallel_for(0, tiles, row_grain(work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sims_s(kTile * p.N), sims_t(kTile * p.N);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_image;
      const int64_t i0 = (tile % tiles_per_image) * kTile;
      const int64_t rows = std::min(kTile, p.N - i0);
      similarity_tile<scalar_t>(xs + b * p.N * p.Ds, p.N, p.Ds, i0, rows, static_cast<acc_t>(p.scale_s),
                                sims_s.data());
      similarity_tile<acc_t>(xt + b * p.N * p.Dt, p.N, p.Dt, i0, rows, static_cast<acc_t>(p.scale_t),
                             sims_t.data());
      body(b, i0, rows, sims_s.data(), sims_t.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_contextual_fwd(const at::Tensor& student_in,
                                                                    const at::Tensor& teacher_in,
                                                                    int64_t reduction) {
  const Problem p = problem_of(student_in, teacher_in);
  check_reduction(reduction);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  at::Tensor lse_s = at::empty({p.B, p.N}, teacher.options());
  at::Tensor lse_t = at::empty({p.B, p.N}, teacher.options());
  at::Tensor out = reduction == kNone ? at::empty({p.B, p.N}, student.options()) : at::empty({}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "token_contextual_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t rows_total = p.B * p.N;
    std::vector<acc_t> row_sums(rows_total);
    acc_t* ls = lse_s.data_ptr<acc_t>();
    acc_t* lt = lse_t.data_ptr<acc_t>();
    const int64_t N = p.N;
    for_each_tile<scalar_t>(p, student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<acc_t>(),
                            [&](int64_t b, int64_t i0, int64_t rows, const acc_t* ss, const acc_t* st) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = b * N + i0 + r;
        const acc_t* srow = ss + r * N;
        const acc_t* trow = st + r * N;
        const acc_t a_lse = row_lse(srow, N), p_lse = row_lse(trow, N);
        ls[row] = a_lse;
        lt[row] = p_lse;
        const Vec va(a_lse), vp(p_lse);
        Vec acc(acc_t(0));
        int64_t j = 0;
        for (; j + V <= N; j += V) {
          const Vec e = vexp(Vec::loadu(trow + j) - vp) - vexp(Vec::loadu(srow + j) - va);
          acc = at::vec::fmadd(e, e, acc);
        }
        acc_t s = vec_sum(acc);
        for (; j < N; ++j) {
          const acc_t e = std::exp(trow[j] - p_lse) - std::exp(srow[j] - a_lse);
          s += e * e;
        }
        row_sums[row] = s;
      }
    });
    if (reduction == kNone) {
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t row = 0; row < rows_total; ++row) o[row] = static_cast<scalar_t>(row_sums[row] / static_cast<acc_t>(N));
    } else {
      acc_t total = ordered_sum(row_sums.data(), rows_total);
      if (reduction == kMean && rows_total > 0)
        total = total / (static_cast<acc_t>(rows_total) * static_cast<acc_t>(N));
      *out.data_ptr<scalar_t>() = static_cast<scalar_t>(total);
    }
  });
  return {out, lse_s, lse_t};
}

at::Tensor token_contextual_bwd(const at::Tensor& grad_in, const at::Tensor& student_in,
                                const at::Tensor& teacher_in, const at::Tensor& lse_s_in,
                                const at::Tensor& lse_t_in, int64_t reduction) {
  const Problem p = problem_of(student_in, teacher_in);
  check_reduction(reduction);
  check_cpu_float(grad_in, "grad");
  for (const at::Tensor* t : {&lse_s_in, &lse_t_in}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == teacher_in.scalar_type() && t->dim() == 2 &&
                          t->size(0) == p.B && t->size(1) == p.N,
                      "lse tensors must be [B, N] in the teacher's dtype");
  }
  if (reduction == kNone) {
    TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == p.B && grad_in.size(1) == p.N,
                      "grad must be [B, N] for reduction none, got ", grad_in.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_in.numel() == 1, "grad must be a scalar, got ", grad_in.sizes());
  }
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor lse_s = lse_s_in.contiguous();
  const at::Tensor lse_t = lse_t_in.contiguous();
  const at::Tensor grad = grad_in.to(teacher.scalar_type()).contiguous();
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  if (student.numel() == 0) return grad_student;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "token_contextual_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    using IO = VecIO<scalar_t>;
    constexpr int64_t V = Vec::size();
    const int64_t N = p.N, Ds = p.Ds;
    const int64_t rows_total = p.B * N;
    const acc_t* ls = lse_s.const_data_ptr<acc_t>();
    const acc_t* lt = lse_t.const_data_ptr<acc_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    // c_i: the scale of G = c (A − P) in each row
    std::vector<acc_t> coef(rows_total);
    const acc_t nn = static_cast<acc_t>(N);
    for (int64_t row = 0; row < rows_total; ++row) {
      if (reduction == kNone) coef[row] = acc_t(2) * g[row] / nn;
      else if (reduction == kMean) coef[row] = acc_t(2) * g[0] / (static_cast<acc_t>(rows_total) * nn);
      else coef[row] = acc_t(2) * g[0];
    }
    const scalar_t* xs = student.const_data_ptr<scalar_t>();
    const acc_t* xt = teacher.const_data_ptr<acc_t>();
    // pass 1: r_i = c_i Σ_j (A_ij − P_ij) A_ij
    std::vector<acc_t> rsum(rows_total);
    for_each_tile<scalar_t>(p, xs, xt, [&](int64_t b, int64_t i0, int64_t rows, const acc_t* ss, const acc_t* st) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = b * N + i0 + r;
        const acc_t* srow = ss + r * N;
        const acc_t* trow = st + r * N;
        const Vec va(ls[row]), vp(lt[row]);
        Vec acc(acc_t(0));
        int64_t j = 0;
        for (; j + V <= N; j += V) {
          const Vec a = vexp(Vec::loadu(srow + j) - va);
          const Vec pt = vexp(Vec::loadu(trow + j) - vp);
          acc = at::vec::fmadd(a - pt, a, acc);
        }
        acc_t s = vec_sum(acc);
        for (; j < N; ++j) {
          const acc_t a = std::exp(srow[j] - ls[row]);
          s += (a - std::exp(trow[j] - lt[row])) * a;
        }
        rsum[row] = coef[row] * s;
      }
    });
    // pass 2: W = dS + dSᵀ row by row, then grad_k = Σ_j W_kj x_j / √Ds
    scalar_t* gs = grad_student.data_ptr<scalar_t>();
    const acc_t scale_s = static_cast<acc_t>(p.scale_s);
    at::parallel_for(0, p.B * ((N + kTile - 1) / kTile), row_grain(kTile * N * (2 * Ds + p.Dt)),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> ss(kTile * N), st(kTile * N), w(kTile * N), gacc(kTile * Ds);
      const int64_t tiles_per_image = (N + kTile - 1) / kTile;
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b = tile / tiles_per_image;
        const int64_t i0 = (tile % tiles_per_image) * kTile;
        const int64_t rows = std::min(kTile, N - i0);
        const scalar_t* x = xs + b * N * Ds;
        similarity_tile<scalar_t>(x, N, Ds, i0, rows, scale_s, ss.data());
        similarity_tile<acc_t>(xt + b * N * p.Dt, N, p.Dt, i0, rows, static_cast<acc_t>(p.scale_t), st.data());
        const int64_t base = b * N;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t k = base + i0 + r;
          const acc_t* srow = ss.data() + r * N;
          const acc_t* trow = st.data() + r * N;
          acc_t* wrow = w.data() + r * N;
          const Vec vls(ls[k]), vlt(lt[k]), vc(coef[k]), vr(rsum[k]);
          int64_t j = 0;
          for (; j + V <= N; j += V) {
            const Vec s = Vec::loadu(srow + j), t = Vec::loadu(trow + j);
            const Vec a_kj = vexp(s - vls), p_kj = vexp(t - vlt);
            const Vec a_jk = vexp(s - Vec::loadu(ls + base + j)), p_jk = vexp(t - Vec::loadu(lt + base + j));
            const Vec c_j = Vec::loadu(coef.data() + base + j), r_j = Vec::loadu(rsum.data() + base + j);
            const Vec wv = a_kj * (vc * (a_kj - p_kj) - vr) + a_jk * (c_j * (a_jk - p_jk) - r_j);
            wv.store(wrow + j);
          }
          for (; j < N; ++j) {
            const acc_t a_kj = std::exp(srow[j] - ls[k]), p_kj = std::exp(trow[j] - lt[k]);
            const acc_t a_jk = std::exp(srow[j] - ls[base + j]), p_jk = std::exp(trow[j] - lt[base + j]);
            wrow[j] = a_kj * (coef[k] * (a_kj - p_kj) - rsum[k]) +
                      a_jk * (coef[base + j] * (a_jk - p_jk) - rsum[base + j]);
          }
        }
        std::fill(gacc.begin(), gacc.begin() + rows * Ds, acc_t(0));
        for (int64_t j = 0; j < N; ++j) {
          const scalar_t* xj = x + j * Ds;
          int64_t d = 0;
          for (; d + V <= Ds; d += V) {
            const Vec c = IO::load(xj + d);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* gr = gacc.data() + r * Ds + d;
              at::vec::fmadd(Vec(w[r * N + j]), c, Vec::loadu(gr)).store(gr);
            }
          }
          for (; d < Ds; ++d) {
            const acc_t c = static_cast<acc_t>(xj[d]);
            for (int64_t r = 0; r < rows; ++r) gacc[r * Ds + d] += w[r * N + j] * c;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* out = gs + (base + i0 + r) * Ds;
          const acc_t* gr = gacc.data() + r * Ds;
          int64_t d = 0;
          for (; d + V <= Ds; d += V) IO::store(out + d, Vec::loadu(gr + d) * Vec(scale_s));
          for (; d < Ds; ++d) out[d] = static_cast<scalar_t>(gr[d] * scale_s);
        }
      }
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("token_contextual_fwd", &token_contextual_fwd);
  m.impl("token_contextual_bwd", &token_contextual_bwd);
}

}  // namespace cpu
}  // namespace kdloss
