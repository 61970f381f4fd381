// TRG kNN-graph local-structure loss, CPU kernels (spec §5.2–5.3) for the CPU dispatch key. The op
// contract (shapes, dtypes, codes, reductions) is documented once, with the schemas, in
// kdloss/_ops/token_graph.py. Student x [M, Ds], teacher y [M, Dt], neighbours nb [M, k]:
//   d_ij = ‖x_i − x_nb(i,j)‖², ℓ_ij = −d_ij / (2σ), logits z_ij = exp(ℓ_ij) (edge 0) or ℓ_ij (edge 1)
//   log p_i = log_softmax_j(z_i) (max-shifted; see shift_by_max), same for the teacher
//   L_i = KL(p^S_i ‖ p^T_i) (direction 0) or KL(p^T_i ‖ p^S_i) (direction 1)
//
// Forward: one task owns a range of nodes; per node, one pass over its k edges computes both
// distances (vectorised over D, accumulated in fp32 / fp64; in fp64 for fp32 data where the logits
// are large: see kWideLogit), the two log-softmaxes and the KL, and writes the per-edge coefficient
// c_ij = ∂L_i/∂d_ij (the backward's only state, O(M·k)):
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
#include <type_traits>
#include <vector>

#include "kdloss/cpu_gemm.h"
#include "kdloss/cpu_utils.h"
#include "kdloss/cpu_wide.h"

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

// ‖a − b‖² over D elements, accumulated in real_t (the accumulation type, or Wide<scalar_t> where
// node_forward needs the distances exactly).
template <typename stored_t, typename real_t>
real_t squared_distance(const stored_t* a, const stored_t* b, int64_t D) {
  using IO = WideIO<stored_t, real_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::size();
  Vec s0(real_t(0)), s1(real_t(0));
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
  real_t s = wide_sum(s0 + s1);
  for (; d < D; ++d) {
    const real_t e = static_cast<real_t>(a[d]) - static_cast<real_t>(b[d]);
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

// Log-kernel logits ℓ = −d/(2σ) up to this magnitude are formed and used in the accumulation type;
// beyond it, in Wide<scalar_t> (fp64 for fp32 data). The loss depends on differences of the logits,
// and a logit rounded at the scale of |ℓ| moves L by Σ_j |∂L/∂ℓ_j|·u·|ℓ_j| (∂L/∂ℓ_j = p_j(r_j − L)
// · ∂z/∂ℓ, whose sum is not bounded by 1 + L): with |ℓ| in the hundreds (a fuzz case: d ≈ 183,
// σ = 0.5, r − L ≈ 20) fp32 distances lost 1e-4 of a loss of 7, several times the eager formula's
// own error. With |ℓ| ≤ 4 that error is a few u·(1 + L), as for any O(1) logit; the common regime
// (σ of the order of the squared distances) stays on the fast path.
constexpr double kWideLogit = 4.0;

// The KL and the per-edge coefficients of one node from the log-kernel logits ls, lt [k] (student,
// teacher), in real_t: returns L_i and writes coef[0..k) (rounded once to acc_t). z [3k] is scratch.
template <typename real_t, typename acc_t>
real_t node_kl(const real_t* ls, const real_t* lt, const Options& o, real_t* z, acc_t* coef) {
  const real_t inv_two_sigma = static_cast<real_t>(0.5 / o.sigma);
  real_t* zs = z;
  real_t* zt = z + o.k;
  real_t* dz_dd = z + 2 * o.k;  // ∂zs/∂d: −zs/(2σ) (edge 0) or −1/(2σ) (edge 1)
  for (int64_t j = 0; j < o.k; ++j) {
    zs[j] = o.edge == 0 ? std::exp(ls[j]) : ls[j];
    zt[j] = o.edge == 0 ? std::exp(lt[j]) : lt[j];
    dz_dd[j] = o.edge == 0 ? -zs[j] * inv_two_sigma : -inv_two_sigma;
  }
  // KL(p^a ‖ p^b) with a = student (direction 0) or teacher (direction 1), written around the top
  // entry t of p^a: with r = log p^a − log p^b and δ_j = r_j − r_t = za_j − (zb_j − zb_t) (za_t = 0),
  //   L = r_t + Σ_j p^a_j δ_j   and   r_j − L = δ_j − Σ_k p^a_k δ_k.
  // When p^a is confident, r_t − L is tiny; forming it as the difference of the O(|r|) numbers r_t
  // and L would lose it to rounding. This form never subtracts two such numbers.
  const Shifted<real_t> s = shift_by_max(zs, o.k), t = shift_by_max(zt, o.k);
  const bool student_first = o.direction == 0;
  const real_t* za = student_first ? zs : zt;
  const real_t* zb = student_first ? zt : zs;
  const Shifted<real_t> a = student_first ? s : t, b = student_first ? t : s;
  const real_t zb_top = zb[a.top];
  real_t mean_delta = 0;
  for (int64_t j = 0; j < o.k; ++j) mean_delta += std::exp(za[j] - a.log_sum) * (za[j] - (zb[j] - zb_top));
  const real_t loss = ((b.log_sum - a.log_sum) - zb_top) + mean_delta;
  for (int64_t j = 0; j < o.k; ++j) {
    const real_t ps = std::exp(zs[j] - s.log_sum);
    // ∂L/∂zs_j = p^S_j (r_j − L) (direction 0) or p^S_j − p^T_j (direction 1)
    const real_t dz = student_first ? ps * ((za[j] - (zb[j] - zb_top)) - mean_delta) : ps - std::exp(zt[j] - t.log_sum);
    coef[j] = static_cast<acc_t>(dz_dd[j] * dz);
  }
  return loss;
}

// Per-task scratch of node_forward.
template <typename acc_t, typename wide_t>
struct NodeScratch {
  std::vector<acc_t> logits, z;     // [2k], [3k]
  std::vector<wide_t> wlogits, wz;  // [2k], [3k]: where |ℓ| > kWideLogit
  explicit NodeScratch(int64_t k) : logits(2 * k), z(3 * k), wlogits(2 * k), wz(3 * k) {}
};

// One node: returns L_i and writes coef[0..k).
template <typename scalar_t, typename wide_t = Wide<scalar_t>>
wide_t node_forward(const scalar_t* xs, const Acc<scalar_t>* xt, const int64_t* nb_row, int64_t i, const Options& o,
                    NodeScratch<Acc<scalar_t>, wide_t>& scratch, Acc<scalar_t>* coef) {
  using acc_t = Acc<scalar_t>;
  const scalar_t* xi = xs + i * o.Ds;
  const acc_t* yi = xt + i * o.Dt;
  const auto logits = [&](auto* out, auto inv_two_sigma) {  // ℓ^S into out[0..k), ℓ^T into out[k..2k)
    using real_t = std::remove_pointer_t<decltype(out)>;
    real_t largest = 0;
    for (int64_t j = 0; j < o.k; ++j) {
      const int64_t n = nb_row[j];
      out[j] = -squared_distance<scalar_t, real_t>(xi, xs + n * o.Ds, o.Ds) * inv_two_sigma;
      out[o.k + j] = -squared_distance<acc_t, real_t>(yi, xt + n * o.Dt, o.Dt) * inv_two_sigma;
      largest = std::max(largest, std::max(-out[j], -out[o.k + j]));
    }
    return largest;
  };
  acc_t* l = scratch.logits.data();
  const acc_t largest = logits(l, static_cast<acc_t>(0.5 / o.sigma));
  if constexpr (!std::is_same_v<wide_t, acc_t>) {
    if (!(largest <= static_cast<acc_t>(kWideLogit))) {
      wide_t* w = scratch.wlogits.data();
      logits(w, static_cast<wide_t>(0.5 / o.sigma));
      return node_kl<wide_t, acc_t>(w, w + o.k, o, scratch.wz.data(), coef);
    }
  }
  return static_cast<wide_t>(node_kl<acc_t, acc_t>(l, l + o.k, o, scratch.z.data(), coef));
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
    using wide_t = Wide<scalar_t>;
    std::vector<wide_t> row_loss(o.M, wide_t(0));
    const scalar_t* x = xs.const_data_ptr<scalar_t>();
    const acc_t* y = xt.const_data_ptr<acc_t>();
    const int64_t* n = nb.const_data_ptr<int64_t>();
    acc_t* c = coef.data_ptr<acc_t>();
    if (o.k > 0) {
      at::parallel_for(0, o.M, row_grain(o.k * (o.Ds + o.Dt)), [&](int64_t begin, int64_t end) {
        NodeScratch<acc_t, wide_t> scratch(o.k);
        for (int64_t i = begin; i < end; ++i)
          row_loss[i] = node_forward<scalar_t>(x, y, n + i * o.k, i, o, scratch, c + i * o.k);
      });
    }
    if (reduction == Reduction::kNone) {
      std::copy(row_loss.begin(), row_loss.end(), out.data_ptr<acc_t>());
    } else {
      wide_t total = ordered_sum(row_loss.data(), o.M);
      if (reduction == Reduction::kMean && o.M > 0) total /= static_cast<wide_t>(o.M);
      *out.data_ptr<acc_t>() = static_cast<acc_t>(total);
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

// ---------------------------------------------------------------------------------------------
// kNN selection (token_graph_knn): the k nearest other nodes of each node by squared Euclidean
// distance d_ij = max(‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩, 0) (NaN counts as +inf), ordered by
// (d_ij, j) ascending: equal distances go to the smaller index, so the result is one well-defined
// set and order. No M×M matrix: the nodes are cut into blocks of T rows; a tile (I, J), J ≤ I, is
// one T×T GEMM (fixed summation order, kdloss/cpu_gemm.h) whose distances are merged into the
// running top-k of the rows of I and, transposed (d is symmetric), of the rows of J. Tiles run in
// rounds of a round-robin schedule in which no two tiles share a block, so each task owns the
// top-k rows it updates; the diagonal tiles form a last round. The (d, j) order is total, so the
// merged top-k does not depend on the order of the merges: the result is identical for any block
// size and thread count. Memory: the [M, k] top-k state plus per task one T×T tile, a packed copy of
// block J and a copy of block I.

// True when (d, j) comes before (d_ref, j_ref).
template <typename acc_t>
inline bool precedes(acc_t d, int64_t j, acc_t d_ref, int64_t j_ref) {
  return d < d_ref || (d == d_ref && j < j_ref);
}

// The running top-k of every node: dist/index [M, k] sorted by (d, j), `worst` [M] = dist[:, k − 1]
// contiguous (the filter's threshold). Slots start as (+inf, M), after every real candidate.
template <typename acc_t>
struct RunningTopK {
  int64_t k;
  std::vector<acc_t> dist, worst;
  std::vector<int64_t> index;
  RunningTopK(int64_t M, int64_t k_)
      : k(k_),
        dist(M * k_, std::numeric_limits<acc_t>::infinity()),
        worst(M, std::numeric_limits<acc_t>::infinity()),
        index(M * k_, M) {}

  // Offers candidate (d, j) to row i (insertion into the sorted slots).
  void offer(int64_t i, acc_t d, int64_t j) {
    if (std::isnan(d)) d = std::numeric_limits<acc_t>::infinity();
    acc_t* di = dist.data() + i * k;
    int64_t* ji = index.data() + i * k;
    if (!precedes(d, j, di[k - 1], ji[k - 1])) return;
    int64_t pos = k - 1;
    for (; pos > 0 && precedes(d, j, di[pos - 1], ji[pos - 1]); --pos) {
      di[pos] = di[pos - 1];
      ji[pos] = ji[pos - 1];
    }
    di[pos] = d;
    ji[pos] = j;
    worst[i] = di[k - 1];
  }
};

// d = max((n_i + n_j) − 2c, 0) for a vector of columns j (2c is exact, so contracting into an fma
// rounds the same way).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> tile_distances(const at::vec::Vectorized<acc_t>& ni,
                                                 const at::vec::Vectorized<acc_t>& nj,
                                                 const at::vec::Vectorized<acc_t>& c) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::maximum((ni + nj) - (c + c), Vec(acc_t(0)));
}

template <typename acc_t>
inline acc_t tile_distance(acc_t ni, acc_t nj, acc_t c) {
  const acc_t d = (ni + nj) - (c + c);
  return d < acc_t(0) ? acc_t(0) : d;
}

// Per task: block I's rows (zero-padded to T), block J packed as panels, the T×T tile of ⟨x_i, x_j⟩.
template <typename acc_t>
struct KnnTile {
  int64_t T, D;
  std::vector<acc_t> rows, panels, dots;
  KnnTile(int64_t T_, int64_t D_)
      : T(T_), D(D_), rows(T_ * D_, acc_t(0)), panels(round_up_to(T_, gemm_nr<acc_t>()) * D_), dots(T_ * T_) {}
};

// Merges tile (I, J) into the top-k of the rows of I and, when I ≠ J, of the rows of J.
template <typename acc_t>
void knn_tile(const acc_t* x, const acc_t* norms, int64_t M, int64_t I, int64_t J, KnnTile<acc_t>& t,
              RunningTopK<acc_t>& top) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t T = t.T, D = t.D, i_base = I * T, j_base = J * T;
  const int64_t rows_i = std::min(T, M - i_base), rows_j = std::min(T, M - j_base);
  std::copy(x + i_base * D, x + (i_base + rows_i) * D, t.rows.begin());
  std::fill(t.rows.begin() + rows_i * D, t.rows.end(), acc_t(0));
  pack_row_panels<acc_t>(x + j_base * D, D, rows_j, D, t.panels.data());
  gemm_blocked(t.rows.data(), D, t.panels.data(), D, t.dots.data(), T, round_up_to(rows_i, kGemmMR),
               round_up_to(rows_j, gemm_nr<acc_t>()), false);
  const acc_t* nj_row = norms + j_base;
  for (int64_t r = 0; r < rows_i; ++r) {  // rows of I: candidates j
    const int64_t i = i_base + r;
    const acc_t* c = t.dots.data() + r * T;
    const Vec ni(norms[i]);
    int64_t q = 0;
    for (; q + V <= rows_j; q += V) {
      const Vec d = tile_distances(ni, Vec::loadu(nj_row + q), Vec::loadu(c + q));
      if (d.gt(Vec(top.worst[i])).zero_mask() == 0) continue;  // every lane is beyond the worst kept
      acc_t lanes[V];
      d.store(lanes);
      for (int64_t l = 0; l < V; ++l)
        if (j_base + q + l != i) top.offer(i, lanes[l], j_base + q + l);
    }
    for (; q < rows_j; ++q)
      if (j_base + q != i) top.offer(i, tile_distance(norms[i], nj_row[q], c[q]), j_base + q);
  }
  if (I == J) return;
  for (int64_t r = 0; r < rows_i; ++r) {  // rows of J: candidate i, one tile row at a time
    const int64_t i = i_base + r;
    const acc_t* c = t.dots.data() + r * T;
    const Vec ni(norms[i]);
    int64_t q = 0;
    for (; q + V <= rows_j; q += V) {
      const Vec d = tile_distances(ni, Vec::loadu(nj_row + q), Vec::loadu(c + q));
      if (d.gt(Vec::loadu(top.worst.data() + j_base + q)).zero_mask() == 0) continue;
      acc_t lanes[V];
      d.store(lanes);
      for (int64_t l = 0; l < V; ++l) top.offer(j_base + q + l, lanes[l], i);
    }
    for (; q < rows_j; ++q) top.offer(j_base + q, tile_distance(norms[i], nj_row[q], c[q]), i);
  }
}

// Block size: a multiple of 48 (whole micro-tiles in fp32 and fp64), at most 192, small enough for
// every round to hold a few tiles per thread.
int64_t knn_block_rows(int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = (M + 4 * threads - 1) / (4 * threads);
  return std::clamp<int64_t>(round_up_to(target, 48), 48, 192);
}

// The rounds of the schedule: every pair of distinct blocks exactly once (circle method), no block
// twice in a round; then all diagonal tiles.
std::vector<std::vector<std::pair<int64_t, int64_t>>> knn_rounds(int64_t blocks) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  const int64_t n = blocks + (blocks & 1);  // with a dummy block when odd
  for (int64_t r = 0; r + 1 < n; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    for (int64_t t = 0; t < n / 2; ++t) {
      const int64_t a = t == 0 ? n - 1 : (r + t) % (n - 1);
      const int64_t b = (r - t + n - 1) % (n - 1);
      if (a < blocks && b < blocks) round.emplace_back(std::max(a, b), std::min(a, b));
    }
    rounds.push_back(round);
  }
  std::vector<std::pair<int64_t, int64_t>> diagonal;
  for (int64_t b = 0; b < blocks; ++b) diagonal.emplace_back(b, b);
  rounds.push_back(diagonal);
  return rounds;
}

template <typename acc_t>
void knn_select(const acc_t* x, int64_t M, int64_t D, int64_t k, int64_t* out) {
  std::vector<acc_t> norms(M);
  for (int64_t i = 0; i < M; ++i) {
    acc_t s = 0;
    for (int64_t d = 0; d < D; ++d) s = std::fma(x[i * D + d], x[i * D + d], s);
    norms[i] = s;
  }
  RunningTopK<acc_t> top(M, k);
  const int64_t T = knn_block_rows(M), blocks = (M + T - 1) / T;
  for (const auto& round : knn_rounds(blocks)) {
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
      KnnTile<acc_t> tile(T, D);
      for (int64_t p = begin; p < end; ++p) knn_tile(x, norms.data(), M, round[p].first, round[p].second, tile, top);
    });
  }
  std::copy(top.index.begin(), top.index.end(), out);
}

at::Tensor token_graph_knn(const at::Tensor& nodes, int64_t k) {
  check_cpu_float(nodes, "nodes");
  TORCH_CHECK_VALUE(nodes.dim() == 2, "nodes must be [M, D], got ", nodes.sizes());
  TORCH_CHECK_VALUE(nodes.scalar_type() == at::kFloat || nodes.scalar_type() == at::kDouble,
                    "nodes must be float32 or float64 (the accumulation dtype), got ", nodes.scalar_type());
  const int64_t M = nodes.size(0), D = nodes.size(1);
  TORCH_CHECK_VALUE(k >= 0 && (M == 0 || k <= M - 1), "k must lie in [0, M − 1], got k = ", k, " for M = ", M);
  at::Tensor out = at::empty({M, k}, nodes.options().dtype(at::kLong));
  if (M == 0 || k == 0) return out;
  const at::Tensor x = nodes.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_graph_knn", [&] {
    knn_select<scalar_t>(x.const_data_ptr<scalar_t>(), M, D, k, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("token_graph_fwd", &token_graph_fwd);
  m.impl("token_graph_bwd", &token_graph_bwd);
  m.impl("token_graph_knn", &token_graph_knn);
}

}  // namespace cpu
}  // namespace kdloss
