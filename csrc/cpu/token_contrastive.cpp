// TRG global contrastive (InfoNCE) loss, CPU kernels for the CPU dispatch key. The op contract
// (shapes, dtypes, reductions, what is saved) is documented once, with the schemas, in
// kdloss/_ops/token_contrastive.py. Nodes u = student [M, E], v = teacher [M, E] (accumulation
// dtype, already normalised for cosine similarity), logits L = u vᵀ / τ:
//   loss_i = lse_row_i − L_ii                                   (symmetric: ½(lse_row_i − L_ii) + ½(lse_col_i − L_ii))
//   reduction: none [M], mean over M, sum
//
// No M×M matrix is ever held. L is streamed in column strips of kStrip columns (a [M, kStrip] buffer);
// within a strip, tasks own blocks of kRowBlock rows, compute their tile of L with a register-blocked
// dot-product micro-kernel and fold it into each row's running max and sum of exponentials (an online
// log-sum-exp, merged strip after strip in column order). The column log-sum-exps (symmetric) are
// exact within a strip, which holds whole columns.
//
// Backward, with w_i the upstream weight of node i (÷ M for mean), c = ½ when symmetric (else 1):
//   G_ij = (c·w_i·softmax_row(L)_ij + [symmetric] ½·w_j·softmax_col(L)_ij − [i = j]·w_i) / τ
//   ∂/∂u = G v,  ∂/∂v = Gᵀ u
// again strip by strip: tasks over row blocks recompute their tiles of L and turn them into the strip
// of G in place; then two strip GEMMs, each split over disjoint output blocks (row chunk × panel of
// E): ∂u += G_J v_J (strips added in column order) and ∂v_J = G_Jᵀ u (G read by columns, K blocked).
// The GEMMs are our own micro-kernels (BLAS results change with its own thread count): every output
// element is summed in an order fixed by M and E alone, so results are bitwise identical for any
// torch.set_num_threads. Cost: one similarity GEMM forward; backward one recomputed similarity GEMM
// plus one GEMM per gradient (eager: 1 + 2). Extra memory: O(M·E) (packed copies of the nodes,
// gradient accumulators) plus one strip buffer O(M·kStrip).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kdloss/cpu_exp.h"
#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

constexpr int64_t kMR = 4;         // gradient micro-kernel rows (4 rows × 2 vectors = 8 accumulators)
constexpr int64_t kRowBlock = 48;  // rows of L per task (a multiple of kMR)
constexpr int64_t kStrip = 256;    // columns of L per strip (a multiple of kMR)
constexpr int64_t kGradRows = 64;  // rows of ∂v per task of the teacher-gradient GEMM (a multiple of kMR)
constexpr int64_t kDepth = 256;    // K block of that GEMM

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct Problem {
  int64_t M, E;
  double inv_tau;
  bool symmetric;
  int64_t row_blocks() const { return (M + kRowBlock - 1) / kRowBlock; }
};

Problem problem_of(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
                   bool symmetric) {
  check_cpu_float(student, "student");
  check_cpu_float(teacher, "teacher");
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.sizes() == student.sizes(),
                    "student and teacher must both be [M, E], got ", student.sizes(), " and ", teacher.sizes());
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(student.scalar_type() == acc && teacher.scalar_type() == acc,
                    "student and teacher must be float32 or float64 (the accumulation dtype), got ",
                    student.scalar_type(), " and ", teacher.scalar_type());
  const double tau = float_arg(temperature, "temperature");
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "temperature must be a finite number > 0, got ", tau);
  return {student.size(0), student.size(1), 1.0 / tau, symmetric};
}

// c[m·ldc + n] = scale · ⟨a_m, b_n⟩ for m < MR, n < NR: MR×NR vector accumulators along k, reduced
// horizontally at the end; every element is summed in the same order whatever the block shape.
template <typename acc_t, int MR, int NR>
inline void dot_block(const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, int64_t K, acc_t scale, acc_t* c,
                      int64_t ldc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = Vec(acc_t(0));
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    Vec av[MR];
    for (int m = 0; m < MR; ++m) av[m] = Vec::loadu(a + m * lda + k);
    for (int n = 0; n < NR; ++n) {
      const Vec bv = Vec::loadu(b + n * ldb + k);
      for (int m = 0; m < MR; ++m) acc[m][n] = at::vec::fmadd(av[m], bv, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      acc_t sum = vec_sum(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) sum += a[m * lda + kk] * b[n * ldb + kk];
      c[m * ldc + n] = sum * scale;
    }
  }
}

// out[r·ld + c] = scale · ⟨x_r, y_c⟩ for r < rows, c < cols (x, y rows of width E, row stride E).
template <typename acc_t>
void logits_tile(acc_t* out, int64_t ld, const acc_t* x, int64_t rows, const acc_t* y, int64_t cols, int64_t E,
                 acc_t scale) {
  constexpr int MR = 3, NR = 4;
  const int64_t rows_full = rows / MR * MR, cols_full = cols / NR * NR;
  for (int64_t c0 = 0; c0 < cols_full; c0 += NR) {
    for (int64_t r = 0; r < rows_full; r += MR)
      dot_block<acc_t, MR, NR>(x + r * E, E, y + c0 * E, E, E, scale, out + r * ld + c0, ld);
    for (int64_t r = rows_full; r < rows; ++r)
      dot_block<acc_t, 1, NR>(x + r * E, E, y + c0 * E, E, E, scale, out + r * ld + c0, ld);
  }
  for (int64_t c = cols_full; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r)
      dot_block<acc_t, 1, 1>(x + r * E, E, y + c * E, E, E, scale, out + r * ld + c, ld);
}

// c[r·ldc + j] += Σ_k a[r·a_row + k·a_k] · b[k·ldb + j] for r < kMR, j < 2·Vec::size(): a register
// block of kMR rows × two vectors, summed over k in order, then added to c. A is read through two
// strides, so the same strip serves as G (a_k = 1) and as Gᵀ (a_row = 1).
template <typename acc_t>
inline void micro_kernel(const acc_t* a, int64_t a_row, int64_t a_k, const acc_t* b, int64_t ldb, int64_t K, acc_t* c,
                         int64_t ldc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec lo[kMR], hi[kMR];
  for (int64_t r = 0; r < kMR; ++r) lo[r] = hi[r] = Vec(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(b + k * ldb), b1 = Vec::loadu(b + k * ldb + V);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kMR; ++r) {
      const Vec ar(a[r * a_row + k * a_k]);
      lo[r] = at::vec::fmadd(ar, b0, lo[r]);
      hi[r] = at::vec::fmadd(ar, b1, hi[r]);
    }
  }
  for (int64_t r = 0; r < kMR; ++r) {
    (Vec::loadu(c + r * ldc) + lo[r]).store(c + r * ldc);
    (Vec::loadu(c + r * ldc + V) + hi[r]).store(c + r * ldc + V);
  }
}

template <typename acc_t>
constexpr int64_t panel_width() {
  return 2 * at::vec::Vectorized<acc_t>::size();
}

// x [M, E] → panels [E_pad / nr][M_pad][nr] (zero-padded, each panel contiguous): the packed B
// operand of the products Σ_k g_k x[k, :], streamed by micro_kernel.
template <typename acc_t>
at::Tensor pack_panels(const at::Tensor& x, int64_t m_pad, int64_t e_pad) {
  constexpr int64_t nr = panel_width<acc_t>();
  const int64_t M = x.size(0), E = x.size(1);
  at::Tensor padded = at::zeros({m_pad, e_pad}, x.options());
  padded.narrow(0, 0, M).narrow(1, 0, E).copy_(x);
  return padded.view({m_pad, e_pad / nr, nr}).permute({1, 0, 2}).contiguous();
}

// Running (max, Σ exp(· − max)) of a row, merged with the values v[0..n).
template <typename acc_t>
void online_lse(const acc_t* v, int64_t n, acc_t& run_max, acc_t& run_sum) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (n >= V) {
    Vec vm = Vec::loadu(v);
    for (j = V; j + V <= n; j += V) vm = at::vec::maximum(vm, Vec::loadu(v + j));
    m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, v[j]);
  const acc_t new_max = std::max(run_max, m);
  if (new_max == -std::numeric_limits<acc_t>::infinity()) return;  // nothing finite yet
  const Vec vmax(new_max);
  Vec vs(acc_t(0));
  for (j = 0; j + V <= n; j += V) vs = vs + vexp(Vec::loadu(v + j) - vmax);
  acc_t s = vec_sum(vs);
  for (; j < n; ++j) s += std::exp(v[j] - new_max);
  run_sum = run_sum * std::exp(run_max - new_max) + s;
  run_max = new_max;
}

// lse[c] = log Σ_{i<M} exp(S[i·ld + c]) for c < cols: the column log-sum-exps of a strip (max + log of
// the shifted sum, added in double), vectorised across columns (two passes: max, then the sum), tasks
// over disjoint column groups.
template <typename acc_t>
void column_lse(const acc_t* S, int64_t ld, int64_t M, int64_t cols, double* lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t groups = (cols + V - 1) / V;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gidx = begin; gidx < end; ++gidx) {
      const int64_t c0 = gidx * V, n = std::min(V, cols - c0);
      if (n == V) {
        Vec vm(-std::numeric_limits<acc_t>::infinity());
        for (int64_t i = 0; i < M; ++i) vm = at::vec::maximum(vm, Vec::loadu(S + i * ld + c0));
        Vec vs(acc_t(0));
        for (int64_t i = 0; i < M; ++i) vs = vs + vexp(Vec::loadu(S + i * ld + c0) - vm);
        acc_t m[V], l[V];
        vm.store(m);
        vs.log().store(l);
        for (int64_t k = 0; k < V; ++k)  // a column of −inf only (M = 1: its diagonal is set aside) is −inf
          lse[c0 + k] = m[k] == -std::numeric_limits<acc_t>::infinity()
                            ? -std::numeric_limits<double>::infinity()
                            : static_cast<double>(m[k]) + static_cast<double>(l[k]);
      } else {
        for (int64_t c = c0; c < c0 + n; ++c) {
          acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
          for (int64_t i = 0; i < M; ++i) m = std::max(m, S[i * ld + c]);
          if (m == -std::numeric_limits<acc_t>::infinity()) {
            lse[c] = -std::numeric_limits<double>::infinity();
            continue;
          }
          for (int64_t i = 0; i < M; ++i) s += std::exp(S[i * ld + c] - m);
          lse[c] = static_cast<double>(m) + std::log(static_cast<double>(s));
        }
      }
    }
  });
}

// d[i] = ⟨u_i, v_i⟩ / τ, the positive logits.
template <typename acc_t>
void diagonal_logits(const acc_t* u, const acc_t* v, const Problem& p, acc_t* d) {
  at::parallel_for(0, p.M, row_grain(p.E), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      dot_block<acc_t, 1, 1>(u + i * p.E, p.E, v + i * p.E, p.E, p.E, static_cast<acc_t>(p.inv_tau), d + i, 1);
  });
}

// Logits L = u vᵀ/τ are bounded by max‖u_i‖·max‖v_j‖/τ; beyond this bound fp32 inputs get their
// logits, log-sum-exps and softmaxes in fp64 (the gradient GEMMs stay fp32). A logit of magnitude
// |L| rounds by ~u·|L| in an fp32 dot product, and where a row's softmax is not saturated the
// gradient moves by (w/τ)·p(1 − p)·δL·‖v‖: a fuzz case with |L| up to 3700 (dot similarity, τ =
// 0.05) had gradients 1.1× over the bound, at the level of eager fp32's own rounding. Cosine
// similarity at the usual τ ≥ 1/64 stays on the fp32 path.
constexpr double kWideLogitBound = 64.0;

template <typename acc_t>
double largest_norm(const acc_t* x, int64_t M, int64_t E) {
  double largest = 0;
  for (int64_t i = 0; i < M; ++i) {
    double sq = 0;
    for (int64_t k = 0; k < E; ++k) sq += static_cast<double>(x[k + i * E]) * static_cast<double>(x[k + i * E]);
    largest = std::max(largest, sq);
  }
  return std::sqrt(largest);
}

// True where fp32 nodes get fp64 logits (see kWideLogitBound); never for fp64 nodes.
bool wide_logits(const at::Tensor& u, const at::Tensor& v, const Problem& p) {
  if (u.scalar_type() != at::kFloat || p.M == 0) return false;
  const double bound =
      largest_norm(u.const_data_ptr<float>(), p.M, p.E) * largest_norm(v.const_data_ptr<float>(), p.M, p.E) * p.inv_tau;
  return !(bound <= kWideLogitBound);
}

// The row (and, symmetric, column) log-sum-exps of L = u vᵀ/τ over the off-diagonal entries only, in
// logit_t (−inf for M = 1), and the diagonal L_ii (diag[0..M)). Each strip's diagonal entries are set aside (−inf)
// before its rows and columns are reduced: the backward needs 1 − p_ii = Σ_{j≠i} p_ij, which a
// confident row (p_ii → 1) cannot get from 1 − exp(L_ii − lse_i) without cancelling to eps/(1 − p_ii).
template <typename logit_t>
void off_diagonal_logsumexps(const logit_t* up, const logit_t* vp, const Problem& p, double* lse_row, double* lse_col,
                             double* diag) {
  const int64_t M = p.M, E = p.E;
  std::vector<logit_t> run_max(M, -std::numeric_limits<logit_t>::infinity()), run_sum(M, logit_t(0));
  std::vector<logit_t> strip(M * kStrip);
  logit_t* S = strip.data();
  for (int64_t j0 = 0; j0 < M; j0 += kStrip) {
    const int64_t w = std::min(kStrip, M - j0);
    at::parallel_for(0, p.row_blocks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * kRowBlock, rows = std::min(kRowBlock, M - i0);
        logits_tile(S + i0 * kStrip, kStrip, up + i0 * E, rows, vp + j0 * E, w, E, static_cast<logit_t>(p.inv_tau));
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          if (i >= j0 && i < j0 + w) S[i * kStrip + (i - j0)] = -std::numeric_limits<logit_t>::infinity();
          online_lse(S + i * kStrip, w, run_max[i], run_sum[i]);
        }
      }
    });
    if (p.symmetric) column_lse(S, kStrip, M, w, lse_col + j0);
  }
  for (int64_t i = 0; i < M; ++i)
    lse_row[i] = run_sum[i] > logit_t(0) ? static_cast<double>(run_max[i]) + std::log(static_cast<double>(run_sum[i]))
                                         : -std::numeric_limits<double>::infinity();
  std::vector<logit_t> diagonal(M);
  diagonal_logits(up, vp, p, diagonal.data());
  std::copy(diagonal.begin(), diagonal.end(), diag);
}

// log(1 + exp(t)) without overflow (t = −inf: 0).
double softplus(double t) { return t > 0 ? t + std::log1p(std::exp(-t)) : std::log1p(std::exp(t)); }

// A row's (or column's) cross-entropy term lse − L_ii = softplus(lse_off − L_ii) and its off-diagonal
// mass 1 − p_ii = exp(lse_off − lse), both in double from the off-diagonal log-sum-exp and the diagonal.
struct DiagonalTerm {
  double loss, off_mass;
};

DiagonalTerm diagonal_term(double lse_off, double diag) {
  if (lse_off == -std::numeric_limits<double>::infinity()) return {0.0, 0.0};  // M = 1: p_ii = 1
  const double loss = softplus(lse_off - diag);
  return {loss, std::exp(lse_off - diag - loss)};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                         const at::Tensor& temperature, bool symmetric,
                                                         int64_t reduction_code) {
  const Problem p = problem_of(student_in, teacher_in, temperature, symmetric);
  const Reduction reduction = check_reduction(reduction_code);
  const at::Tensor u = student_in.contiguous(), v = teacher_in.contiguous();
  const auto opts = u.options();
  // float64 (see split_lse): the row and column log-sum-exps, then their off-diagonal masses 1 − p_ii
  at::Tensor state = at::zeros({4, p.M}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty(reduction == Reduction::kNone ? at::IntArrayRef{p.M} : at::IntArrayRef{}, opts);
  const bool wide = wide_logits(u, v, p);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "token_contrastive_fwd", [&] {
    using acc_t = scalar_t;
    const int64_t M = p.M;
    double* lse_row = state.data_ptr<double>();
    double* lse_col = lse_row + M;
    double* off_row = lse_row + 2 * M;
    double* off_col = lse_row + 3 * M;
    std::vector<double> diag64(M);
    if (wide) {
      const at::Tensor u64 = u.to(at::kDouble), v64 = v.to(at::kDouble);
      off_diagonal_logsumexps(u64.const_data_ptr<double>(), v64.const_data_ptr<double>(), p, lse_row, lse_col,
                              diag64.data());
    } else {
      off_diagonal_logsumexps(u.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), p, lse_row, lse_col, diag64.data());
    }
    std::vector<acc_t> per_row(M);
    for (int64_t i = 0; i < M; ++i) {
      const DiagonalTerm row = diagonal_term(lse_row[i], diag64[i]);
      lse_row[i] = diag64[i] + row.loss;
      off_row[i] = row.off_mass;
      double term = row.loss;
      if (symmetric) {
        const DiagonalTerm col = diagonal_term(lse_col[i], diag64[i]);
        lse_col[i] = diag64[i] + col.loss;
        off_col[i] = col.off_mass;
        term = 0.5 * term + 0.5 * col.loss;
      }
      per_row[i] = static_cast<acc_t>(term);
    }
    if (reduction == Reduction::kNone) {
      std::copy(per_row.begin(), per_row.end(), out.data_ptr<acc_t>());
    } else {
      acc_t total = ordered_sum(per_row.data(), M);
      if (reduction == Reduction::kMean && M > 0) total = total / static_cast<acc_t>(M);
      *out.data_ptr<acc_t>() = total;
    }
  });
  return {out, state};
}

// A float64 log-sum-exp as an acc_t pair hi + lo: exp((x − hi) − lo) keeps the accuracy of the float64
// value, since x − hi is exact wherever the probability is not negligible (x within a factor 2 of hi).
template <typename acc_t>
void split_lse(const double* lse, int64_t n, std::vector<acc_t>& hi, std::vector<acc_t>& lo) {
  hi.resize(n), lo.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    hi[i] = static_cast<acc_t>(lse[i]);
    lo[i] = static_cast<acc_t>(lse[i] - static_cast<double>(hi[i]));
  }
}

// Row i of a strip's tile of G (see the top of the file), written over the logits s[0..w) of row i
// and columns j0...; (hi_i, lo_i) and (col_hi, col_lo) the row's and the columns' log-sum-exps;
// diagonal_i the entry G_ii, formed from the off-diagonal masses (see GradientTiles).
template <typename acc_t>
void gradient_row(acc_t* s, int64_t w, int64_t i, int64_t j0, acc_t hi_i, acc_t lo_i, acc_t own_i, const acc_t* col_hi,
                  const acc_t* col_lo, const acc_t* other, acc_t diagonal_i) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vh(hi_i), vl(lo_i), vo(own_i);
  int64_t c = 0;
  if (other != nullptr) {
    for (; c + V <= w; c += V) {
      const Vec x = Vec::loadu(s + c);
      const Vec col = (x - Vec::loadu(col_hi + j0 + c)) - Vec::loadu(col_lo + j0 + c);
      const Vec g = vo * vexp((x - vh) - vl) + Vec::loadu(other + j0 + c) * vexp(col);
      g.store(s + c);
    }
    for (; c < w; ++c) {
      s[c] =
          own_i * std::exp((s[c] - hi_i) - lo_i) + other[j0 + c] * std::exp((s[c] - col_hi[j0 + c]) - col_lo[j0 + c]);
    }
  } else {
    for (; c + V <= w; c += V) (vo * vexp((Vec::loadu(s + c) - vh) - vl)).store(s + c);
    for (; c < w; ++c) s[c] = own_i * std::exp((s[c] - hi_i) - lo_i);
  }
  if (i >= j0 && i < j0 + w) s[i - j0] = diagonal_i;
}

// The tiles of G, from logits in logit_t (acc_t, or fp64 for fp32 nodes: see kWideLogitBound): the
// per-node weights and the log-sum-exps (as hi + lo pairs) in logit_t.
template <typename logit_t>
struct GradientTiles {
  const logit_t* u;
  const logit_t* v;
  Problem p;
  // diagonal[i] = G_ii = own_i·p_ii + other_i·p^col_ii − w_i/τ = −own_i·(1 − p_ii) − other_i·(1 − p^col_ii)
  std::vector<logit_t> row_hi, row_lo, col_hi, col_lo, own, other, diagonal;

  // Rows of block blk, columns j0..j0+w of G (row stride kStrip) into G + i0·kStrip; scratch holds
  // kRowBlock·kStrip logit_t where logit_t is wider than acc_t.
  template <typename acc_t>
  void fill(acc_t* G, int64_t blk, int64_t j0, int64_t w, std::vector<logit_t>& scratch) const {
    const int64_t i0 = blk * kRowBlock, rows = std::min(kRowBlock, p.M - i0);
    constexpr bool same = std::is_same_v<acc_t, logit_t>;
    logit_t* tile = nullptr;
    if constexpr (same) tile = G + i0 * kStrip;
    else tile = scratch.data();
    logits_tile(tile, kStrip, u + i0 * p.E, rows, v + j0 * p.E, w, p.E, static_cast<logit_t>(p.inv_tau));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      gradient_row(tile + r * kStrip, w, i, j0, row_hi[i], row_lo[i], own[i], col_hi.data(), col_lo.data(),
                   p.symmetric ? other.data() : nullptr, diagonal[i]);
    }
    if constexpr (!same) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < w; ++c) G[(i0 + r) * kStrip + c] = static_cast<acc_t>(tile[r * kStrip + c]);
    }
  }
};

// The gradient [M, E] held in the first rows and columns of a padded accumulator: the accumulator
// itself when there is no padding, else a contiguous copy.
at::Tensor unpad(const at::Tensor& acc_buf, int64_t M, int64_t E) {
  if (acc_buf.size(0) == M && acc_buf.size(1) == E) return acc_buf;
  return acc_buf.narrow(0, 0, M).narrow(1, 0, E).contiguous();
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd(const at::Tensor& grad_in, const at::Tensor& student_in,
                                                         const at::Tensor& teacher_in, const at::Tensor& lse_in,
                                                         const at::Tensor& temperature, bool symmetric,
                                                         int64_t reduction_code, bool need_student, bool need_teacher) {
  const Problem p = problem_of(student_in, teacher_in, temperature, symmetric);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = student_in.scalar_type();
  TORCH_CHECK_VALUE(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kDouble && lse_in.dim() == 2 &&
                        lse_in.size(0) == 4 && lse_in.size(1) == p.M,
                    "lse must be a [4, M] CPU tensor of dtype float64, got ", lse_in.sizes(), " ",
                    lse_in.scalar_type());
  const at::Tensor grad = checked_grad(grad_in, reduction, {p.M}, acc);
  const at::Tensor u = student_in.contiguous(), v = teacher_in.contiguous(), lse = lse_in.contiguous();
  const auto opts = u.options();
  const int64_t M = p.M, E = p.E;
  if (M == 0 || E == 0 || (!need_student && !need_teacher)) return {at::zeros({M, E}, opts), at::zeros({M, E}, opts)};
  at::Tensor grad_u, grad_v;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "token_contrastive_bwd", [&] {
    using acc_t = scalar_t;
    constexpr int64_t nr = panel_width<acc_t>();
    const int64_t m_pad = round_up(M, kMR), e_pad = round_up(E, nr), panels = e_pad / nr;
    // per-node weights: own term (row softmax), other term (column softmax), diagonal; all ÷ τ
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const acc_t inv_tau = static_cast<acc_t>(p.inv_tau), half = acc_t(0.5);
    const double* off_row = lse.const_data_ptr<double>() + 2 * M;
    const double* off_col = off_row + M;
    std::vector<acc_t> own(M), other(symmetric ? M : 0), diagonal(M);
    for (int64_t i = 0; i < M; ++i) {
      acc_t wi = reduction == Reduction::kNone ? g[i] : g[0];
      if (reduction == Reduction::kMean) wi = wi / static_cast<acc_t>(M);
      const acc_t weight = wi * inv_tau;
      own[i] = symmetric ? half * weight : weight;
      if (symmetric) other[i] = half * weight;
      double entry = -static_cast<double>(own[i]) * off_row[i];
      if (symmetric) entry -= static_cast<double>(other[i]) * off_col[i];
      diagonal[i] = static_cast<acc_t>(entry);
    }
    const bool wide = wide_logits(u, v, p);
    const at::Tensor u64 = wide ? u.to(at::kDouble) : at::Tensor(), v64 = wide ? v.to(at::kDouble) : at::Tensor();
    const auto tiles_of = [&](auto* up, auto* vp) {
      using logit_t = std::remove_const_t<std::remove_pointer_t<decltype(up)>>;
      GradientTiles<logit_t> t{up, vp, p, {}, {}, {}, {}, {}, {}, {}};
      split_lse(lse.const_data_ptr<double>(), M, t.row_hi, t.row_lo);
      split_lse(lse.const_data_ptr<double>() + M, M, t.col_hi, t.col_lo);
      t.own.assign(own.begin(), own.end());
      t.other.assign(other.begin(), other.end());
      t.diagonal.assign(diagonal.begin(), diagonal.end());
      return t;
    };
    const GradientTiles<acc_t> tiles = tiles_of(u.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>());
    const GradientTiles<double> wide_tiles =
        wide ? tiles_of(u64.const_data_ptr<double>(), v64.const_data_ptr<double>()) : GradientTiles<double>{};
    const at::Tensor v_panels = need_student ? pack_panels<acc_t>(v, m_pad, e_pad) : at::Tensor();
    const at::Tensor u_panels = need_teacher ? pack_panels<acc_t>(u, m_pad, e_pad) : at::Tensor();
    at::Tensor du = need_student ? at::zeros({m_pad, e_pad}, opts) : at::Tensor();
    at::Tensor dv = need_teacher ? at::zeros({m_pad, e_pad}, opts) : at::Tensor();
    // the strip of G [m_pad, kStrip] (rows ≥ M stay zero)
    at::Tensor strip = at::zeros({m_pad, kStrip}, opts);
    acc_t* G = strip.data_ptr<acc_t>();
    for (int64_t j0 = 0; j0 < M; j0 += kStrip) {
      const int64_t w = std::min(kStrip, M - j0), w_pad = round_up(w, kMR);
      if (w_pad > w)  // columns past the strip's last one (rows of Gᵀ): zero, not the previous strip's values
        strip.narrow(1, w, w_pad - w).zero_();
      at::parallel_for(0, p.row_blocks(), 1, [&](int64_t begin, int64_t end) {
        std::vector<double> scratch(wide && !std::is_same_v<acc_t, double> ? kRowBlock * kStrip : 0);
        std::vector<acc_t> unused;
        for (int64_t blk = begin; blk < end; ++blk) {
          if (wide) wide_tiles.fill(G, blk, j0, w, scratch);
          else tiles.fill(G, blk, j0, w, unused);
        }
      });
      if (need_student) {
        // du[rows, :] += G_strip [rows, w] · v[j0..j0+w, :], over disjoint (row chunk, panel) blocks;
        // strips are added in order, so every element of du is summed in a fixed order
        const int64_t chunks = (m_pad + kGradRows - 1) / kGradRows;
        at::parallel_for(0, chunks * panels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const int64_t pn = t / chunks, r_begin = (t % chunks) * kGradRows;
            const int64_t r_end = std::min(m_pad, r_begin + kGradRows);
            const acc_t* panel = v_panels.const_data_ptr<acc_t>() + pn * m_pad * nr + j0 * nr;
            acc_t* c = du.data_ptr<acc_t>() + pn * nr;
            for (int64_t r0 = r_begin; r0 < r_end; r0 += kMR)
              micro_kernel(G + r0 * kStrip, kStrip, 1, panel, nr, w, c + r0 * e_pad, e_pad);
          }
        });
      }
      if (!need_teacher) continue;
      // dv[j0.., :] = Gᵀ_strip [w_pad, M] · u [M, :] (G read by columns), over disjoint (row chunk, panel) blocks; K in
      // blocks of kDepth so that a panel's slice stays in L1 across the chunk's row groups (each output
      // element still sums its K blocks in order)
      const int64_t chunks = (w_pad + kGradRows - 1) / kGradRows;
      at::parallel_for(0, chunks * panels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t pn = t / chunks, r_begin = (t % chunks) * kGradRows;
          const int64_t r_end = std::min(w_pad, r_begin + kGradRows);
          const acc_t* panel = u_panels.const_data_ptr<acc_t>() + pn * m_pad * nr;
          acc_t* c = dv.data_ptr<acc_t>() + j0 * e_pad + pn * nr;
          for (int64_t k0 = 0; k0 < M; k0 += kDepth) {
            const int64_t depth = std::min(kDepth, M - k0);
            for (int64_t r0 = r_begin; r0 < r_end; r0 += kMR)
              micro_kernel(G + k0 * kStrip + r0, 1, kStrip, panel + k0 * nr, nr, depth, c + r0 * e_pad, e_pad);
          }
        }
      });
    }
    grad_u = need_student ? unpad(du, M, E) : at::zeros({M, E}, opts);
    grad_v = need_teacher ? unpad(dv, M, E) : at::zeros({M, E}, opts);
  });
  return {grad_u, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("token_contrastive_fwd", &token_contrastive_fwd);
  m.impl("token_contrastive_bwd", &token_contrastive_bwd);
}

}  // namespace cpu
}  // namespace kdloss
