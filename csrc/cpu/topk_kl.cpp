// Top-k sparse KL CPU kernels (spec §3) for the CPU dispatch key. The op contract (shapes, dtypes,
// reductions) is documented once, with the schemas, in kdloss/_ops/topk_kl.py.
//
// Forward: one streaming pass per row (blocked online max/Σexp in the accumulation type), then
// O(k) gathers; saves the row's stats (m, l): m = max z, l = log Σ exp((z − m)/T). Backward:
// recomputes q = exp((z − m)/T − l) and writes the dense gradient g·(α·q_j + β_j·[j∈K]) in one
// pass (spec §3.4).
//
// Every log q_j is computed as (z_j − m)·(1/T) − l: the shift by the maximum happens in logit units,
// before the division by T. At small T, z/T and its log-sum-exp are large, and the difference of two
// large rounded numbers would lose the absolute accuracy of log q (and two roundings of the same
// z·(1/T), one of them fused into an fma, would not even cancel for k = 1).
#include <ATen/ops/empty.h>
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

// Elements per block of the online log-sum-exp: the block is re-read from L1 for Σexp.
constexpr int64_t kBlock = 2048;
// DistillKit's clamp of the student's kept mass in the tail-bucket term (spec §3.3).
constexpr double kTailClamp = 1e-8;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// max_j z[j] over z[0..n) (NaN propagates).
template <typename scalar_t>
Acc<scalar_t> block_max(const scalar_t* z, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  Vec m0(neg_inf<acc_t>()), m1(neg_inf<acc_t>());
  int64_t i = 0;
  for (; i + 2 * IO::size() <= n; i += 2 * IO::size()) {
    m0 = at::vec::maximum(m0, IO::load(z + i));
    m1 = at::vec::maximum(m1, IO::load(z + i + IO::size()));
  }
  for (; i + IO::size() <= n; i += IO::size()) m0 = at::vec::maximum(m0, IO::load(z + i));
  acc_t m =
      at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(z[i]);
    if (!(v <= m)) m = v;
  }
  return m;
}

// Σ_j exp((z[j] − m)·inv_t) over z[0..n).
template <typename scalar_t>
Acc<scalar_t> block_sum_exp(const scalar_t* z, int64_t n, Acc<scalar_t> inv_t, Acc<scalar_t> m) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec vt(inv_t), vm(m);
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * IO::size() <= n; i += 2 * IO::size()) {
    s0 = s0 + vexp((IO::load(z + i) - vm) * vt);
    s1 = s1 + vexp((IO::load(z + i + IO::size()) - vm) * vt);
  }
  for (; i + IO::size() <= n; i += IO::size()) s0 = s0 + vexp((IO::load(z + i) - vm) * vt);
  acc_t s = vec_sum(s0 + s1);
  for (; i < n; ++i) s += std::exp((static_cast<acc_t>(z[i]) - m) * inv_t);
  return s;
}

// bf16/fp16 z[0..n) converted to fp32 in `out` (16 at a time); returns their max (NaN propagates).
template <typename scalar_t>
float block_to_float(const scalar_t* z, int64_t n, float* out) {
  using Reduced = at::vec::Vectorized<scalar_t>;
  using Vec = at::vec::Vectorized<float>;
  Vec m0(neg_inf<float>()), m1(neg_inf<float>());
  int64_t i = 0;
  for (; i + Reduced::size() <= n; i += Reduced::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Reduced::loadu(z + i));
    lo.store(out + i);
    hi.store(out + i + Vec::size());
    m0 = at::vec::maximum(m0, lo);
    m1 = at::vec::maximum(m1, hi);
  }
  float m =
      at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
  for (; i < n; ++i) {
    out[i] = static_cast<float>(z[i]);
    if (!(out[i] <= m)) m = out[i];
  }
  return m;
}

// A row's softmax statistics: m = the largest logit, l = log Σ exp((z − m)·inv_t) (0 for an empty
// or all −inf set, m = −inf then), so that log q_j = (z_j − m)·inv_t − l.
template <typename acc_t>
struct Stats {
  acc_t m, l;
};

// Stats over the whole row, streamed in blocks with a running max (one read of z; bf16/fp16
// blocks are converted once into an L1-resident fp32 buffer).
template <typename scalar_t>
Stats<Acc<scalar_t>> row_stats(const scalar_t* z, int64_t V, Acc<scalar_t> inv_t) {
  using acc_t = Acc<scalar_t>;
  acc_t m = neg_inf<acc_t>(), s = 0;
  alignas(64) float buffer[c10::is_reduced_floating_point_v<scalar_t> ? kBlock : 1];
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    acc_t bm;
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      bm = block_to_float(z + b, n, buffer);
    } else {
      bm = block_max(z + b, n);
    }
    if (std::isnan(bm)) return {bm, bm};
    if (bm == neg_inf<acc_t>()) continue;  // a block of −inf logits adds nothing
    if (bm > m) {
      s *= std::exp((m - bm) * inv_t);  // 0 while m = −inf
      m = bm;
    }
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      s += block_sum_exp<float>(buffer, n, inv_t, m);
    } else {
      s += block_sum_exp(z + b, n, inv_t, m);
    }
  }
  return {m, m == neg_inf<acc_t>() ? acc_t(0) : std::log(s)};
}

// One row's teacher slots and student logits.
template <typename scalar_t>
struct Row {
  using acc_t = Acc<scalar_t>;
  const scalar_t* z;   // [V]
  const int64_t* ids;  // [k]
  const acc_t* logp;   // [k] log p̂
  acc_t tail_logp;     // log r̂
  int64_t k;

  bool kept(int64_t i) const { return logp[i] != neg_inf<acc_t>(); }
  acc_t logit(int64_t i) const { return static_cast<acc_t>(z[ids[i]]); }
  acc_t log_q(int64_t i, acc_t inv_t, const Stats<acc_t>& st) const { return (logit(i) - st.m) * inv_t - st.l; }
};

// Stats over the kept slots only (student_support="topk"); {−inf, 0} when K is empty.
template <typename scalar_t>
Stats<Acc<scalar_t>> kept_stats(const Row<scalar_t>& row, Acc<scalar_t> inv_t) {
  using acc_t = Acc<scalar_t>;
  acc_t m = neg_inf<acc_t>();
  for (int64_t i = 0; i < row.k; ++i)
    if (row.kept(i) && !(row.logit(i) <= m)) m = row.logit(i);  // NaN propagates
  if (m == neg_inf<acc_t>() || std::isnan(m)) return {m, acc_t(0)};
  acc_t s = 0;
  for (int64_t i = 0; i < row.k; ++i)
    if (row.kept(i)) s += std::exp((row.logit(i) - m) * inv_t);
  return {m, std::log(s)};
}

// Teacher mass Σ_K p̂ and student mass Σ_K q on the kept slots, q_i = exp((z_i − m)/T − l).
template <typename acc_t>
struct KeptMass {
  acc_t teacher = 0, student = 0;
};

template <typename scalar_t>
KeptMass<Acc<scalar_t>> kept_mass(const Row<scalar_t>& row, Acc<scalar_t> inv_t, const Stats<Acc<scalar_t>>& st) {
  KeptMass<Acc<scalar_t>> m;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.kept(i)) continue;
    m.teacher += std::exp(row.logp[i]);
    m.student += std::exp(row.log_q(i, inv_t, st));
  }
  return m;
}

// A wider accumulator: the two sums of accurate_tail_mass are subtracted.
template <typename acc_t>
using Wide = std::conditional_t<std::is_same_v<acc_t, double>, long double, double>;

// The student's mass outside K, r_s = Σ_{j∉K} q_j, where Σ_K q is close to 1. 1 − Σ_K q in the
// accumulation type keeps only ~eps/r_s of r_s's digits; here Σ_j e_j and Σ_K e_j (e_j = exp((z_j − m)·t),
// the same vexp evaluation for every term, so the kept terms cancel exactly) are summed in a wider type
// and subtracted: r_s = (Σ_j e_j − Σ_K e_j) / Σ_j e_j, accurate to a few eps relative. One more pass
// over the row, for tail-bucket rows whose student puts more than half of its mass on K.
template <typename scalar_t>
Acc<scalar_t> accurate_tail_mass(const Row<scalar_t>& row, int64_t V, Acc<scalar_t> inv_t,
                                 const Stats<Acc<scalar_t>>& st) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec vt(inv_t), vm(st.m);
  alignas(64) acc_t lanes[Vec::size()];
  Wide<acc_t> all = 0, kept = 0;
  auto add = [&](const Vec& e, int64_t n, Wide<acc_t>& sum) {
    e.store(lanes);
    for (int64_t i = 0; i < n; ++i) sum += lanes[i];
  };
  int64_t j = 0;
  for (; j + IO::size() <= V; j += IO::size()) add(vexp((IO::load(row.z + j) - vm) * vt), IO::size(), all);
  for (; j < V; ++j) add(vexp((Vec(static_cast<acc_t>(row.z[j])) - vm) * vt), 1, all);
  for (int64_t i = 0; i < row.k; ++i)
    if (row.kept(i)) add(vexp((Vec(row.logit(i)) - vm) * vt), 1, kept);
  return all > 0 ? static_cast<acc_t>((all - kept) / all) : acc_t(0);
}

// The student's tail mass r_s = 1 − Σ_K q as DistillKit clamps it: Σ_K q to [1e-8, 1 − 1e-8].
// 1 − 1e-8 is 1 in fp32, where DistillKit then takes log1p(−1) = −inf; here the upper end is applied
// as r_s ≥ 1e-8 (the same clamp in exact arithmetic, representable in fp32), so a student confident
// on K gets log r_s = log 1e-8, finite, with a zero gradient like any clamped end.
template <typename acc_t>
struct StudentTail {
  acc_t log_r;   // log r_s after the clamp
  acc_t r;       // r_s (meaningful when not clamped)
  bool clamped;  // a clamp is active: the tail term does not depend on z
};

template <typename scalar_t>
StudentTail<Acc<scalar_t>> student_tail(const Row<scalar_t>& row, int64_t V, Acc<scalar_t> inv_t,
                                        const Stats<Acc<scalar_t>>& st, Acc<scalar_t> kept) {
  using acc_t = Acc<scalar_t>;
  const acc_t lo = static_cast<acc_t>(kTailClamp);
  const acc_t plain = acc_t(1) - kept;  // exact for kept ∈ [0.5, 1] (Sterbenz), but not r_s's digits
  const acc_t r = plain < acc_t(0.5) ? accurate_tail_mass(row, V, inv_t, st) : plain;
  if (!(r > lo)) return {std::log(lo), r, true};
  if (kept < lo) return {std::log1p(-lo), r, true};
  return {plain < acc_t(0.5) ? std::log(r) : std::log1p(-kept), r, false};
}

// KL_row = Σ_K p̂ (log p̂ − log q) [+ r̂ (log r̂ − log r_s)] with xlogy semantics (spec §3.3).
template <typename scalar_t>
Acc<scalar_t> row_kl(const Row<scalar_t>& row, int64_t V, Acc<scalar_t> inv_t, const Stats<Acc<scalar_t>>& st,
                     bool full_support) {
  using acc_t = Acc<scalar_t>;
  acc_t head = 0, student_kept = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.kept(i)) continue;
    const acc_t log_q = row.log_q(i, inv_t, st);
    head += std::exp(row.logp[i]) * (row.logp[i] - log_q);
    student_kept += std::exp(log_q);
  }
  if (!full_support || row.tail_logp == neg_inf<acc_t>()) return head;
  return head + std::exp(row.tail_logp) * (row.tail_logp - student_tail(row, V, inv_t, st, student_kept).log_r);
}

// Per-row gradient coefficients: ∂KL/∂z_j = inv_t·(α·q_j + β_i [j = ids_i]). Full-vocabulary student:
// with P = Σ_K p̂ and, for the tail bucket, γ = r̂/r_s (0 where DistillKit's clamp is active, r̂ then
// counted as 0 too), α = P + r̂ − γ and β_i = γ·q_i − p̂_i, so a kept slot gets κ·q_i − p̂_i with
// κ = α + γ = P + r̂ — formed directly: α and γ are both huge when r_s is tiny, and their sum would
// cancel. Student renormalised over K: α = 0, κ = P.
template <typename acc_t>
struct Coefficients {
  acc_t alpha, kept, mass;
};

template <typename scalar_t>
Coefficients<Acc<scalar_t>> row_coefficients(const Row<scalar_t>& row, int64_t V, Acc<scalar_t> inv_t,
                                             const Stats<Acc<scalar_t>>& st, bool full_support) {
  using acc_t = Acc<scalar_t>;
  const auto mass = kept_mass(row, inv_t, st);
  if (!full_support) return {acc_t(0), mass.teacher, mass.teacher};
  acc_t gamma = 0, tail_mass = 0;
  // d/dz of −r̂·log r_s; zero where DistillKit's clamp is active
  if (row.tail_logp != neg_inf<acc_t>()) {
    const auto tail = student_tail(row, V, inv_t, st, mass.student);
    if (!tail.clamped) {
      tail_mass = std::exp(row.tail_logp);
      gamma = tail_mass / tail.r;
    }
  }
  return {mass.teacher + tail_mass - gamma, mass.teacher + tail_mass, mass.teacher};
}

// out[0..V) = c·exp((z − m)·inv_t − l) (or zeros when c = 0).
template <typename scalar_t>
void dense_softmax_row(scalar_t* out, const scalar_t* z, int64_t V, Acc<scalar_t> inv_t, const Stats<Acc<scalar_t>>& st,
                       Acc<scalar_t> c) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  if (c == acc_t(0)) {
    std::fill(out, out + V, static_cast<scalar_t>(0));
    return;
  }
  const Vec vt(inv_t), vm(st.m), vl(-st.l), vc(c);
  int64_t j = 0;
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    // 16 bf16/fp16 at a time: one load, two fp32 halves, one rounding store of all 16
    using Reduced = at::vec::Vectorized<scalar_t>;
    for (; j + Reduced::size() <= V; j += Reduced::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Reduced::loadu(z + j));
      lo = vc * vexp(at::vec::fmadd(lo - vm, vt, vl));
      hi = vc * vexp(at::vec::fmadd(hi - vm, vt, vl));
      at::vec::convert_from_float<scalar_t>(lo, hi).store(out + j);
    }
  }
  for (; j + IO::size() <= V; j += IO::size())
    IO::store(out + j, vc * vexp(at::vec::fmadd(IO::load(z + j) - vm, vt, vl)));
  for (; j < V; ++j) out[j] = static_cast<scalar_t>(c * std::exp((static_cast<acc_t>(z[j]) - st.m) * inv_t - st.l));
}

void check_acc_tensor(const at::Tensor& t, const char* name, at::ScalarType acc, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Re-checks the op-level contract (kdloss/_ops/topk_kl.py) and returns the ids, contiguous.
at::Tensor check_inputs(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& target_logp,
                        const at::Tensor& tail_logp, const at::Tensor& valid, const at::Tensor& divisor,
                        double inv_temperature, double scale) {
  check_cpu_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V <= 1 || N == 0 || logits.stride(1) == 1, "logits must have unit stride along V");
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == N,
                    "ids must be an int64 CPU tensor [N, k] with N = ", N, ", got ", ids.scalar_type(), " ",
                    ids.sizes());
  const int64_t k = ids.size(1);
  const auto acc = acc_type(logits.scalar_type());
  check_acc_tensor(target_logp, "target_logp", acc, {N, k});
  check_acc_tensor(tail_logp, "tail_logp", acc, {N});
  check_acc_tensor(divisor, "divisor", acc, {});
  TORCH_CHECK_VALUE(valid.device().is_cpu() && valid.scalar_type() == at::kBool && valid.sizes() == at::IntArrayRef{N},
                    "valid must be a bool CPU tensor [N]");
  TORCH_CHECK_VALUE(std::isfinite(inv_temperature) && inv_temperature > 0, "inv_temperature must be > 0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite");
  auto ids_c = ids.contiguous();
  const int64_t* p = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "ids must lie in [0, V) with V = ", V, ", got ", p[i]);
  return ids_c;
}

template <typename scalar_t>
Row<scalar_t> make_row(const at::Tensor& logits, const int64_t* ids, const Acc<scalar_t>* logp,
                       const Acc<scalar_t>* tail, int64_t n, int64_t k) {
  return {logits.const_data_ptr<scalar_t>() + n * logits.stride(0), ids + n * k, logp + n * k, tail[n], k};
}

std::tuple<at::Tensor, at::Tensor> topk_kl_fwd(const at::Tensor& logits, const at::Tensor& ids,
                                               const at::Tensor& target_logp, const at::Tensor& tail_logp,
                                               const at::Tensor& valid, const at::Tensor& divisor,
                                               const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                                               bool full_support, int64_t reduction_code) {
  const double inv_temperature = float_arg(inv_temperature_t, "inv_temperature");
  const double scale = float_arg(scale_t, "scale");
  const auto ids_c = check_inputs(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale);
  const Reduction reduction = check_reduction(reduction_code);
  const int64_t N = logits.size(0), V = logits.size(1), k = ids.size(1);
  const auto tgt = target_logp.contiguous(), tail = tail_logp.contiguous(), ok = valid.contiguous();
  at::Tensor stats = at::empty({N, 2}, target_logp.options());
  // the loss is returned in the accumulation dtype, like the stats
  at::Tensor loss =
      at::empty(reduction == Reduction::kNone ? at::IntArrayRef{N} : at::IntArrayRef{}, target_logp.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    const acc_t* tgt_p = tgt.const_data_ptr<acc_t>();
    const acc_t* tail_p = tail.const_data_ptr<acc_t>();
    const bool* ok_p = ok.const_data_ptr<bool>();
    acc_t* stats_p = stats.data_ptr<acc_t>();
    std::vector<acc_t> rows(N);
    at::parallel_for(0, N, row_grain(full_support ? V : k), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (!ok_p[n]) {
          stats_p[2 * n] = stats_p[2 * n + 1] = 0;
          rows[n] = 0;
          continue;
        }
        const auto row = make_row<scalar_t>(logits, ids_c.const_data_ptr<int64_t>(), tgt_p, tail_p, n, k);
        const Stats<acc_t> st = full_support ? row_stats(row.z, V, inv_t) : kept_stats(row, inv_t);
        stats_p[2 * n] = st.m;
        stats_p[2 * n + 1] = st.l;
        rows[n] = static_cast<acc_t>(scale) * row_kl(row, V, inv_t, st, full_support);
      }
    });
    acc_t* out = loss.data_ptr<acc_t>();
    if (reduction == Reduction::kNone) {
      std::copy(rows.begin(), rows.end(), out);
      return;
    }
    acc_t total = ordered_sum(rows.data(), N);
    if (reduction == Reduction::kMean) {
      const acc_t d = divisor.item<acc_t>();
      total = d > acc_t(0) ? total / d : acc_t(0);
    }
    out[0] = total;
  });
  return {loss, stats};
}

at::Tensor topk_kl_bwd(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& logits, const at::Tensor& ids,
                       const at::Tensor& target_logp, const at::Tensor& tail_logp, const at::Tensor& valid,
                       const at::Tensor& divisor, const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                       bool full_support, int64_t reduction_code) {
  const double inv_temperature = float_arg(inv_temperature_t, "inv_temperature");
  const double scale = float_arg(scale_t, "scale");
  const auto ids_c = check_inputs(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale);
  const Reduction reduction = check_reduction(reduction_code);
  const int64_t N = logits.size(0), V = logits.size(1), k = ids.size(1);
  check_acc_tensor(stats, "stats", target_logp.scalar_type(), {N, 2});
  const auto g = checked_grad(grad, reduction, {N}, target_logp.scalar_type());
  const auto tgt = target_logp.contiguous(), tail = tail_logp.contiguous(), ok = valid.contiguous();
  const auto stats_c = stats.contiguous();
  at::Tensor out = at::empty({N, V}, logits.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    const acc_t* g_p = g.const_data_ptr<acc_t>();
    const acc_t* tgt_p = tgt.const_data_ptr<acc_t>();
    const acc_t* tail_p = tail.const_data_ptr<acc_t>();
    const acc_t* stats_p = stats_c.const_data_ptr<acc_t>();
    const bool* ok_p = ok.const_data_ptr<bool>();
    // ∂loss/∂KL_row · 1/T, without the per-row upstream gradient of reduction "none"
    acc_t row_scale = static_cast<acc_t>(scale) * inv_t;
    if (reduction != Reduction::kNone) row_scale *= g_p[0];
    if (reduction == Reduction::kMean) {
      const acc_t d = divisor.item<acc_t>();
      row_scale = d > acc_t(0) ? row_scale / d : acc_t(0);
    }
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out_row = out_p + n * V;
        const acc_t gr = ok_p[n] ? (reduction == Reduction::kNone ? row_scale * g_p[n] : row_scale) : acc_t(0);
        if (gr == acc_t(0)) {
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
          continue;
        }
        const auto row = make_row<scalar_t>(logits, ids_c.const_data_ptr<int64_t>(), tgt_p, tail_p, n, k);
        const Stats<acc_t> st{stats_p[2 * n], stats_p[2 * n + 1]};
        const auto c = row_coefficients(row, V, inv_t, st, full_support);
        dense_softmax_row(out_row, row.z, V, inv_t, st, gr * c.alpha);
        for (int64_t i = 0; i < k; ++i) {
          if (!row.kept(i)) continue;
          const acc_t q = std::exp(row.log_q(i, inv_t, st));
          const acc_t p = std::exp(row.logp[i]);
          const acc_t d = c.kept * q - p;
          out_row[row.ids[i]] = static_cast<scalar_t>(gr * d);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("topk_kl_fwd", &topk_kl_fwd);
  m.impl("topk_kl_bwd", &topk_kl_bwd);
}

}  // namespace cpu
}  // namespace kdloss
