// Top-k sparse KL CPU kernels (spec §3) for the CPU dispatch key. The op contract (shapes, dtypes,
// reductions) is documented once, with the schemas, in kdloss/_ops/topk_kl.py.
//
// Forward: one streaming pass per row (blocked online max/Σexp in the accumulation type), then
// O(k) gathers; saves the row's stats (m, l): m = max z, l = log Σ exp((z − m)/T). Backward:
// recomputes q = exp((z − m)/T − l) and writes the dense gradient g·(α·q_j + β_j·[j∈K]) in one
// pass. Forward with the gradient (topk_kl_fwd_grad): per row, the log-sum-exp sweep keeps every
// exp((z_j − m_b)/T) (m_b: the maximum of its block) in a row-sized buffer, and a second sweep, while
// the row is still in L2, scales it to the gradient: one read of the logits, one exp per element.
//
// Rows are addressed through two strides ([B, T, V] logits, e.g. the label-shift slice
// full[:, :-1], are read in place). Repeated ids among the kept slots count once per slot (their
// gradient entries are summed, race-free); topk_kl_fwd_grad can reject them instead (check_unique).
//
// Every log q_j is computed as (z_j − m)·(1/T) − l: the shift by the maximum happens in logit units,
// before the division by T. At small T, z/T and its log-sum-exp are large, and the difference of two
// large rounded numbers would lose the absolute accuracy of log q (and two roundings of the same
// z·(1/T), one of them fused into an fma, would not even cancel for k = 1).
//
// The O(k) work of a row (log q, q and p̂ on the kept slots, their sums, the gradient κ·q_i − p̂_i) runs
// in double, from l in double (Stats::lw). At a large T both q and p̂ are close to uniform and the
// gradient T²/T·(κ·q_i − p̂_i) is a small difference of two terms, scaled up by T: an fp32 evaluation
// (q rounded through log q ≈ −log V and exp) kept ~eps·T·q of error in it, several times the bound.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kdloss/cpu_exp.h"
#include "kdloss/cpu_utils.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Vector sums of exps flushed into double lanes every kFlushPairs pairs of vectors. A lane that holds a
// block's maximum (exp 0 = 1) would otherwise take every later term of its lane rounded at the scale of
// 1: 128 fp32 additions of ~2e-5 each erred by up to 1e-5 in a row's sum (a confident student: a fuzz
// case's loss 1.7x over the bound); with the flush a lane adds at most kFlushPairs terms in fp32, and
// the flush (two widening conversions and adds per vector with AVX2) costs ~2 % of the exps.
constexpr int64_t kFlushPairs = 16;

template <typename acc_t>
struct LaneSums {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec wide = Vec(acc_t(0));  // acc_t = double: the lanes themselves

  void flush(const Vec& v) { wide = wide + v; }
  double total() const { return vec_sum(wide); }
};

template <>
struct LaneSums<float> {
  static constexpr int64_t kLanes = at::vec::Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();

  void flush(const at::vec::Vectorized<float>& v) {
    const __m256 x = v;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  double total() const {
    alignas(32) double parts[8];
    _mm256_store_pd(parts, lo);
    _mm256_store_pd(parts + 4, hi);
    double s = 0;
    for (double p : parts) s += p;
    return s;
  }
#else
  double lanes[kLanes] = {};

  void flush(const at::vec::Vectorized<float>& v) {
    alignas(64) float parts[kLanes];
    v.store(parts);
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(parts[k]);
  }
  double total() const {
    double s = 0;
    for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
    return s;
  }
#endif
};

// Σ_j e_j with e_j = exp((x_j − m)·inv_t) over x[0..n) (x in the accumulation type), m ≥ max x; kStore
// also writes e[0..n) = e_j. kCoarse: the reduced-precision exp (see cpu_exp.h), for bf16/fp16 logits.
// The lanes' partial sums (see LaneSums) and the tail, its exps too, are added in double: a row shorter
// than a vector is summed exactly.
template <typename acc_t, bool kCoarse = false, bool kStore = false>
double block_sum_exp(const acc_t* x, int64_t n, acc_t inv_t, acc_t m, acc_t* e = nullptr) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vt(inv_t), vm(m);
  LaneSums<acc_t> sums;
  int64_t i = 0;
  while (i + 2 * W <= n) {
    Vec s0(acc_t(0)), s1(acc_t(0));
    const int64_t end = std::min(n, i + kFlushPairs * 2 * W);
    for (; i + 2 * W <= end; i += 2 * W) {
      const Vec a = vexp_nonpositive<kCoarse>((Vec::loadu(x + i) - vm) * vt),
                b = vexp_nonpositive<kCoarse>((Vec::loadu(x + i + W) - vm) * vt);
      if constexpr (kStore) {
        a.store(e + i);
        b.store(e + i + W);
      }
      s0 = s0 + a;
      s1 = s1 + b;
    }
    sums.flush(s0);
    sums.flush(s1);
  }
  for (; i + W <= n; i += W) {
    const Vec a = vexp_nonpositive<kCoarse>((Vec::loadu(x + i) - vm) * vt);
    if constexpr (kStore) a.store(e + i);
    sums.flush(a);
  }
  double s = sums.total();
  for (; i < n; ++i) {
    const double ei = std::exp(static_cast<double>((x[i] - m) * inv_t));
    if constexpr (kStore) e[i] = static_cast<acc_t>(ei);
    s += ei;
  }
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
// or all −inf set, m = −inf then), so that log q_j = (z_j − m)·inv_t − l; lw is l in double (the sum
// added in double), for the kept slots' O(k) arithmetic; l = lw rounded is what the forward saves.
template <typename acc_t>
struct Stats {
  acc_t m, l;
  double lw;
};

// The stats of a row with largest logit m and shifted sum s (m = −inf: an empty set).
template <typename acc_t>
Stats<acc_t> stats_of(acc_t m, double s) {
  if (m == neg_inf<acc_t>()) return {m, acc_t(0), 0.0};
  const double l = std::log(s);
  return {m, static_cast<acc_t>(l), l};
}

// The shift saved with l for the backward: m + T·(lw − l), so that the saved pair keeps the row's
// log-sum-exp m/T + lw, not only m/T + l (log q_j = (z_j − m)/T − l stays exact in the pair's form).
// At a large T the rounding of l is most of a kept log q's error, and m has digits to spare for it: this
// moves m by a few of its last units at most, and leaves it unchanged where T·(lw − l) is below half of
// one (then the pair is exactly (m, l), as before).
template <typename acc_t>
acc_t saved_shift(const Stats<acc_t>& st, double inv_t) {
  if (!std::isfinite(st.m)) return st.m;
  return static_cast<acc_t>(static_cast<double>(st.m) + (st.lw - static_cast<double>(st.l)) / inv_t);
}

// Stats over the whole row, streamed in blocks with a running max (one read of z; bf16/fp16
// blocks are converted once into an L1-resident fp32 buffer).
template <typename scalar_t>
Stats<Acc<scalar_t>> row_stats(const scalar_t* z, int64_t V, Acc<scalar_t> inv_t) {
  using acc_t = Acc<scalar_t>;
  acc_t m = neg_inf<acc_t>();
  double s = 0;
  alignas(64) float buffer[c10::is_reduced_floating_point_v<scalar_t> ? kBlock : 1];
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    acc_t bm;
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      bm = block_to_float(z + b, n, buffer);
    } else {
      bm = block_max(z + b, n);
    }
    if (std::isnan(bm)) return {bm, bm, bm};
    if (bm == neg_inf<acc_t>()) continue;  // a block of −inf logits adds nothing
    if (bm > m) {
      s *= std::exp(static_cast<double>((m - bm) * inv_t));  // 0 while m = −inf
      m = bm;
    }
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      s += block_sum_exp<float, true>(buffer, n, inv_t, m);
    } else {
      s += block_sum_exp(z + b, n, inv_t, m);
    }
  }
  return stats_of(m, s);
}

// One row's teacher slots and student logits.
template <typename scalar_t>
struct Row {
  using acc_t = Acc<scalar_t>;
  const scalar_t* z;   // [V]
  const int64_t* ids;  // [k]
  const double* logp;  // [k] log p̂ (double: at a large T·scale an fp32 p̂ is most of a kept gradient's error)
  double tail_logp;    // log r̂
  int64_t k;
  const acc_t* kept_z = nullptr;  // [k] z[ids] gathered before z is overwritten (in-place gradient), or null

  bool kept(int64_t i) const { return logp[i] != neg_inf<double>(); }
  acc_t logit(int64_t i) const { return kept_z != nullptr ? kept_z[i] : static_cast<acc_t>(z[ids[i]]); }
  // log q_i in double (z_i − m exact), from lw
  double log_q(int64_t i, double inv_t, const Stats<acc_t>& st) const {
    return (static_cast<double>(logit(i)) - static_cast<double>(st.m)) * inv_t - st.lw;
  }
};

// Stats over the kept slots only (student_support="topk"); {−inf, 0} when K is empty.
template <typename scalar_t>
Stats<Acc<scalar_t>> kept_stats(const Row<scalar_t>& row, double inv_t) {
  using acc_t = Acc<scalar_t>;
  acc_t m = neg_inf<acc_t>();
  for (int64_t i = 0; i < row.k; ++i)
    if (row.kept(i) && !(row.logit(i) <= m)) m = row.logit(i);  // NaN propagates
  if (m == neg_inf<acc_t>() || std::isnan(m)) return {m, acc_t(0), 0.0};
  double s = 0;
  for (int64_t i = 0; i < row.k; ++i)
    if (row.kept(i)) s += std::exp((static_cast<double>(row.logit(i)) - static_cast<double>(m)) * inv_t);
  return stats_of(m, s);
}

// Teacher mass Σ_K p̂ and student mass Σ_K q on the kept slots, q_i = exp((z_i − m)/T − l).
template <typename acc_t>
struct KeptMass {
  acc_t teacher = 0, student = 0;
};

template <typename scalar_t>
KeptMass<double> kept_mass(const Row<scalar_t>& row, double inv_t, const Stats<Acc<scalar_t>>& st) {
  KeptMass<double> m;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.kept(i)) continue;
    m.teacher += std::exp(static_cast<double>(row.logp[i]));
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
double accurate_tail_mass(const Row<scalar_t>& row, int64_t V, Acc<scalar_t> inv_t, const Stats<Acc<scalar_t>>& st) {
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
  return all > 0 ? static_cast<double>((all - kept) / all) : 0.0;
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
StudentTail<double> student_tail(const Row<scalar_t>& row, int64_t V, double inv_t, const Stats<Acc<scalar_t>>& st,
                                 double kept) {
  using acc_t = Acc<scalar_t>;
  const double lo = kTailClamp;
  const double plain = 1.0 - kept;  // exact for kept ∈ [0.5, 1] (Sterbenz), but not r_s's digits
  const double r = plain < 0.5 ? accurate_tail_mass(row, V, static_cast<acc_t>(inv_t), st) : plain;
  if (!(r > lo)) return {std::log(lo), r, true};
  if (kept < lo) return {std::log1p(-lo), r, true};
  return {plain < acc_t(0.5) ? std::log(r) : std::log1p(-kept), r, false};
}

// KL_row = Σ_K p̂ (log p̂ − log q) [+ r̂ (log r̂ − log r_s)] with xlogy semantics (spec §3.3).
template <typename scalar_t>
double row_kl(const Row<scalar_t>& row, int64_t V, double inv_t, const Stats<Acc<scalar_t>>& st, bool full_support) {
  using acc_t = Acc<scalar_t>;
  double head = 0, student_kept = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.kept(i)) continue;
    const double log_q = row.log_q(i, inv_t, st), log_p = row.logp[i];
    head += std::exp(log_p) * (log_p - log_q);
    student_kept += std::exp(log_q);
  }
  if (!full_support || row.tail_logp == neg_inf<acc_t>()) return head;
  const double tail_logp = row.tail_logp;
  return head + std::exp(tail_logp) * (tail_logp - student_tail(row, V, inv_t, st, student_kept).log_r);
}

// Per-row gradient coefficients: ∂KL/∂z_j = inv_t·(α·q_j + β_i [j = ids_i]). Full-vocabulary student:
// with P = Σ_K p̂ and, for the tail bucket, γ = r̂/r_s (0 where DistillKit's clamp is active, r̂ then
// counted as 0 too), α = P + r̂ − γ and β_i = γ·q_i − p̂_i, so a kept slot gets κ·q_i − p̂_i with
// κ = α + γ = P + r̂ — formed directly: α and γ are both huge when r_s is tiny, and their sum would
// cancel. Student renormalised over K: α = 0, κ = P.
template <typename acc_t>
struct Coefficients {
  acc_t alpha, kept, mass, gamma;
};

template <typename scalar_t>
Coefficients<double> row_coefficients(const Row<scalar_t>& row, int64_t V, double inv_t, const Stats<Acc<scalar_t>>& st,
                                      bool full_support) {
  using acc_t = Acc<scalar_t>;
  const auto mass = kept_mass(row, inv_t, st);
  if (!full_support) return {0.0, mass.teacher, mass.teacher, 0.0};
  double gamma = 0, tail_mass = 0;
  // d/dz of −r̂·log r_s; zero where DistillKit's clamp is active
  if (row.tail_logp != neg_inf<acc_t>()) {
    const auto tail = student_tail(row, V, inv_t, st, mass.student);
    if (!tail.clamped) {
      tail_mass = std::exp(static_cast<double>(row.tail_logp));
      gamma = tail_mass / tail.r;
    }
  }
  return {mass.teacher + tail_mass - gamma, mass.teacher + tail_mass, mass.teacher, gamma};
}

// The loss of a row and its gradient coefficients, with one evaluation of the student's tail.
template <typename acc_t>
struct RowTerms {
  acc_t kl;
  Coefficients<acc_t> c;
};

template <typename scalar_t>
RowTerms<double> row_terms(const Row<scalar_t>& row, int64_t V, double inv_t, const Stats<Acc<scalar_t>>& st,
                           bool full_support) {
  using acc_t = Acc<scalar_t>;
  double head = 0, teacher = 0, student = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.kept(i)) continue;
    const double log_q = row.log_q(i, inv_t, st), log_p = row.logp[i];
    const double p = std::exp(log_p);
    head += p * (log_p - log_q);
    teacher += p;
    student += std::exp(log_q);
  }
  if (!full_support) return {head, {0.0, teacher, teacher, 0.0}};
  if (row.tail_logp == neg_inf<acc_t>()) return {head, {teacher, teacher, teacher, 0.0}};
  const auto tail = student_tail(row, V, inv_t, st, student);
  const double tail_logp = row.tail_logp;
  const double kl = head + std::exp(tail_logp) * (tail_logp - tail.log_r);
  if (tail.clamped) return {kl, {teacher, teacher, teacher, 0.0}};
  const double tail_mass = std::exp(tail_logp), gamma = tail_mass / tail.r;
  return {kl, {teacher + tail_mass - gamma, teacher + tail_mass, teacher, gamma}};
}

// Kept slots grouped by id: lead[i] is the first kept slot with the id of slot i (−1 for a slot
// outside K). A small open-addressing table, rebuilt per row (O(k)).
class SlotGroups {
 public:
  // Groups the kept slots of `row`; returns whether some id repeats among them.
  template <typename scalar_t>
  bool build(const Row<scalar_t>& row) {
    int shift = 60;
    uint64_t cap = 16;
    while (cap < 2 * static_cast<uint64_t>(row.k)) {
      cap <<= 1;
      --shift;
    }
    keys_.assign(cap, -1);
    first_.resize(cap);
    lead_.resize(row.k);
    bool repeated = false;
    for (int64_t i = 0; i < row.k; ++i) {
      if (!row.kept(i)) {
        lead_[i] = -1;
        continue;
      }
      const int64_t id = row.ids[i];
      uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift;
      while (keys_[h] != -1 && keys_[h] != id) h = (h + 1) & (cap - 1);
      if (keys_[h] == -1) {
        keys_[h] = id;
        first_[h] = i;
        lead_[i] = i;
      } else {
        lead_[i] = first_[h];
        repeated = true;
      }
    }
    return repeated;
  }
  int64_t lead(int64_t i) const { return lead_[i]; }

 private:
  std::vector<int64_t> keys_, first_, lead_;
};

// Overwrites the kept entries of a gradient row (its dense part g·α·q already written): id j gets
// g·(α·q_j + Σ_{i: ids_i = j} (γ·q_j − p̂_i)), i.e. g·(κ·q_j − p̂_i) for an id held by one slot —
// the exact derivative of the loss with every slot counted as its own outcome.
template <typename scalar_t>
void write_kept(scalar_t* out_row, const Row<scalar_t>& row, double inv_t, const Stats<Acc<scalar_t>>& st,
                const Coefficients<double>& c, double gr, SlotGroups& groups, std::vector<double>& teacher_sum,
                std::vector<int64_t>& count) {
  const bool repeated = groups.build(row);
  if (repeated) {
    teacher_sum.assign(row.k, 0.0);
    count.assign(row.k, 0);
    for (int64_t i = 0; i < row.k; ++i) {
      const int64_t lead = groups.lead(i);
      if (lead < 0) continue;
      teacher_sum[lead] += std::exp(static_cast<double>(row.logp[i]));
      ++count[lead];
    }
  }
  for (int64_t i = 0; i < row.k; ++i) {
    if (groups.lead(i) != i) continue;
    const double q = std::exp(row.log_q(i, inv_t, st));
    double d;
    if (!repeated || count[i] == 1) {
      d = c.kept * q - std::exp(static_cast<double>(row.logp[i]));
    } else {
      d = (c.kept + static_cast<double>(count[i] - 1) * c.gamma) * q - teacher_sum[i];
    }
    out_row[row.ids[i]] = static_cast<scalar_t>(gr * d);
  }
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

// Rows of [N, V] or [B, T, V] logits.
int64_t row_count(const at::Tensor& logits) {
  return logits.dim() == 3 ? logits.size(0) * logits.size(1) : logits.size(0);
}

// Row stats as row_stats, keeping e_j = exp((z_j − m_b)·inv_t) in e[0..V) and the block maxima m_b in
// block_max (−inf for a block of −inf logits, whose e is not written). One read of z.
template <typename scalar_t>
Stats<Acc<scalar_t>> row_stats_kept(const scalar_t* z, int64_t V, Acc<scalar_t> inv_t, Acc<scalar_t>* e,
                                    Acc<scalar_t>* block_maxima) {
  using acc_t = Acc<scalar_t>;
  acc_t m = neg_inf<acc_t>();
  double s = 0;
  alignas(64) float buffer[c10::is_reduced_floating_point_v<scalar_t> ? kBlock : 1];
  for (int64_t b = 0, blk = 0; b < V; b += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b);
    const acc_t* x;
    acc_t bm;
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      bm = block_to_float(z + b, n, buffer);
      x = buffer;
    } else {
      bm = block_max(z + b, n);
      x = z + b;
    }
    block_maxima[blk] = bm;
    if (std::isnan(bm)) return {bm, bm, bm};
    if (bm == neg_inf<acc_t>()) continue;
    const double bs = block_sum_exp<acc_t, c10::is_reduced_floating_point_v<scalar_t>, true>(x, n, inv_t, bm, e + b);
    if (bm > m) {
      s *= std::exp(static_cast<double>((m - bm) * inv_t));  // 0 while m = −inf
      m = bm;
    }
    s += bm == m ? bs : bs * std::exp(static_cast<double>((bm - m) * inv_t));
  }
  return stats_of(m, s);
}

// out[0..V) = c·q_j = c·exp((m_b − m)·inv_t − l)·e_j from the kept exps (e may alias out).
template <typename scalar_t>
void dense_from_kept(scalar_t* out, const Acc<scalar_t>* e, const Acc<scalar_t>* block_max, int64_t V,
                     Acc<scalar_t> inv_t, const Stats<Acc<scalar_t>>& st, Acc<scalar_t> c) {
  using acc_t = Acc<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t b = 0, blk = 0; b < V; b += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b);
    const acc_t f =
        block_max[blk] == neg_inf<acc_t>() ? acc_t(0) : c * std::exp((block_max[blk] - st.m) * inv_t - st.l);
    scalar_t* o = out + b;
    const acc_t* x = e + b;
    if (f == acc_t(0)) {
      std::fill(o, o + n, static_cast<scalar_t>(0));
      continue;
    }
    const Vec vf(f);
    int64_t j = 0;
    if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
      using Reduced = at::vec::Vectorized<scalar_t>;
      for (; j + Reduced::size() <= n; j += Reduced::size())
        at::vec::convert_from_float<scalar_t>(vf * Vec::loadu(x + j), vf * Vec::loadu(x + j + Vec::size()))
            .store(o + j);
    } else {
      for (; j + Vec::size() <= n; j += Vec::size()) (vf * Vec::loadu(x + j)).store(o + j);
    }
    for (; j < n; ++j) o[j] = static_cast<scalar_t>(f * x[j]);
  }
}

void check_acc_tensor(const at::Tensor& t, const char* name, at::ScalarType acc, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// The teacher targets: the accumulation dtype or float64 (read in double either way).
void check_target_tensor(const at::Tensor& t, const char* name, at::ScalarType acc, at::IntArrayRef shape) {
  check_acc_tensor(t, name, t.scalar_type() == at::kDouble ? at::kDouble : acc, shape);
}

// Re-checks the op-level contract (kdloss/_ops/topk_kl.py) and returns the ids, contiguous.
at::Tensor check_inputs(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& target_logp,
                        const at::Tensor& tail_logp, const at::Tensor& valid, const at::Tensor& divisor,
                        double inv_temperature, double scale) {
  check_cpu_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "logits must be [N, V] or [B, T, V], got ", logits.sizes());
  const int64_t N = row_count(logits), V = logits.size(-1);
  TORCH_CHECK_VALUE(V <= 1 || N == 0 || logits.stride(-1) == 1, "logits must have unit stride along V");
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == N,
                    "ids must be an int64 CPU tensor [N, k] with N = ", N, ", got ", ids.scalar_type(), " ",
                    ids.sizes());
  const int64_t k = ids.size(1);
  const auto acc = acc_type(logits.scalar_type());
  check_target_tensor(target_logp, "target_logp", acc, {N, k});
  check_target_tensor(tail_logp, "tail_logp", acc, {N});
  check_acc_tensor(divisor, "divisor", acc, {});
  TORCH_CHECK_VALUE(valid.device().is_cpu() && valid.scalar_type() == at::kBool && valid.sizes() == at::IntArrayRef{N},
                    "valid must be a bool CPU tensor [N]");
  TORCH_CHECK_VALUE(std::isfinite(inv_temperature) && inv_temperature > 0, "inv_temperature must be > 0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite");
  auto ids_c = ids.contiguous();
  const int64_t* p = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "teacher_ids must lie in [0, V) with V = ", V, ", got ", p[i]);
  return ids_c;
}

// An op call's inputs once checked: the options read on the host and the per-row tensors contiguous.
struct Call {
  double inv_temperature, scale;
  Reduction reduction;
  int64_t rows, vocab, k;
  at::Tensor ids, target_logp, tail_logp, valid;
};

Call prepare_call(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& target_logp,
                  const at::Tensor& tail_logp, const at::Tensor& valid, const at::Tensor& divisor,
                  const at::Tensor& inv_temperature_t, const at::Tensor& scale_t, int64_t reduction_code) {
  const double inv_temperature = float_arg(inv_temperature_t, "inv_temperature");
  const double scale = float_arg(scale_t, "scale");
  auto ids_c = check_inputs(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale);
  return {inv_temperature,
          scale,
          check_reduction(reduction_code),
          row_count(logits),
          logits.size(-1),
          ids.size(1),
          std::move(ids_c),
          target_logp.to(at::kDouble).contiguous(),
          tail_logp.to(at::kDouble).contiguous(),
          valid.contiguous()};
}

// The forward's outputs, in the accumulation dtype like the stats: the loss ([N] for none, else a
// scalar) and the stats [N, 2].
std::pair<at::Tensor, at::Tensor> loss_and_stats(const Call& call, const at::Tensor& logits) {
  const int64_t N = call.rows;
  const auto acc_options = logits.options().dtype(acc_type(logits.scalar_type()));
  return {at::empty(call.reduction == Reduction::kNone ? at::IntArrayRef{N} : at::IntArrayRef{}, acc_options),
          at::empty({N, 2}, acc_options)};
}

// Row n of [N, V] or [B, T, V] logits (unit stride along V, any other strides: row n is (n / T, n % T)).
template <typename scalar_t>
struct RowAddress {
  const scalar_t* base;
  int64_t seq, batch_stride, row_stride;
  const scalar_t* operator()(int64_t n) const { return base + (n / seq) * batch_stride + (n % seq) * row_stride; }
};

template <typename scalar_t>
RowAddress<scalar_t> row_address(const at::Tensor& logits) {
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  if (logits.dim() == 3) return {base, std::max<int64_t>(logits.size(1), 1), logits.stride(0), logits.stride(1)};
  return {base, std::max<int64_t>(logits.size(0), 1), 0, logits.stride(0)};
}

template <typename scalar_t>
Row<scalar_t> make_row(const RowAddress<scalar_t>& address, const int64_t* ids, const double* logp, const double* tail,
                       int64_t n, int64_t k) {
  return {address(n), ids + n * k, logp + n * k, tail[n], k};
}

// Large gradients (and the fused head's CPU buffers) come from a small cache of 2 MiB-aligned blocks
// advised for transparent huge pages before their first touch (fewer page faults on a fresh block;
// effective where /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always"). A block returns
// to the cache when its last tensor is freed, and the next request of a similar size reuses it: pages
// already faulted in, as a caching allocator keeps them, instead of ~4 ms of page clearing per 10 MB on
// every training step. At most kIdleBlocks blocks are idle (the smallest is freed first);
// `kdloss.empty_cache()` frees them (topk_kl_release_buffers). KDLOSS_GRAD_CACHE=0 frees every block at
// once; KDLOSS_HUGEPAGES=0 takes every buffer from the default allocator instead.
bool env_enabled(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::string(env) != "0";
}

class BlockCache {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kIdleBlocks = 2;

  // A block of at least `bytes` (a multiple of kHugePage): the smallest idle one no more than twice
  // that size, else a fresh one. Null on failure.
  std::pair<void*, size_t> take(size_t bytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (it->second >= rounded && it->second <= 2 * rounded && (best == idle_.end() || it->second < best->second))
          best = it;
      if (best != idle_.end()) {
        const auto block = *best;
        idle_.erase(best);
        return block;
      }
    }
    void* block = std::aligned_alloc(kHugePage, rounded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (block != nullptr) madvise(block, rounded, MADV_HUGEPAGE);  // advice only: a failure leaves small pages
#endif
    return {block, rounded};
  }

  // Keeps a freed block idle, freeing the smallest idle one beyond kIdleBlocks.
  void give_back(void* block, size_t size) {
    static const bool keep = env_enabled("KDLOSS_GRAD_CACHE");
    if (!keep) {
      std::free(block);
      return;
    }
    std::pair<void*, size_t> evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> guard(mutex_);
      idle_.emplace_back(block, size);
      if (idle_.size() > kIdleBlocks) {
        auto smallest = std::min_element(idle_.begin(), idle_.end(),
                                         [](const auto& a, const auto& b) { return a.second < b.second; });
        evicted = *smallest;
        idle_.erase(smallest);
      }
    }
    std::free(evicted.first);
  }

  // Frees the idle blocks; returns their total size in bytes.
  int64_t release() {
    std::lock_guard<std::mutex> guard(mutex_);
    int64_t total = 0;
    for (const auto& [block, size] : idle_) {
      total += static_cast<int64_t>(size);
      std::free(block);
    }
    idle_.clear();
    return total;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> idle_;
};

BlockCache& block_cache() {
  static auto* cache = new BlockCache();  // never destroyed: blocks may be freed during interpreter exit
  return *cache;
}

int64_t topk_kl_release_buffers() { return block_cache().release(); }

// An uninitialised CPU tensor (a gradient, or a fused-head buffer): large ones (≥ 8 MiB) from the block
// cache, small ones from the default allocator.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  static const bool advise = env_enabled("KDLOSS_HUGEPAGES");
  if (!advise || bytes < 4 * BlockCache::kHugePage) return at::empty(sizes, options);
  auto [block, size] = block_cache().take(bytes);
  if (block == nullptr) return at::empty(sizes, options);
  return at::from_blob(
      block, sizes, [size = size](void* p) { block_cache().give_back(p, size); }, options);
}

// The fused head's CPU buffers (weight gradient, chunk logits) from the same cache.
at::Tensor topk_kl_empty(at::IntArrayRef size, at::ScalarType dtype) {
  return cached_empty(size, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// The loss from the per-row values: the rows for "none", else their fixed-order sum (divided by the
// divisor for "mean"; 0 when it is ≤ 0).
template <typename acc_t>
void write_loss(const std::vector<acc_t>& rows, Reduction reduction, const at::Tensor& divisor, acc_t* out) {
  if (reduction == Reduction::kNone) {
    std::copy(rows.begin(), rows.end(), out);
    return;
  }
  acc_t total = ordered_sum(rows.data(), static_cast<int64_t>(rows.size()));
  if (reduction == Reduction::kMean) {
    const acc_t d = divisor.item<acc_t>();
    total = d > acc_t(0) ? total / d : acc_t(0);
  }
  out[0] = total;
}

at::Tensor topk_kl_bwd(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& logits, const at::Tensor& ids,
                       const at::Tensor& target_logp, const at::Tensor& tail_logp, const at::Tensor& valid,
                       const at::Tensor& divisor, const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                       bool full_support, int64_t reduction_code) {
  const Call call =
      prepare_call(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature_t, scale_t, reduction_code);
  const double inv_temperature = call.inv_temperature, scale = call.scale;
  const Reduction reduction = call.reduction;
  const int64_t N = call.rows, V = call.vocab, k = call.k;
  const auto acc = acc_type(logits.scalar_type());
  check_acc_tensor(stats, "stats", acc, {N, 2});
  const auto g = checked_grad(grad, reduction, {N}, acc);
  const auto stats_c = stats.contiguous();
  at::Tensor out = cached_empty(logits.sizes(), logits.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    const acc_t* g_p = g.const_data_ptr<acc_t>();
    const double* tgt_p = call.target_logp.const_data_ptr<double>();
    const double* tail_p = call.tail_logp.const_data_ptr<double>();
    const acc_t* stats_p = stats_c.const_data_ptr<acc_t>();
    const bool* ok_p = call.valid.const_data_ptr<bool>();
    // ∂loss/∂KL_row · 1/T, without the per-row upstream gradient of reduction "none"
    acc_t row_scale = static_cast<acc_t>(scale) * inv_t;
    if (reduction != Reduction::kNone) row_scale *= g_p[0];
    if (reduction == Reduction::kMean) {
      const acc_t d = divisor.item<acc_t>();
      row_scale = d > acc_t(0) ? row_scale / d : acc_t(0);
    }
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const auto address = row_address<scalar_t>(logits);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      SlotGroups groups;
      std::vector<double> teacher_sum;
      std::vector<int64_t> count;
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out_row = out_p + n * V;
        const acc_t gr = ok_p[n] ? (reduction == Reduction::kNone ? row_scale * g_p[n] : row_scale) : acc_t(0);
        if (gr == acc_t(0)) {
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
          continue;
        }
        const auto row = make_row<scalar_t>(address, call.ids.const_data_ptr<int64_t>(), tgt_p, tail_p, n, k);
        // the kept stats are O(k): recomputed in double rather than read back rounded
        const Stats<acc_t> st = full_support ? Stats<acc_t>{stats_p[2 * n], stats_p[2 * n + 1], stats_p[2 * n + 1]}
                                             : kept_stats(row, inv_temperature);
        const auto c = row_coefficients(row, V, inv_temperature, st, full_support);
        dense_softmax_row(out_row, row.z, V, inv_t, st, static_cast<acc_t>(gr * c.alpha));
        write_kept(out_row, row, inv_temperature, st, c, gr, groups, teacher_sum, count);
      }
    });
  });
  return out;
}

// The forward with, when compute_grad, the gradient for an upstream gradient of 1 (one read of the
// logits, see the top of the file); check_unique rejects ids repeated among a counted row's kept slots.
// The gradient goes to `out` ([N, V] contiguous, the logits' dtype; empty without compute_grad), which
// may be the logits themselves (in_place): each row's exps then go to a row buffer, and its kept logits
// are gathered before the row is overwritten.
std::tuple<at::Tensor, at::Tensor> fwd_grad_into(const at::Tensor& logits, const at::Tensor& ids,
                                                 const at::Tensor& target_logp, const at::Tensor& tail_logp,
                                                 const at::Tensor& valid, const at::Tensor& divisor,
                                                 const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                                                 bool full_support, int64_t reduction_code, bool compute_grad,
                                                 bool check_unique, const at::Tensor& out, bool in_place) {
  const Call call =
      prepare_call(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature_t, scale_t, reduction_code);
  const double inv_temperature = call.inv_temperature, scale = call.scale;
  const Reduction reduction = call.reduction;
  const int64_t N = call.rows, V = call.vocab, k = call.k;
  at::Tensor loss, stats;
  std::tie(loss, stats) = loss_and_stats(call, logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_fwd_grad", [&] {
    using acc_t = Acc<scalar_t>;
    constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    const double* tgt_p = call.target_logp.const_data_ptr<double>();
    const double* tail_p = call.tail_logp.const_data_ptr<double>();
    const bool* ok_p = call.valid.const_data_ptr<bool>();
    acc_t* stats_p = stats.data_ptr<acc_t>();
    // ∂loss/∂KL_row · 1/T for an upstream gradient of 1
    acc_t row_scale = static_cast<acc_t>(scale) * inv_t;
    if (reduction == Reduction::kMean) {
      const acc_t d = divisor.item<acc_t>();
      row_scale = d > acc_t(0) ? row_scale / d : acc_t(0);
    }
    scalar_t* out_p = compute_grad ? out.data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> rows(N);
    const auto address = row_address<scalar_t>(logits);
    at::parallel_for(0, N, row_grain(full_support ? V : k), [&](int64_t begin, int64_t end) {
      SlotGroups groups;
      std::vector<double> teacher_sum;
      std::vector<acc_t> kept_exps(compute_grad && full_support && (!kSameType || in_place) ? V : 0);
      std::vector<acc_t> kept_logits(in_place ? k : 0);
      std::vector<acc_t> block_max(compute_grad && full_support ? (V + kBlock - 1) / kBlock : 0);
      std::vector<int64_t> count;
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out_row = compute_grad ? out_p + n * V : nullptr;
        if (!ok_p[n]) {
          stats_p[2 * n] = stats_p[2 * n + 1] = 0;
          rows[n] = 0;
          if (compute_grad) std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
          continue;
        }
        auto row = make_row<scalar_t>(address, call.ids.const_data_ptr<int64_t>(), tgt_p, tail_p, n, k);
        if (in_place) {
          for (int64_t i = 0; i < k; ++i) kept_logits[i] = static_cast<acc_t>(row.z[row.ids[i]]);
          row.kept_z = kept_logits.data();
        }
        if (check_unique)
          TORCH_CHECK_VALUE(!groups.build(row),
                            "teacher_ids must be unique within each position among slots with non-zero teacher mass "
                            "(a repeated id double-counts; pad with any id and a -inf value instead), row ",
                            n);
        if (!compute_grad) {
          const Stats<acc_t> st = full_support ? row_stats(row.z, V, inv_t) : kept_stats(row, inv_temperature);
          stats_p[2 * n] = saved_shift(st, inv_temperature);
          stats_p[2 * n + 1] = st.l;
          rows[n] = static_cast<acc_t>(scale * row_kl(row, V, inv_temperature, st, full_support));
          continue;
        }
        acc_t* exps = nullptr;
        if constexpr (kSameType) {
          // the gradient row holds the exps until scaled in place (unless it is the logits row)
          exps = in_place ? kept_exps.data() : reinterpret_cast<acc_t*>(out_row);
        } else {
          exps = kept_exps.data();
        }
        const Stats<acc_t> st =
            full_support ? row_stats_kept(row.z, V, inv_t, exps, block_max.data()) : kept_stats(row, inv_temperature);
        stats_p[2 * n] = saved_shift(st, inv_temperature);
        stats_p[2 * n + 1] = st.l;
        const auto terms = row_terms(row, V, inv_temperature, st, full_support);
        rows[n] = static_cast<acc_t>(scale * terms.kl);
        const acc_t c = static_cast<acc_t>(row_scale * terms.c.alpha);
        if (!full_support || c == acc_t(0)) {
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
        } else if (std::isnan(st.m)) {
          dense_softmax_row(out_row, row.z, V, inv_t, st, c);
        } else {
          dense_from_kept(out_row, exps, block_max.data(), V, inv_t, st, c);
        }
        write_kept(out_row, row, inv_temperature, st, terms.c, row_scale, groups, teacher_sum, count);
      }
    });
    write_loss(rows, reduction, divisor, loss.data_ptr<acc_t>());
  });
  return {loss, stats};
}

// The forward alone: loss and stats, nothing of size N×V written.
std::tuple<at::Tensor, at::Tensor> topk_kl_fwd(const at::Tensor& logits, const at::Tensor& ids,
                                               const at::Tensor& target_logp, const at::Tensor& tail_logp,
                                               const at::Tensor& valid, const at::Tensor& divisor,
                                               const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                                               bool full_support, int64_t reduction_code) {
  return fwd_grad_into(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature_t, scale_t, full_support,
                       reduction_code, false, false, at::Tensor(), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_grad(
    const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& target_logp, const at::Tensor& tail_logp,
    const at::Tensor& valid, const at::Tensor& divisor, const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
    bool full_support, int64_t reduction_code, bool compute_grad, bool check_unique) {
  at::Tensor out = compute_grad ? cached_empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  auto [loss, stats] = fwd_grad_into(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature_t, scale_t,
                                     full_support, reduction_code, compute_grad, check_unique, out, false);
  return {loss, stats, out};
}

// topk_kl_fwd_grad with the gradient written over the (contiguous) logits: no second [N, V] buffer.
std::tuple<at::Tensor, at::Tensor> topk_kl_fwd_grad_(const at::Tensor& logits, const at::Tensor& ids,
                                                     const at::Tensor& target_logp, const at::Tensor& tail_logp,
                                                     const at::Tensor& valid, const at::Tensor& divisor,
                                                     const at::Tensor& inv_temperature_t, const at::Tensor& scale_t,
                                                     bool full_support, int64_t reduction_code) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous for the in-place gradient");
  return fwd_grad_into(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature_t, scale_t, full_support,
                       reduction_code, true, false, logits, true);
}

// grad *= the upstream gradient in place, per row for reduction none; rows whose factor is exactly 1 are
// skipped. The eager CUDA backward's op (csrc/cuda/topk_kl_ops.cpp); here for parity and opcheck.
void topk_kl_rescale_(const at::Tensor& grad, const at::Tensor& grad_loss, int64_t reduction) {
  check_cpu_float(grad, "grad");
  TORCH_CHECK_VALUE(grad.is_contiguous() && grad.dim() >= 1, "grad must be contiguous, got ", grad.sizes());
  TORCH_CHECK_VALUE(grad_loss.device().is_cpu(), "grad_loss must be a CPU tensor, got ", grad_loss.device());
  const int64_t V = grad.size(-1), N = V > 0 ? grad.numel() / V : 0;
  const Reduction code = check_reduction(reduction);
  const auto factor = upstream_grad(grad_loss, code, {N}, acc_type(grad.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "topk_kl_rescale_", [&] {
    using acc_t = Acc<scalar_t>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* f = factor.const_data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const acc_t fn = f[code == Reduction::kNone ? n : 0];
        if (fn == acc_t(1)) continue;
        for (scalar_t* x = g + n * V; x != g + (n + 1) * V; ++x)
          *x = static_cast<scalar_t>(static_cast<acc_t>(*x) * fn);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("topk_kl_rescale_", &topk_kl_rescale_);
  m.impl("topk_kl_fwd", &topk_kl_fwd);
  m.impl("topk_kl_bwd", &topk_kl_bwd);
  m.impl("topk_kl_fwd_grad", &topk_kl_fwd_grad);
  m.impl("topk_kl_fwd_grad_", &topk_kl_fwd_grad_);
}

TORCH_LIBRARY_IMPL(kdloss, CompositeExplicitAutograd, m) {
  m.impl("topk_kl_release_buffers", &topk_kl_release_buffers);
  m.impl("topk_kl_empty", &topk_kl_empty);
}

}  // namespace cpu
}  // namespace kdloss
