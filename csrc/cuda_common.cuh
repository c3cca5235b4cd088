// The CUDA pieces shared by the per-weight kernels (sn_kernels_cuda.cu) and the multi-tensor kernels
// of sn_kernels.group (sn_kernels_grouped_cuda.cu): block reductions, the "last block" ticket, the
// launch plan of the mat-vec passes, and the passes' bodies.
//
// A body computes one block's share of a pass given the block's index and the number of blocks of
// its weight (not blockIdx / gridDim): a per-weight kernel passes its own grid, a grouped kernel the
// block's position inside its weight's range of the launch.  Both therefore run the same partition,
// the same fixed-order sums and the same ticket protocol, so their results are bit-identical.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/core/Device.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace at {
class Tensor;
}

namespace sn_kernels {
namespace cuda {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int64_t TARGET_BLOCKS = 512;  // the row-chunk split of W^T u depends on the shape only
constexpr int64_t TARGET_WARPS = 8192;  // the row split of W v (warps per row) depends on the shape only
constexpr int MAX_DOT_BLOCKS = 1024;
constexpr int UNROLL = 8;       // loads in flight per thread in the finishing loops
constexpr int ELEM_UNROLL = 4;  // vector loads in flight per thread in the elementwise kernels

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t ld(const T* p, int64_t k) {
  return static_cast<acc_t>(p[k]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// deterministic block sum (fixed tree); every thread gets the result
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x) {
  __shared__ acc_t red[WARPS];
  __syncthreads();  // red may be in use from a previous call
  x = warp_sum(x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += red[w];
  return total;
}

// true in exactly one block of those that call it with the same counter: the last to arrive.
// The caller's global writes before the call are visible to that block.
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int expected) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(counter, 1u);
    last = (prev == expected - 1);
    if (last) *counter = 0;  // reset for the next kernel on this stream
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// for (k = start; k < len; k += step) body(k, load(k)), with the loads of U consecutive iterations
// issued before their bodies run (the bodies in the loop's order, so results are unchanged).
template <int U, typename Load, typename Body>
__device__ __forceinline__ void strided_ahead(int64_t k, int64_t step, int64_t len, Load load, Body body) {
  using T = decltype(load(int64_t{0}));
  for (; k + (U - 1) * step < len; k += U * step) {
    T r[U];
#pragma unroll
    for (int q = 0; q < U; ++q) r[q] = load(k + q * step);
#pragma unroll
    for (int q = 0; q < U; ++q) body(k + q * step, r[q]);
  }
  for (; k < len; k += step) body(k, load(k));
}

// strided_ahead over the threads of this block
template <int U, typename Load, typename Body>
__device__ __forceinline__ void block_strided(int64_t len, Load load, Body body) {
  strided_ahead<U>(threadIdx.x, blockDim.x, len, load, body);
}

// The threads' share of a strided elementwise loop: [start, end) with step `step`.  A per-weight
// kernel strides over its whole grid; a grouped kernel's block strides over its item.
struct Stride {
  int64_t start, step, end;
};

// the share of this thread when `nblocks` blocks (this one is `block`) stride over [0, len)
__device__ __forceinline__ Stride grid_stride(int64_t block, int64_t nblocks, int64_t len) {
  return {block * blockDim.x + threadIdx.x, nblocks * blockDim.x, len};
}

// t[e] = sum over c < count of p[c * stride + e] (e < N), added in order of c; the N * U loads of U
// consecutive c are issued before their adds.  p was written by other blocks of this kernel (L2 loads).
template <int U, int N, typename acc_t>
__device__ __forceinline__ void sum_ahead(const acc_t* p, int64_t count, int64_t stride, acc_t (&t)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) t[e] = 0;
  int64_t c = 0;
  for (; c + U <= count; c += U) {
    acc_t r[U][N];
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int e = 0; e < N; ++e) r[q][e] = __ldcg(p + (c + q) * stride + e);
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int e = 0; e < N; ++e) t[e] += r[q][e];
  }
  for (; c < count; ++c)
#pragma unroll
    for (int e = 0; e < N; ++e) t[e] += __ldcg(p + c * stride + e);
}

// prev <- x / max(|x|, eps) unless |x| is zero or not finite (a zero or non-finite weight: the previous
// vector is kept, read from prev_in in the weight dtype when given, else from prev); also written to
// out1 and out2 (weight dtype) where they are not null.  Returns |x|^2 / max(|x|, eps).  Run by one
// whole block.
template <typename scalar_t, typename acc_t>
__device__ acc_t block_normalize(const acc_t* x, acc_t* prev, const scalar_t* prev_in, int64_t len, double eps,
                                 scalar_t* out1, scalar_t* out2) {
  acc_t ss = 0;
  const auto load_x = [&](int64_t k) { return __ldcg(x + k); };
  block_strided<UNROLL>(len, load_x, [&](int64_t, acc_t xk) { ss += xk * xk; });
  ss = block_sum(ss);
  const acc_t norm = sqrt(ss);
  const acc_t denom = norm > static_cast<acc_t>(eps) ? norm : static_cast<acc_t>(eps);
  const bool accept = isfinite(norm) && norm > 0;
  block_strided<UNROLL>(len, load_x, [&](int64_t k, acc_t xk) {
    const acc_t val = accept ? xk / denom : (prev_in != nullptr ? static_cast<acc_t>(prev_in[k]) : prev[k]);
    prev[k] = val;
    if (out1 != nullptr) out1[k] = static_cast<scalar_t>(val);
    if (out2 != nullptr) out2[k] = static_cast<scalar_t>(val);
  });
  return norm * norm / denom;
}

// n / d and n % d by a multiply and a shift, for n, d <= INT32_MAX
using Div32 = at::cuda::detail::IntDivider<unsigned int>;

template <typename acc_t>
__device__ __forceinline__ acc_t safe_sigma(acc_t s) {
  return s == 0 ? static_cast<acc_t>(INFINITY) : s;
}

struct Finish {
  double eps;
  bool eval;          // sigma = u . s instead of normalizing s
  bool write_out;     // write the normalized vector to out/out_used (last iteration)
  bool want_sigma;    // write sigma
};

// ------------------------------------------------------------------ the passes' bodies

// s = W x, block `block` of `nblocks`: warp g of them reduces the columns [slice * span, (slice + 1) *
// span) of row g / wpr (slice = g % wpr) into s_part[g]; the last block sums each row's wpr slices in
// order into s and finishes: training: u = s / max(|s|, eps) (+ sigma); eval: sigma = u . s, u_used = u,
// v_used = v.  Without vectors (outer > 1 or unaligned rows) the lanes walk the flattened column index
// j = o * inner + k, so all 32 lanes stay busy whatever inner is.  The normalized u goes to u_out and
// u_used where they are not null, on the last iteration (fin.write_out).
template <typename scalar_t, typename acc_t, typename x_t, int VEC>
__device__ __forceinline__ void row_dot_block(int64_t block, int64_t nblocks, const scalar_t* __restrict__ w,
                                              int64_t outer, int64_t m, int64_t inner, const x_t* __restrict__ x,
                                              int64_t wpr, int64_t span, acc_t* s_part, acc_t* s,
                                              unsigned int* counter, const Finish& fin, scalar_t* u_out,
                                              scalar_t* u_used, acc_t* sigma, const scalar_t* u_in,
                                              const scalar_t* v_in, scalar_t* v_used, acc_t* u_acc) {
  const int lane = threadIdx.x % 32;
  const int64_t n = outer * inner;
  const int64_t g = block * WARPS + threadIdx.x / 32;
  const int64_t row = g / wpr;
  if (row < m) {
    const int64_t lo = (g - row * wpr) * span, hi = min(n, lo + span);
    acc_t acc = 0;
    if constexpr (VEC > 1) {
      // outer == 1, inner % VEC == 0, 16-byte aligned rows; span % VEC == 0
      using V = Vec<scalar_t, VEC>;
      const V* wr = reinterpret_cast<const V*>(w + row * inner);
#pragma unroll 4
      for (int64_t q = lo / VEC + lane; q < hi / VEC; q += 32) {
        const V a = wr[q];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(a.v[e]) * ld<acc_t>(x, q * VEC + e);
      }
    } else {
      // element (row, j) with j = o * inner + k lives at (o * m + row) * inner + k = j + o * (m - 1) * inner
      // + row * inner; (o, k) advance by 32 columns per step without a division
      int64_t j = lo + lane, o = j / inner;
      int64_t k = j - o * inner;
      const int64_t step_o = 32 / inner, step_k = 32 % inner;
      const scalar_t* wr = w + row * inner;
#pragma unroll 4
      for (; j < hi; j += 32) {
        acc += static_cast<acc_t>(wr[o * m * inner + k]) * ld<acc_t>(x, j);
        o += step_o;
        k += step_k;
        if (k >= inner) {
          k -= inner;
          ++o;
        }
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) s_part[g] = acc;
  }
  if (!arrive_last(counter, static_cast<unsigned int>(nblocks))) return;
  if (wpr > 1) {  // s[i] = sum of row i's slices, in order
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      acc_t t[1];
      sum_ahead<UNROLL>(s_part + i * wpr, wpr, 1, t);
      s[i] = t[0];
    }
    __threadfence();  // block_normalize reads other threads' s with L2 loads
    __syncthreads();
  }
  if (fin.eval) {
    acc_t d = 0;
    block_strided<UNROLL>(m, [&](int64_t i) { return u_in[i]; }, [&](int64_t i, scalar_t ui) {
      d += static_cast<acc_t>(ui) * __ldcg(s + i);
      u_used[i] = ui;
    });
    d = block_sum(d);
    block_strided<UNROLL>(n, [&](int64_t j) { return v_in[j]; }, [&](int64_t j, scalar_t vj) { v_used[j] = vj; });
    if (threadIdx.x == 0) *sigma = d;
    return;
  }
  // training: u_in is the previous u in the weight dtype on the first iteration (u_acc not yet filled)
  const acc_t sig = block_normalize<scalar_t, acc_t>(s, u_acc, u_in, m, fin.eps, fin.write_out ? u_out : nullptr,
                                                     fin.write_out ? u_used : nullptr);
  if (fin.want_sigma && threadIdx.x == 0) *sigma = sig;
}

// Block (tile, chunk) of a (tiles, chunks) grid: partial[chunk][j] = sum_{i in row chunk} W[i, j] y[i]
// for the tile's columns; the last chunk of each column tile sums the chunks in order into t[j] and the
// tile's sum of squares; the last tile normalizes t into v (v_acc; on the last iteration also v_out and
// v_used where they are not null).
template <typename scalar_t, typename acc_t, typename y_t, int VEC>
__device__ __forceinline__ void col_partial_block(int64_t tile, int64_t chunk, int64_t tiles, int64_t chunks,
                                                  const scalar_t* __restrict__ w, int64_t outer, int64_t m,
                                                  int64_t inner, const y_t* __restrict__ y, int64_t rows_per_chunk,
                                                  acc_t* partial, acc_t* t, acc_t* tile_sq, unsigned int* counters,
                                                  const Finish& fin, scalar_t* v_out, scalar_t* v_used, acc_t* sigma,
                                                  acc_t* v_acc, const scalar_t* v_in) {
  const int64_t n = outer * inner;
  const int64_t j0 = (tile * THREADS + threadIdx.x) * VEC;  // first column of this thread
  const int64_t i0 = chunk * rows_per_chunk, i1 = min(m, i0 + rows_per_chunk);
  acc_t acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0;
  if (j0 < n) {
    if constexpr (VEC > 1) {
      using V = Vec<scalar_t, VEC>;
#pragma unroll 4
      for (int64_t i = i0; i < i1; ++i) {
        const V a = *reinterpret_cast<const V*>(w + i * inner + j0);
        const acc_t yi = ld<acc_t>(y, i);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(a.v[e]) * yi;
      }
    } else {
      const int64_t o = j0 / inner, k = j0 % inner;
      const scalar_t* wc = w + o * m * inner + k;
#pragma unroll 4
      for (int64_t i = i0; i < i1; ++i) acc[0] += static_cast<acc_t>(wc[i * inner]) * ld<acc_t>(y, i);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (j0 + e < n) partial[chunk * n + j0 + e] = acc[e];
  }
  // last chunk of this column tile: combine the chunks in order (VEC * UNROLL loads in flight)
  if (!arrive_last(counters + 1 + tile, static_cast<unsigned int>(chunks))) return;
  acc_t sq = 0;
  if (j0 < n) {  // with VEC > 1, n % VEC == 0: the thread's VEC columns are all inside
    acc_t tj[VEC];
    sum_ahead<UNROLL>(partial + j0, chunks, n, tj);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      t[j0 + e] = tj[e];
      sq += tj[e] * tj[e];
    }
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) tile_sq[tile] = sq;
  // last tile: v = t / max(|t|, eps)
  if (!arrive_last(counters, static_cast<unsigned int>(tiles))) return;
  acc_t ss = 0;
  block_strided<UNROLL>(tiles, [&](int64_t q) { return __ldcg(tile_sq + q); }, [&](int64_t, acc_t x) { ss += x; });
  ss = block_sum(ss);  // a fixed tree over a fixed assignment of tiles to threads
  const acc_t norm = sqrt(ss);
  const acc_t denom = norm > static_cast<acc_t>(fin.eps) ? norm : static_cast<acc_t>(fin.eps);
  const bool accept = isfinite(norm) && norm > 0;  // else keep the previous v (zero or non-finite weight)
  block_strided<UNROLL>(n, [&](int64_t j) { return __ldcg(t + j); }, [&](int64_t j, acc_t tj) {
    const acc_t vj = accept ? tj / denom : (v_in != nullptr ? static_cast<acc_t>(v_in[j]) : v_acc[j]);
    v_acc[j] = vj;
    if (fin.write_out) {
      if (v_out != nullptr) v_out[j] = static_cast<scalar_t>(vj);
      if (v_used != nullptr) v_used[j] = static_cast<scalar_t>(vj);
    }
  });
  if (fin.want_sigma && threadIdx.x == 0) *sigma = norm * norm / denom;
}

// out = W / sigma over this thread's share `r` of the elements (VEC == 1) or of the VEC-vectors
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void divide_strided(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, acc_t sig,
                                               const Stride& r) {
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end, [&](int64_t q) { return reinterpret_cast<const V*>(w)[q]; },
                               [&](int64_t q, V a) {
#pragma unroll
                                 for (int e = 0; e < VEC; ++e)
                                   a.v[e] = static_cast<scalar_t>(static_cast<acc_t>(a.v[e]) / sig);
                                 reinterpret_cast<V*>(out)[q] = a;
                               });
  } else {
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end, [&](int64_t k) { return w[k]; }, [&](int64_t k, scalar_t wk) {
      out[k] = static_cast<scalar_t>(static_cast<acc_t>(wk) / sig);
    });
  }
}

// the elements (or VEC-vectors) per block of <G, W>: the number of partials depends on the shape only
template <int VEC>
__host__ __device__ inline int dot_parts(int64_t numel) {
  const int64_t per_block = THREADS * VEC * 8;
  const int64_t parts = (numel + per_block - 1) / per_block;
  return static_cast<int>(parts < MAX_DOT_BLOCKS ? parts : MAX_DOT_BLOCKS);
}

// this thread's sum of G * W over its share `r` (elements, or VEC-vectors)
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ acc_t dot_strided(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                                             const Stride& r) {
  acc_t acc = 0;
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    struct Pair {
      V a, b;
    };
    strided_ahead<ELEM_UNROLL>(
        r.start, r.step, r.end,
        [&](int64_t q) { return Pair{reinterpret_cast<const V*>(g)[q], reinterpret_cast<const V*>(w)[q]}; },
        [&](int64_t, const Pair& p) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(p.a.v[e]) * static_cast<acc_t>(p.b.v[e]);
        });
  } else {
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end,
                               [&](int64_t k) { return static_cast<acc_t>(g[k]) * static_cast<acc_t>(w[k]); },
                               [&](int64_t, acc_t gw) { acc += gw; });
  }
  return acc;
}

// c = sum(partial[0, nparts)) / sig: the same fixed order in every block that calls it
template <typename acc_t>
__device__ __forceinline__ acc_t grad_coefficient(const acc_t* __restrict__ partial, int nparts, acc_t sig) {
  acc_t c = 0;
  for (int b = threadIdx.x; b < nparts; b += blockDim.x) c += partial[b];
  return block_sum(c) / sig;
}

// grad = (G - c u v^T) / sigma over this thread's share `r` of the VEC-vectors (VEC > 1: outer == 1 and
// inner % VEC == 0, so a vector lies in one row) or of the elements of a weight whose matrix view is
// (outer, m, inner); div_inner, div_m divide by inner and m when numel <= INT32_MAX
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void grad_strided(const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t m,
                                             int64_t inner, int64_t numel, const scalar_t* __restrict__ u,
                                             const scalar_t* __restrict__ v, acc_t c, acc_t sig, const Div32& div_inner,
                                             const Div32& div_m, const Stride& r) {
  const auto grad = [&](scalar_t ge, scalar_t ui, scalar_t vj) {
    const acc_t uv = static_cast<acc_t>(ui) * static_cast<acc_t>(vj);
    return static_cast<scalar_t>((static_cast<acc_t>(ge) - c * uv) / sig);
  };
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end, [&](int64_t q) { return reinterpret_cast<const V*>(g)[q]; },
                               [&](int64_t q, V a) {
                                 const int64_t e0 = q * VEC, i = e0 / inner, j = e0 - i * inner;
                                 const scalar_t ui = u[i];
#pragma unroll
                                 for (int e = 0; e < VEC; ++e) a.v[e] = grad(a.v[e], ui, v[j + e]);
                                 reinterpret_cast<V*>(out)[q] = a;
                               });
  } else if (numel <= INT32_MAX) {
    // (o, i, k) of element e = (o * m + i) * inner + k by 32-bit multiply-shift division
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end, [&](int64_t e) { return g[e]; }, [&](int64_t e, scalar_t ge) {
      const auto rk = div_inner.divmod(static_cast<uint32_t>(e));
      const auto oi = div_m.divmod(rk.div);
      out[e] = grad(ge, u[oi.mod], v[static_cast<int64_t>(oi.div) * inner + rk.mod]);
    });
  } else {
    strided_ahead<ELEM_UNROLL>(r.start, r.step, r.end, [&](int64_t e) { return g[e]; }, [&](int64_t e, scalar_t ge) {
      const int64_t k = e % inner, rr = e / inner, i = rr % m, o = rr / m;
      out[e] = grad(ge, u[i], v[o * inner + k]);
    });
  }
}

// the two dividers of grad_strided (unused, and left trivial, when numel > INT32_MAX)
struct GradDividers {
  Div32 inner, m;
};

inline GradDividers grad_dividers(const MatrixView& mv) {
  const bool small = mv.outer * mv.m * mv.inner <= INT32_MAX;
  return {Div32(small ? static_cast<unsigned>(mv.inner) : 1u), Div32(small ? static_cast<unsigned>(mv.m) : 1u)};
}

// ------------------------------------------------------------------ host and device: the plans

template <typename T>
bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The matrix the kernels read.  With inner == 1 and outer > 1 (dim = the last dimension, e.g. dim = 1
// of a 2-D weight) a row of W is a strided memory column, which the row pass would read with stride m:
// the kernels then read the memory as its own (outer, m) matrix, which is W^T, and swap roles (the
// row pass computes W^T u, the column pass W v), so every read is coalesced.
inline MatrixView kernel_view(const MatrixView& mv, bool& transposed) {
  transposed = mv.inner == 1 && mv.outer > 1;
  return transposed ? MatrixView{1, mv.outer, mv.m} : mv;
}

// The elements per load of the mat-vec passes over the kernels' matrix kv at address w: a 16-byte
// vector when every row is whole aligned vectors, else 1.
template <typename scalar_t>
int matvec_vec(const scalar_t* w, const MatrixView& kv) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  return (kv.outer == 1 && kv.inner % VEC == 0 && aligned16(w)) ? VEC : 1;
}

// Launch plan of the mat-vec passes (arithmetic on the shape and the vector width only, on the host
// or on the device: the fixed-order sums are the same on every run).
//   row pass (W x, row_dot_block): a row's columns are split over `wpr` warps of `span` columns;
//   column pass (W^T y, col_partial_block): `tiles` column tiles x `chunks` row chunks of `rows` rows.
struct Plan {
  int vec;
  int64_t wpr, span, row_blocks;
  int64_t tiles, chunks, rows;
};

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__host__ __device__ inline Plan make_plan(const MatrixView& mv, int vec) {
  Plan p;
  p.vec = vec;
  const int64_t n = mv.outer * mv.inner, lane_step = 32 * p.vec;
  // about TARGET_WARPS warps in all, each with at least 8 lane steps
  const int64_t most = max64(1, n / (8 * lane_step));
  p.wpr = min64(max64(1, TARGET_WARPS / mv.m), most);
  p.span = ((n + p.wpr - 1) / p.wpr + lane_step - 1) / lane_step * lane_step;
  p.wpr = (n + p.span - 1) / p.span;
  p.row_blocks = (mv.m * p.wpr + WARPS - 1) / WARPS;
  // about TARGET_BLOCKS blocks in all, at least 8 rows per chunk
  p.tiles = (n + THREADS * p.vec - 1) / (THREADS * p.vec);
  const int64_t want = max64(1, TARGET_BLOCKS / p.tiles);
  p.chunks = min64(min64(want, max64(1, mv.m / 8)), 65535);
  p.rows = (mv.m + p.chunks - 1) / p.chunks;
  p.chunks = (mv.m + p.rows - 1) / p.rows;
  return p;
}

// Where a power iteration's buffers lie in its workspace (accumulation dtype), for the kernels' matrix
// kv of a weight whose u has u_len elements.  Training: partials (chunks * kv.n) | u (u_len) | v |
// s, row slices (s_len) | t = column sums (kv.n) | tile sums (tiles).  Eval: s, row slices only.
struct Workspace {
  int64_t partial, ua, va, s, s_part, t, tile_sq, size;
};

__host__ __device__ inline Workspace workspace_layout(const MatrixView& kv, int64_t u_len, const Plan& p,
                                                      bool training) {
  const int64_t kn = kv.outer * kv.inner;
  const int64_t s_len = kv.m + (p.wpr > 1 ? kv.m * p.wpr : 0);  // s, then the row slices' partials
  Workspace ws;
  ws.partial = 0;
  ws.ua = training ? p.chunks * kn : 0;
  ws.va = ws.ua + (training ? u_len : 0);
  ws.s = ws.ua + (training ? kv.m + kn : 0);  // u and v: m + n = kv.m + kv.n elements
  ws.s_part = p.wpr > 1 ? ws.s + kv.m : ws.s;
  ws.t = ws.s + s_len;
  ws.tile_sq = ws.t + (training ? kn : 0);
  ws.size = ws.tile_sq + (training ? p.tiles : 0);
  return ws;
}

// Zeroed int32 counters for the launches this call queues on `stream` (sn_kernels_cuda.cu).
unsigned int* stream_counters(const at::Device& device, cudaStream_t stream, int64_t needed, at::Tensor& keep);

}  // namespace cuda
}  // namespace sn_kernels
