// Plackett-Luce distillation (PLD) CPU kernels (spec §2, decision 2) for the CPU dispatch key. The
// op contract (shapes, dtypes, reductions; order [R, C] int32 = π*, written by the forward, read by
// the backward) is documented once, with the schemas, in kdloss/_ops/plackett_luce.py.
//
// Per row (π* = label first, then the other classes by descending teacher logit, ties → lower
// class index first; x_j = s[π*_j]; log α_j = log_softmax(t / τ)[π*_j]):
//   forward   lse_j = log Σ_{l≥j} exp(x_l) = m_j + l_j          (suffix scan; m_j = max_{l≥j} x_l)
//             L     = Σ_j α_j ((m_j − x_j) + l_j)
//   backward  S_j   = Σ_{k≤j} α_k exp(lse_j − lse_k)            (prefix scan, S_j = e^{δ_j} S_{j−1} + α_j,
//                                                                 δ_j = lse_j − lse_{j−1} ≤ 0)
//             ∂L/∂x_j = exp(x_j − lse_j) · S_j − α_j            (spec §2.5, closed form)
// lse_j is kept as the pair (m_j, l_j), l_j ∈ [0, log C]: every quantity used is a difference of two
// logits (exact when they are close, Sterbenz) plus small terms, never a large lse_j itself, whose
// rounding would cost absolute accuracy in lse_j − x_j once the logits spread over ~1e5 (and the
// logits are never shifted by their maximum, which overflows for spreads beyond FLT_MAX: such a
// difference becomes +inf, clamped to the largest finite value for the loss, exp(−inf) = 0 in the
// gradient). Both scans run with a running maximum: a scalar max scan, vectorised exps of the
// differences, then a scalar multiply-add chain (no exp/log inside the sequential loop).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

constexpr int8_t kOk = 0, kBadLabel = 1, kBadPermutation = 2, kBadOrder = 3;

// Order-preserving unsigned images of floats (ascending), with −0 and +0 mapped to one key.
inline uint32_t ordered_bits(float x) {
  x = x + 0.0f;  // −0 → +0 (not folded away without -ffast-math)
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t ordered_bits(double x) {
  x = x + 0.0;
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Per-thread buffers, allocated once per parallel chunk and reused for every row of it.
template <typename acc_t>
struct Scratch {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t C, padded;
  std::vector<uint64_t> keys, keys_tmp;  // packed sort keys (fp32) / per-class keys (fp64)
  std::vector<int32_t> ranking;          // teacher ranking (all classes)
  std::vector<uint8_t> seen;             // permutation checks
  std::vector<acc_t> x, log_alpha, a, b, c, d;
  std::vector<double> wide_factor;  // the backward scan's exp(δ_j), in double (see row_backward)

  explicit Scratch(int64_t classes) : C(classes), padded((classes + Vec::size() - 1) / Vec::size() * Vec::size()) {}

  void ensure_sort() {
    if (keys.empty()) {
      keys.resize(C);
      keys_tmp.resize(C);
      ranking.resize(C);
    }
  }
  void ensure_seen() {
    if (seen.empty()) seen.resize(C);
  }
  void ensure_scan() {
    if (x.empty()) {
      for (auto* v : {&x, &log_alpha, &a, &b, &c, &d}) v->resize(padded);
      wide_factor.resize(padded);
    }
  }
};

// Stable descending sort of the teacher logits: ranking[0..C) (ties → lower class index first).
// fp32: keys packed with the class index into one uint64, so equal logits order by index; an LSD
// radix sort on the 32 key bits (stable, starting from index order) for large C.
void teacher_ranking(const float* t, int64_t C, Scratch<float>& sc) {
  sc.ensure_sort();
  uint64_t* a = sc.keys.data();
  uint64_t* b = sc.keys_tmp.data();
  for (int64_t j = 0; j < C; ++j) {
    a[j] = (static_cast<uint64_t>(~ordered_bits(t[j])) << 32) | static_cast<uint32_t>(j);
  }
  if (C <= 256) {
    std::sort(a, a + C);  // keys are unique (index in the low bits): deterministic
  } else {
    int64_t hist[4][256];
    std::memset(hist, 0, sizeof(hist));
    for (int64_t j = 0; j < C; ++j) {
      const uint32_t key = static_cast<uint32_t>(a[j] >> 32);
      for (int p = 0; p < 4; ++p) ++hist[p][(key >> (8 * p)) & 255u];
    }
    for (int p = 0; p < 4; ++p) {
      int64_t* h = hist[p];
      bool trivial = false;
      int64_t sum = 0;
      for (int v = 0; v < 256; ++v) {
        if (h[v] == C) trivial = true;
        const int64_t count = h[v];
        h[v] = sum;
        sum += count;
      }
      if (trivial) continue;  // every key shares this digit: the pass would not move anything
      for (int64_t j = 0; j < C; ++j) {
        const uint32_t digit = static_cast<uint32_t>(a[j] >> (32 + 8 * p)) & 255u;
        b[h[digit]++] = a[j];
      }
      std::swap(a, b);
    }
  }
  int32_t* r = sc.ranking.data();
  for (int64_t j = 0; j < C; ++j) r[j] = static_cast<int32_t>(a[j] & 0xffffffffull);
}

// fp64: comparison sort of class indices on (descending key, ascending index) — a total order,
// so the result is the stable descending order.
void teacher_ranking(const double* t, int64_t C, Scratch<double>& sc) {
  sc.ensure_sort();
  uint64_t* keys = sc.keys.data();
  int32_t* r = sc.ranking.data();
  for (int64_t j = 0; j < C; ++j) {
    keys[j] = ~ordered_bits(t[j]);
    r[j] = static_cast<int32_t>(j);
  }
  std::sort(r, r + C, [keys](int32_t p, int32_t q) { return keys[p] < keys[q] || (keys[p] == keys[q] && p < q); });
}

// π*: the label first, then `ranking` without the label. `ranking` is a user permutation (checked:
// every class exactly once) or the kernel's own sort. Returns false for an invalid permutation.
template <typename acc_t, typename index_t>
bool label_first(const index_t* ranking, int64_t y, int64_t C, bool check, int32_t* order, Scratch<acc_t>& sc) {
  uint8_t* seen = nullptr;
  if (check) {
    sc.ensure_seen();
    seen = sc.seen.data();
    std::memset(seen, 0, C);
  }
  order[0] = static_cast<int32_t>(y);
  int64_t k = 1;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t p = static_cast<int64_t>(ranking[j]);
    if (check) {
      if (p < 0 || p >= C || seen[p]) return false;
      seen[p] = 1;
    }
    if (p != y) {
      if (k >= C) return false;
      order[k++] = static_cast<int32_t>(p);
    }
  }
  return k == C;
}

// log_softmax(t / τ) at the positions of `order`, and the student logits gathered the same way,
// into sc.log_alpha / sc.x (padded: x = 0, log α = lowest, so padded lanes contribute exactly 0).
template <typename scalar_t>
void gather_row(const scalar_t* s, const Acc<scalar_t>* t, const int32_t* order, int64_t C, Acc<scalar_t> inv_tau,
                Scratch<Acc<scalar_t>>& sc) {
  using acc_t = Acc<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t tmax = at::vec::reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, t, C);
  const Vec vmax(tmax), vinv(inv_tau);
  // Σ exp in blocks (acc_t) whose sums add in double: one fp32 accumulator per lane would chain C / 8
  // additions, and its error (~1e-5 relative at C = 32000) would scale every α_j, hence the loss
  constexpr int64_t kBlock = 64;
  double total = 0.0;
  for (int64_t start = 0; start < C; start += kBlock * Vec::size()) {
    const int64_t n = std::min<int64_t>(C - start, kBlock * Vec::size());
    total += static_cast<double>(at::vec::map_reduce_all<acc_t>([&](Vec v) { return ((v - vmax) * vinv).exp(); },
                                                                [](Vec p, Vec q) { return p + q; }, t + start, n));
  }
  const acc_t log_total = static_cast<acc_t>(std::log(total));
  acc_t* x = sc.x.data();
  acc_t* la = sc.log_alpha.data();
  constexpr acc_t lowest = std::numeric_limits<acc_t>::lowest();
  for (int64_t j = 0; j < C; ++j) {
    const int32_t p = order[j];
    x[j] = static_cast<acc_t>(s[p]);
    // −inf teacher logits (probability 0) become the lowest finite value: still exp → 0, but
    // differences of two of them stay finite inside the scans
    la[j] = std::max((t[p] - tmax) * inv_tau - log_total, lowest);
  }
  for (int64_t j = C; j < sc.padded; ++j) {
    x[j] = acc_t(0);
    la[j] = lowest;
  }
}

// Suffix log-sum-exp of sc.x as the pair (m, l): m_j = max_{l≥j} x_l into sc.a, l_j = log Σ_{l≥j}
// exp(x_l − m_j) into `l` (padded tail: m = 0, l = 0). Uses sc.b, sc.c as temporaries. The sequential
// sum runs in double: in fp32 a chain of C additions errs by up to ~C·eps (4e-3 relative at
// C = 32000), far beyond one rounding.
template <typename acc_t>
void suffix_lse(Scratch<acc_t>& sc, int64_t C, acc_t* l) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t* x = sc.x.data();
  acc_t* m = sc.a.data();    // suffix max
  acc_t* up = sc.b.data();   // exp(m_{j+1} − m_j)
  acc_t* own = sc.c.data();  // exp(x_j − m_j), then the scaled suffix sums
  // suffix max; the rescale factor exp(m_{j+1} − m_j) is 1 except where the maximum changes
  // (rarely: a scalar exp there); up[C-1] multiplies the empty sum 0
  acc_t run = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = C - 1; j >= 0; --j) {
    if (x[j] > run) {
      up[j] = j == C - 1 ? acc_t(0) : std::exp(run - x[j]);
      run = x[j];
    } else {
      up[j] = acc_t(1);
    }
    m[j] = run;
  }
  for (int64_t j = C; j < sc.padded; ++j) m[j] = acc_t(0);
  for (int64_t j = 0; j < sc.padded; j += Vec::size()) {
    (Vec::loadu(x + j) - Vec::loadu(m + j)).exp().store(own + j);
  }
  double sum = 0.0;
  for (int64_t j = C - 1; j >= 0; --j) {
    sum = sum * static_cast<double>(up[j]) + static_cast<double>(own[j]);
    own[j] = static_cast<acc_t>(sum);
  }
  for (int64_t j = C; j < sc.padded; ++j) own[j] = acc_t(1);
  for (int64_t j = 0; j < sc.padded; j += Vec::size()) Vec::loadu(own + j).log().store(l + j);
}

// lse_j − x_j = (m_j − x_j) + l_j ≥ 0; a logit spread beyond the largest finite value (m_j − x_j
// = +inf) is clamped to it.
template <typename acc_t>
at::vec::Vectorized<acc_t> lse_minus_x(const acc_t* m, const acc_t* x, const acc_t* l, int64_t j) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec d = at::vec::minimum(Vec::loadu(m + j) - Vec::loadu(x + j), Vec(std::numeric_limits<acc_t>::max()));
  return d + Vec::loadu(l + j);
}

// Loss of one row (π* already in `order`).
template <typename scalar_t>
Acc<scalar_t> row_forward(const scalar_t* s, const Acc<scalar_t>* t, const int32_t* order, int64_t C,
                          Acc<scalar_t> inv_tau, Scratch<Acc<scalar_t>>& sc) {
  using acc_t = Acc<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  sc.ensure_scan();
  gather_row(s, t, order, C, inv_tau, sc);
  acc_t* l = sc.d.data();
  suffix_lse(sc, C, l);
  const acc_t* x = sc.x.data();
  const acc_t* m = sc.a.data();
  const acc_t* la = sc.log_alpha.data();
  // blocks of kBlock vectors summed in acc_t, the block sums in double: a single fp32 accumulator per
  // lane would chain C / 8 additions (an error of ~1e-5 relative at C = 32000)
  constexpr int64_t kBlock = 8;
  double total = 0.0;
  for (int64_t start = 0; start < sc.padded; start += kBlock * Vec::size()) {
    const int64_t stop = std::min<int64_t>(sc.padded, start + kBlock * Vec::size());
    Vec acc(acc_t(0));
    for (int64_t j = start; j < stop; j += Vec::size()) {
      // α = 0 (log α = lowest) contributes exactly 0 even where lse_j − x_j is the clamped maximum
      const Vec alpha = Vec::loadu(la + j).exp();
      acc = acc + Vec::blendv(alpha * lse_minus_x(m, x, l, j), Vec(acc_t(0)), alpha == Vec(acc_t(0)));
    }
    total += static_cast<double>(vec_sum(acc));
  }
  return static_cast<acc_t>(total);
}

// Gradient of one row, times `coef`, scattered to grad_row[order[j]].
template <typename scalar_t>
void row_backward(const scalar_t* s, const Acc<scalar_t>* t, const int32_t* order, int64_t C, Acc<scalar_t> inv_tau,
                  Acc<scalar_t> coef, Scratch<Acc<scalar_t>>& sc, scalar_t* grad_row) {
  using acc_t = Acc<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  sc.ensure_scan();
  gather_row(s, t, order, C, inv_tau, sc);
  acc_t* l = sc.d.data();
  suffix_lse(sc, C, l);  // m_j in sc.a, l_j in sc.d
  const acc_t* x = sc.x.data();
  const acc_t* m = sc.a.data();
  const acc_t* la = sc.log_alpha.data();
  // exp(δ_j), δ_j = lse_j − lse_{j−1} = (m_j − m_{j−1}) + (l_j − l_{j−1}) ≤ 0, and the scan of S, in
  // double: the chain multiplies up to C factors, whose fp32 roundings (in δ_j and in its exp) would
  // accumulate to ~√C·eps relative; in double the δ_j of the stored fp32 m_j, l_j telescope exactly
  using WideVec = at::vec::Vectorized<double>;
  double* factor = sc.wide_factor.data();
  acc_t* alpha = sc.c.data();  // α_j, then S_j
  factor[0] = 0.0;             // S_0 = α_0: the factor multiplies the empty sum
  for (int64_t j = 1; j < C; ++j) {
    factor[j] = (static_cast<double>(m[j]) - static_cast<double>(m[j - 1])) +
                (static_cast<double>(l[j]) - static_cast<double>(l[j - 1]));
  }
  for (int64_t j = C; j < sc.padded; ++j) factor[j] = 0.0;
  for (int64_t j = 0; j < sc.padded; j += WideVec::size()) WideVec::loadu(factor + j).exp().store(factor + j);
  for (int64_t j = 0; j < sc.padded; j += Vec::size()) Vec::loadu(la + j).exp().store(alpha + j);
  acc_t* S = sc.c.data();
  double run = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    run = (j == 0 ? 0.0 : run * factor[j]) + static_cast<double>(alpha[j]);
    S[j] = static_cast<acc_t>(run);
  }
  for (int64_t j = C; j < sc.padded; ++j) S[j] = acc_t(0);
  const Vec vcoef(coef), zero(acc_t(0));
  acc_t* g = sc.b.data();  // reuse: g_j = exp(x_j − lse_j)·S_j − α_j
  for (int64_t j = 0; j < sc.padded; j += Vec::size()) {
    const Vec q = (zero - lse_minus_x(m, x, l, j)).exp();
    ((q * Vec::loadu(S + j) - Vec::loadu(la + j).exp()) * vcoef).store(g + j);
  }
  for (int64_t j = 0; j < C; ++j) grad_row[order[j]] = static_cast<scalar_t>(g[j]);
}

// Checks shared by both directions; returns (R, C).
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                         double temperature) {
  check_cpu_float(student, "student_logits");
  check_cpu_float(teacher, "teacher_logits");
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be [R, C], got ", student.sizes());
  const int64_t R = student.size(0), C = student.size(1);
  TORCH_CHECK_VALUE(C >= 1, "student_logits must have at least one class, got C = ", C);
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 classes are supported");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher_logits must have shape ", student.sizes(), ", got ",
                    teacher.sizes());
  const auto acc_dtype = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc_dtype, "teacher_logits must be ", acc_dtype, ", got ",
                    teacher.scalar_type());
  TORCH_CHECK_VALUE(
      labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == R,
      "labels must be a CPU int64 tensor of shape [", R, "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
  return {R, C};
}

void raise_status(const std::vector<int8_t>& status, const at::Tensor& labels, int64_t C, int64_t ignore_index) {
  for (size_t r = 0; r < status.size(); ++r) {
    switch (status[r]) {
      case kOk: continue;
      case kBadLabel:
        TORCH_CHECK_VALUE(false, "labels must lie in [0, C) with C = ", C, " or equal ignore_index = ", ignore_index,
                          ", got ", labels.data_ptr<int64_t>()[r], " at row ", r);
      case kBadPermutation:
        TORCH_CHECK_VALUE(false, "teacher_permutation must hold each class index in [0, ", C,
                          ") exactly once per row; row ", r, " does not");
      default:
        TORCH_CHECK_VALUE(false, "order must hold each class index in [0, ", C, ") exactly once per row; row ", r,
                          " does not");
    }
  }
}

int64_t counted_rows(const int64_t* y, int64_t R, int64_t ignore_index) {
  int64_t count = 0;
  for (int64_t r = 0; r < R; ++r) count += y[r] != ignore_index;
  return count;
}

std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& labels,
                                                     const c10::optional<at::Tensor>& teacher_permutation,
                                                     const at::Tensor& temperature_t, int64_t ignore_index,
                                                     int64_t reduction_code) {
  const double temperature = float_arg(temperature_t, "temperature");
  const Reduction reduction = check_reduction(reduction_code);
  const auto [R, C] = check_inputs(student, teacher, labels, temperature);
  at::Tensor perm;
  if (teacher_permutation.has_value()) {
    perm = teacher_permutation->contiguous();
    TORCH_CHECK_VALUE(perm.device().is_cpu() && perm.scalar_type() == at::kLong && perm.sizes() == student.sizes(),
                      "teacher_permutation must be a CPU int64 tensor of shape ", student.sizes(), ", got ",
                      perm.scalar_type(), " ", perm.sizes());
  }
  const auto s = unit_inner_stride(student);
  const auto t = teacher.contiguous();
  const auto y = labels.contiguous();
  // the loss is returned in the accumulation dtype (fp32; fp64 for fp64 students)
  const auto loss_opts = s.options().dtype(acc_type(s.scalar_type()));
  at::Tensor out = reduction == Reduction::kNone ? at::empty({R}, loss_opts) : at::empty({}, loss_opts);
  at::Tensor order = at::empty({R, C}, s.options().dtype(at::kInt));
  std::vector<int8_t> status(R, kOk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "plackett_luce_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    const scalar_t* s_p = s.data_ptr<scalar_t>();
    const int64_t s_stride = s.stride(0);
    const acc_t* t_p = t.data_ptr<acc_t>();
    const int64_t* y_p = y.data_ptr<int64_t>();
    const int64_t* perm_p = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
    int32_t* order_p = order.data_ptr<int32_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
    std::vector<acc_t> row_loss(R, acc_t(0));
    at::parallel_for(0, R, row_grain(16 * C), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> sc(C);
      for (int64_t r = begin; r < end; ++r) {
        int32_t* ord = order_p + r * C;
        const int64_t label = y_p[r];
        bool ok = label != ignore_index;
        if (ok && (label < 0 || label >= C)) {
          status[r] = kBadLabel;
          ok = false;
        }
        if (ok) {
          if (perm_p) {
            ok = label_first(perm_p + r * C, label, C, /*check=*/true, ord, sc);
          } else {
            teacher_ranking(t_p + r * C, C, sc);
            ok = label_first(sc.ranking.data(), label, C, /*check=*/false, ord, sc);
          }
          if (!ok) status[r] = kBadPermutation;
        }
        if (!ok) {
          for (int64_t j = 0; j < C; ++j) ord[j] = static_cast<int32_t>(j);
          continue;
        }
        row_loss[r] = row_forward<scalar_t>(s_p + r * s_stride, t_p + r * C, ord, C, inv_tau, sc);
      }
    });
    raise_status(status, y, C, ignore_index);
    if (reduction == Reduction::kNone) {
      std::copy(row_loss.begin(), row_loss.end(), out.data_ptr<acc_t>());
    } else {
      acc_t total = ordered_sum(row_loss.data(), R);
      const int64_t count = counted_rows(y_p, R, ignore_index);
      // no counted row: the mean is 0, never 0/0 (spec §0)
      if (reduction == Reduction::kMean && count > 0) total = total / static_cast<acc_t>(count);
      out.data_ptr<acc_t>()[0] = total;
    }
  });
  return {out, order};
}

at::Tensor plackett_luce_bwd(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& labels, const at::Tensor& order, const at::Tensor& temperature_t,
                             int64_t ignore_index, int64_t reduction_code) {
  const double temperature = float_arg(temperature_t, "temperature");
  const Reduction reduction = check_reduction(reduction_code);
  const auto [R, C] = check_inputs(student, teacher, labels, temperature);
  // the upstream gradient in the accumulation dtype (the loss's own dtype; never rounded to the student's)
  const auto g = checked_grad(grad, reduction, {R}, acc_type(student.scalar_type()));
  TORCH_CHECK_VALUE(order.device().is_cpu() && order.scalar_type() == at::kInt && order.sizes() == student.sizes(),
                    "order must be a CPU int32 tensor of shape ", student.sizes(), ", got ", order.scalar_type(), " ",
                    order.sizes());
  const auto s = unit_inner_stride(student);
  const auto t = teacher.contiguous();
  const auto y = labels.contiguous();
  const auto ord = order.contiguous();
  at::Tensor grad_student = at::empty({R, C}, s.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<int8_t> status(R, kOk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "plackett_luce_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t* g_p = g.data_ptr<acc_t>();
    const scalar_t* s_p = s.data_ptr<scalar_t>();
    const int64_t s_stride = s.stride(0);
    const acc_t* t_p = t.data_ptr<acc_t>();
    const int64_t* y_p = y.data_ptr<int64_t>();
    const int32_t* ord_p = ord.data_ptr<int32_t>();
    scalar_t* out_p = grad_student.data_ptr<scalar_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
    const int64_t count = counted_rows(y_p, R, ignore_index);
    acc_t scale = acc_t(1);
    if (reduction == Reduction::kMean) scale = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
    const acc_t scalar_grad = reduction == Reduction::kNone ? acc_t(0) : g_p[0] * scale;
    at::parallel_for(0, R, row_grain(8 * C), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> sc(C);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* out_row = out_p + r * C;
        const int64_t label = y_p[r];
        const int32_t* o = ord_p + r * C;
        bool ok = label != ignore_index;
        if (ok && (label < 0 || label >= C)) {
          status[r] = kBadLabel;
          ok = false;
        }
        if (ok) {
          // memory safety for direct op calls: every class exactly once, the label first
          sc.ensure_seen();
          std::memset(sc.seen.data(), 0, C);
          ok = o[0] == label;
          for (int64_t j = 0; ok && j < C; ++j) {
            const int32_t p = o[j];
            ok = p >= 0 && p < C && !sc.seen[p];
            if (ok) sc.seen[p] = 1;
          }
          if (!ok) status[r] = kBadOrder;
        }
        if (!ok) {
          std::fill(out_row, out_row + C, scalar_t(0));
          continue;
        }
        const acc_t coef = reduction == Reduction::kNone ? g_p[r] : scalar_grad;
        row_backward<scalar_t>(s_p + r * s_stride, t_p + r * C, o, C, inv_tau, coef, sc, out_row);
      }
    });
    raise_status(status, y, C, ignore_index);
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("plackett_luce_fwd", &plackett_luce_fwd);
  m.impl("plackett_luce_bwd", &plackett_luce_bwd);
}

}  // namespace cpu
}  // namespace kdloss
