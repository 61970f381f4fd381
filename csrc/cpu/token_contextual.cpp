// TRG token-wise contextual loss, CPU kernels for the CPU dispatch key. The op contract (shapes,
// dtypes, reductions, the precomputed gradient) is documented once, with the schemas, in
// kdloss/_ops/token_contextual.py. Features F_s [B, N, Ds], F_t [B, N, Dt]:
//   S = F_s F_sᵀ/√Ds, T = F_t F_tᵀ/√Dt per image; A = softmax_row(S), P = softmax_row(T)
//   loss = Σ_{b,i,j} (P − A)² / (B·N·N)   (mean; the sum drops the divisor; none: [B, N] row means)
//
// One task owns one image at a time and holds its two N×N similarity matrices in a task buffer
// (freed when the task ends; nothing N×N survives the call). S and T are symmetric, so only the
// lower block triangle is multiplied (syrk-style: micro-tiles of 6 rows × 2 vectors that touch
// j ≤ i), then mirrored: half the FLOPs of a full product.
//
// Gradient (∂L/∂A_ij = c_i (A_ij − P_ij); c = 2/(B N²) for mean, 2 for sum, 2 g_i / N for none):
//   ρ_i = Σ_j (A_ij − P_ij) A_ij,  V_ij = A_ij (c_i (A_ij − P_ij) − c_i ρ_i)   (= dS, the softmax backward)
//   ∂L/∂F_s = W F_s with W = (V + Vᵀ)/√Ds                                      (ONE GEMM per image)
// W is formed in place over S (symmetric), then multiplied by the packed student.
// * Scalar reductions with a gradient needed: the forward also returns this gradient for an upstream
//   gradient of 1 (no recomputation, 1.5 GEMM-equivalents forward, none backward; eager runs 4).
// * reduction none (per-row upstream gradients): the forward keeps per row (O(B·N)) the softmax
//   statistics of S and T (row max and log-sum, kept apart for accuracy) and ρ; the backward recomputes
//   the triangles and runs the one GEMM (2 GEMM-equivalents).
// Every element of every product is summed in a fixed order (kdloss/cpu_gemm.h), images do not
// depend on the thread count and the loss is an ordered sum of row partials, so results are bitwise
// identical for any torch.set_num_threads. With fewer images than threads (or images too long for
// one buffer per thread) one image runs at a time, its row blocks split over the threads, with the
// same per-element order. Extra memory: per task two N×N buffers and packed copies of one image's
// features, freed when the call returns (at most kWorkspaceBudget of N×N buffers at once), plus the
// returned O(B·N) statistics and, when asked, the gradient.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kdloss/cpu_exp.h"
#include "kdloss/cpu_gemm.h"
#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

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
  Problem p{student.size(0), student.size(1), student.size(2), teacher.size(2), 0, 0};
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

// Row statistics of one side for all B·N rows: max[row], logsum[row], the two halves of a
// [2, B, N] tensor.
template <typename acc_t>
struct Stats {
  acc_t* max;
  acc_t* logsum;
  Stats(at::Tensor& t, int64_t rows_total) : max(t.data_ptr<acc_t>()), logsum(max + rows_total) {}
};

// Row stride of a row-major GEMM operand of `cols` columns: one panel wider when cols is a multiple
// of 1 KiB (rows 4 KiB apart would share L1 sets and evict each other in the micro-kernel's 6-row
// reads).
template <typename acc_t>
int64_t similarity_stride(int64_t n_cols) {
  return (n_cols * static_cast<int64_t>(sizeof(acc_t))) % 1024 == 0 ? n_cols + gemm_nr<acc_t>() : n_cols;
}

// One side of one image, packed for the products: `rows` [n_pad, D] (zero rows past N; the A
// operand), `panels` (xᵀ in panels: the B operand of x xᵀ) and, for the student's gradient,
// `columns` (x in column panels: the B operand of W x).
template <typename acc_t>
struct PackedImage {
  int64_t N, D, n_pad, n_cols, d_cols, ld;  // ld: row stride of `rows`
  std::vector<acc_t> rows, panels, columns;
  PackedImage(int64_t N_, int64_t D_, bool for_gradient)
      : N(N_),
        D(D_),
        n_pad(round_up_to(N_, kGemmMR)),
        n_cols(round_up_to(N_, gemm_nr<acc_t>())),
        d_cols(round_up_to(D_, gemm_nr<acc_t>())),
        ld(similarity_stride<acc_t>(D_)),
        rows(n_pad * ld, acc_t(0)),
        panels(n_cols * D_),
        columns(for_gradient ? d_cols * N_ : 0) {}

  template <typename scalar_t>
  void load(const scalar_t* x) {  // x: one image [N, D], contiguous
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) rows[i * ld + d] = static_cast<acc_t>(x[i * D + d]);
    pack_row_panels<acc_t>(rows.data(), ld, N, D, panels.data());
    if (!columns.empty()) pack_col_panels<acc_t>(rows.data(), ld, N, D, columns.data());
  }
};

// Rows per strip of the blocked transposes (the column entries written stay in L1).
constexpr int64_t kTransposeBlock = 32;

// Rows [m0, m1) (multiples of kGemmMR) of out [n_pad, ld] ← x xᵀ for one image (ld ≥ n_cols), raw
// dot products: only the micro-tiles on or below the diagonal.
template <typename acc_t>
void lower_products(const PackedImage<acc_t>& x, acc_t* out, int64_t ld, int64_t m0, int64_t m1) {
  gemm_rows(x.rows.data(), x.ld, x.panels.data(), x.D, out, ld, m0, m1, x.n_cols, true);
}

// Rows [r0, r1): the lower triangle copied into the upper one (S exactly symmetric). Row i writes
// only the column entries (j, i), j < i, that no other row touches.
template <typename acc_t>
void mirror_lower(acc_t* out, int64_t ld, int64_t r0, int64_t r1) {
  for (int64_t j0 = 0; j0 < r1; j0 += kTransposeBlock) {  // a kTransposeBlock-row strip of columns [r0, r1)
    for (int64_t i = std::max(r0, j0); i < r1; ++i)
      for (int64_t j = j0; j < std::min(j0 + kTransposeBlock, i); ++j) out[j * ld + i] = out[i * ld + j];
  }
}

// In place: v[0..N) → scale·v (rounded: a product alone, nothing to fuse it with); returns the max
// of the results, NaN when any is NaN.
template <typename acc_t>
acc_t scale_row_max(acc_t* v, int64_t N, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vscale(scale);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (N >= V) {
    Vec vm(m);
    for (; j + V <= N; j += V) {
      const Vec x = Vec::loadu(v + j) * vscale;
      x.store(v + j);
      vm = at::vec::maximum(vm, x);  // propagates NaN
    }
    m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < N; ++j) {
    v[j] *= scale;
    m = std::isnan(v[j]) || v[j] > m ? v[j] : m;
  }
  return m;
}

// In place: v[0..N) → exp((v − m) − l); returns Σ_j of the results. With m and l finite every
// argument is ≤ 0 or −inf (m is the row max, l ≥ 0): the cheaper exp without the overflow branch;
// otherwise (an infinite or NaN row) the general one, so that NaN and inf propagate.
template <typename acc_t>
acc_t exp_shifted(acc_t* v, int64_t N, acc_t m, acc_t l) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m), vl(l);
  Vec vs(acc_t(0));
  int64_t j = 0;
  if (std::isfinite(m) && std::isfinite(l)) {
    for (; j + V <= N; j += V) {
      const Vec e = vexp_nonpositive((Vec::loadu(v + j) - vm) - vl);
      e.store(v + j);
      vs = vs + e;
    }
  } else {
    for (; j + V <= N; j += V) {
      const Vec e = vexp((Vec::loadu(v + j) - vm) - vl);
      e.store(v + j);
      vs = vs + e;
    }
  }
  acc_t s = vec_sum(vs);
  for (; j < N; ++j) {
    v[j] = std::exp((v[j] - m) - l);
    s += v[j];
  }
  return s;
}

// In place: v[0..N) (raw dot products) → softmax(scale·v); writes the row's max m of scale·v and
// l = log Σ_j exp(scale·v_j − m).
template <typename acc_t>
void softmax_row(acc_t* v, int64_t N, acc_t scale, acc_t& m_out, acc_t& l_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t m = scale_row_max(v, N, scale);
  const acc_t s = exp_shifted(v, N, m, acc_t(0));
  const Vec inv(acc_t(1) / s);
  int64_t j = 0;
  for (; j + V <= N; j += V) (Vec::loadu(v + j) * inv).store(v + j);
  for (; j < N; ++j) v[j] *= acc_t(1) / s;
  m_out = m;
  l_out = std::log(s);
}

// In place: v[0..N) (raw dot products) → exp((scale·v − m) − l), the softmax rebuilt from saved
// statistics.
template <typename acc_t>
void softmax_from_stats(acc_t* v, int64_t N, acc_t scale, acc_t m, acc_t l) {
  scale_row_max(v, N, scale);
  exp_shifted(v, N, m, l);
}

// Σ_j (A_j − P_j)² (returned) and ρ = Σ_j (A_j − P_j) A_j of one row.
template <typename acc_t>
acc_t squared_error_row(const acc_t* a, const acc_t* p, int64_t N, acc_t& rho) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec sq(acc_t(0)), rv(acc_t(0));
  int64_t j = 0;
  for (; j + V <= N; j += V) {
    const Vec av = Vec::loadu(a + j);
    const Vec e = av - Vec::loadu(p + j);
    sq = at::vec::fmadd(e, e, sq);
    rv = at::vec::fmadd(e, av, rv);
  }
  acc_t s = vec_sum(sq), r = vec_sum(rv);
  for (; j < N; ++j) {
    const acc_t e = a[j] - p[j];
    s += e * e;
    r += e * a[j];
  }
  rho = r;
  return s;
}

// In place over a row of A: V_j = A_j (c (A_j − P_j) − r), r = c ρ (row of dS).
template <typename acc_t>
void softmax_backward_row(acc_t* a, const acc_t* p, int64_t N, acc_t c, acc_t r) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vc(c), vr(r);
  int64_t j = 0;
  for (; j + V <= N; j += V) {
    const Vec av = Vec::loadu(a + j);
    (av * (vc * (av - Vec::loadu(p + j)) - vr)).store(a + j);
  }
  for (; j < N; ++j) a[j] = a[j] * (c * (a[j] - p[j]) - r);
}

// In place, rows [r0, r1) of V [N, N] (row stride ld) → W = scale · (V + Vᵀ): the pair {i, j}, j ≤ i,
// is handled by row i alone, so row ranges can run in parallel.
template <typename acc_t>
void symmetrize(acc_t* v, int64_t ld, acc_t scale, int64_t r0, int64_t r1) {
  for (int64_t j0 = 0; j0 < r1; j0 += kTransposeBlock) {  // strips of rows j, as in mirror_lower
    for (int64_t i = std::max(r0, j0); i < r1; ++i) {
      for (int64_t j = j0; j < std::min(j0 + kTransposeBlock, i); ++j) {
        const acc_t w = scale * (v[i * ld + j] + v[j * ld + i]);
        v[i * ld + j] = w;
        v[j * ld + i] = w;
      }
    }
  }
  for (int64_t i = r0; i < r1; ++i) v[i * ld + i] = scale * (v[i * ld + i] + v[i * ld + i]);
}

// Rows [m0, m1) (multiples of kGemmMR) of W [n_pad, N] (row stride ld) · x into out [N, D]: one GEMM
// over the packed student, straight into out where its rows and columns match the micro-tiles (same
// type, D a multiple of the panel width, whole tiles below N), the rest through g [n_pad, d_cols].
template <typename acc_t, typename out_t>
void weighted_sum(const acc_t* w, int64_t ld, const PackedImage<acc_t>& x, acc_t* g, out_t* out, int64_t m0,
                  int64_t m1) {
  int64_t direct_end = m0;  // rows [m0, direct_end) go straight to out
  if constexpr (std::is_same_v<acc_t, out_t>) {
    if (x.d_cols == x.D) direct_end = std::max(m0, std::min(m1, x.N / kGemmMR * kGemmMR));
    if (direct_end > m0) gemm_rows(w, ld, x.columns.data(), x.N, out, x.D, m0, direct_end, x.d_cols, false);
  }
  if (direct_end == m1) return;
  gemm_rows(w, ld, x.columns.data(), x.N, g, x.d_cols, direct_end, m1, x.d_cols, false);
  for (int64_t i = direct_end; i < std::min(m1, x.N); ++i)
    for (int64_t d = 0; d < x.D; ++d) out[i * x.D + d] = static_cast<out_t>(g[i * x.d_cols + d]);
}

// Runs f(r0, r1) over rows [0, n): at once, or in parallel over blocks of kGemmMC rows (multiples of
// kGemmMR), visited in the order 0, last, 1, last − 1, … so that the contiguous ranges each thread
// gets mix short and long rows of a triangle.
template <typename F>
void over_rows(int64_t n, bool parallel, const F& f) {
  if (!parallel) {
    f(0, n);
    return;
  }
  const int64_t blocks = (n + kGemmMC - 1) / kGemmMC;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t block = q % 2 == 0 ? q / 2 : blocks - 1 - q / 2;
      f(block * kGemmMC, std::min(n, (block + 1) * kGemmMC));
    }
  });
}

// One task's buffers: the packed sides of its current image and the similarity / gradient blocks.
template <typename acc_t>
struct ImageWork {
  PackedImage<acc_t> xs, xt;
  int64_t ld;
  std::vector<acc_t> s, t, g;
  ImageWork(const Problem& p, bool for_gradient)
      : xs(p.N, p.Ds, for_gradient),
        xt(p.N, p.Dt, false),
        ld(similarity_stride<acc_t>(xs.n_cols)),
        s(xs.n_pad * ld, acc_t(0)),
        t(xs.n_pad * ld, acc_t(0)),
        g(for_gradient ? xs.n_pad * xs.d_cols : 0) {}

  // The raw dot products F Fᵀ of image b, both sides (the softmaxes apply 1/√D); with `parallel` the
  // row blocks are split over threads.
  template <typename scalar_t, typename teacher_t>
  void similarities_of(const Problem& p, const scalar_t* student, const teacher_t* teacher, int64_t b, bool parallel) {
    xs.load(student + b * p.N * p.Ds);
    xt.load(teacher + b * p.N * p.Dt);
    over_rows(xs.n_pad, parallel, [&](int64_t m0, int64_t m1) {
      lower_products(xs, s.data(), ld, m0, m1);
      lower_products(xt, t.data(), ld, m0, m1);
    });
    over_rows(p.N, parallel, [&](int64_t r0, int64_t r1) {
      mirror_lower(s.data(), ld, r0, r1);
      mirror_lower(t.data(), ld, r0, r1);
    });
  }

  // The gradient rows of image b from the softmax-backward rows V held in s: W = (V + Vᵀ)/√Ds, then
  // W · F_s into out [N, Ds].
  template <typename out_t>
  void gradient_of(const Problem& p, out_t* out, bool parallel) {
    over_rows(p.N, parallel,
              [&](int64_t r0, int64_t r1) { symmetrize(s.data(), ld, static_cast<acc_t>(p.scale_s), r0, r1); });
    over_rows(xs.n_pad, parallel,
              [&](int64_t m0, int64_t m1) { weighted_sum(s.data(), ld, xs, g.data(), out, m0, m1); });
  }
};

// Bytes of N×N image buffers that may be in flight at once: past it, fewer images run in parallel
// (a grain of several images per task), so a long sequence cannot take 2·N² per thread.
constexpr int64_t kWorkspaceBudget = int64_t(256) << 20;

// How images are spread over threads: whole images per task (grain: images per task, at most
// kWorkspaceBudget / (one task's buffers) tasks), or — when there are fewer images than threads or
// the buffers of one image per thread exceed the budget — one image at a time with its row blocks
// split over threads (grain 0). Both compute every element in the same order.
template <typename acc_t>
int64_t image_grain(const Problem& p) {
  const int64_t per_task =
      2 * round_up_to(p.N, kGemmMR) * round_up_to(p.N, gemm_nr<acc_t>()) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = std::max<int64_t>(1, kWorkspaceBudget / std::max<int64_t>(1, per_task));
  if (threads > 1 && (p.B < threads || tasks < threads)) return 0;
  return std::max<int64_t>(1, (p.B + tasks - 1) / tasks);
}

// Runs f(work, b, parallel_rows) for every image b (see image_grain).
template <typename acc_t, typename F>
void over_images(const Problem& p, bool for_gradient, const F& f) {
  const int64_t grain = image_grain<acc_t>(p);
  if (grain == 0) {
    ImageWork<acc_t> work(p, for_gradient);
    for (int64_t b = 0; b < p.B; ++b) f(work, b, true);
    return;
  }
  at::parallel_for(0, p.B, grain, [&](int64_t begin, int64_t end) {
    ImageWork<acc_t> work(p, for_gradient);
    for (int64_t b = begin; b < end; ++b) f(work, b, false);
  });
}

// c_i, the per-row scale of ∂L/∂A = c (A − P), for an upstream gradient g.
template <typename acc_t>
acc_t row_coefficient(const acc_t* g, Reduction reduction, int64_t row, int64_t rows_total, int64_t N) {
  const acc_t nn = static_cast<acc_t>(N);
  if (reduction == Reduction::kNone) return acc_t(2) * g[row] / nn;
  if (reduction == Reduction::kMean) return acc_t(2) * g[0] / (static_cast<acc_t>(rows_total) * nn);
  return acc_t(2) * g[0];
}

template <typename teacher_t, typename scalar_t>
void contextual_forward(const Problem& p, const scalar_t* student, const teacher_t* teacher, Reduction reduction,
                        at::Tensor& stats_s, at::Tensor& stats_t, at::Tensor& rho, at::Tensor& out,
                        Acc<scalar_t>* grad_unit) {
  using acc_t = Acc<scalar_t>;
  const int64_t N = p.N, rows_total = p.B * p.N;
  std::vector<acc_t> row_sums(rows_total);
  const Stats<acc_t> ss(stats_s, rows_total), st(stats_t, rows_total);
  acc_t* rh = rho.data_ptr<acc_t>();
  const acc_t one(1), scale_s = static_cast<acc_t>(p.scale_s), scale_t = static_cast<acc_t>(p.scale_t);
  over_images<acc_t>(p, grad_unit != nullptr, [&](ImageWork<acc_t>& work, int64_t b, bool parallel) {
    work.similarities_of(p, student, teacher, b, parallel);
    over_rows(N, parallel, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t row = b * N + i;
        acc_t* a = work.s.data() + i * work.ld;
        acc_t* q = work.t.data() + i * work.ld;
        softmax_row(a, N, scale_s, ss.max[row], ss.logsum[row]);
        softmax_row(q, N, scale_t, st.max[row], st.logsum[row]);
        row_sums[row] = squared_error_row(a, q, N, rh[row]);
        if (grad_unit == nullptr) continue;
        const acc_t c = row_coefficient(&one, reduction, row, rows_total, N);
        softmax_backward_row(a, q, N, c, c * rh[row]);
      }
    });
    if (grad_unit != nullptr) work.gradient_of(p, grad_unit + b * N * p.Ds, parallel);
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
}

// A [B, N, D] input as a contiguous tensor of its own dtype or of the accumulation dtype (the
// teacher may come in another dtype than the student).
at::Tensor teacher_operand(const at::Tensor& teacher, const at::Tensor& student) {
  const auto acc = acc_type(student.scalar_type());
  const auto t = teacher.scalar_type();
  return (t == student.scalar_type() || t == acc ? teacher : teacher.to(acc)).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_contextual_fwd(
    const at::Tensor& student_in, const at::Tensor& teacher_in, int64_t reduction_code, bool with_grad) {
  const Problem p = problem_of(student_in, teacher_in);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student_in.scalar_type());
  const auto opts = at::TensorOptions().dtype(acc);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_operand(teacher_in, student_in);
  at::Tensor stats_s = at::empty({2, p.B, p.N}, opts);
  at::Tensor stats_t = at::empty({2, p.B, p.N}, opts);
  at::Tensor rho = at::empty({p.B, p.N}, opts);
  const bool precompute = with_grad && reduction != Reduction::kNone;
  at::Tensor grad_unit = precompute ? at::empty(student_in.sizes(), opts) : at::empty({0}, opts);
  // the loss is returned in the accumulation dtype
  at::Tensor out = at::empty(reduction == Reduction::kNone ? at::IntArrayRef{p.B, p.N} : at::IntArrayRef{}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "token_contextual_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    acc_t* g = precompute && student.numel() > 0 ? grad_unit.data_ptr<acc_t>() : nullptr;
    const scalar_t* xs = student.const_data_ptr<scalar_t>();
    if (teacher.scalar_type() == student.scalar_type()) {
      contextual_forward(p, xs, teacher.const_data_ptr<scalar_t>(), reduction, stats_s, stats_t, rho, out, g);
    } else {
      contextual_forward(p, xs, teacher.const_data_ptr<acc_t>(), reduction, stats_s, stats_t, rho, out, g);
    }
  });
  return {out, stats_s, stats_t, rho, grad_unit};
}

template <typename teacher_t, typename scalar_t>
void contextual_backward(const Problem& p, const scalar_t* student, const teacher_t* teacher, Reduction reduction,
                         const Acc<scalar_t>* grad, at::Tensor& stats_s, at::Tensor& stats_t, const at::Tensor& rho,
                         scalar_t* grad_student) {
  using acc_t = Acc<scalar_t>;
  const int64_t N = p.N, rows_total = p.B * N;
  const Stats<acc_t> sa(stats_s, rows_total), sp(stats_t, rows_total);
  const acc_t scale_s = static_cast<acc_t>(p.scale_s), scale_t = static_cast<acc_t>(p.scale_t);
  const acc_t* rh = rho.const_data_ptr<acc_t>();
  over_images<acc_t>(p, true, [&](ImageWork<acc_t>& work, int64_t b, bool parallel) {
    work.similarities_of(p, student, teacher, b, parallel);
    over_rows(N, parallel, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t row = b * N + i;
        acc_t* a = work.s.data() + i * work.ld;
        acc_t* q = work.t.data() + i * work.ld;
        softmax_from_stats(a, N, scale_s, sa.max[row], sa.logsum[row]);
        softmax_from_stats(q, N, scale_t, sp.max[row], sp.logsum[row]);
        const acc_t c = row_coefficient(grad, reduction, row, rows_total, N);
        softmax_backward_row(a, q, N, c, c * rh[row]);
      }
    });
    work.gradient_of(p, grad_student + b * N * p.Ds, parallel);
  });
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
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_operand(teacher_in, student_in);
  at::Tensor stats_s = stats_s_in.contiguous(), stats_t = stats_t_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "token_contextual_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const scalar_t* xs = student.const_data_ptr<scalar_t>();
    scalar_t* out = grad_student.data_ptr<scalar_t>();
    if (teacher.scalar_type() == student.scalar_type()) {
      contextual_backward(p, xs, teacher.const_data_ptr<scalar_t>(), reduction, g, stats_s, stats_t, rho, out);
    } else {
      contextual_backward(p, xs, teacher.const_data_ptr<acc_t>(), reduction, g, stats_s, stats_t, rho, out);
    }
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
