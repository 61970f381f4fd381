// TRG token-wise contextual loss, CPU kernels (spec §5.2–5.3) for the CPU dispatch key. The op
// contract (shapes, dtypes, reductions) is documented once, with the schemas, in
// kdloss/_ops/token_contextual.py. Features F_s [B, N, Ds], F_t [B, N, Dt]:
//   S = F_s F_sᵀ/√Ds, T = F_t F_tᵀ/√Dt per image; A = softmax_row(S), P = softmax_row(T)
//   loss = Σ_{b,i,j} (P − A)² / (B·N·N)   (mean; the sum drops the divisor; none: [B, N] row means)
//
// Nothing of size N×N is ever stored. Work is split into tiles of at most kRows rows of one image
// (spread evenly); a task computes its tile's similarity rows (≤ kRows×N per side, in a buffer
// owned by the task), consumes them with vectorised row passes and drops them. Every row is
// complete inside its tile, so no online softmax is needed. The GEMMs are our own register-blocked
// micro-kernels rather than BLAS so that summation orders are fixed (BLAS results change with its
// own thread count). The similarity GEMM reads the features in place (dot products along D, a
// 3×4 block of vector accumulators); the gradient GEMM reads one packed copy of the student.
//
// Forward saves, per row (O(B·N)): the softmax statistics of S and T (row max and log-sum, kept
// apart for accuracy) and ρ_i = Σ_j (A_ij − P_ij) A_ij.
// Backward (spec §5.3) with c_i the per-row scale of G = c (A − P), r_i = c_i ρ_i:
//   W_kj = A_kj (c_k(A_kj − P_kj) − r_k) + A_jk (c_j(A_jk − P_jk) − r_j)   (row k of dS + dSᵀ)
//   ∂L/∂F_s[k] = Σ_j W_kj F_s[j] / √Ds                                    (one GEMM per tile)
// S and T are symmetric, so A_jk = exp(S_kj − max_j − log_j) comes from row k's similarities too: each
// task writes only its own gradient rows (no scatter, no atomics). Tile boundaries do not depend
// on the thread count and reductions go through per-row partials and ordered_sum, so results are
// bitwise identical for any torch.set_num_threads. Cost: 2 GEMMs forward, 3 backward (eager: 2+2);
// extra memory: the per-task buffers, fp32 copies of bf16/fp16 features and, in the backward, one
// packed copy of the student (O(B·N·D); nothing N×N).
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

constexpr int64_t kMR = 4;     // micro-kernel rows (4 rows × 2 vectors = 8 accumulators)
constexpr int64_t kRows = 48;  // rows per tile (a multiple of kMR): one task's work unit

// Softmax statistics of one row v[0..N) (N ≥ 1): its max m and l = log Σ_j exp(v[j] − m), so that
// softmax(v)_j = exp((v[j] − m) − l). Kept apart rather than as m + l: when |m| is large, rounding
// m + l would shift every probability of the row by up to ulp(m) relatively.
template <typename acc_t>
void row_stats(const acc_t* v, int64_t N, acc_t& m_out, acc_t& l_out) {
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
  m_out = m;
  l_out = std::log(s);
}

// Row statistics of one side for all B·N rows: max[row], logsum[row], the two halves of a
// [2, B, N] tensor.
template <typename acc_t>
struct Stats {
  acc_t* max;
  acc_t* logsum;
  Stats(at::Tensor& t, int64_t rows_total) : max(t.data_ptr<acc_t>()), logsum(max + rows_total) {}
};

struct Problem {
  int64_t B, N, Ds, Dt;
  double scale_s, scale_t;
  int64_t tile_rows;  // rows per tile: ≤ kRows, a multiple of kMR, spread evenly over the image
  int64_t tiles_per_image() const { return (N + tile_rows - 1) / tile_rows; }
};

Problem problem_of(const at::Tensor& student, const at::Tensor& teacher) {
  check_cpu_float(student, "student");
  check_cpu_float(teacher, "teacher");
  TORCH_CHECK_VALUE(student.dim() == 3 && teacher.dim() == 3, "student and teacher must be [B, N, D]");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
                    "student and teacher must share B and N, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(2) > 0 && teacher.size(2) > 0, "token widths must be positive");
  Problem p{student.size(0), student.size(1), student.size(2), teacher.size(2), 0, 0, kRows};
  if (p.N > 0) {
    const int64_t tiles = (p.N + kRows - 1) / kRows;
    p.tile_rows = std::min(kRows, (((p.N + tiles - 1) / tiles) + kMR - 1) / kMR * kMR);
  }
  p.scale_s = 1.0 / std::sqrt(static_cast<double>(p.Ds));
  p.scale_t = 1.0 / std::sqrt(static_cast<double>(p.Dt));
  return p;
}

void check_row_stats(const at::Tensor& t, const Problem& p, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == acc && t.dim() == 3 && t.size(0) == 2 &&
                        t.size(1) == p.B && t.size(2) == p.N,
                    name, " must be a [2, B, N] CPU tensor of dtype ", acc, ", got ", t.sizes(), " ", t.scalar_type());
}

void check_row_state(const at::Tensor& t, const Problem& p, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(
      t.device().is_cpu() && t.scalar_type() == acc && t.dim() == 2 && t.size(0) == p.B && t.size(1) == p.N, name,
      " must be a [B, N] CPU tensor of dtype ", acc, ", got ", t.sizes(), " ", t.scalar_type());
}

// c[r·ldc + j] = Σ_k a[r·lda + k] · b[k·ldb + j] for r < kMR, j < 2·Vec::size(): a register
// block of kMR rows × two vectors, summed over k in order.
template <typename acc_t>
inline void micro_kernel(const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, int64_t K, acc_t* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec lo[kMR], hi[kMR];
  for (int64_t r = 0; r < kMR; ++r) lo[r] = hi[r] = Vec(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(b + k * ldb), b1 = Vec::loadu(b + k * ldb + V);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kMR; ++r) {
      const Vec ar(a[r * lda + k]);
      lo[r] = at::vec::fmadd(ar, b0, lo[r]);
      hi[r] = at::vec::fmadd(ar, b1, hi[r]);
    }
  }
  for (int64_t r = 0; r < kMR; ++r) {
    lo[r].store(c + r * ldc);
    hi[r].store(c + r * ldc + V);
  }
}

// C [m_pad, n_pad] = A [m_pad, K] · B, with B packed as panels [n_pad / kNR][K][kNR] (each panel
// contiguous, so the micro-kernel streams it); m_pad a multiple of kMR, n_pad of kNR.
template <typename acc_t>
void gemm_packed(const acc_t* a, int64_t lda, const acc_t* b_panels, int64_t K, acc_t* c, int64_t ldc, int64_t m_pad,
                 int64_t n_pad) {
  constexpr int64_t kNR = 2 * at::vec::Vectorized<acc_t>::size();
  for (int64_t j0 = 0; j0 < n_pad; j0 += kNR) {  // one K×kNR panel, reused from cache by every row block
    const acc_t* panel = b_panels + (j0 / kNR) * K * kNR;
    for (int64_t r0 = 0; r0 < m_pad; r0 += kMR) micro_kernel(a + r0 * lda, lda, panel, kNR, K, c + r0 * ldc + j0, ldc);
  }
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// x [B, N, D] → [B, ceil(D / nr), N, nr]: x[b]'s columns in zero-padded panels of nr, each panel
// [N, nr] contiguous: the packed B operand of the products Σ_j w_j x[b, j, :].
at::Tensor pack_panels(const at::Tensor& x, int64_t nr, at::ScalarType acc) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), d_pad = round_up(D, nr);
  at::Tensor padded = at::zeros({B, N, d_pad}, at::TensorOptions().dtype(acc));
  padded.narrow(2, 0, D).copy_(x);
  return padded.view({B, N, d_pad / nr, nr}).permute({0, 2, 1, 3}).contiguous();
}

// One side's features in acc dtype: `values` [B, N, D] contiguous (the input itself when it already
// is) and, for the student in the backward, `gradient`: packed panels of x[b], the B operand of
// W · x (one copy of the input).
struct Features {
  at::Tensor values, gradient;
  int64_t d_pad;
  Features(const at::Tensor& x, const Problem& p, at::ScalarType acc, bool for_gradient) {
    const int64_t nr =
        2 * (acc == at::kDouble ? at::vec::Vectorized<double>::size() : at::vec::Vectorized<float>::size());
    values = x.detach().to(acc).contiguous();
    d_pad = round_up(x.size(2), nr);
    if (for_gradient) gradient = pack_panels(values, nr, acc);
  }
};

// One task's scratch, acc dtype: a tile's similarity rows of each side [kRows, N] (row stride
// ld = N) and, for the backward, its gradient rows [kRows, g_cols].
struct TileBuffers {
  at::Tensor s, t, g;
  int64_t ld;
  TileBuffers(int64_t N, int64_t g_cols, at::ScalarType acc)
      : s(at::zeros({kRows, N}, at::TensorOptions().dtype(acc))),
        t(at::zeros({kRows, N}, at::TensorOptions().dtype(acc))),
        g(at::empty({g_cols > 0 ? kRows : 0, g_cols}, at::TensorOptions().dtype(acc))),
        ld(N) {}
};

// c[m·ldc + n] = scale · ⟨a_m, b_n⟩ = scale · Σ_k a[m·lda + k] · b[n·ldb + k] for m < MR, n < NR: MR×NR vector
// accumulators along k, reduced horizontally at the end. Every element is summed in the same order
// whatever the block shape, so edge blocks agree bitwise with full ones.
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

// out[r·ld + j] = scale · ⟨x_{i0+r}, x_j⟩ for r < rows, j < N, x one image [N, D]. The 4 rows x_j
// of a column block stay in L1 while the tile's rows stream past them.
template <typename acc_t>
void gram_rows(acc_t* out, int64_t ld, const acc_t* x, int64_t N, int64_t D, acc_t scale, int64_t i0, int64_t rows) {
  constexpr int MR = 3, NR = 4;
  const int64_t rows_full = rows / MR * MR, n_full = N / NR * NR;
  const acc_t* a = x + i0 * D;
  for (int64_t j0 = 0; j0 < n_full; j0 += NR) {
    for (int64_t r = 0; r < rows_full; r += MR)
      dot_block<acc_t, MR, NR>(a + r * D, D, x + j0 * D, D, D, scale, out + r * ld + j0, ld);
    for (int64_t r = rows_full; r < rows; ++r)
      dot_block<acc_t, 1, NR>(a + r * D, D, x + j0 * D, D, D, scale, out + r * ld + j0, ld);
  }
  for (int64_t j = n_full; j < N; ++j)
    for (int64_t r = 0; r < rows; ++r)
      dot_block<acc_t, 1, 1>(a + r * D, D, x + j * D, D, D, scale, out + r * ld + j, ld);
}

// Runs body(b, i0, rows, buffers) over every tile in parallel, after filling buffers.s / .t with
// the tile's scaled similarity rows of both sides.
template <typename acc_t, typename Body>
void for_each_tile(const Problem& p, const Features& fs, const Features& ft, int64_t g_cols, const Body& body) {
  const int64_t tiles = p.B * p.tiles_per_image();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    TileBuffers buf(p.N, g_cols, fs.values.scalar_type());
    acc_t* ss = buf.s.data_ptr<acc_t>();
    acc_t* st = buf.t.data_ptr<acc_t>();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / p.tiles_per_image();
      const int64_t i0 = (tile % p.tiles_per_image()) * p.tile_rows;
      const int64_t rows = std::min(p.tile_rows, p.N - i0);
      gram_rows(ss, buf.ld, fs.values.const_data_ptr<acc_t>() + b * p.N * p.Ds, p.N, p.Ds,
                static_cast<acc_t>(p.scale_s), i0, rows);
      gram_rows(st, buf.ld, ft.values.const_data_ptr<acc_t>() + b * p.N * p.Dt, p.N, p.Dt,
                static_cast<acc_t>(p.scale_t), i0, rows);
      body(b, i0, rows, buf);
    }
  });
}

// Forward row pass: returns Σ_j (P_ij − A_ij)² and writes ρ_i = Σ_j (A_ij − P_ij) A_ij, with
// A_ij = exp((s_j − a_max) − a_log), P_ij = exp((t_j − p_max) − p_log).
template <typename acc_t>
acc_t contextual_row(const acc_t* srow, const acc_t* trow, int64_t N, acc_t a_max, acc_t a_log, acc_t p_max,
                     acc_t p_log, acc_t& rho) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vam(a_max), val(a_log), vpm(p_max), vpl(p_log);
  Vec sq(acc_t(0)), rv(acc_t(0));
  int64_t j = 0;
  for (; j + V <= N; j += V) {
    const Vec a = vexp((Vec::loadu(srow + j) - vam) - val);
    const Vec e = a - vexp((Vec::loadu(trow + j) - vpm) - vpl);
    sq = at::vec::fmadd(e, e, sq);
    rv = at::vec::fmadd(e, a, rv);
  }
  acc_t s = vec_sum(sq), r = vec_sum(rv);
  for (; j < N; ++j) {
    const acc_t a = std::exp((srow[j] - a_max) - a_log);
    const acc_t e = a - std::exp((trow[j] - p_max) - p_log);
    s += e * e;
    r += e * a;
  }
  rho = r;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_contextual_fwd(const at::Tensor& student_in,
                                                                                const at::Tensor& teacher_in,
                                                                                int64_t reduction_code) {
  const Problem p = problem_of(student_in, teacher_in);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student_in.scalar_type());
  const Features fs(student_in, p, acc, false), ft(teacher_in, p, acc, false);
  const auto opts = at::TensorOptions().dtype(acc);
  at::Tensor stats_s = at::empty({2, p.B, p.N}, opts);
  at::Tensor stats_t = at::empty({2, p.B, p.N}, opts);
  at::Tensor rho = at::empty({p.B, p.N}, opts);
  // the loss is returned in the accumulation dtype
  at::Tensor out = at::empty(reduction == Reduction::kNone ? at::IntArrayRef{p.B, p.N} : at::IntArrayRef{}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_in.scalar_type(), "token_contextual_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    const int64_t N = p.N, rows_total = p.B * p.N;
    std::vector<acc_t> row_sums(rows_total);
    const Stats<acc_t> ss(stats_s, rows_total), st(stats_t, rows_total);
    acc_t* rh = rho.data_ptr<acc_t>();
    for_each_tile<acc_t>(p, fs, ft, 0, [&](int64_t b, int64_t i0, int64_t rows, TileBuffers& buf) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = b * N + i0 + r;
        const acc_t* srow = buf.s.const_data_ptr<acc_t>() + r * buf.ld;
        const acc_t* trow = buf.t.const_data_ptr<acc_t>() + r * buf.ld;
        row_stats(srow, N, ss.max[row], ss.logsum[row]);
        row_stats(trow, N, st.max[row], st.logsum[row]);
        row_sums[row] =
            contextual_row(srow, trow, N, ss.max[row], ss.logsum[row], st.max[row], st.logsum[row], rh[row]);
      }
    });
    if (reduction == Reduction::kNone) {
      acc_t* o = out.data_ptr<acc_t>();
      for (int64_t row = 0; row < rows_total; ++row) o[row] = row_sums[row] / static_cast<acc_t>(N);
    } else {
      acc_t total = ordered_sum(row_sums.data(), rows_total);
      if (reduction == Reduction::kMean && rows_total > 0)
        total = total / (static_cast<acc_t>(rows_total) * static_cast<acc_t>(N));
      *out.data_ptr<acc_t>() = total;
    }
  });
  return {out, stats_s, stats_t, rho};
}

// out[d] = v[d] for d < D, converted to the output dtype.
template <typename scalar_t>
void store_row(scalar_t* out, const Acc<scalar_t>* v, int64_t D) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::size();
  int64_t d = 0;
  for (; d + V <= D; d += V) IO::store(out + d, Vec::loadu(v + d));
  for (; d < D; ++d) out[d] = static_cast<scalar_t>(v[d]);
}

// c_i, the per-row scale of G = c (A − P): ∂loss/∂A_ij = c_i (A_ij − P_ij).
template <typename acc_t>
std::vector<acc_t> row_coefficients(const acc_t* g, Reduction reduction, int64_t rows_total, int64_t N) {
  std::vector<acc_t> coef(rows_total);
  const acc_t nn = static_cast<acc_t>(N);
  for (int64_t row = 0; row < rows_total; ++row) {
    if (reduction == Reduction::kNone) coef[row] = acc_t(2) * g[row] / nn;
    else if (reduction == Reduction::kMean) coef[row] = acc_t(2) * g[0] / (static_cast<acc_t>(rows_total) * nn);
    else coef[row] = acc_t(2) * g[0];
  }
  return coef;
}

// Overwrites a tile's student similarity rows with the rows of W = (dS + dSᵀ)/√Ds (spec §5.3).
// base: first row of the image in the [B·N] row-state arrays; i0: the tile's first row.
template <typename acc_t>
void gradient_weights(acc_t* ss, const acc_t* st, int64_t ld, int64_t rows, int64_t N, int64_t base, int64_t i0,
                      const Stats<acc_t>& sa, const Stats<acc_t>& sp, const acc_t* coef, const acc_t* rsum,
                      acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t *am = sa.max + base, *al = sa.logsum + base, *pm = sp.max + base, *pl = sp.logsum + base;
  const acc_t *c_b = coef + base, *r_b = rsum + base;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t k = i0 + r;
    acc_t* srow = ss + r * ld;
    const acc_t* trow = st + r * ld;
    const Vec vam(am[k]), val(al[k]), vpm(pm[k]), vpl(pl[k]), vc(c_b[k]), vr(r_b[k]), vscale(scale);
    int64_t j = 0;
    for (; j + V <= N; j += V) {
      const Vec s = Vec::loadu(srow + j), t = Vec::loadu(trow + j);
      const Vec a_kj = vexp((s - vam) - val), p_kj = vexp((t - vpm) - vpl);
      const Vec a_jk = vexp((s - Vec::loadu(am + j)) - Vec::loadu(al + j));
      const Vec p_jk = vexp((t - Vec::loadu(pm + j)) - Vec::loadu(pl + j));
      const Vec w =
          a_kj * (vc * (a_kj - p_kj) - vr) + a_jk * (Vec::loadu(c_b + j) * (a_jk - p_jk) - Vec::loadu(r_b + j));
      (w * vscale).store(srow + j);
    }
    for (; j < N; ++j) {
      const acc_t a_kj = std::exp((srow[j] - am[k]) - al[k]), p_kj = std::exp((trow[j] - pm[k]) - pl[k]);
      const acc_t a_jk = std::exp((srow[j] - am[j]) - al[j]), p_jk = std::exp((trow[j] - pm[j]) - pl[j]);
      srow[j] = scale * (a_kj * (c_b[k] * (a_kj - p_kj) - r_b[k]) + a_jk * (c_b[j] * (a_jk - p_jk) - r_b[j]));
    }
  }
}

at::Tensor token_contextual_bwd(const at::Tensor& grad_in, const at::Tensor& student_in, const at::Tensor& teacher_in,
                                const at::Tensor& stats_s_in, const at::Tensor& stats_t_in, const at::Tensor& rho_in,
                                int64_t reduction_code) {
  const Problem p = problem_of(student_in, teacher_in);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student_in.scalar_type());
  check_row_stats(stats_s_in, p, acc, "stats_student");
  check_row_stats(stats_t_in, p, acc, "stats_teacher");
  check_row_state(rho_in, p, acc, "rho");
  const at::Tensor grad = checked_grad(grad_in, reduction, {p.B, p.N}, acc);
  at::Tensor grad_student = at::empty(student_in.sizes(), student_in.options());
  if (student_in.numel() == 0) return grad_student;
  const Features fs(student_in, p, acc, true), ft(teacher_in, p, acc, false);
  at::Tensor stats_s = stats_s_in.contiguous(), stats_t = stats_t_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_in.scalar_type(), "token_contextual_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const int64_t N = p.N, rows_total = p.B * N;
    const Stats<acc_t> sa(stats_s, rows_total), sp(stats_t, rows_total);
    const std::vector<acc_t> coef = row_coefficients(grad.const_data_ptr<acc_t>(), reduction, rows_total, N);
    std::vector<acc_t> rsum(rows_total);
    const acc_t* rh = rho.const_data_ptr<acc_t>();
    for (int64_t row = 0; row < rows_total; ++row) rsum[row] = coef[row] * rh[row];
    scalar_t* gs = grad_student.data_ptr<scalar_t>();
    for_each_tile<acc_t>(p, fs, ft, fs.d_pad, [&](int64_t b, int64_t i0, int64_t rows, TileBuffers& buf) {
      acc_t* w = buf.s.data_ptr<acc_t>();
      acc_t* g = buf.g.data_ptr<acc_t>();
      gradient_weights(w, buf.t.const_data_ptr<acc_t>(), buf.ld, rows, N, b * N, i0, sa, sp, coef.data(), rsum.data(),
                       static_cast<acc_t>(p.scale_s));
      // g [rows, d_pad] = W [rows, N] · F_s[b] [N, d_pad]
      gemm_packed(w, buf.ld, fs.gradient.const_data_ptr<acc_t>() + b * N * fs.d_pad, N, g, fs.d_pad,
                  round_up(rows, kMR), fs.d_pad);
      for (int64_t r = 0; r < rows; ++r) store_row(gs + (b * N + i0 + r) * p.Ds, g + r * fs.d_pad, p.Ds);
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
