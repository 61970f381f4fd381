// TRG kNN-graph local-structure loss, CPU kernels (spec §5.2–5.3) for the CPU dispatch key. The op
// contract (shapes, dtypes, codes, reductions) is documented once, with the schemas, in
// kdloss/_ops/token_graph.py. Student x [M, Ds], teacher y [M, Dt], neighbours nb [M, k]:
//   d_ij = ‖x_i − x_nb(i,j)‖², ℓ_ij = −d_ij / (2σ), logits z_ij = exp(ℓ_ij) (edge 0) or ℓ_ij (edge 1)
//   log p_i = log_softmax_j(z_i) (max-shifted; see shift_by_max), same for the teacher
//   L_i = KL(p^S_i ‖ p^T_i) (direction 0) or KL(p^T_i ‖ p^S_i) (direction 1)
//
// Forward: one task owns a range of nodes; per node, one pass over its k edges computes both
// distances (vectorised over D, accumulated in fp32 / fp64), the two log-softmaxes and the KL, and
// writes the per-edge coefficient c_ij = ∂L_i/∂d_ij (the backward's only state, O(M·k)):
//   ∂L_i/∂z_ij = p^S_ij (r_ij − L_i), r = log p^S − log p^T   (direction 0; Σ_j p^S_ij r_ij = L_i)
//              = p^S_ij − p^T_ij                               (direction 1)
//   ∂z_ij/∂d_ij = −z_ij / (2σ) (edge 0) or −1/(2σ) (edge 1)
// Backward: w_ij = 2·g_i·c_ij (g_i the upstream gradient, ÷ M for mean), and
//   ∂L/∂x_i = Σ_j w_ij (x_i − x_nb(i,j)) + Σ_{(m,j): nb(m,j) = i} w_mj (x_i − x_m)
// The second (scatter) sum runs over a transposed edge list (CSR by neighbour, built with a
// sequential counting sort in O(M·k), edges in ascending order), so every gradient row is written
// by one task in a fixed order: results are bitwise identical for any torch.set_num_threads.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kdloss/cpu_utils.h"

namespace kdloss {
namespace cpu {
namespace {

// student [M, Ds], neighbours [M, k] int64 with every entry in [0, M).
void check_graph(const at::Tensor& student, const at::Tensor& neighbours) {
  check_cpu_float(student, "student");
  TORCH_CHECK_VALUE(student.dim() == 2, "student must be [M, Ds], got ", student.sizes());
  TORCH_CHECK_VALUE(neighbours.device().is_cpu() && neighbours.scalar_type() == at::kLong && neighbours.dim() == 2 &&
                        neighbours.size(0) == student.size(0),
                    "neighbours must be an int64 CPU tensor [M, k] with M = ", student.size(0), ", got ",
                    neighbours.scalar_type(), " ", neighbours.sizes());
}

void check_neighbour_range(const int64_t* nb, int64_t count, int64_t M) {
  for (int64_t e = 0; e < count; ++e)
    TORCH_CHECK_VALUE(nb[e] >= 0 && nb[e] < M, "neighbours must lie in [0, M) with M = ", M, ", got ", nb[e]);
}

// ‖a − b‖² over D elements, accumulated in the accumulation type.
template <typename scalar_t>
Acc<scalar_t> squared_distance(const scalar_t* a, const scalar_t* b, int64_t D) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::size();
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t d = 0;
  for (; d + 2 * V <= D; d += 2 * V) {
    const Vec e0 = IO::load(a + d) - IO::load(b + d);
    const Vec e1 = IO::load(a + d + V) - IO::load(b + d + V);
    s0 = at::vec::fmadd(e0, e0, s0);
    s1 = at::vec::fmadd(e1, e1, s1);
  }
  for (; d + V <= D; d += V) {
    const Vec e0 = IO::load(a + d) - IO::load(b + d);
    s0 = at::vec::fmadd(e0, e0, s0);
  }
  acc_t s = vec_sum(s0 + s1);
  for (; d < D; ++d) {
    const acc_t e = static_cast<acc_t>(a[d]) - static_cast<acc_t>(b[d]);
    s += e * e;
  }
  return s;
}

// In place: z[0..k) → z − max z (k ≥ 1), so the top entry becomes exactly 0; returns its index and
// log Σ_j exp(z_j − max z). Then log p_j = z_j − log_sum is rounded at the scale of the shifted
// logits. (Forming lse = max + log Σ first and subtracting it would round at the scale of |max z|,
// and the log-kernel logits −d/(2σ) can be in the hundreds while the KL's terms are O(1).)
template <typename acc_t>
struct Shifted {
  int64_t top;
  acc_t log_sum;
};

template <typename acc_t>
Shifted<acc_t> shift_by_max(acc_t* z, int64_t k) {
  int64_t top = 0;
  for (int64_t j = 1; j < k; ++j)
    if (z[j] > z[top]) top = j;
  const acc_t m = z[top];
  acc_t s = 0;
  for (int64_t j = 0; j < k; ++j) {
    z[j] -= m;
    s += std::exp(z[j]);
  }
  return {top, std::log(s)};
}

struct Options {
  int64_t M, k, Ds, Dt;
  double sigma;
  int64_t edge, direction;
};

// One node: returns L_i and writes coef[0..k).
template <typename scalar_t>
Acc<scalar_t> node_forward(const scalar_t* xs, const Acc<scalar_t>* xt, const int64_t* nb_row, int64_t i,
                           const Options& o, Acc<scalar_t>* zs, Acc<scalar_t>* zt, Acc<scalar_t>* coef) {
  using acc_t = Acc<scalar_t>;
  const acc_t inv_two_sigma = static_cast<acc_t>(0.5 / o.sigma);
  const scalar_t* xi = xs + i * o.Ds;
  const acc_t* yi = xt + i * o.Dt;
  for (int64_t j = 0; j < o.k; ++j) {
    const int64_t n = nb_row[j];
    const acc_t ls = -squared_distance(xi, xs + n * o.Ds, o.Ds) * inv_two_sigma;
    const acc_t lt = -squared_distance(yi, xt + n * o.Dt, o.Dt) * inv_two_sigma;
    zs[j] = o.edge == 0 ? std::exp(ls) : ls;
    zt[j] = o.edge == 0 ? std::exp(lt) : lt;
    coef[j] = o.edge == 0 ? -zs[j] * inv_two_sigma : -inv_two_sigma;  // ∂z/∂d, completed below
  }
  // KL(p^a ‖ p^b) with a = student (direction 0) or teacher (direction 1), written around the top
  // entry t of p^a: with r = log p^a − log p^b and δ_j = r_j − r_t = za_j − (zb_j − zb_t) (za_t = 0),
  //   L = r_t + Σ_j p^a_j δ_j   and   r_j − L = δ_j − Σ_k p^a_k δ_k.
  // When p^a is confident, r_t − L is tiny; forming it as the difference of the O(|r|) numbers r_t
  // and L would lose it to rounding. This form never subtracts two such numbers.
  const Shifted<acc_t> s = shift_by_max(zs, o.k), t = shift_by_max(zt, o.k);
  const bool student_first = o.direction == 0;
  const acc_t* za = student_first ? zs : zt;
  const acc_t* zb = student_first ? zt : zs;
  const Shifted<acc_t> a = student_first ? s : t, b = student_first ? t : s;
  const acc_t zb_top = zb[a.top];
  acc_t mean_delta = 0;
  for (int64_t j = 0; j < o.k; ++j) mean_delta += std::exp(za[j] - a.log_sum) * (za[j] - (zb[j] - zb_top));
  const acc_t loss = ((b.log_sum - a.log_sum) - zb_top) + mean_delta;
  for (int64_t j = 0; j < o.k; ++j) {
    const acc_t ps = std::exp(zs[j] - s.log_sum);
    // ∂L/∂zs_j = p^S_j (r_j − L) (direction 0) or p^S_j − p^T_j (direction 1)
    coef[j] *= student_first ? ps * ((za[j] - (zb[j] - zb_top)) - mean_delta) : ps - std::exp(zt[j] - t.log_sum);
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> token_graph_fwd(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                   const at::Tensor& neighbours_in, const at::Tensor& sigma_t,
                                                   int64_t edge, int64_t direction, int64_t reduction_code) {
  const double sigma = float_arg(sigma_t, "sigma");
  check_graph(student_in, neighbours_in);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student_in.scalar_type());
  check_cpu_float(teacher_in, "teacher");
  TORCH_CHECK_VALUE(
      teacher_in.dim() == 2 && teacher_in.size(0) == student_in.size(0) && teacher_in.scalar_type() == acc,
      "teacher must be [M, Dt] with M = ", student_in.size(0), " and dtype ", acc, ", got ", teacher_in.sizes(), " ",
      teacher_in.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, "sigma must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(edge == 0 || edge == 1, "edge code must be 0 or 1, got ", edge);
  TORCH_CHECK_VALUE(direction == 0 || direction == 1, "direction code must be 0 or 1, got ", direction);
  const Options o{student_in.size(0), neighbours_in.size(1), student_in.size(1), teacher_in.size(1), sigma, edge,
                  direction};
  const at::Tensor xs = student_in.contiguous();
  const at::Tensor xt = teacher_in.contiguous();
  const at::Tensor nb = neighbours_in.contiguous();
  check_neighbour_range(nb.const_data_ptr<int64_t>(), o.M * o.k, o.M);
  // the loss is returned in the accumulation dtype
  at::Tensor out = at::empty(reduction == Reduction::kNone ? at::IntArrayRef{o.M} : at::IntArrayRef{},
                             student_in.options().dtype(acc));
  at::Tensor coef = at::empty({o.M, o.k}, student_in.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_in.scalar_type(), "token_graph_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    std::vector<acc_t> row_loss(o.M, acc_t(0));
    const scalar_t* x = xs.const_data_ptr<scalar_t>();
    const acc_t* y = xt.const_data_ptr<acc_t>();
    const int64_t* n = nb.const_data_ptr<int64_t>();
    acc_t* c = coef.data_ptr<acc_t>();
    if (o.k > 0) {
      at::parallel_for(0, o.M, row_grain(o.k * (o.Ds + o.Dt)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(2 * o.k);
        for (int64_t i = begin; i < end; ++i)
          row_loss[i] =
              node_forward<scalar_t>(x, y, n + i * o.k, i, o, scratch.data(), scratch.data() + o.k, c + i * o.k);
      });
    }
    if (reduction == Reduction::kNone) {
      std::copy(row_loss.begin(), row_loss.end(), out.data_ptr<acc_t>());
    } else {
      acc_t total = ordered_sum(row_loss.data(), o.M);
      if (reduction == Reduction::kMean && o.M > 0) total /= static_cast<acc_t>(o.M);
      *out.data_ptr<acc_t>() = total;
    }
  });
  return {out, coef};
}

// dst[0..D) = Σ_t w[t]·(x_i − x_{other[t]}) for one row, in chunks of registers (edges innermost).
template <typename scalar_t>
void gradient_row(const scalar_t* x, int64_t D, int64_t i, const int64_t* other, const Acc<scalar_t>* w, int64_t count,
                  scalar_t* dst) {
  using IO = VecIO<scalar_t>;
  using acc_t = Acc<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::size();
  const scalar_t* xi = x + i * D;
  int64_t d = 0;
  for (; d + 2 * V <= D; d += 2 * V) {
    const Vec xi0 = IO::load(xi + d), xi1 = IO::load(xi + d + V);
    Vec a0(acc_t(0)), a1(acc_t(0));
    for (int64_t t = 0; t < count; ++t) {
      const scalar_t* xo = x + other[t] * D + d;
      const Vec wt(w[t]);
      a0 = at::vec::fmadd(wt, xi0 - IO::load(xo), a0);
      a1 = at::vec::fmadd(wt, xi1 - IO::load(xo + V), a1);
    }
    IO::store(dst + d, a0);
    IO::store(dst + d + V, a1);
  }
  for (; d + V <= D; d += V) {
    const Vec xi0 = IO::load(xi + d);
    Vec a0(acc_t(0));
    for (int64_t t = 0; t < count; ++t) a0 = at::vec::fmadd(Vec(w[t]), xi0 - IO::load(x + other[t] * D + d), a0);
    IO::store(dst + d, a0);
  }
  for (; d < D; ++d) {
    const acc_t xd = static_cast<acc_t>(xi[d]);
    acc_t a = 0;
    for (int64_t t = 0; t < count; ++t) a += w[t] * (xd - static_cast<acc_t>(x[other[t] * D + d]));
    dst[d] = static_cast<scalar_t>(a);
  }
}

at::Tensor token_graph_bwd(const at::Tensor& grad_in, const at::Tensor& student_in, const at::Tensor& neighbours_in,
                           const at::Tensor& coef_in, int64_t reduction_code) {
  check_graph(student_in, neighbours_in);
  const Reduction reduction = check_reduction(reduction_code);
  const auto acc = acc_type(student_in.scalar_type());
  const int64_t M = student_in.size(0), D = student_in.size(1), k = neighbours_in.size(1);
  TORCH_CHECK_VALUE(
      coef_in.device().is_cpu() && coef_in.scalar_type() == acc && coef_in.sizes() == neighbours_in.sizes(),
      "coef must be a CPU tensor [M, k] of dtype ", acc, ", got ", coef_in.sizes(), " ", coef_in.scalar_type());
  const at::Tensor grad = checked_grad(grad_in, reduction, {M}, acc);
  at::Tensor grad_student = at::empty({M, D}, student_in.options());
  if (grad_student.numel() == 0) return grad_student;
  const at::Tensor xs = student_in.contiguous();
  const at::Tensor nb_t = neighbours_in.contiguous();
  const at::Tensor coef_t = coef_in.contiguous();
  const int64_t* nb = nb_t.const_data_ptr<int64_t>();
  const int64_t edges = M * k;
  check_neighbour_range(nb, edges, M);
  // Transposed edge list: the edges pointing at node j are in_edge[in_start[j] .. in_start[j + 1]),
  // in ascending edge order (stable counting sort).
  std::vector<int64_t> in_start(M + 1, 0), in_edge(edges);
  for (int64_t e = 0; e < edges; ++e) ++in_start[nb[e] + 1];
  for (int64_t j = 0; j < M; ++j) in_start[j + 1] += in_start[j];
  {
    std::vector<int64_t> cursor(in_start.begin(), in_start.end() - 1);
    for (int64_t e = 0; e < edges; ++e) in_edge[cursor[nb[e]]++] = e;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_in.scalar_type(), "token_graph_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const acc_t* c = coef_t.const_data_ptr<acc_t>();
    // w_e = 2·g_i·c_e with the reduction's scale folded in
    std::vector<acc_t> w(edges);
    const acc_t scalar_g = reduction == Reduction::kNone   ? acc_t(0)
                           : reduction == Reduction::kMean ? g[0] / static_cast<acc_t>(M)
                                                           : g[0];
    for (int64_t e = 0; e < edges; ++e) w[e] = acc_t(2) * (reduction == Reduction::kNone ? g[e / k] : scalar_g) * c[e];
    const scalar_t* x = xs.const_data_ptr<scalar_t>();
    scalar_t* out = grad_student.data_ptr<scalar_t>();
    const int64_t avg_degree = 2 * k + 1;
    at::parallel_for(0, M, row_grain(avg_degree * D), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> other;
      std::vector<acc_t> weight;
      for (int64_t i = begin; i < end; ++i) {
        other.clear();
        weight.clear();
        for (int64_t j = 0; j < k; ++j) {  // outgoing edges (i, nb(i, j))
          other.push_back(nb[i * k + j]);
          weight.push_back(w[i * k + j]);
        }
        for (int64_t p = in_start[i]; p < in_start[i + 1]; ++p) {  // incoming edges (m, i)
          const int64_t e = in_edge[p];
          other.push_back(e / k);
          weight.push_back(w[e]);
        }
        gradient_row<scalar_t>(x, D, i, other.data(), weight.data(), static_cast<int64_t>(other.size()), out + i * D);
      }
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("token_graph_fwd", &token_graph_fwd);
  m.impl("token_graph_bwd", &token_graph_bwd);
}

}  // namespace cpu
}  // namespace kdloss
