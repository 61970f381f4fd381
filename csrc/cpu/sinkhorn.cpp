// SinKD CPU kernels (spec §1, decision 1) for the CPU dispatch key. The op contract (shapes, dtypes,
// options) is documented once, with the schemas, in kdloss/_ops/sinkhorn.py.
//
// Forward, all in the accumulation dtype:
//   s = softmax((z_s − max)/T), t = softmax((z_t − max)/T)  rows; parallel over rows
//   W_ij = Σ_c |s_ic − t_jc|                               vectorised over j (teacher transposed)
//   x = −W/ε;  n times:  a_i = lse_j(x_ij), x ← x − a_i     row step, parallel over rows
//                        b_j = lse_i(x_ij), x ← x − b_j     column step, parallel over column blocks
//   loss = scale · Σ_ij exp(x_ij) · W_ij                   per-row partials + ordered_sum
// The iterate x is kept and updated in place, exactly as the reference computes it (and not as
// −W/ε + f_i + g_j with accumulated potentials f, g: those grow like W/ε, and adding them back onto
// −W/ε cancels all but a few bits at small ε). The column step's subtraction is deferred to the
// next row pass (or the loss pass), which applies it while streaming the row. The increments a, b
// of every half-step — 2·n·(B + B') numbers — are saved for the backward.
//
// Backward (spec §1.5): x̄ = gs·P⊙W, W̄ = gs·P (gs = grad·scale); for each step in reverse
//   column step: x̄ ← x̄ − P_col⊙colsum(x̄);  row step: x̄ ← x̄ − P_row⊙rowsum(x̄);  then W̄ −= x̄/ε,
//   s̄_ic = Σ_j W̄_ij·sign(s_ic − t_jc), z̄ = (1/T)·s⊙(s̄ − ⟨s̄, s⟩).
// P_row / P_col are exp of the iterate after that half-step. W̄ −= x̄/ε amplifies any inconsistency
// between these plans and the forward's by 1/ε, so the backward regenerates the forward's iterates
// bitwise: "state h" (the iterate after h half-steps, state 0 = −W/ε) is replayed from the saved
// increments with the forward's own subtractions, starting from checkpoints stored every
// ⌈√(2n)⌉ half-steps (⌊2n/m⌋ extra B×B' buffers, at most m subtractions per replayed element).
// A row pass (apply the column update, take row sums) alternates with a column-block pass (apply
// the row update, take column sums), so every reduction is sequential inside one task.
//
// exp is `vexp` (kdloss/cpu_exp.h: ~2 ulp, ~3× Sleef's throughput on AVX2; fp64 uses ATen's exp).
// Every B×B' matrix is stored with its rows padded to a multiple of the vector width (pads: W = 0,
// x = −inf, b = 0, so their plan entries are exp(−inf) = 0), which removes scalar tails: each
// element is computed by the same vector instruction whatever the thread count, and the results
// are bitwise independent of it.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kdloss/cpu_exp.h"
#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

// Columns per task of a column-block pass (in vectors): 32 vectors = 1 KiB of fp32 per row, so a
// task streams long contiguous row segments (short segments at a stride of B' elements defeat the
// hardware prefetcher); its per-column accumulators stay in L1.
constexpr int64_t kBlockVecs = 32;

// Grain of the B×B' passes: a pass is one parallel region, and a recursion runs 2·n_iters of them,
// so each task gets at least ~2^18 elements (~0.1 ms of exp) — small plans run on one thread
// instead of paying a fork/join per half-step (which costs milliseconds on a loaded machine).
inline int64_t pass_grain(int64_t work_per_unit) {
  constexpr int64_t kMinWork = int64_t(1) << 18;
  const int64_t w = work_per_unit > 0 ? work_per_unit : 1;
  return std::max<int64_t>(row_grain(w), (kMinWork + w - 1) / w);
}

template <typename acc_t>
struct Problem {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();
  int64_t B, Bt, Bp, C;  // rows (student), columns (teacher), padded row length, classes
  acc_t eps;

  int64_t blocks() const { return (Bp / V + kBlockVecs - 1) / kBlockVecs; }
  // column range [j0, j1) of block q (multiples of V)
  int64_t block_begin(int64_t q) const { return q * kBlockVecs * V; }
  int64_t block_end(int64_t q) const { return std::min(Bp, (q + 1) * kBlockVecs * V); }
};

template <typename acc_t>
acc_t vec_max(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// out[r, :] = softmax(z[r, :] / T) for rows [0, rows); z has row stride `stride`, unit column stride.
// The logits are shifted by their maximum before the division by T (z/T itself overflows for a
// tiny T).
template <typename in_t, typename acc_t>
void softmax_rows(const in_t* z, int64_t rows, int64_t C, int64_t stride, double T, acc_t* out) {
  const acc_t temp = static_cast<acc_t>(T);
  at::parallel_for(0, rows, row_grain(4 * C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const in_t* zr = z + r * stride;
      acc_t* o = out + r * C;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<acc_t>(zr[c]);
        m = std::max(m, o[c]);
      }
      acc_t total = 0;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = std::exp((o[c] - m) / temp);
        total += o[c];
      }
      for (int64_t c = 0; c < C; ++c) o[c] /= total;
    }
  });
}

// tT[c, j] = t[j, c], zero-padded to Bp columns.
template <typename acc_t>
std::vector<acc_t> transpose_padded(const acc_t* t, const Problem<acc_t>& p) {
  std::vector<acc_t> tT(p.C * p.Bp, acc_t(0));
  for (int64_t j = 0; j < p.Bt; ++j)
    for (int64_t c = 0; c < p.C; ++c) tT[c * p.Bp + j] = t[j * p.C + c];
  return tT;
}

// Fills W (pads 0) and L = −W/ε (pads −inf), both [B, Bp]: W_ij = Σ_c |s_ic − t_jc|, vectorised over j.
template <typename acc_t>
void cost_matrix(const acc_t* s, const acc_t* tT, const Problem<acc_t>& p, acc_t* W, acc_t* L) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec veps(p.eps), zero(acc_t(0));
  at::parallel_for(0, p.B, row_grain(p.Bp * p.C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* si = s + i * p.C;
      acc_t* Wi = W + i * p.Bp;
      acc_t* Li = L + i * p.Bp;
      int64_t j = 0;
      for (; j + 4 * V <= p.Bp; j += 4 * V) {  // four independent accumulators
        Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
        for (int64_t c = 0; c < p.C; ++c) {
          const Vec sc(si[c]);
          const acc_t* tc = tT + c * p.Bp + j;
          a0 = a0 + (sc - Vec::loadu(tc)).abs();
          a1 = a1 + (sc - Vec::loadu(tc + V)).abs();
          a2 = a2 + (sc - Vec::loadu(tc + 2 * V)).abs();
          a3 = a3 + (sc - Vec::loadu(tc + 3 * V)).abs();
        }
        a0.store(Wi + j), a1.store(Wi + j + V), a2.store(Wi + j + 2 * V), a3.store(Wi + j + 3 * V);
        ((zero - a0) / veps).store(Li + j), ((zero - a1) / veps).store(Li + j + V);
        ((zero - a2) / veps).store(Li + j + 2 * V), ((zero - a3) / veps).store(Li + j + 3 * V);
      }
      for (; j < p.Bp; j += V) {
        Vec a(acc_t(0));
        for (int64_t c = 0; c < p.C; ++c) a = a + (Vec(si[c]) - Vec::loadu(tT + c * p.Bp + j)).abs();
        a.store(Wi + j);
        ((zero - a) / veps).store(Li + j);
      }
      for (j = p.Bt; j < p.Bp; ++j) {
        Wi[j] = acc_t(0);
        Li[j] = -std::numeric_limits<acc_t>::infinity();
      }
    }
  });
}

// Row step: x_ij ← x_ij − b_j (the pending column step; none for the first row step), then
// a_i = lse_j(x_ij) and x_ij ← x_ij − a_i, for every row (parallel over rows; the row stays in L1).
template <typename acc_t>
void row_step(acc_t* X, const acc_t* b_prev, const Problem<acc_t>& p, acc_t* a) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, p.B, pass_grain(3 * p.Bp), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* Xi = X + i * p.Bp;
      Vec m(-std::numeric_limits<acc_t>::infinity());
      for (int64_t j = 0; j < p.Bp; j += V) {
        Vec x = Vec::loadu(Xi + j);
        if (b_prev) {
          x = x - Vec::loadu(b_prev + j);
          x.store(Xi + j);
        }
        m = at::vec::maximum(m, x);
      }
      const acc_t mx = vec_max(m);
      const Vec vmx(mx);
      Vec sum(acc_t(0));
      for (int64_t j = 0; j < p.Bp; j += V) sum = sum + vexp(Vec::loadu(Xi + j) - vmx);
      const acc_t ai = mx + std::log(vec_sum(sum));
      a[i] = ai;
      const Vec va(ai);
      for (int64_t j = 0; j < p.Bp; j += V) (Vec::loadu(Xi + j) - va).store(Xi + j);
    }
  });
}

// Column step: b_j = lse_i(x_ij) (parallel over column blocks; pads get b = 0). The subtraction
// x ← x − b is left to the next row pass.
template <typename acc_t>
void col_step(const acc_t* X, const Problem<acc_t>& p, acc_t* b) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, p.blocks(), pass_grain(2 * p.B * kBlockVecs * V), [&](int64_t qb, int64_t qe) {
    for (int64_t q = qb; q < qe; ++q) {
      const int64_t j0 = p.block_begin(q), nv = (p.block_end(q) - j0) / V;
      Vec m[kBlockVecs], sum[kBlockVecs];
      for (int64_t k = 0; k < nv; ++k) m[k] = Vec(-std::numeric_limits<acc_t>::infinity());
      for (int64_t i = 0; i < p.B; ++i) {
        const acc_t* Xi = X + i * p.Bp + j0;
        for (int64_t k = 0; k < nv; ++k) m[k] = at::vec::maximum(m[k], Vec::loadu(Xi + k * V));
      }
      for (int64_t k = 0; k < nv; ++k) sum[k] = Vec(acc_t(0));
      for (int64_t i = 0; i < p.B; ++i) {
        const acc_t* Xi = X + i * p.Bp + j0;
        for (int64_t k = 0; k < nv; ++k) sum[k] = sum[k] + vexp(Vec::loadu(Xi + k * V) - m[k]);
      }
      for (int64_t k = 0; k < nv; ++k) (m[k] + sum[k].log()).store(b + j0 + k * V);
    }
  });
  for (int64_t j = p.Bt; j < p.Bp; ++j) b[j] = acc_t(0);  // pads: −inf columns would give NaN
}

// The iterates of the forward, regenerated bitwise: state(h) is the iterate after h half-steps
// (state 0 = −W/ε; half-step t subtracts a_{t/2} from the rows for even t, b_{t/2} from the columns
// for odd t), replayed with the forward's subtractions from the nearest stored checkpoint below h.
template <typename acc_t>
struct Replay {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t* L;     // state 0, [B, Bp]
  const acc_t* ckpt;  // states m, 2m, …: [⌊2n/m⌋, B, Bp]
  const acc_t* a;     // [n, B] row increments
  const acc_t* b;     // [n, Bp] column increments, pads 0
  int64_t B, Bp, m;

  Vec state(int64_t h, int64_t i, int64_t j) const {
    const int64_t c = h / m;
    Vec x = Vec::loadu((c == 0 ? L : ckpt + (c - 1) * B * Bp) + i * Bp + j);
    for (int64_t t = c * m; t < h; ++t) {
      x = (t % 2 == 0) ? x - Vec(a[(t / 2) * B + i]) : x - Vec::loadu(b + (t / 2) * Bp + j);
    }
    return x;
  }
};

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  check_cpu_float(student, "student_logits");
  check_cpu_float(teacher, "teacher_logits");
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be [B, C], got ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) >= 1, "student_logits must have at least one class");
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(1) == student.size(1), "teacher_logits must be [B', ",
                    student.size(1), "], got ", teacher.sizes());
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc, "teacher_logits must be ", acc, ", got ", teacher.scalar_type());
}

void check_options(double temperature, double epsilon, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon > 0, "epsilon must be > 0, got ", epsilon);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

template <typename acc_t>
Problem<acc_t> make_problem(int64_t B, int64_t Bt, int64_t C, double epsilon) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  return {B, Bt, (Bt + V - 1) / V * V, C, static_cast<acc_t>(epsilon)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& temperature_t,
    const at::Tensor& epsilon_t, int64_t n_iters, const at::Tensor& scale_t) {
  const double temperature = float_arg(temperature_t, "temperature");
  const double epsilon = float_arg(epsilon_t, "epsilon");
  const double scale = float_arg(scale_t, "scale");
  check_inputs(student_logits, teacher_logits);
  check_options(temperature, epsilon, scale);
  TORCH_CHECK_VALUE(n_iters >= 1, "n_iters must be >= 1, got ", n_iters);
  const int64_t B = student_logits.size(0), Bt = teacher_logits.size(0), C = student_logits.size(1);
  const auto zs = student_logits.stride(1) == 1 ? student_logits : student_logits.contiguous();
  const auto zt = teacher_logits.contiguous();
  const auto acc_opts = zt.options();
  at::Tensor loss = at::empty({}, acc_opts);  // the loss is returned in the accumulation dtype
  at::Tensor probs_s = at::empty({B, C}, acc_opts), probs_t = at::empty({Bt, C}, acc_opts);
  at::Tensor cost = at::empty({B, Bt}, acc_opts);
  at::Tensor a_hist = at::zeros({n_iters, B}, acc_opts), b_hist = at::zeros({n_iters, Bt}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs.scalar_type(), "sinkhorn_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    acc_t* s = probs_s.data_ptr<acc_t>();
    acc_t* t = probs_t.data_ptr<acc_t>();
    softmax_rows<scalar_t, acc_t>(zs.data_ptr<scalar_t>(), B, C, zs.stride(0), temperature, s);
    softmax_rows<acc_t, acc_t>(zt.data_ptr<acc_t>(), Bt, C, C, temperature, t);
    if (B == 0 || Bt == 0) {  // an empty plan: the loss is 0
      loss.fill_(0);
      return;
    }
    const auto p = make_problem<acc_t>(B, Bt, C, epsilon);
    const std::vector<acc_t> tT = transpose_padded(t, p);
    std::vector<acc_t> W(B * p.Bp), X(B * p.Bp), b(p.Bp, acc_t(0));
    cost_matrix(s, tT.data(), p, W.data(), X.data());  // X = −W/ε
    acc_t* ah = a_hist.data_ptr<acc_t>();
    acc_t* bh = b_hist.data_ptr<acc_t>();
    for (int64_t k = 0; k < n_iters; ++k) {
      row_step(X.data(), k > 0 ? b.data() : nullptr, p, ah + k * B);
      col_step(X.data(), p, b.data());
      std::copy(b.begin(), b.begin() + Bt, bh + k * Bt);
    }
    std::vector<acc_t> row_sums(B);
    acc_t* cost_p = cost.data_ptr<acc_t>();
    at::parallel_for(0, B, pass_grain(2 * p.Bp), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* Xi = X.data() + i * p.Bp;
        const acc_t* Wi = W.data() + i * p.Bp;
        Vec acc(acc_t(0));
        for (int64_t j = 0; j < p.Bp; j += V) {
          acc = acc + vexp(Vec::loadu(Xi + j) - Vec::loadu(b.data() + j)) * Vec::loadu(Wi + j);
        }
        row_sums[i] = vec_sum(acc);
        std::copy(Wi, Wi + Bt, cost_p + i * Bt);
      }
    });
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(scale) * ordered_sum(row_sums.data(), B);
  });
  return {loss, probs_s, probs_t, cost, a_hist, b_hist};
}

at::Tensor sinkhorn_bwd(const at::Tensor& grad, const at::Tensor& student_logits, const at::Tensor& probs_s,
                        const at::Tensor& probs_t, const at::Tensor& cost, const at::Tensor& a_hist,
                        const at::Tensor& b_hist, const at::Tensor& temperature_t, const at::Tensor& epsilon_t,
                        const at::Tensor& scale_t) {
  const double temperature = float_arg(temperature_t, "temperature");
  const double epsilon = float_arg(epsilon_t, "epsilon");
  const double scale = float_arg(scale_t, "scale");
  check_cpu_float(student_logits, "student_logits");
  check_cpu_float(grad, "grad");
  check_options(temperature, epsilon, scale);
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && student_logits.size(1) >= 1,
                    "student_logits must be [B, C] with C >= 1, got ", student_logits.sizes());
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one element, got ", grad.numel());
  const int64_t B = student_logits.size(0), C = student_logits.size(1);
  const auto acc = acc_type(student_logits.scalar_type());
  for (const auto* t : {&probs_s, &probs_t, &cost, &a_hist, &b_hist}) {
    check_cpu_float(*t, "saved tensor");
    TORCH_CHECK_VALUE(t->scalar_type() == acc && t->dim() == 2, "saved tensors must be 2-D ", acc);
  }
  const int64_t Bt = probs_t.size(0), n_iters = a_hist.size(0);
  TORCH_CHECK_VALUE(probs_s.size(0) == B && probs_s.size(1) == C && probs_t.size(1) == C,
                    "probabilities must be [B, C] and [B', C]");
  TORCH_CHECK_VALUE(cost.size(0) == B && cost.size(1) == Bt, "cost must be [B, B'], got ", cost.sizes());
  TORCH_CHECK_VALUE(n_iters >= 1 && a_hist.size(1) == B && b_hist.size(0) == n_iters && b_hist.size(1) == Bt,
                    "increments must be [n_iters, B] and [n_iters, B']");
  at::Tensor grad_student = at::zeros({B, C}, student_logits.options());
  if (B == 0 || Bt == 0) return grad_student;
  const auto s_t = probs_s.contiguous(), t_t = probs_t.contiguous(), W_t = cost.contiguous();
  const auto a_t = a_hist.contiguous(), b_t = b_hist.contiguous();
  const auto g_scalar = grad.to(acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "sinkhorn_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const auto p = make_problem<acc_t>(B, Bt, C, epsilon);
    const acc_t gs = static_cast<acc_t>(scale) * g_scalar.data_ptr<acc_t>()[0];
    const acc_t* s = s_t.data_ptr<acc_t>();
    const std::vector<acc_t> tT = transpose_padded(t_t.data_ptr<acc_t>(), p);
    // column increments, zero-padded to Bp
    std::vector<acc_t> bp(n_iters * p.Bp, acc_t(0));
    const acc_t* bsrc = b_t.data_ptr<acc_t>();
    for (int64_t k = 0; k < n_iters; ++k) std::copy(bsrc + k * Bt, bsrc + (k + 1) * Bt, bp.begin() + k * p.Bp);
    // padded W (pads 0) and state 0, L = −W/ε (pads −inf), computed as the forward computed it
    std::vector<acc_t> W(B * p.Bp), L(B * p.Bp);
    const acc_t* Wsrc = W_t.data_ptr<acc_t>();
    at::parallel_for(0, B, row_grain(p.Bp), [&](int64_t begin, int64_t end) {
      const Vec veps(p.eps), zero(acc_t(0));
      for (int64_t i = begin; i < end; ++i) {
        acc_t* Wi = W.data() + i * p.Bp;
        std::copy(Wsrc + i * Bt, Wsrc + (i + 1) * Bt, Wi);
        std::fill(Wi + Bt, Wi + p.Bp, acc_t(0));
        for (int64_t j = 0; j < p.Bp; j += V) ((zero - Vec::loadu(Wi + j)) / veps).store(L.data() + i * p.Bp + j);
        for (int64_t j = Bt; j < p.Bp; ++j) L[i * p.Bp + j] = -std::numeric_limits<acc_t>::infinity();
      }
    });
    // checkpoints: states m, 2m, … ≤ 2n, one streaming replay per row
    const int64_t states = 2 * n_iters;
    const int64_t every = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(states)))));
    const int64_t n_ckpt = states / every;
    std::vector<acc_t> ckpt(n_ckpt * B * p.Bp);
    const Replay<acc_t> replay{L.data(), ckpt.data(), a_t.data_ptr<acc_t>(), bp.data(), B, p.Bp, every};
    at::parallel_for(0, B, pass_grain(states * p.Bp), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < p.Bp; j += V) {
          Vec x = Vec::loadu(L.data() + i * p.Bp + j);
          for (int64_t t = 0; t < n_ckpt * every; ++t) {
            x = (t % 2 == 0) ? x - Vec(replay.a[(t / 2) * B + i]) : x - Vec::loadu(bp.data() + (t / 2) * p.Bp + j);
            if ((t + 1) % every == 0) x.store(ckpt.data() + ((t + 1) / every - 1) * B * p.Bp + i * p.Bp + j);
          }
        }
      }
    });
    std::vector<acc_t> Xbar(B * p.Bp), Wbar(B * p.Bp), colsum(p.Bp), rowsum(B);
    const int64_t block_grain = pass_grain(2 * B * kBlockVecs * V);
    const Vec vgs(gs), inv_eps(acc_t(1) / p.eps);

    // x̄ = gs·P⊙W, W̄ = gs·P with the final plan (state 2n); colsum(x̄) for the last column step.
    at::parallel_for(0, p.blocks(), block_grain, [&](int64_t qb, int64_t qe) {
      for (int64_t q = qb; q < qe; ++q) {
        const int64_t j0 = p.block_begin(q), j1 = p.block_end(q);
        // rows outer, the block's columns inner: contiguous row segments; sums in colsum (L1)
        std::fill(colsum.begin() + j0, colsum.begin() + j1, acc_t(0));
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t j = j0; j < j1; j += V) {
            const int64_t o = i * p.Bp + j;
            const Vec wb = vgs * vexp(replay.state(states, i, j));
            wb.store(Wbar.data() + o);
            const Vec xb = wb * Vec::loadu(W.data() + o);
            xb.store(Xbar.data() + o);
            (Vec::loadu(colsum.data() + j) + xb).store(colsum.data() + j);
          }
        }
      }
    });
    for (int64_t k = n_iters; k >= 1; --k) {
      // column step k (output: state 2k): x̄ −= P_col⊙colsum; then rowsum(x̄).
      at::parallel_for(0, B, pass_grain(2 * p.Bp), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t* Xi = Xbar.data() + i * p.Bp;
          Vec rsum(acc_t(0));
          for (int64_t j = 0; j < p.Bp; j += V) {
            const Vec P = vexp(replay.state(2 * k, i, j));
            const Vec xb = Vec::loadu(Xi + j) - P * Vec::loadu(colsum.data() + j);
            xb.store(Xi + j);
            rsum = rsum + xb;
          }
          rowsum[i] = vec_sum(rsum);
        }
      });
      // row step k (output: state 2k − 1): x̄ −= P_row⊙rowsum; then colsum(x̄) for column step k − 1,
      // or, after the first step, W̄ −= x̄/ε.
      const bool last = k == 1;
      at::parallel_for(0, p.blocks(), block_grain, [&](int64_t qb, int64_t qe) {
        for (int64_t q = qb; q < qe; ++q) {
          const int64_t j0 = p.block_begin(q), j1 = p.block_end(q);
          std::fill(colsum.begin() + j0, colsum.begin() + j1, acc_t(0));
          for (int64_t i = 0; i < B; ++i) {
            const Vec ri(rowsum[i]);
            for (int64_t j = j0; j < j1; j += V) {
              const int64_t o = i * p.Bp + j;
              const Vec P = vexp(replay.state(2 * k - 1, i, j));
              const Vec xb = Vec::loadu(Xbar.data() + o) - P * ri;
              if (last) {
                (Vec::loadu(Wbar.data() + o) - xb * inv_eps).store(Wbar.data() + o);
              } else {
                xb.store(Xbar.data() + o);
                (Vec::loadu(colsum.data() + j) + xb).store(colsum.data() + j);
              }
            }
          }
        }
      });
    }
    // s̄_ic = Σ_j W̄_ij·sign(s_ic − t_jc); z̄ = (1/T)·s⊙(s̄ − ⟨s̄, s⟩)
    scalar_t* out = grad_student.data_ptr<scalar_t>();
    const acc_t inv_T = acc_t(1) / static_cast<acc_t>(temperature);
    at::parallel_for(0, B, row_grain(p.Bp * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sbar(C);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* si = s + i * C;
        const acc_t* Wb = Wbar.data() + i * p.Bp;
        acc_t dot = 0;
        for (int64_t c = 0; c < C; ++c) {
          const Vec sc(si[c]);
          const acc_t* tc = tT.data() + c * p.Bp;
          Vec a(acc_t(0));
          for (int64_t j = 0; j < p.Bp; j += V) {
            const Vec tj = Vec::loadu(tc + j);
            a = a + Vec::loadu(Wb + j) * (sc.gt(tj) - sc.lt(tj));
          }
          sbar[c] = vec_sum(a);
          dot += sbar[c] * si[c];
        }
        for (int64_t c = 0; c < C; ++c) out[i * C + c] = static_cast<scalar_t>(inv_T * si[c] * (sbar[c] - dot));
      }
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("sinkhorn_fwd", &sinkhorn_fwd);
  m.impl("sinkhorn_bwd", &sinkhorn_bwd);
}

}  // namespace cpu
}  // namespace kdloss
