// Margin-MSE CPU kernels (spec §4) for the CPU dispatch key. The op contract (shapes, dtypes,
// reductions) is documented once, with the schemas, in kdloss/_ops/margin_mse.py.
//
// Precision: the row computations run in Wide<scalar_t> — fp64 for fp32 (and fp64) students, fp32
// for bf16/fp16. ∂L/∂s⁺ = 2·Σ_i e_i and ∂L/∂q = Σ_i g_i·(p − n_i) are sums whose terms cancel (the
// result can be 100× smaller than Σ|terms|), and the dot product ⟨q, p⟩ enters all n margins, so its
// rounding is counted n times; in fp32 that rounding, not the data, would set the gradient's error.
// The kernels are bound by memory traffic, so the wider arithmetic costs little (docs/verifying.md,
// "Cancellation").
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "kdloss/cpu_utils.h"
#include "kdloss/cpu_wide.h"

namespace kdloss {
namespace cpu {
namespace {

// Teacher margin t⁺ − t⁻_i of one row, read from raw scores or from stored margins (stored as
// tea_t, computed in wide_t).
template <typename tea_t, typename wide_t>
struct TeacherRow {
  using IO = WideIO<tea_t, wide_t>;
  const tea_t* values;  // [n] margins, or the n negative scores
  wide_t positive;      // t⁺ (raw scores) — unused for margins
  bool is_scores;

  TeacherRow(const tea_t* teacher, int64_t b, int64_t n, bool scores)
      : values(scores ? teacher + b * (n + 1) + 1 : teacher + b * n),
        positive(scores ? static_cast<wide_t>(teacher[b * (n + 1)]) : wide_t(0)),
        is_scores(scores) {}

  wide_t margin(int64_t i) const {
    const wide_t v = static_cast<wide_t>(values[i]);
    return is_scores ? positive - v : v;
  }
  typename IO::Vec margin_vec(int64_t i) const {
    using Vec = typename IO::Vec;
    const Vec v = IO::load(values + i);
    return is_scores ? Vec(positive) - v : v;
  }
};

// The teacher row of a scalar_t student: stored in the accumulation dtype, used in the wide one.
template <typename scalar_t>
using Teacher = TeacherRow<Acc<scalar_t>, Wide<scalar_t>>;

// Scale applied to grad_output·2e: 1/(B·n) for mean, 1 otherwise.
inline double reduction_scale(Reduction reduction, int64_t B, int64_t n) {
  return reduction == Reduction::kMean ? 1.0 / (static_cast<double>(B) * static_cast<double>(n)) : 1.0;
}

// Squared errors of one row in wide_t: writes e² to `out_row` when given, returns Σ_i e². The
// negative scores are the student's (in_t = scalar_t) or fused dot products (in_t = wide_t); rows
// are out_t (the accumulation dtype of the loss).
template <typename wide_t, typename tea_t, typename in_t, typename out_t>
wide_t score_row_forward(wide_t s_pos, const in_t* s_neg /*[n]*/, const TeacherRow<tea_t, wide_t>& t, int64_t n,
                         out_t* out_row /*[n] or null*/) {
  using In = WideIO<in_t, wide_t>;
  using Out = WideIO<out_t, wide_t>;
  using Vec = typename Out::Vec;
  static_assert(std::is_same_v<typename In::Vec, Vec>, "input and output must share an accumulator");
  const Vec vpos(s_pos);
  constexpr int64_t S = Out::size();
  // e² of the S margins at i, stored when out_row is given
  auto squares = [&](int64_t i) {
    const Vec e = (vpos - In::load(s_neg + i)) - t.margin_vec(i);
    const Vec sq = e * e;
    if (out_row) Out::store(out_row + i, sq);
    return sq;
  };
  Vec acc0(wide_t(0)), acc1(wide_t(0));  // two chains: the adds' latency, not their count, bounds the loop
  int64_t i = 0;
  for (; i + 2 * S <= n; i += 2 * S) {
    acc0 = acc0 + squares(i);
    acc1 = acc1 + squares(i + S);
  }
  for (; i + S <= n; i += S) acc0 = acc0 + squares(i);
  wide_t total = wide_sum(acc0 + acc1);
  for (; i < n; ++i) {
    const wide_t e = (s_pos - static_cast<wide_t>(s_neg[i])) - t.margin(i);
    total += e * e;
    if (out_row) out_row[i] = static_cast<out_t>(e * e);
  }
  return total;
}

// Reduces per-row sums in a thread-count independent order and writes the scalar loss.
template <typename scalar_t>
void write_reduced(at::Tensor& out, const std::vector<Wide<scalar_t>>& row_sums, Reduction reduction, int64_t B,
                   int64_t n) {
  using wide_t = Wide<scalar_t>;
  wide_t total = ordered_sum(row_sums.data(), B);
  // An empty batch has no margins: the mean is 0 (never 0/0 = NaN, spec §0).
  if (reduction == Reduction::kMean && B * n > 0) total = total / static_cast<wide_t>(static_cast<double>(B) * n);
  out.data_ptr<Acc<scalar_t>>()[0] = static_cast<Acc<scalar_t>>(total);
}

// The loss is returned in the accumulation dtype (fp32; fp64 for fp64 students): the Python
// entry point rounds it to the student's dtype only outside autocast.
at::Tensor allocate_loss(const at::Tensor& like, Reduction reduction, int64_t B, int64_t n) {
  const auto opts = like.options().dtype(acc_type(like.scalar_type()));
  if (reduction == Reduction::kNone) return at::empty({B, n}, opts);
  return at::empty({}, opts);
}

void check_teacher(const at::Tensor& teacher, const at::Tensor& student, int64_t B, int64_t n, bool teacher_is_scores) {
  check_cpu_float(teacher, "teacher");
  const auto acc_dtype = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(teacher.scalar_type() == acc_dtype, "teacher must be ", acc_dtype, ", got ", teacher.scalar_type());
  const int64_t cols = teacher_is_scores ? n + 1 : n;
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == B && teacher.size(1) == cols, "teacher must have shape [",
                    B, ", ", cols, "], got ", teacher.sizes());
}

void check_scores(const at::Tensor& student_pos, const at::Tensor& student_neg) {
  check_cpu_float(student_pos, "student_pos");
  check_cpu_float(student_neg, "student_neg");
  TORCH_CHECK_VALUE(student_pos.dim() == 1, "student_pos must be [B], got ", student_pos.sizes());
  TORCH_CHECK_VALUE(student_neg.dim() == 2 && student_neg.size(0) == student_pos.size(0),
                    "student_neg must be [B, n] with B = ", student_pos.size(0), ", got ", student_neg.sizes());
  TORCH_CHECK_VALUE(student_neg.scalar_type() == student_pos.scalar_type(),
                    "student_neg must have the dtype of student_pos");
}

// Checked inputs of one scores call: student scores and teacher, contiguous.
struct ScoreInputs {
  at::Tensor pos, neg, tea;
  int64_t B, n;
  Reduction reduction;
};

ScoreInputs prepare_scores(const at::Tensor& student_pos, const at::Tensor& student_neg, const at::Tensor& teacher,
                           bool teacher_is_scores, int64_t reduction_code) {
  check_scores(student_pos, student_neg);
  const Reduction reduction = check_reduction(reduction_code);
  const int64_t B = student_neg.size(0), n = student_neg.size(1);
  check_teacher(teacher, student_pos, B, n, teacher_is_scores);
  return {student_pos.contiguous(), student_neg.contiguous(), teacher.contiguous(), B, n, reduction};
}

at::Tensor margin_mse_fwd(const at::Tensor& student_pos, const at::Tensor& student_neg, const at::Tensor& teacher,
                          bool teacher_is_scores, int64_t reduction_code) {
  const ScoreInputs in = prepare_scores(student_pos, student_neg, teacher, teacher_is_scores, reduction_code);
  const at::Tensor &pos = in.pos, &neg = in.neg, &tea = in.tea;
  const int64_t B = in.B, n = in.n;
  const Reduction reduction = in.reduction;
  at::Tensor out = allocate_loss(student_pos, reduction, B, n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pos.scalar_type(), "margin_mse_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    using wide_t = Wide<scalar_t>;
    const scalar_t* pos_p = pos.data_ptr<scalar_t>();
    const scalar_t* neg_p = neg.data_ptr<scalar_t>();
    const acc_t* tea_p = tea.data_ptr<acc_t>();
    acc_t* none_p = reduction == Reduction::kNone ? out.data_ptr<acc_t>() : nullptr;
    std::vector<wide_t> row_sums(reduction == Reduction::kNone ? 0 : B);
    at::parallel_for(0, B, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Teacher<scalar_t> t(tea_p, b, n, teacher_is_scores);
        const wide_t s =
            score_row_forward(static_cast<wide_t>(pos_p[b]), neg_p + b * n, t, n, none_p ? none_p + b * n : nullptr);
        if (!row_sums.empty()) row_sums[b] = s;
      }
    });
    if (reduction != Reduction::kNone) write_reduced<scalar_t>(out, row_sums, reduction, B, n);
  });
  return out;
}

// Backward of one row: grad_neg_row[i] = −g_i, returns Σ_i g_i = ∂L/∂s⁺, with
// g_i = coef·e_i·grad_row[i] (reduction none) or coef·e_i (coef already holds 2·scale·grad).
// in_t as in score_row_forward; grad_t is the upstream gradient's type; out_t the gradient rows' type.
template <typename wide_t, typename tea_t, typename in_t, typename grad_t, typename out_t>
wide_t score_row_backward(wide_t s_pos, const in_t* s_neg /*[n]*/, const TeacherRow<tea_t, wide_t>& t, int64_t n,
                          wide_t coef, const grad_t* grad_row /*[n] or null*/, out_t* grad_neg_row /*[n]*/) {
  using In = WideIO<in_t, wide_t>;
  using Grad = WideIO<grad_t, wide_t>;
  using Out = WideIO<out_t, wide_t>;
  using Vec = typename Grad::Vec;
  static_assert(std::is_same_v<typename In::Vec, Vec> && std::is_same_v<typename Out::Vec, Vec>,
                "inputs and outputs must share an accumulator");
  const Vec vpos(s_pos), vcoef(coef);
  constexpr int64_t S = Grad::size();
  // g of the S margins at i; stores −g
  auto gradients = [&](int64_t i) {
    const Vec e = (vpos - In::load(s_neg + i)) - t.margin_vec(i);
    const Vec g = grad_row ? e * vcoef * Grad::load(grad_row + i) : e * vcoef;
    Out::store(grad_neg_row + i, Vec(wide_t(0)) - g);
    return g;
  };
  Vec acc0(wide_t(0)), acc1(wide_t(0));
  int64_t i = 0;
  for (; i + 2 * S <= n; i += 2 * S) {
    acc0 = acc0 + gradients(i);
    acc1 = acc1 + gradients(i + S);
  }
  for (; i + S <= n; i += S) acc0 = acc0 + gradients(i);
  wide_t total = wide_sum(acc0 + acc1);
  for (; i < n; ++i) {
    const wide_t e = (s_pos - static_cast<wide_t>(s_neg[i])) - t.margin(i);
    const wide_t g = grad_row ? e * coef * static_cast<wide_t>(grad_row[i]) : e * coef;
    grad_neg_row[i] = static_cast<out_t>(-g);
    total += g;
  }
  return total;
}

// 2·scale·grad for a scalar upstream gradient, 2·scale for reduction none (grad loaded per margin).
template <typename wide_t, typename grad_t>
wide_t backward_coef(const grad_t* grad, Reduction reduction, int64_t B, int64_t n) {
  return wide_t(2) * static_cast<wide_t>(reduction_scale(reduction, B, n)) *
         (reduction == Reduction::kNone ? wide_t(1) : static_cast<wide_t>(grad[0]));
}

std::tuple<at::Tensor, at::Tensor> margin_mse_bwd(const at::Tensor& grad, const at::Tensor& student_pos,
                                                  const at::Tensor& student_neg, const at::Tensor& teacher,
                                                  bool teacher_is_scores, int64_t reduction_code) {
  const ScoreInputs in = prepare_scores(student_pos, student_neg, teacher, teacher_is_scores, reduction_code);
  const at::Tensor &pos = in.pos, &neg = in.neg, &tea = in.tea;
  const int64_t B = in.B, n = in.n;
  const Reduction reduction = in.reduction;
  // the upstream gradient in the accumulation dtype (the loss's own dtype: never rounded to the student's)
  const auto g = checked_grad(grad, reduction, {B, n}, acc_type(pos.scalar_type()));
  at::Tensor grad_pos = at::empty({B}, pos.options());
  at::Tensor grad_neg = at::empty({B, n}, neg.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pos.scalar_type(), "margin_mse_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    using wide_t = Wide<scalar_t>;
    const acc_t* g_p = g.data_ptr<acc_t>();
    const scalar_t* pos_p = pos.data_ptr<scalar_t>();
    const scalar_t* neg_p = neg.data_ptr<scalar_t>();
    const acc_t* tea_p = tea.data_ptr<acc_t>();
    scalar_t* gpos_p = grad_pos.data_ptr<scalar_t>();
    scalar_t* gneg_p = grad_neg.data_ptr<scalar_t>();
    const bool none = reduction == Reduction::kNone;
    const wide_t coef = backward_coef<wide_t>(g_p, reduction, B, n);
    at::parallel_for(0, B, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Teacher<scalar_t> t(tea_p, b, n, teacher_is_scores);
        gpos_p[b] = static_cast<scalar_t>(score_row_backward(static_cast<wide_t>(pos_p[b]), neg_p + b * n, t, n, coef,
                                                             none ? g_p + b * n : nullptr, gneg_p + b * n));
      }
    });
  });
  return {grad_pos, grad_neg};
}

// ---------------------------------------------------------------------------------------------
// Fused dot-product scores: s⁺_b = ⟨q_b, p_b⟩, s⁻_{b,i} = ⟨q_b, n_{b,i}⟩ (spec §4.3).

// Rows of the embedding tensors; the last dimension is unit-stride (enforced by the caller).
template <typename scalar_t>
struct EmbeddingRows {
  const scalar_t* q;
  const scalar_t* p;
  const scalar_t* negs;
  int64_t q_stride, p_stride, neg_stride0, neg_stride1;

  const scalar_t* query(int64_t b) const { return q + b * q_stride; }
  const scalar_t* positive(int64_t b) const { return p + b * p_stride; }
  const scalar_t* negative(int64_t b, int64_t i) const { return negs + b * neg_stride0 + i * neg_stride1; }
};

template <typename scalar_t>
Wide<scalar_t> dot(const scalar_t* x, const scalar_t* y, int64_t D) {
  using acc_t = Wide<scalar_t>;
  using IO = WideIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  Vec acc0(acc_t(0)), acc1(acc_t(0));
  int64_t d = 0;
  for (; d + 2 * IO::size() <= D; d += 2 * IO::size()) {
    acc0 = at::vec::fmadd(IO::load(x + d), IO::load(y + d), acc0);
    acc1 = at::vec::fmadd(IO::load(x + d + IO::size()), IO::load(y + d + IO::size()), acc1);
  }
  for (; d + IO::size() <= D; d += IO::size()) {
    acc0 = at::vec::fmadd(IO::load(x + d), IO::load(y + d), acc0);
  }
  acc_t total = wide_sum(acc0 + acc1);
  for (; d < D; ++d) total += static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]);
  return total;
}

// Scores of one row: returns s⁺ and fills s_neg[0..n).
template <typename scalar_t>
Wide<scalar_t> row_scores(const EmbeddingRows<scalar_t>& rows, int64_t b, int64_t n, int64_t D, Wide<scalar_t>* s_neg) {
  const scalar_t* q = rows.query(b);
  for (int64_t i = 0; i < n; ++i) s_neg[i] = dot<scalar_t>(q, rows.negative(b, i), D);
  return dot<scalar_t>(q, rows.positive(b), D);
}

void check_embeddings(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives) {
  check_cpu_float(query, "query");
  check_cpu_float(positive, "positive");
  check_cpu_float(negatives, "negatives");
  TORCH_CHECK_VALUE(query.dim() == 2, "query must be [B, D], got ", query.sizes());
  TORCH_CHECK_VALUE(positive.sizes() == query.sizes(), "positive must have the shape of query ", query.sizes(),
                    ", got ", positive.sizes());
  TORCH_CHECK_VALUE(negatives.dim() == 3 && negatives.size(0) == query.size(0) && negatives.size(2) == query.size(1),
                    "negatives must be [B, n, D] = [", query.size(0), ", n, ", query.size(1), "], got ",
                    negatives.sizes());
  TORCH_CHECK_VALUE(positive.scalar_type() == query.scalar_type() && negatives.scalar_type() == query.scalar_type(),
                    "query, positive and negatives must share one dtype");
}

template <typename scalar_t>
EmbeddingRows<scalar_t> embedding_rows(const at::Tensor& q, const at::Tensor& p, const at::Tensor& negs) {
  return {q.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), negs.data_ptr<scalar_t>(), q.stride(0), p.stride(0),
          negs.stride(0),         negs.stride(1)};
}

// Checked inputs of one embeddings call: embeddings with a unit-stride last dimension, teacher contiguous.
struct EmbeddingInputs {
  at::Tensor q, p, negs, tea;
  int64_t B, n, D;
  Reduction reduction;
};

EmbeddingInputs prepare_embeddings(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                                   const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction_code) {
  check_embeddings(query, positive, negatives);
  const Reduction reduction = check_reduction(reduction_code);
  const int64_t B = negatives.size(0), n = negatives.size(1), D = negatives.size(2);
  check_teacher(teacher, query, B, n, teacher_is_scores);
  return {unit_inner_stride(query),
          unit_inner_stride(positive),
          unit_inner_stride(negatives),
          teacher.contiguous(),
          B,
          n,
          D,
          reduction};
}

at::Tensor margin_mse_emb_fwd(const at::Tensor& query, const at::Tensor& positive, const at::Tensor& negatives,
                              const at::Tensor& teacher, bool teacher_is_scores, int64_t reduction_code) {
  const EmbeddingInputs in = prepare_embeddings(query, positive, negatives, teacher, teacher_is_scores, reduction_code);
  const at::Tensor &q = in.q, &p = in.p, &negs = in.negs, &tea = in.tea;
  const int64_t B = in.B, n = in.n, D = in.D;
  const Reduction reduction = in.reduction;
  at::Tensor out = allocate_loss(query, reduction, B, n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "margin_mse_emb_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    using wide_t = Wide<scalar_t>;
    const auto rows = embedding_rows<scalar_t>(q, p, negs);
    const acc_t* tea_p = tea.data_ptr<acc_t>();
    acc_t* none_p = reduction == Reduction::kNone ? out.data_ptr<acc_t>() : nullptr;
    std::vector<wide_t> row_sums(reduction == Reduction::kNone ? 0 : B);
    at::parallel_for(0, B, row_grain((n + 1) * D), [&](int64_t begin, int64_t end) {
      std::vector<wide_t> s_neg(n);
      for (int64_t b = begin; b < end; ++b) {
        const Teacher<scalar_t> t(tea_p, b, n, teacher_is_scores);
        const wide_t s_pos = row_scores<scalar_t>(rows, b, n, D, s_neg.data());
        const wide_t total = score_row_forward(s_pos, s_neg.data(), t, n, none_p ? none_p + b * n : nullptr);
        if (!row_sums.empty()) row_sums[b] = total;
      }
    });
    if (reduction != Reduction::kNone) write_reduced<scalar_t>(out, row_sums, reduction, B, n);
  });
  return out;
}

// out[0..D) = c · src[0..D)
template <typename scalar_t>
void scale_row(scalar_t* out, const scalar_t* src, Wide<scalar_t> c, int64_t D) {
  using IO = WideIO<scalar_t, Wide<scalar_t>>;
  using Vec = typename IO::Vec;
  const Vec vc(c);
  int64_t d = 0;
  for (; d + IO::size() <= D; d += IO::size()) IO::store(out + d, IO::load(src + d) * vc);
  for (; d < D; ++d) out[d] = static_cast<scalar_t>(static_cast<Wide<scalar_t>>(src[d]) * c);
}

// out[0..D) = Σ_j coef[j] · src_j[0..D)   (src_0 = first, src_{1..m} = rest(i)); vectorized over D.
template <typename scalar_t, typename RowFn>
void weighted_rows(scalar_t* out, const Wide<scalar_t>* coef, const scalar_t* first, RowFn rest, int64_t m, int64_t D) {
  using acc_t = Wide<scalar_t>;
  using IO = WideIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  int64_t d = 0;
  for (; d + IO::size() <= D; d += IO::size()) {
    Vec acc = IO::load(first + d) * Vec(coef[0]);
    for (int64_t i = 0; i < m; ++i) acc = at::vec::fmadd(IO::load(rest(i) + d), Vec(coef[i + 1]), acc);
    IO::store(out + d, acc);
  }
  for (; d < D; ++d) {
    acc_t acc = static_cast<acc_t>(first[d]) * coef[0];
    for (int64_t i = 0; i < m; ++i) acc += static_cast<acc_t>(rest(i)[d]) * coef[i + 1];
    out[d] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_mse_emb_bwd(const at::Tensor& grad, const at::Tensor& query,
                                                                  const at::Tensor& positive,
                                                                  const at::Tensor& negatives,
                                                                  const at::Tensor& teacher, bool teacher_is_scores,
                                                                  int64_t reduction_code) {
  const EmbeddingInputs in = prepare_embeddings(query, positive, negatives, teacher, teacher_is_scores, reduction_code);
  const at::Tensor &q = in.q, &p = in.p, &negs = in.negs, &tea = in.tea;
  const int64_t B = in.B, n = in.n, D = in.D;
  const Reduction reduction = in.reduction;
  const auto g = checked_grad(grad, reduction, {B, n}, acc_type(q.scalar_type()));
  at::Tensor grad_q = at::empty({B, D}, q.options());
  at::Tensor grad_p = at::empty({B, D}, q.options());
  at::Tensor grad_n = at::empty({B, n, D}, q.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "margin_mse_emb_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    using wide_t = Wide<scalar_t>;
    const acc_t* g_p = g.data_ptr<acc_t>();
    const auto rows = embedding_rows<scalar_t>(q, p, negs);
    const acc_t* tea_p = tea.data_ptr<acc_t>();
    const bool none = reduction == Reduction::kNone;
    const wide_t coef_scale = backward_coef<wide_t>(g_p, reduction, B, n);
    scalar_t* gq_p = grad_q.data_ptr<scalar_t>();
    scalar_t* gp_p = grad_p.data_ptr<scalar_t>();
    scalar_t* gn_p = grad_n.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(2 * (n + 1) * D), [&](int64_t begin, int64_t end) {
      std::vector<wide_t> s_neg(n), coef(n + 1);  // coef[0] = ∂L/∂s⁺, coef[1 + i] = ∂L/∂s⁻_i
      for (int64_t b = begin; b < end; ++b) {
        const Teacher<scalar_t> t(tea_p, b, n, teacher_is_scores);
        const wide_t s_pos = row_scores<scalar_t>(rows, b, n, D, s_neg.data());
        coef[0] =
            score_row_backward(s_pos, s_neg.data(), t, n, coef_scale, none ? g_p + b * n : nullptr, coef.data() + 1);
        // ∂L/∂q_b = c⁺·p_b + Σ_i c⁻_i·n_{b,i};  ∂L/∂p_b = c⁺·q_b;  ∂L/∂n_{b,i} = c⁻_i·q_b
        weighted_rows<scalar_t>(
            gq_p + b * D, coef.data(), rows.positive(b), [&](int64_t i) { return rows.negative(b, i); }, n, D);
        const scalar_t* qb = rows.query(b);
        scale_row<scalar_t>(gp_p + b * D, qb, coef[0], D);
        for (int64_t i = 0; i < n; ++i) scale_row<scalar_t>(gn_p + (b * n + i) * D, qb, coef[i + 1], D);
      }
    });
  });
  return {grad_q, grad_p, grad_n};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdloss, CPU, m) {
  m.impl("margin_mse_fwd", &margin_mse_fwd);
  m.impl("margin_mse_bwd", &margin_mse_bwd);
  m.impl("margin_mse_emb_fwd", &margin_mse_emb_fwd);
  m.impl("margin_mse_emb_bwd", &margin_mse_emb_bwd);
}

}  // namespace cpu
}  // namespace kdloss
