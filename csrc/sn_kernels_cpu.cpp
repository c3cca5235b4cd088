// The native backend: op schemas and CPU kernels.
//
// Every pass streams W once.  The "uv" training step computes W v and W^T (W v) in one pass,
// so its forward reads W twice: once there, once for W / sigma.  Work is split with
// at::parallel_for, and every reduction uses a partition fixed by the shape alone (row dot
// products, a fixed number of row chunks for W^T u combined in order, fixed element blocks
// for <G, W>), so results are bit-identical for any number of threads.  Large outputs come
// from a block cache (cpu_block_cache.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/enum_tag.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_block_cache.h"
#include "cpu_loops.h"
#include "cpu_stream.h"

namespace sn_kernels {
namespace baseline {
#include "cpu_f32_loops.h"
}  // namespace baseline
}  // namespace sn_kernels

namespace sn_kernels {
namespace {

constexpr int LANES = 16;             // independent accumulators: lets -O3 vectorise reductions exactly
// elements per parallel task, at least: smaller work runs inline on the calling thread.  A weight of
// a few hundred KiB (a 128x128x3x3 convolution) is read from memory, not cache, in a training step
// (everything else ran in between), and one core cannot stream it at the memory's speed: splitting
// it over the cores pays even for such small weights (about 15% of an SNGAN discriminator's
// spectral-norm step on 2 cores).  The partition of every reduction is fixed by the shape, not by
// this, so results stay bit-identical for any thread count.
constexpr int64_t GRAIN = 1 << 15;
constexpr int64_t MAX_CHUNKS = 32;    // row chunks of W^T u
constexpr int64_t MIN_CHUNK_ROWS = 32;
constexpr int64_t DOT_BLOCK = 1 << 14;  // elements per partial of <G, W>
// rows shorter than this are added into W^T y by add_rows_outer (many rows per call), longer ones by axpy4
constexpr int64_t SHORT_ROW = 16;
// pieces of W's rows (dim != 0) up to this long are summed per (row, k) across the outer index by dot_rows
constexpr int64_t DOT_ROWS_MAX_TILED = 128;

template <typename acc_t>
inline acc_t lane_sum(const acc_t* acc) {
  // fixed pairwise order
  acc_t a[LANES];
  for (int l = 0; l < LANES; ++l) a[l] = acc[l];
  for (int w = LANES / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}

// sum_k a[k] * b[k], a in the weight dtype, b in the accumulation dtype
template <typename scalar_t, typename acc_t>
inline acc_t dot_lanes(const scalar_t* __restrict a, const acc_t* __restrict b, int64_t len) {
  acc_t acc[LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= len; k += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += static_cast<acc_t>(a[k + l]) * b[k + l];
  for (int l = 0; k < len; ++k, ++l) acc[l] += static_cast<acc_t>(a[k]) * b[k];
  return lane_sum(acc);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict a, const acc_t* __restrict b, int64_t len) {
  return dot_lanes(a, b, len);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot2(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t len) {
  acc_t acc[LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= len; k += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += static_cast<acc_t>(a[k + l]) * static_cast<acc_t>(b[k + l]);
  for (int l = 0; k < len; ++k, ++l) acc[l] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return lane_sum(acc);
}

// y[k] += alpha * a[k]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict y, const scalar_t* __restrict a, acc_t alpha, int64_t len) {
  for (int64_t k = 0; k < len; ++k) y[k] += alpha * static_cast<acc_t>(a[k]);
}

// float32 goes through the run-time selected loop table (AVX2+FMA when available)
const F32Loops& f32() {
  static const F32Loops* table = select_f32_loops(&baseline::table);
  return *table;
}

template <>
inline float dot<float, float>(const float* __restrict a, const float* __restrict b, int64_t len) {
  return f32().dot(a, b, len);
}
template <>
inline float dot2<float, float>(const float* __restrict a, const float* __restrict b, int64_t len) {
  return f32().dot(a, b, len);
}
// float64 through the AVX2 table when the CPU has it (NOTES L11), so that every float64 sum of products (the rows
// of matvec and of the fused "uv" pass, norms, <G, W>) takes the same dot
template <>
inline double dot<double, double>(const double* __restrict a, const double* __restrict b, int64_t len) {
  if (const auto f64 = f32().dot_f64) return f64(a, b, len);
  return dot_lanes(a, b, len);
}
template <>
inline double dot2<double, double>(const double* __restrict a, const double* __restrict b, int64_t len) {
  return dot<double, double>(a, b, len);
}
template <>
inline void axpy<float, float>(float* __restrict y, const float* __restrict a, float alpha, int64_t len) {
  f32().axpy(y, a, alpha, len);
}

// y[k] += alpha[0] a0[k] + ... + alpha[3] a3[k], in that order (bit-identical to four axpy calls)
template <typename scalar_t, typename acc_t>
inline void axpy4(acc_t* __restrict y, const scalar_t* a0, const scalar_t* a1, const scalar_t* a2,
                  const scalar_t* a3, const acc_t* alpha, int64_t len) {
  axpy(y, a0, alpha[0], len);
  axpy(y, a1, alpha[1], len);
  axpy(y, a2, alpha[2], len);
  axpy(y, a3, alpha[3], len);
}
template <>
inline void axpy4<float, float>(float* __restrict y, const float* a0, const float* a1, const float* a2,
                                const float* a3, const float* alpha, int64_t len) {
  f32().axpy4(y, a0, a1, a2, a3, alpha, len);
}

// out[0, len) += sum_{i in [i0, i1)} y[i] w[(o * m + i) * stride + col0 + k], rows added in order
template <typename scalar_t, typename acc_t>
inline void add_rows(acc_t* out, const scalar_t* w, int64_t o, int64_t m, int64_t col0, int64_t len, const acc_t* y,
                     int64_t i0, int64_t i1, int64_t stride) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const scalar_t* r = w + (o * m + i) * stride + col0;
    axpy4(out, r, r + stride, r + 2 * stride, r + 3 * stride, y + i, len);
  }
  for (; i < i1; ++i) axpy(out, w + (o * m + i) * stride + col0, y[i], len);
}

// out[o * len + k] += sum_{r < rows} y[r] a[o * ostride + r * len + k] for o < outer: rows added in order (axpy's
// roundings), many short rows per call
template <typename scalar_t, typename acc_t>
inline void add_rows_outer(acc_t* out, const scalar_t* a, const acc_t* y, int64_t len, int64_t rows, int64_t outer,
                           int64_t ostride) {
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t r = 0; r < rows; ++r) axpy(out + o * len, a + o * ostride + r * len, y[r], len);
}
template <>
inline void add_rows_outer<float, float>(float* out, const float* a, const float* y, int64_t len, int64_t rows,
                                         int64_t outer, int64_t ostride) {
  f32().add_rows_outer(out, a, y, len, rows, outer, ostride);
}

// lane_sum of x[0, len) placed in lanes k % LANES, each 0 + x[k]: for len <= P <= LANES the lanes above P only
// add zeros, so a tree over P lanes gives the same sum without the full tree's cost per row
template <int P, typename acc_t>
inline acc_t tree_total(const acc_t* x, int64_t len) {
  acc_t a[P];
  for (int l = 0; l < P; ++l) a[l] = l < len ? acc_t(0) + x[l] : acc_t(0);
  for (int w = P / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}
template <typename acc_t>
inline acc_t piece_total(const acc_t* x, int64_t len) {
  if (len == 1) return x[0];
  if (len <= 2) return tree_total<2>(x, len);
  if (len <= 4) return tree_total<4>(x, len);
  if (len <= 8) return tree_total<8>(x, len);
  acc_t lanes[LANES] = {};
  for (int64_t k0 = 0; k0 < len; k0 += LANES)
    for (int64_t l = 0; l < std::min<int64_t>(LANES, len - k0); ++l) lanes[l] += x[k0 + l];
  return lane_sum(lanes);
}

// s[r] += sum_{o < outer, k < len} a[o * ostride + r * len + k] b[o * len + k] for r < rows, W in memory order.
// Long pieces: each piece's dot, a row's sum taken over o in order.  Pieces up to DOT_ROWS_MAX_TILED long
// (dim != 0 with a short trailing extent; tall narrow weights, rows of up to 8): the partial sums of every
// (row, k) are carried across o and each row's `len` partials added at the end in dot's lanes (for outer == 1
// that is dot's own sum, without a call per row), as the float32 loop does for outer > 1 (cpu_f32_loops.h,
// dot_rows): the order depends on the shape alone
template <typename scalar_t, typename acc_t>
inline void dot_rows_generic(acc_t* s, const scalar_t* a, const acc_t* b, int64_t len, int64_t rows, int64_t outer,
                             int64_t ostride) {
  // outer == 1: a row is one piece; past a few lanes its dot is as cheap as the partials and their total
  if (len > DOT_ROWS_MAX_TILED || (outer == 1 && len > 8)) {
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t r = 0; r < rows; ++r) s[r] += dot(a + o * ostride + r * len, b + o * len, len);
    return;
  }
  constexpr int64_t ACC = 4096;  // (row, k) partial sums per block (32 KiB for float64, on the stack)
  acc_t part[ACC];
  const int64_t block = ACC / len;
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t nr = std::min(block, rows - r0);
    std::fill(part, part + nr * len, acc_t(0));
    for (int64_t o = 0; o < outer; ++o) {
      const scalar_t* ao = a + o * ostride + r0 * len;
      const acc_t* bo = b + o * len;
      if (len == 1) {  // one loop over the rows, vectorized
        const acc_t b0 = bo[0];
        for (int64_t r = 0; r < nr; ++r) part[r] += static_cast<acc_t>(ao[r]) * b0;
        continue;
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = 0; k < len; ++k) part[r * len + k] += static_cast<acc_t>(ao[r * len + k]) * bo[k];
    }
    for (int64_t r = 0; r < nr; ++r) s[r0 + r] += piece_total(part + r * len, len);
  }
}
template <typename scalar_t, typename acc_t>
inline void dot_rows(acc_t* s, const scalar_t* a, const acc_t* b, int64_t len, int64_t rows, int64_t outer,
                     int64_t ostride) {
  dot_rows_generic(s, a, b, len, rows, outer, ostride);
}
template <>
inline void dot_rows<float, float>(float* s, const float* a, const float* b, int64_t len, int64_t rows, int64_t outer,
                                   int64_t ostride) {
  f32().dot_rows(s, a, b, len, rows, outer, ostride);
}
// float64 through the AVX2 table when the CPU has it (NOTES L11): the generic loops are compiled for the baseline ISA
template <>
inline void dot_rows<double, double>(double* s, const double* a, const double* b, int64_t len, int64_t rows,
                                     int64_t outer, int64_t ostride) {
  if (const auto f64 = f32().dot_rows_f64) return f64(s, a, b, len, rows, outer, ostride);
  dot_rows_generic(s, a, b, len, rows, outer, ostride);
}

// float16 rows, widened as they are read (eval_sigma_half's matvec; its caller checks that the table has them)
template <>
inline void dot_rows<at::Half, float>(float* s, const at::Half* a, const float* b, int64_t len, int64_t rows,
                                      int64_t outer, int64_t ostride) {
  const auto f16 = f32().dot_rows_f16;
  TORCH_INTERNAL_ASSERT(f16 != nullptr, "sn_kernels: float16 rows without F16C");
  f16(s, reinterpret_cast<const unsigned short*>(a), b, len, rows, outer, ostride);
}

template <typename scalar_t, typename acc_t>
inline void divide(scalar_t* __restrict y, const scalar_t* __restrict w, acc_t sig, int64_t len) {
  for (int64_t k = 0; k < len; ++k) y[k] = static_cast<scalar_t>(static_cast<acc_t>(w[k]) / sig);
}
template <>
inline void divide<float, float>(float* __restrict y, const float* __restrict w, float sig, int64_t len) {
  f32().divide(y, w, sig, len);
}
template <>
inline void divide<double, double>(double* __restrict y, const double* __restrict w, double sig, int64_t len) {
  f32().divide_f64(y, w, sig, len);
}
template <>
inline void divide<at::BFloat16, float>(at::BFloat16* __restrict y, const at::BFloat16* __restrict w, float sig,
                                        int64_t len) {
  f32().divide_bf16(reinterpret_cast<unsigned short*>(y), reinterpret_cast<const unsigned short*>(w), sig, len);
}

// y[k] = (g[k] - c * (ui * v[k])) * inv, or / sig where inv is 0 (grad_factor, cpu_vector_steps.h)
template <typename scalar_t, typename acc_t>
inline void grad_row(scalar_t* __restrict y, const scalar_t* __restrict g, const acc_t* __restrict v, acc_t c,
                     acc_t ui, acc_t sig, acc_t inv, int64_t len) {
  if (inv != 0)
    for (int64_t k = 0; k < len; ++k) y[k] = static_cast<scalar_t>((static_cast<acc_t>(g[k]) - c * (ui * v[k])) * inv);
  else
    for (int64_t k = 0; k < len; ++k) y[k] = static_cast<scalar_t>((static_cast<acc_t>(g[k]) - c * (ui * v[k])) / sig);
}
template <>
inline void grad_row<float, float>(float* __restrict y, const float* __restrict g, const float* __restrict v, float c,
                                   float ui, float sig, float inv, int64_t len) {
  f32().grad_row(y, g, v, c, ui, sig, inv, len);
}

// rows [r0, r1) of the (outer * m, len) layout of y = (G - c u v^T) / sigma, grad_row's arithmetic
template <typename scalar_t, typename acc_t>
inline void grad_row_range(scalar_t* y, const scalar_t* g, const acc_t* u, const acc_t* v, acc_t c, acc_t sig,
                           acc_t inv, int64_t len, int64_t m, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    grad_row(y + r * len, g + r * len, v + (r / m) * len, c, u[r % m], sig, inv, len);
}
template <>
inline void grad_row_range<float, float>(float* y, const float* g, const float* u, const float* v, float c, float sig,
                                         float inv, int64_t len, int64_t m, int64_t r0, int64_t r1) {
  f32().grad_rows(y, g, u, v, c, sig, inv, len, m, r0, r1);  // many rows per call: short rows cost no call each
}

template <typename acc_t>
inline acc_t sumsq(const acc_t* x, int64_t len) { return dot<acc_t, acc_t>(x, x, len); }

// s = W x   (x has n entries, s has m)
template <typename scalar_t, typename acc_t>
void matvec(const scalar_t* w, const MatrixView& mv, const acc_t* x, acc_t* s) {
  const int64_t m = mv.m, inner = mv.inner, outer = mv.outer, n = mv.n();
  // in memory order: rows [i0, i1) of outer index o are contiguous; s[i] summed over o in order as before
  at::parallel_for(0, m, std::max<int64_t>(1, GRAIN / n), [&](int64_t i0, int64_t i1) {
    std::fill(s + i0, s + i1, acc_t(0));
    dot_rows(s + i0, w + i0 * inner, x, inner, i1 - i0, outer, m * inner);
  });
}

// The fixed row chunks of W^T y: the partition depends on m alone, so sums are thread-count independent.
struct RowChunks {
  int64_t rows, count;
  explicit RowChunks(int64_t m)
      : rows(std::max<int64_t>(MIN_CHUNK_ROWS, (m + MAX_CHUNKS - 1) / MAX_CHUNKS)), count((m + rows - 1) / rows) {}
};

// t = sum of the chunk partials part[c * n, (c + 1) * n), added in chunk order
template <typename acc_t>
void combine_chunks(const acc_t* part, int64_t chunks, int64_t n, acc_t* t) {
  at::parallel_for(0, n, GRAIN / 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) t[j] = part[j];
    for (int64_t c = 1; c < chunks; ++c) {
      const acc_t* p = part + c * n;
      for (int64_t j = j0; j < j1; ++j) t[j] += p[j];
    }
  });
}

// t = sum over the row chunks of chunk_sum(i0, i1, out), each writing its rows [i0, i1) into a zeroed
// partial `out` of n entries; chunks run in parallel, partials are added in chunk order
template <typename acc_t, typename ChunkSum>
void sum_row_chunks(const RowChunks& rc, int64_t m, int64_t n, std::vector<acc_t>& scratch, acc_t* t,
                    const ChunkSum& chunk_sum) {
  scratch.resize(static_cast<size_t>(rc.count * n));
  acc_t* part = scratch.data();
  at::parallel_for(0, rc.count, std::max<int64_t>(1, GRAIN / (rc.rows * n)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* out = part + c * n;
      std::fill(out, out + n, acc_t(0));
      chunk_sum(c * rc.rows, std::min(m, (c + 1) * rc.rows), out);
    }
  });
  combine_chunks(part, rc.count, n, t);
}

// matvec_t for short rows (inner < SHORT_ROW) of several outer indices: the same chunk partials (each in row
// order) and their sum in chunk order, but computed in memory order, split by outer index: each task reads
// whole (m, inner) blocks, eight at a time, instead of every chunk reading a sliver of each
template <typename scalar_t, typename acc_t>
void matvec_t_short(const scalar_t* w, const MatrixView& mv, const RowChunks& rc, const acc_t* y, acc_t* t,
                    std::vector<acc_t>& scratch) {
  const int64_t m = mv.m, inner = mv.inner, n = mv.n();
  if (rc.count > 1) scratch.resize(static_cast<size_t>(rc.count * n));
  acc_t* part = rc.count > 1 ? scratch.data() : t;
  at::parallel_for(0, mv.outer, std::max<int64_t>(1, GRAIN / (m * inner)), [&](int64_t o0, int64_t o1) {
    for (int64_t c = 0; c < rc.count; ++c) std::fill(part + c * n + o0 * inner, part + c * n + o1 * inner, acc_t(0));
    for (int64_t ob = o0; ob < o1; ob += 8) {
      const int64_t oe = std::min(o1, ob + 8);
      for (int64_t c = 0; c < rc.count; ++c) {
        const int64_t i0 = c * rc.rows, i1 = std::min(m, i0 + rc.rows);
        add_rows_outer(part + c * n + ob * inner, w + (ob * m + i0) * inner, y + i0, inner, i1 - i0, oe - ob,
                       m * inner);
      }
    }
  });
  if (rc.count > 1) combine_chunks(part, rc.count, n, t);
}

// t = W^T y   (y has m entries, t has n): fixed row chunks, partials combined in order
template <typename scalar_t, typename acc_t>
void matvec_t(const scalar_t* w, const MatrixView& mv, const acc_t* y, acc_t* t, std::vector<acc_t>& scratch) {
  const int64_t m = mv.m, inner = mv.inner, outer = mv.outer, n = mv.n();
  const RowChunks rc(m);
  if (outer > 1 && inner == 1 && m >= 32) {
    // one element a row: t[o] is the dot of W's o-th run of m contiguous elements with y (a chain of
    // multiply-adds per row chunk, as below, would go through memory one element at a time); a run
    // shorter than two vectors of lanes is cheaper in matvec_t_short's eight chains at once
    at::parallel_for(0, outer, std::max<int64_t>(1, GRAIN / m), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) t[o] = dot(w + o * m, y, m);
    });
    return;
  }
  if (outer > 1 && inner < SHORT_ROW) return matvec_t_short(w, mv, rc, y, t, scratch);
  if (rc.count == 1) {
    // few rows: split the columns instead (each column is still summed in row order)
    if (outer == 1) {
      at::parallel_for(0, n, std::max<int64_t>(1024, GRAIN / m), [&](int64_t j0, int64_t j1) {
        std::fill(t + j0, t + j1, acc_t(0));
        add_rows(t + j0, w, 0, m, j0, j1 - j0, y, 0, m, n);
      });
    } else {
      at::parallel_for(0, outer, std::max<int64_t>(1, GRAIN / (m * inner)), [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          acc_t* out = t + o * inner;
          std::fill(out, out + inner, acc_t(0));
          add_rows(out, w, o, m, 0, inner, y, 0, m, inner);
        }
      });
    }
    return;
  }
  sum_row_chunks(rc, m, n, scratch, t, [&](int64_t i0, int64_t i1, acc_t* out) {
    if (inner < SHORT_ROW) return add_rows_outer(out, w + i0 * inner, y + i0, inner, i1 - i0, 1, 0);  // outer 1
    for (int64_t o = 0; o < outer; ++o) add_rows(out + o * inner, w, o, m, 0, inner, y, i0, i1, inner);
  });
}

// s = W v and r = W^T s in ONE pass over W (the "uv" step reads W once, not twice): each group of
// four rows is dotted with v, then added into its chunk's partial of r while still in L1.  Since
// u = s / |s|, W^T u = r / |s|.  Same row chunks and row order as matvec_t, so deterministic too.
// Only for the dim = 0 layout with several chunks (returns false otherwise: use matvec + matvec_t).
template <typename scalar_t, typename acc_t>
bool matvec_and_back(const scalar_t* w, const MatrixView& mv, const acc_t* v, acc_t* s, acc_t* r,
                     std::vector<acc_t>& scratch) {
  const int64_t m = mv.m, n = mv.n();
  const RowChunks rc(m);
  if (mv.outer != 1 || rc.count == 1) return false;
  sum_row_chunks(rc, m, n, scratch, r, [&](int64_t i0, int64_t i1, acc_t* out) {
    if (n < SHORT_ROW) {  // short rows: the chunk's dots, then its rows added in order (the same sums)
      std::fill(s + i0, s + i1, acc_t(0));
      dot_rows(s + i0, w + i0 * n, v, n, i1 - i0, 1, 0);
      return add_rows_outer(out, w + i0 * n, s + i0, n, i1 - i0, 1, 0);
    }
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      const scalar_t* row = w + i * n;
      for (int q = 0; q < 4; ++q) s[i + q] = dot(row + q * n, v, n);
      axpy4(out, row, row + n, row + 2 * n, row + 3 * n, s + i, n);
    }
    for (; i < i1; ++i) {
      s[i] = dot(w + i * n, v, n);
      axpy(out, w + i * n, s[i], n);
    }
  });
  return true;
}

#include "cpu_vector_steps.h"  // normalize_into, scale_back, safe_sigma

template <typename scalar_t, typename acc_t>
void to_acc_vec(const at::Tensor& src, acc_t* dst) {
  const scalar_t* p = src.const_data_ptr<scalar_t>();
  for (int64_t k = 0, len = src.numel(); k < len; ++k) dst[k] = static_cast<acc_t>(p[k]);
}

template <typename scalar_t, typename acc_t>
void from_acc_vec(const acc_t* src, at::Tensor& dst) {
  scalar_t* p = dst.mutable_data_ptr<scalar_t>();
  for (int64_t k = 0, len = dst.numel(); k < len; ++k) p[k] = static_cast<scalar_t>(src[k]);
}

// a copy of a small contiguous vector: memcpy, without clone()'s general strided-copy machinery
at::Tensor contiguous_copy(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::memcpy(out.mutable_data_ptr(), x.const_data_ptr(), x.nbytes());
  return out;
}

// ---- float16 weights through the float32 kernels (benchmarks/NOTES.md, L2) ----
//
// The generic loops convert c10::Half one element at a time in software (the build has no F16C), 4-9x
// slower than PyTorch's spectral norm.  ATen's conversion is vectorized (F16C where the CPU has it) and
// the float32 kernels use the AVX2 table, so each float16 op converts its inputs to float32, runs the
// float32 op and converts its tensor result back: the same float32 arithmetic rounded once
// (round-to-nearest-even) as the half loops, with float32 sums in the float32 kernels' order.  bfloat16
// keeps its loops (its conversion is a shift); the generic loops no longer take float16.  The ops check
// their float16 arguments first, so messages and refusals are the float16 ones.

bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf; }

// t converted to `dtype` by ATen (copy_, elementwise: no dependence on the thread count) into a cached
// block, laid out as t is when t is dense (contiguous otherwise, or when `contiguous` asks for it)
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype, bool contiguous = false) {
  const bool keep = !contiguous && t.is_non_overlapping_and_dense();
  at::Tensor out = cached_empty_cpu(t.sizes(), keep ? t.strides() : c10::contiguous_strides(t.sizes()), dtype);
  out.copy_(t);
  return out;
}

at::Tensor as_float(const at::Tensor& t, bool contiguous = false) { return converted(t, at::kFloat, contiguous); }
at::Tensor as_half(const at::Tensor& t) { return converted(t, at::kHalf); }

// the bits of a contiguous float16 tensor, for the float16 loops of the table
const unsigned short* half_bits(const at::Tensor& t) {
  return reinterpret_cast<const unsigned short*>(t.const_data_ptr<at::Half>());
}

// Eval sigma = u^T W v of a float16 weight: what the float32 op gives on ATen's float32 copy of W, bit for bit (the
// same matvec rows and dot_rows sums, lanes and trees, on the same exactly widened values), W widened as it is
// read (`dot_rows_f16`: rows of one piece in registers, pieces of the (outer, m, inner) layouts of dim != 0 through
// an L1 buffer) instead of a float32 copy written and read back (NOTES L9-L10).  Taken where the copy is not
// faster (`eval_sigma_widens`).
bool eval_sigma_widens(const MatrixView& mv) {
  // one piece a row: rows of 16 or more (shorter ones measured faster on the copy, L7); pieces: at most
  // DOT_ROWS_WIDE elements (the buffer), and stretches of at least 32 (the m rows of one piece: a widening per
  // piece of Linear(1, 4096) or Linear(10, 1000) along dim=1 cost twice the copy, L10)
  return mv.outer == 1 ? mv.inner >= SHORT_ROW : mv.inner <= DOT_ROWS_WIDE && mv.m * mv.inner >= 32;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eval_sigma_half(const at::Tensor& weight_, const at::Tensor& u,
                                                               const at::Tensor& v, const MatrixView& mv,
                                                               const F32Loops& loops) {
  TORCH_INTERNAL_ASSERT(eval_sigma_widens(mv));
  const at::Tensor weight = weight_.contiguous();
  const int64_t m = mv.m, n = mv.n();
  std::vector<float> ua(m), va(n), s(m);
  loops.widen_f16(ua.data(), half_bits(u), m);  // u, v contiguous (checked); F16C, not c10's conversion one at a time
  loops.widen_f16(va.data(), half_bits(v), n);
  matvec(weight.const_data_ptr<at::Half>(), mv, va.data(), s.data());  // the float32 op's split and rows
  at::Tensor sigma = at::empty({}, weight.options().dtype(at::kFloat));
  *sigma.mutable_data_ptr<float>() = dot(ua.data(), s.data(), m);
  return {sigma, contiguous_copy(u), contiguous_copy(v)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(const at::Tensor& weight_, at::Tensor& u,
                                                                   at::Tensor& v, int64_t n_power_iterations,
                                                                   double eps, int64_t dim, c10::string_view order_,
                                                                   bool training) {
  const MatrixView mv = matrix_view(weight_, dim);
  const bool vu = check_power_iteration_args(weight_, u, v, mv, n_power_iterations, eps, order_, training);
  if (is_half(weight_) && !training && f32().dot_rows_f16 != nullptr && eval_sigma_widens(mv))
    return eval_sigma_half(weight_, u, v, mv, f32());
  if (is_half(weight_)) {
    // float32 copies of u, v iterated, then rounded into the caller's float16 buffers in place
    at::Tensor uf = as_float(u), vf = as_float(v);
    at::Tensor sigma = std::get<0>(power_iteration_cpu(as_float(weight_, true), uf, vf, n_power_iterations, eps,
                                                       dim, order_, training));
    if (training) {
      from_acc_vec<at::Half, float>(uf.const_data_ptr<float>(), u);
      from_acc_vec<at::Half, float>(vf.const_data_ptr<float>(), v);
      bump_versions(u, v);
    }
    return {sigma, contiguous_copy(u), contiguous_copy(v)};
  }
  const at::Tensor weight = weight_.contiguous();
  const auto acc_dtype = accumulation_type(weight.scalar_type());
  at::Tensor sigma = at::empty({}, weight.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "sn_power_iteration_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t m = mv.m, n = mv.n();
    std::vector<acc_t> ua(m), va(n), s(m), t(n), scratch;
    to_acc_vec<scalar_t, acc_t>(u, ua.data());
    to_acc_vec<scalar_t, acc_t>(v, va.data());
    acc_t sig = 0;
    if (training) {
      for (int64_t it = 0; it < n_power_iterations; ++it) {
        if (vu) {
          matvec_t(w, mv, ua.data(), t.data(), scratch);
          normalize_into(t.data(), va.data(), n, eps);
          matvec(w, mv, va.data(), s.data());
          sig = normalize_into(s.data(), ua.data(), m, eps);
        } else if (matvec_and_back(w, mv, va.data(), s.data(), t.data(), scratch) &&
                   scale_back(s.data(), ua.data(), t.data(), m, n, eps)) {
          sig = normalize_into(t.data(), va.data(), n, eps);
        } else {
          matvec(w, mv, va.data(), s.data());
          normalize_into(s.data(), ua.data(), m, eps);
          matvec_t(w, mv, ua.data(), t.data(), scratch);
          sig = normalize_into(t.data(), va.data(), n, eps);
        }
      }
      from_acc_vec<scalar_t, acc_t>(ua.data(), u);
      from_acc_vec<scalar_t, acc_t>(va.data(), v);
    } else {
      matvec(w, mv, va.data(), s.data());
      sig = dot(ua.data(), s.data(), m);
    }
    *sigma.mutable_data_ptr<acc_t>() = sig;
  });
  if (training) bump_versions(u, v);
  return {sigma, contiguous_copy(u), contiguous_copy(v)};
}

// y = w / sigma over `numel` elements stored alike, split over the cores
template <typename scalar_t, typename acc_t>
void divide_all(scalar_t* y, const scalar_t* w, acc_t sig, int64_t numel) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streamed(numel)) {  // a large W / sigma leaves the caches anyway: written around them (cpu_stream.h)
      at::parallel_for(0, numel, GRAIN, [&](int64_t k0, int64_t k1) {
        stream_blocks(y, k0, k1, [&](float* buf, int64_t k, int64_t len) { divide(buf, w + k, sig, len); });
        stream_fence();
      });
      return;
    }
  }
  at::parallel_for(0, numel, GRAIN, [&](int64_t k0, int64_t k1) { divide(y + k0, w + k0, sig, k1 - k0); });
}

// out = W / sigma for a float16 W stored in out's order: one pass, converting on the fly (F16C), which is what
// the float32 detour (ATen's conversions around the float32 division) computes, bit for bit
at::Tensor divide_half_into(at::Tensor& out, const at::Tensor& weight, const at::Tensor& sigma,
                            void (*divide_f16)(unsigned short*, const unsigned short*, float, long)) {
  const float sig = safe_sigma(*sigma.const_data_ptr<float>());
  const unsigned short* w = half_bits(weight);
  auto* y = reinterpret_cast<unsigned short*>(out.mutable_data_ptr<at::Half>());
  at::parallel_for(0, weight.numel(), GRAIN, [&](int64_t k0, int64_t k1) { divide_f16(y + k0, w + k0, sig, k1 - k0); });
  return out;
}

at::Tensor normalize_cpu(const at::Tensor& weight_, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                         int64_t dim) {
  TORCH_CHECK(sigma.numel() == 1, "sn_kernels: sigma must have one element");
  TORCH_CHECK(sigma.scalar_type() == accumulation_type(weight_.scalar_type()),
              "sn_kernels: sigma must be in the accumulation dtype");
  const auto divide_f16 = f32().divide_f16;
  if (is_half(weight_) && divide_f16 == nullptr)  // no F16C: through ATen's conversions
    return as_half(normalize_cpu(as_float(weight_), as_float(u), as_float(v), sigma, dim));
  // elementwise: a dense weight keeps its layout (out has the same strides); anything else is made contiguous
  const at::Tensor weight = weight_.is_non_overlapping_and_dense() ? weight_ : weight_.contiguous();
  at::Tensor out = cached_empty_cpu(weight.sizes(), weight.strides(), weight.scalar_type());
  if (is_half(weight)) return divide_half_into(out, weight, sigma, divide_f16);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "sn_normalize_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t sig = safe_sigma(*sigma.const_data_ptr<acc_t>());
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    divide_all(y, w, sig, weight.numel());
  });
  return out;
}

void check_sigma(const at::Tensor& weight, const at::Tensor& sigma) {
  TORCH_CHECK(sigma.numel() == 1 && sigma.scalar_type() == accumulation_type(weight.scalar_type()),
              "sn_kernels: sigma must be one element in the accumulation dtype");
}

void check_grad_args(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& sigma) {
  TORCH_CHECK(grad.sizes() == weight.sizes(), "sn_kernels: grad must have the weight's shape");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "sn_kernels: grad must have the weight's dtype");
  check_sigma(weight, sigma);
}

// <g, w> over `numel` elements stored in the same order: fixed blocks, partials summed in order
template <typename scalar_t, typename acc_t>
acc_t blocked_dot(const scalar_t* g, const scalar_t* w, int64_t numel) {
  const int64_t blocks = (numel + DOT_BLOCK - 1) / DOT_BLOCK;
  std::vector<acc_t> part(blocks);
  at::parallel_for(0, blocks, std::max<int64_t>(1, GRAIN / DOT_BLOCK), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k0 = b * DOT_BLOCK;
      part[b] = dot2<scalar_t, acc_t>(g + k0, w + k0, std::min(DOT_BLOCK, numel - k0));
    }
  });
  acc_t c = 0;
  for (int64_t b = 0; b < blocks; ++b) c += part[b];
  return c;
}

// y = (G - c u v^T) / sigma for contiguous G and y, row by row of the (outer * m, inner) layout
template <typename scalar_t, typename acc_t>
void grad_rows(scalar_t* y, const scalar_t* g, const acc_t* ua, const acc_t* va, acc_t c, acc_t sig,
               const MatrixView& mv) {
  const int64_t m = mv.m, inner = mv.inner;
  const acc_t inv = grad_factor(sig);
  if constexpr (std::is_same_v<scalar_t, float>) {
    // a large float32 gradient leaves the caches anyway: written around them, row by row through an L1
    // buffer (cpu_stream.h; grad_row's loop, so the same values), when its rows are long enough for that
    if (streamed_rows(inner, mv.outer * m * inner)) {
      at::parallel_for(0, mv.outer * m, std::max<int64_t>(1, GRAIN / inner), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* gr = g + r * inner;
          const float* vr = va + (r / m) * inner;
          stream_blocks(y + r * inner, 0, inner, [&](float* buf, int64_t k, int64_t len) {
            f32().grad_row(buf, gr + k, vr + k, c, ua[r % m], sig, inv, len);
          });
        }
        stream_fence();
      });
      return;
    }
  }
  at::parallel_for(0, mv.outer * m, std::max<int64_t>(1, GRAIN / inner), [&](int64_t r0, int64_t r1) {
    grad_row_range(y, g, ua, va, c, sig, inv, inner, m, r0, r1);
  });
}

// (G - <G, W>/sigma u v^T) / scaled and <G, W>/sigma (0-d, the accumulation dtype): the backward kernel with
// its final divisor apart from sigma.  `scaled` is sigma itself for W / sigma (native_backward), and
// sigma / gamma for the learnable gain's gamma W / sigma, whose gamma gradient is the returned dot.
// (`with_dot` false: no dot tensor is made, for native_backward)
std::tuple<at::Tensor, at::Tensor> backward_scaled(const at::Tensor& grad_, const at::Tensor& weight_,
                                                   const at::Tensor& u_, const at::Tensor& v_, const at::Tensor& sigma,
                                                   const at::Tensor& scaled, int64_t dim, bool with_dot) {
  const MatrixView mv = matrix_view(weight_, dim);
  check_args(weight_, u_, v_, mv);
  check_grad_args(grad_, weight_, sigma);
  check_sigma(weight_, scaled);
  if (is_half(weight_)) {
    const at::Tensor g = as_float(grad_, true), w = as_float(weight_, true);
    auto [out, c] = backward_scaled(g, w, as_float(u_), as_float(v_), sigma, scaled, dim, with_dot);
    return {as_half(out), c};
  }
  const at::Tensor weight = weight_.contiguous(), grad = grad_.contiguous();
  at::Tensor out = cached_empty_cpu(weight.sizes(), weight.strides(), weight.scalar_type());
  at::Tensor dot = with_dot ? at::empty({}, sigma.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "sn_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t sig = safe_sigma(*sigma.const_data_ptr<acc_t>());
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const acc_t c = blocked_dot<scalar_t, acc_t>(g, weight.const_data_ptr<scalar_t>(), weight.numel()) / sig;
    if (with_dot) *dot.mutable_data_ptr<acc_t>() = c;
    std::vector<acc_t> ua(mv.m), va(mv.n());
    to_acc_vec<scalar_t, acc_t>(u_.contiguous(), ua.data());
    to_acc_vec<scalar_t, acc_t>(v_.contiguous(), va.data());
    const acc_t divisor = safe_sigma(*scaled.const_data_ptr<acc_t>());
    grad_rows(out.mutable_data_ptr<scalar_t>(), g, ua.data(), va.data(), c, divisor, mv);
  });
  return {out, dot};
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                        const at::Tensor& sigma, int64_t dim) {
  return std::get<0>(backward_scaled(grad, weight, u, v, sigma, sigma, dim, false));
}

std::tuple<at::Tensor, at::Tensor> backward_gain_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                     const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                                                     const at::Tensor& scaled, int64_t dim) {
  return backward_scaled(grad, weight, u, v, sigma, scaled, dim, true);
}

// ---- W / sigma laid out for a compiled graph (functional._normalize_laid_out; fakes: backends/native.py) ----
//
// On the CPU inductor lays every convolution's weight out channels-last.  A W / sigma written
// contiguous would cost a copy to channels-last forward and one of its gradient back, each a
// kernel inductor generates and compiles per weight shape (benchmarks/NOTES.md, C4).  These ops
// write W / sigma in the layout asked for, and read the gradient in whichever of the two layouts
// it comes (the convolution's backward gives it channels-last), writing grad_W in the weight's.

bool is_channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_channels_last(const at::Tensor& weight, bool channels_last) {
  TORCH_CHECK(!channels_last || weight.dim() == 4, "sn_kernels: channels_last needs a 4-d weight, got a ",
              weight.dim(), "-d one");
}

// y[o][b * A + a] = w[o][a * B + b] / sigma for o < O: each (A, B) block of a 4-d weight stored
// contiguous (A = channels, B = kernel positions) or channels-last (the other way round) written in
// the other order; the same division as `divide`, so the values are native_normalize's bit for bit
template <typename scalar_t, typename acc_t>
void divide_transposed(scalar_t* y, const scalar_t* w, acc_t sig, int64_t O, int64_t A, int64_t B) {
  at::parallel_for(0, O, std::max<int64_t>(1, GRAIN / (A * B)), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const scalar_t* wo = w + o * A * B;
      scalar_t* yo = y + o * A * B;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t a = 0; a < A; ++a) yo[b * A + a] = static_cast<scalar_t>(static_cast<acc_t>(wo[a * B + b]) / sig);
    }
  });
}

void check_layout_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                       int64_t dim, bool channels_last) {
  check_args(weight, u, v, matrix_view(weight, dim));
  check_sigma(weight, sigma);
  check_channels_last(weight, channels_last);
}

// strides of W / sigma written contiguous or channels-last (the two layouts of these ops)
c10::DimVector layout_strides(const at::Tensor& weight, bool channels_last) {
  if (!channels_last) return c10::contiguous_strides(weight.sizes());
  const auto cl = c10::get_channels_last_strides_2d(weight.sizes());
  return c10::DimVector(cl.begin(), cl.end());
}

at::Tensor normalize_layout_cpu(const at::Tensor& weight_, const at::Tensor& u, const at::Tensor& v,
                                const at::Tensor& sigma, int64_t dim, bool channels_last) {
  check_layout_args(weight_, u, v, sigma, dim, channels_last);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // a weight stored in out's order divides element by element; a 4-d one in the other order transposes
  const bool same_order = weight_.is_contiguous(format);
  const auto divide_f16 = f32().divide_f16;
  // float16 in another order, or without F16C: as_float keeps a dense weight's layout, so the float32 op takes
  // the same route (divide or transpose)
  if (is_half(weight_) && !(same_order && divide_f16 != nullptr))
    return as_half(normalize_layout_cpu(as_float(weight_), as_float(u), as_float(v), sigma, dim, channels_last));
  at::Tensor out = cached_empty_cpu(weight_.sizes(), layout_strides(weight_, channels_last), weight_.scalar_type());
  if (is_half(weight_)) return divide_half_into(out, weight_, sigma, divide_f16);
  const bool other_4d = !same_order && (channels_last || is_channels_last_4d(weight_));
  const at::Tensor weight = same_order || (other_4d && !channels_last) ? weight_ : weight_.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "sn_normalize_layout_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t sig = safe_sigma(*sigma.const_data_ptr<acc_t>());
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    if (!other_4d) {
      divide_all(y, w, sig, weight.numel());
      return;
    }
    const int64_t O = weight.size(0), C = weight.size(1), S = weight.size(2) * weight.size(3);
    if (channels_last) divide_transposed(y, w, sig, O, C, S);  // (C, S) blocks to (S, C)
    else divide_transposed(y, w, sig, O, S, C);
  });
  return out;
}

// W / sigma twice, as two outputs with the same values: the hook API's compiled route, whose module.weight
// outlives the forward and is therefore an output of the graph (hooks.SpectralNorm.keep).  With one tensor
// used twice, autograd would add the two gradients in a kernel inductor generates per weight shape; with
// two, native_normalize_layout_backward sums them (`kept`) inside the call.  The second is laid out as the
// weight is (contiguous for a contiguous weight), as eager's module.weight is and as autograd makes the zero
// gradient it materializes when nothing uses it: in the first's channels-last layout AOTAutograd would
// transpose that gradient into a fresh tensor every step (benchmarks/NOTES.md, C6).  Both by the same
// division from W, so the values are the same bits.
bool own_channels_last(const at::Tensor& weight) {
  return is_channels_last_4d(weight) && !weight.is_contiguous();
}

// kept = w / sigma element by element (w stored in kept's order), and out = the same bits, in the same order or,
// when `transposed`, each output channel's (A, B) block as (B, A): (C, S) to (S, C) when kept is contiguous
// (`own_cl` false), (S, C) to (C, S) when it is channels-last.  One read of W from memory per output channel; the
// copy reads the channel's slice of kept from the L1 (benchmarks/NOTES.md, C8)
template <typename scalar_t>
void divide_twice(scalar_t* out, scalar_t* kept, const scalar_t* w, scalar_t sig, const at::Tensor& weight,
                  bool transposed, bool own_cl) {
  const int64_t numel = weight.numel();
  if (numel == 0) return;
  if (!transposed) {
    at::parallel_for(0, numel, GRAIN, [&](int64_t k0, int64_t k1) {
      divide(kept + k0, w + k0, sig, k1 - k0);
      std::memcpy(out + k0, kept + k0, (k1 - k0) * sizeof(scalar_t));
    });
    return;
  }
  const int64_t O = weight.size(0), C = weight.size(1), S = weight.size(2) * weight.size(3);
  const int64_t A = own_cl ? S : C, B = own_cl ? C : S;
  at::parallel_for(0, O, std::max<int64_t>(1, GRAIN / (A * B)), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      scalar_t* ko = kept + o * A * B;
      scalar_t* yo = out + o * A * B;
      divide(ko, w + o * A * B, sig, A * B);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t a = 0; a < A; ++a) yo[b * A + a] = ko[a * B + b];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> normalize_layout_twice_cpu(const at::Tensor& weight, const at::Tensor& u,
                                                              const at::Tensor& v, const at::Tensor& sigma,
                                                              int64_t dim, bool channels_last) {
  if (is_half(weight)) {  // W converted once for both
    check_layout_args(weight, u, v, sigma, dim, channels_last);
    const at::Tensor w = as_float(weight);
    auto [out, kept] = normalize_layout_twice_cpu(w, as_float(u), as_float(v), sigma, dim, channels_last);
    return {as_half(out), as_half(kept)};
  }
  const bool own = own_channels_last(weight);
  const auto own_format = own ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto type = weight.scalar_type();
  if ((type != at::kFloat && type != at::kDouble) || !weight.is_contiguous(own_format)) {
    // bfloat16's transposed division rounds through static_cast and its in-order one through the vector loop,
    // whose NaN bits a copy would carry into the other's place; a weight not dense in kept's order divides
    // through a contiguous copy: two calls, each with native_normalize_layout's bits
    at::Tensor out = normalize_layout_cpu(weight, u, v, sigma, dim, channels_last);
    at::Tensor kept = normalize_layout_cpu(weight, u, v, sigma, dim, own);
    return {out, kept};
  }
  check_layout_args(weight, u, v, sigma, dim, channels_last);
  at::Tensor kept = cached_empty_cpu(weight.sizes(), layout_strides(weight, own), type);
  at::Tensor out = cached_empty_cpu(weight.sizes(), layout_strides(weight, channels_last), type);
  AT_DISPATCH_FLOATING_TYPES(type, "sn_normalize_layout_twice_cpu", [&] {
    const scalar_t sig = safe_sigma(*sigma.const_data_ptr<scalar_t>());
    divide_twice(out.mutable_data_ptr<scalar_t>(), kept.mutable_data_ptr<scalar_t>(),
                 weight.const_data_ptr<scalar_t>(), sig, weight, channels_last != own, own);
  });
  return {out, kept};
}

// whether every entry of t is zero, of either sign (NaN is not): a read of t in storage order, blocks in
// parallel, stopping at the first block with a nonzero entry.  On the bits: an entry is a zero iff its bits
// shifted left by one (the sign dropped) are 0, so a block ORs those (integer ops, vectorized) and tests once.
template <typename scalar_t>
bool all_zero_bits(const scalar_t* p, int64_t numel) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 8, uint64_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "one unsigned integer per entry");
  const bits_t* q = reinterpret_cast<const bits_t*>(p);
  std::atomic<bool> nonzero{false};
  at::parallel_for(0, numel, GRAIN, [&](int64_t k0, int64_t k1) {
    constexpr int64_t BLOCK = 4096;
    for (int64_t b = k0; b < k1 && !nonzero.load(std::memory_order_relaxed); b += BLOCK) {
      bits_t acc = 0;
      const int64_t e = std::min(k1, b + BLOCK);
      for (int64_t k = b; k < e; ++k) acc |= static_cast<bits_t>(q[k] << 1);
      if (acc != 0) nonzero.store(true, std::memory_order_relaxed);
    }
  });
  return !nonzero.load();
}

bool all_zero(const at::Tensor& t_) {
  const at::Tensor t = t_.is_non_overlapping_and_dense() ? t_ : t_.contiguous();
  bool zero = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sn_all_zero_cpu", [&] {
    zero = all_zero_bits(t.const_data_ptr<scalar_t>(), t.numel());  // a dense tensor's entries, in some order
  });
  return zero;
}

// grad_W = (G - <G, W_sn> u v^T) / sigma from the saved output W_sn = W / sigma, written contiguous or
// channels-last (the weight's layout); G = grad, plus `kept` (the gradient of the second output of
// native_normalize_layout_twice) when given and not all zero.  G and W_sn stored in one order (any dense layout): <G, W_sn>
// is summed in that order, so the bits do not depend on the output layout.  A channels-last G written
// contiguous (the compiled convolution's case) is read block-transposed for dim 0 or 1; any other
// combination writes from a contiguous copy of G.
at::Tensor normalize_layout_backward_cpu(const at::Tensor& grad_in, const at::Tensor& weight_sn_, const at::Tensor& u_,
                                         const at::Tensor& v_, const at::Tensor& sigma, int64_t dim,
                                         bool channels_last, const std::optional<at::Tensor>& kept) {
  const MatrixView mv = matrix_view(weight_sn_, dim);
  check_args(weight_sn_, u_, v_, mv);
  check_grad_args(grad_in, weight_sn_, sigma);
  check_channels_last(weight_sn_, channels_last);
  bool has_kept = kept.has_value() && kept->defined();
  if (has_kept) check_grad_args(*kept, weight_sn_, sigma);
  // a kept gradient of zeros (the one autograd materializes when nothing used module.weight) is not added:
  // one read instead of a weight-sized sum; the result is eager's, where module.weight is the forward's own
  // tensor and no sum is formed (the sum would differ in the sign of zero entries only: -0 + 0 = +0)
  if (has_kept && all_zero(*kept)) has_kept = false;
  // the sum autograd forms for a tensor used twice, rounded as it rounds it, into a cached block
  at::Tensor grad_ = grad_in;
  if (has_kept) {
    const bool dense = grad_in.is_non_overlapping_and_dense();
    grad_ = cached_empty_cpu(grad_in.sizes(), dense ? grad_in.strides() : c10::contiguous_strides(grad_in.sizes()),
                             grad_in.scalar_type());
    at::add_out(grad_, grad_in, *kept);
  }
  // G (with kept added in float16 above) and the saved W / sigma as float32, in their own layouts
  if (is_half(weight_sn_))
    return as_half(normalize_layout_backward_cpu(as_float(grad_), as_float(weight_sn_), as_float(u_), as_float(v_),
                                                 sigma, dim, channels_last, std::nullopt));
  const int64_t d = dim < 0 ? dim + weight_sn_.dim() : dim;
  const bool one_order = grad_.strides() == weight_sn_.strides() && grad_.is_non_overlapping_and_dense();
  const at::Tensor grad = one_order ? grad_ : grad_.contiguous();
  const at::Tensor weight_sn = one_order ? weight_sn_ : weight_sn_.contiguous();
  const bool transposed = !grad.is_contiguous() && d <= 1 && is_channels_last_4d(grad);
  const at::Tensor g_rows = grad.is_contiguous() || transposed ? grad : grad.contiguous();
  at::Tensor out = cached_empty_cpu(weight_sn.sizes(), c10::contiguous_strides(weight_sn.sizes()),
                                    weight_sn.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight_sn.scalar_type(), "sn_layout_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t sig = safe_sigma(*sigma.const_data_ptr<acc_t>());
    const acc_t c = blocked_dot<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), weight_sn.const_data_ptr<scalar_t>(),
                                                 weight_sn.numel());
    std::vector<acc_t> ua(mv.m), va(mv.n());
    to_acc_vec<scalar_t, acc_t>(u_.contiguous(), ua.data());
    to_acc_vec<scalar_t, acc_t>(v_.contiguous(), va.data());
    const scalar_t* g = g_rows.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    if (!transposed) {
      grad_rows(y, g, ua.data(), va.data(), c, sig, mv);
      return;
    }
    // y[o][b][s] from g[o][s][b]: each output channel's (S, B) block of G transposed into a buffer, then the
    // same-order route's row loop on it (grad_row_range with that route's row length and u, v indexing), so the
    // two routes run the same arithmetic (the float32 loops fuse g - c * (u v) into an FMA where the CPU has one)
    const int64_t O = grad.size(0), B = grad.size(1), S = grad.size(2) * grad.size(3);
    const acc_t inv = grad_factor(sig);
    at::parallel_for(0, O, std::max<int64_t>(1, GRAIN / (B * S)), [&](int64_t o0, int64_t o1) {
      std::vector<scalar_t> t(B * S);
      for (int64_t o = o0; o < o1; ++o) {
        const scalar_t* go = g + o * B * S;
        for (int64_t s = 0; s < S; ++s)
          for (int64_t b = 0; b < B; ++b) t[b * S + s] = go[s * B + b];
        scalar_t* yo = y + o * B * S;
        if (d == 0)  // row o of the (O, B * S) matrix
          grad_row_range(yo, t.data(), ua.data() + o, va.data(), c, sig, inv, B * S, 1, 0, 1);
        else  // rows (o, b) of the (O * B, S) layout: u by b, v by o
          grad_row_range(yo, t.data(), ua.data(), va.data() + o * S, c, sig, inv, S, B, 0, B);
      }
    });
  });
  // a channels-last weight's gradient: laid out after the fact (rare: the parameter itself is channels-last)
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

// The version of the ops' schemas, checked by the Python side when it loads the library
// (sn_kernels/backends/native.py OPS_VERSION): an extension built from older sources (an install not
// rebuilt after an update) is then refused with a reason, instead of failing at the first call that
// passes an argument it does not know.  Bump both whenever a native_* schema changes
// (tests/test_native.py compares a digest of the schemas).
constexpr int64_t kOpsVersion = 4;

int64_t ops_version() { return kOpsVersion; }

}  // namespace

TORCH_LIBRARY(sn_kernels, m) {
  m.def("native_ops_version() -> int", &ops_version);
  m.def("native_power_iteration(Tensor weight, Tensor(a!) u, Tensor(b!) v, int n_power_iterations, float eps, "
        "int dim, str order, bool training) -> (Tensor, Tensor, Tensor)");
  m.def("native_normalize(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  m.def("native_backward(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  // the same with the final divisor `scaled` apart from sigma, and <G, W> / sigma: the learnable gain's gradients
  // (gamma W / sigma = W / scaled with scaled = sigma / gamma; gamma's gradient is the dot), CPU only
  m.def("native_backward_gain(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, Tensor scaled, "
        "int dim) -> (Tensor, Tensor)");
  // W / sigma written contiguous or channels-last, and its gradient from W / sigma itself: the compiled
  // CPU route (functional._compiled_ops); the backward takes the gradient in whatever layout it comes
  m.def("native_normalize_layout(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim, bool channels_last) "
        "-> Tensor");
  m.def("native_normalize_layout_backward(Tensor grad, Tensor weight_sn, Tensor u, Tensor v, Tensor sigma, "
        "int dim, bool channels_last, Tensor? kept=None) -> Tensor", {at::Tag::flexible_layout});
  // the same W / sigma twice, for a front end whose module attribute outlives the forward (the hook API):
  // the first laid out as channels_last says, the second as the weight is
  m.def("native_normalize_layout_twice(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim, "
        "bool channels_last) -> (Tensor, Tensor)");
  // native_normalize with its gradient in C++ (sn_kernels_autograd.cpp): the eager-mode entry point
  m.def("native_normalize_eager(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  // the whole eager forward (power iteration, the Lipschitz scaling when coeff is given, W / sigma, times the
  // learnable gain when given) in one call
  m.def("native_spectral_normalize_eager(Tensor weight, Tensor(a!) u, Tensor(b!) v, int n_power_iterations, "
        "float eps, int dim, str order, bool training, float? coeff=None, bool soft=False, Tensor? gain=None) "
        "-> (Tensor, Tensor)");
  // the block cache of CPU outputs (cpu_block_cache.h): statistics and release of idle blocks
  m.def("native_cpu_cache_stats() -> int[]", &cpu_cache_stats);
  m.def("native_cpu_cache_clear() -> ()", &cpu_cache_clear);
}

TORCH_LIBRARY_IMPL(sn_kernels, CPU, m) {
  m.impl("native_power_iteration", &power_iteration_cpu);
  m.impl("native_normalize", &normalize_cpu);
  m.impl("native_backward", &backward_cpu);
  m.impl("native_backward_gain", &backward_gain_cpu);
  m.impl("native_normalize_layout", &normalize_layout_cpu);
  m.impl("native_normalize_layout_backward", &normalize_layout_backward_cpu);
  m.impl("native_normalize_layout_twice", &normalize_layout_twice_cpu);
}

}  // namespace sn_kernels
