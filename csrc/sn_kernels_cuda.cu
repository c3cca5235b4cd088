// The native backend: CUDA kernels.
//
// Launches (one power iteration): "uv" = row_dot (s = W v, last block: u = s/|s|) +
// col_partial (t = W^T u, last block per column tile combines the row chunks, last
// tile: v = t/|t|, sigma) ; "vu" the same two in the other order; + normalize = 3.
// Eval: row_dot (last block: sigma = u.s) + normalize = 2.  Backward: dot_partial
// (<G, W> per block) + grad (every block sums the partials in the same fixed order) = 2.
// All reductions are fixed-order trees (no float atomics); the "last block" is found
// with an integer counter that the last block resets to zero, so no memset is needed.
// The counters are per (device, stream), allocated once and never freed; under CUDA graph
// capture each call gets zeroed counters of its own, owned by the graph (stream_counters).
// sigma is read from device memory: no host synchronisation.
//
// Loops that one thread runs over many global loads issue UNROLL loads before using them
// (block_strided, sum_ahead): a dependent load per iteration costs an L2 or DRAM round trip
// each, and the last block's finishing work is on the critical path of every pass.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.h"

namespace sn_kernels {
namespace {

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

// strided_ahead over the threads of the grid
template <int U, typename Load, typename Body>
__device__ __forceinline__ void grid_strided(int64_t len, Load load, Body body) {
  strided_ahead<U>(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * blockDim.x, len, load, body);
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
// vector is kept, read from prev_in in the weight dtype when given, else from prev); optionally also
// written to out1, out2 (weight dtype).  Returns |x|^2 / max(|x|, eps).  Run by one whole block.
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
    if (out1 != nullptr) {
      out1[k] = static_cast<scalar_t>(val);
      out2[k] = static_cast<scalar_t>(val);
    }
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

// s = W x: warp g of the grid reduces the columns [slice * span, (slice + 1) * span) of row g / wpr
// (slice = g % wpr) into s_part[g]; the last block sums each row's wpr slices in order into s and
// finishes: training: u = s / max(|s|, eps) (+ sigma); eval: sigma = u . s, u_used = u, v_used = v.
// Without vectors (outer > 1 or unaligned rows) the lanes walk the flattened column index
// j = o * inner + k, so all 32 lanes stay busy whatever inner is.
template <typename scalar_t, typename acc_t, typename x_t, int VEC>
__global__ void __launch_bounds__(THREADS) row_dot_kernel(
    const scalar_t* __restrict__ w, int64_t outer, int64_t m, int64_t inner, const x_t* __restrict__ x,
    int64_t wpr, int64_t span, acc_t* s_part, acc_t* s, unsigned int* counter, Finish fin, scalar_t* u_out,
    scalar_t* u_used, acc_t* sigma, const scalar_t* u_in, const scalar_t* v_in, scalar_t* v_used, acc_t* u_acc) {
  const int lane = threadIdx.x % 32;
  const int64_t n = outer * inner;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
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
  if (!arrive_last(counter, gridDim.x)) return;
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
  const acc_t sig = block_normalize<scalar_t, acc_t>(s, u_acc, u_in, m, fin.eps, fin.write_out ? u_out : nullptr, u_used);
  if (fin.want_sigma && threadIdx.x == 0) *sigma = sig;
}

// partial[c][j] = sum_{i in row chunk c} W[i, j] y[i]; the last chunk of each column tile sums the
// chunks in order into t[j] and the tile's sum of squares; the last tile normalizes t into v.
template <typename scalar_t, typename acc_t, typename y_t, int VEC>
__global__ void __launch_bounds__(THREADS) col_partial_kernel(
    const scalar_t* __restrict__ w, int64_t outer, int64_t m, int64_t inner, const y_t* __restrict__ y,
    int64_t rows_per_chunk, acc_t* partial, acc_t* t, acc_t* tile_sq, unsigned int* counters, Finish fin,
    scalar_t* v_out, scalar_t* v_used, acc_t* sigma, acc_t* v_acc, const scalar_t* v_in) {
  const int64_t n = outer * inner;
  const int64_t tile = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
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
  if (!arrive_last(counters + 1 + tile, chunks)) return;
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
  if (!arrive_last(counters, gridDim.x)) return;
  acc_t ss = 0;
  block_strided<UNROLL>(gridDim.x, [&](int64_t q) { return __ldcg(tile_sq + q); }, [&](int64_t, acc_t x) { ss += x; });
  ss = block_sum(ss);  // a fixed tree over a fixed assignment of tiles to threads
  const acc_t norm = sqrt(ss);
  const acc_t denom = norm > static_cast<acc_t>(fin.eps) ? norm : static_cast<acc_t>(fin.eps);
  const bool accept = isfinite(norm) && norm > 0;  // else keep the previous v (zero or non-finite weight)
  block_strided<UNROLL>(n, [&](int64_t j) { return __ldcg(t + j); }, [&](int64_t j, acc_t tj) {
    const acc_t vj = accept ? tj / denom : (v_in != nullptr ? static_cast<acc_t>(v_in[j]) : v_acc[j]);
    v_acc[j] = vj;
    if (fin.write_out) {
      v_out[j] = static_cast<scalar_t>(vj);
      v_used[j] = static_cast<scalar_t>(vj);
    }
  });
  if (fin.want_sigma && threadIdx.x == 0) *sigma = norm * norm / denom;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) normalize_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                                            int64_t numel, const acc_t* __restrict__ sigma) {
  const acc_t sig = safe_sigma(*sigma);
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    grid_strided<ELEM_UNROLL>(numel / VEC, [&](int64_t q) { return reinterpret_cast<const V*>(w)[q]; },
                              [&](int64_t q, V a) {
#pragma unroll
                                for (int e = 0; e < VEC; ++e)
                                  a.v[e] = static_cast<scalar_t>(static_cast<acc_t>(a.v[e]) / sig);
                                reinterpret_cast<V*>(out)[q] = a;
                              });
  } else {
    grid_strided<ELEM_UNROLL>(numel, [&](int64_t k) { return w[k]; }, [&](int64_t k, scalar_t wk) {
      out[k] = static_cast<scalar_t>(static_cast<acc_t>(wk) / sig);
    });
  }
}

// partial[b] = sum over this block's grid-stride share of G * W
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) dot_partial_kernel(const scalar_t* __restrict__ g,
                                                              const scalar_t* __restrict__ w, int64_t numel,
                                                              acc_t* __restrict__ partial) {
  acc_t acc = 0;
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    struct Pair {
      V a, b;
    };
    grid_strided<ELEM_UNROLL>(
        numel / VEC,
        [&](int64_t q) { return Pair{reinterpret_cast<const V*>(g)[q], reinterpret_cast<const V*>(w)[q]}; },
        [&](int64_t, const Pair& p) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(p.a.v[e]) * static_cast<acc_t>(p.b.v[e]);
        });
  } else {
    grid_strided<ELEM_UNROLL>(numel, [&](int64_t k) { return static_cast<acc_t>(g[k]) * static_cast<acc_t>(w[k]); },
                              [&](int64_t, acc_t gw) { acc += gw; });
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// grad = (G - c u v^T) / sigma with c = sum(partial) / sigma (every block sums the partials identically)
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) grad_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                                       int64_t m, int64_t inner, int64_t numel,
                                                       const scalar_t* __restrict__ u,
                                                       const scalar_t* __restrict__ v,
                                                       const acc_t* __restrict__ partial, int nparts,
                                                       const acc_t* __restrict__ sigma, Div32 div_inner,
                                                       Div32 div_m) {
  acc_t c = 0;
  for (int b = threadIdx.x; b < nparts; b += blockDim.x) c += partial[b];
  c = block_sum(c);
  const acc_t sig = safe_sigma(*sigma);
  c = c / sig;
  const auto grad = [&](scalar_t ge, scalar_t ui, scalar_t vj) {
    const acc_t uv = static_cast<acc_t>(ui) * static_cast<acc_t>(vj);
    return static_cast<scalar_t>((static_cast<acc_t>(ge) - c * uv) / sig);
  };
  if constexpr (VEC > 1) {
    // outer == 1 and inner % VEC == 0: a vector lies in one row
    using V = Vec<scalar_t, VEC>;
    grid_strided<ELEM_UNROLL>(numel / VEC, [&](int64_t q) { return reinterpret_cast<const V*>(g)[q]; },
                              [&](int64_t q, V a) {
                                const int64_t e0 = q * VEC, i = e0 / inner, j = e0 - i * inner;
                                const scalar_t ui = u[i];
#pragma unroll
                                for (int e = 0; e < VEC; ++e) a.v[e] = grad(a.v[e], ui, v[j + e]);
                                reinterpret_cast<V*>(out)[q] = a;
                              });
  } else if (numel <= INT32_MAX) {
    // (o, i, k) of element e = (o * m + i) * inner + k by 32-bit multiply-shift division
    grid_strided<ELEM_UNROLL>(numel, [&](int64_t e) { return g[e]; }, [&](int64_t e, scalar_t ge) {
      const auto rk = div_inner.divmod(static_cast<uint32_t>(e));
      const auto oi = div_m.divmod(rk.div);
      out[e] = grad(ge, u[oi.mod], v[static_cast<int64_t>(oi.div) * inner + rk.mod]);
    });
  } else {
    grid_strided<ELEM_UNROLL>(numel, [&](int64_t e) { return g[e]; }, [&](int64_t e, scalar_t ge) {
      const int64_t k = e % inner, r = e / inner, i = r % m, o = r / m;
      out[e] = grad(ge, u[i], v[o * inner + k]);
    });
  }
}

// ------------------------------------------------------------------ host side

// Zeroed int32 counters for the launches this call queues on the current stream `stream` (each
// kernel's last block resets the counters it used).
// Eager: one buffer per (device, stream), zeroed once on that stream and never freed (an outgrown
// buffer is kept: a kernel queued before may still use it), so a call costs no memset and no kernel
// ever sees freed memory.  Under CUDA graph capture: a fresh zeroed tensor from the graph's private
// pool, held by `keep` until the launches are queued; its memset is part of the graph, so a graph's
// counters are its own and a graph can replay on any stream beside eager calls and other graphs.
unsigned int* stream_counters(const at::Device& device, cudaStream_t stream, int64_t needed, at::Tensor& keep) {
  const auto opts = at::TensorOptions().device(device).dtype(at::kInt);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    keep = at::zeros({needed}, opts);
    return reinterpret_cast<unsigned int*>(keep.mutable_data_ptr<int>());
  }
  static std::mutex mu;
  // never destroyed: a static destructor would free device memory after the CUDA context is gone
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  static auto* retired = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& buf = (*buffers)[{device.index(), stream}];
  if (!buf.defined() || buf.numel() < needed) {
    if (buf.defined()) retired->push_back(buf);
    int64_t size = 1024;
    while (size < needed) size *= 2;
    buf = at::zeros({size}, opts);  // zeroed on the current stream, which is `stream`
  }
  return reinterpret_cast<unsigned int*>(buf.mutable_data_ptr<int>());
}

template <typename T>
bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Grid of a grid-stride kernel of THREADS threads: one block per `per_block` items, at most one
// full wave (SMs x the blocks of `kernel` resident per SM, by the occupancy calculator; cached).
int64_t grid_for(const void* kernel, int64_t work, int64_t per_block) {
  static std::mutex mu;
  static auto* per_sm = new std::map<std::pair<const void*, int>, int>();
  const int dev = c10::cuda::current_device();
  int resident = 0;
  {
    const std::lock_guard<std::mutex> lock(mu);
    auto it = per_sm->find({kernel, dev});
    if (it == per_sm->end()) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, THREADS, 0));
      it = per_sm->emplace(std::make_pair(kernel, dev), std::max(resident, 1)).first;
    }
    resident = it->second;
  }
  const int64_t wave = static_cast<int64_t>(resident) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, wave));
}

// Launch plan of the mat-vec passes (host arithmetic on the shape, and on the alignment that picks
// the vector width, only: the fixed-order sums are the same on every run).
//   row pass (W x, row_dot_kernel): a row's columns are split over `wpr` warps of `span` columns;
//   column pass (W^T y, col_partial_kernel): `tiles` column tiles x `chunks` row chunks of `rows` rows.
struct Plan {
  int vec;  // elements per load: a 16-byte vector when every row is whole aligned vectors, else 1
  int64_t wpr, span, row_blocks;
  int64_t tiles, chunks, rows;
};

template <typename scalar_t>
Plan make_plan(const scalar_t* w, const MatrixView& mv) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  Plan p;
  p.vec = (mv.outer == 1 && mv.inner % VEC == 0 && aligned16(w)) ? VEC : 1;
  const int64_t n = mv.n(), lane_step = 32 * p.vec;
  // about TARGET_WARPS warps in all, each with at least 8 lane steps
  const int64_t most = std::max<int64_t>(1, n / (8 * lane_step));
  p.wpr = std::min<int64_t>(std::max<int64_t>(1, TARGET_WARPS / mv.m), most);
  p.span = ((n + p.wpr - 1) / p.wpr + lane_step - 1) / lane_step * lane_step;
  p.wpr = (n + p.span - 1) / p.span;
  p.row_blocks = (mv.m * p.wpr + WARPS - 1) / WARPS;
  // about TARGET_BLOCKS blocks in all, at least 8 rows per chunk
  p.tiles = (n + THREADS * p.vec - 1) / (THREADS * p.vec);
  const int64_t want = std::max<int64_t>(1, TARGET_BLOCKS / p.tiles);
  p.chunks = std::min<int64_t>({want, std::max<int64_t>(1, mv.m / 8), 65535});
  p.rows = (mv.m + p.chunks - 1) / p.chunks;
  p.chunks = (mv.m + p.rows - 1) / p.rows;
  return p;
}

template <typename scalar_t, typename x_t>
void launch_row_dot(const scalar_t* w, const MatrixView& mv, const Plan& p, const x_t* x, acc_type_t<scalar_t>* s_part,
                    acc_type_t<scalar_t>* s, unsigned int* counter, Finish fin, scalar_t* u_out, scalar_t* u_used,
                    acc_type_t<scalar_t>* sigma, const scalar_t* u_in, const scalar_t* v_in, scalar_t* v_used,
                    acc_type_t<scalar_t>* u_acc, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const dim3 grid(static_cast<unsigned>(p.row_blocks));
  if (p.vec == VEC && VEC > 1) {
    row_dot_kernel<scalar_t, acc_t, x_t, VEC><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, x, p.wpr, p.span, s_part, s, counter, fin, u_out, u_used, sigma, u_in, v_in,
        v_used, u_acc);
  } else {
    row_dot_kernel<scalar_t, acc_t, x_t, 1><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, x, p.wpr, p.span, s_part, s, counter, fin, u_out, u_used, sigma, u_in, v_in,
        v_used, u_acc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename y_t>
void launch_col_partial(const scalar_t* w, const MatrixView& mv, const Plan& p, const y_t* y,
                        acc_type_t<scalar_t>* partial, acc_type_t<scalar_t>* t, acc_type_t<scalar_t>* tile_sq,
                        unsigned int* counters, Finish fin, scalar_t* v_out, scalar_t* v_used,
                        acc_type_t<scalar_t>* sigma, acc_type_t<scalar_t>* v_acc, const scalar_t* v_in,
                        cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.chunks));
  if (p.vec == VEC && VEC > 1) {
    col_partial_kernel<scalar_t, acc_t, y_t, VEC><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, y, p.rows, partial, t, tile_sq, counters, fin, v_out, v_used, sigma, v_acc, v_in);
  } else {
    col_partial_kernel<scalar_t, acc_t, y_t, 1><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, y, p.rows, partial, t, tile_sq, counters, fin, v_out, v_used, sigma, v_acc, v_in);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The matrix the kernels read.  With inner == 1 and outer > 1 (dim = the last dimension, e.g. dim = 1
// of a 2-D weight) a row of W is a strided memory column, which the row pass would read with stride m:
// the kernels then read the memory as its own (outer, m) matrix, which is W^T, and swap roles (the
// row pass computes W^T u, the column pass W v), so every read is coalesced.
MatrixView kernel_view(const MatrixView& mv, bool& transposed) {
  transposed = mv.inner == 1 && mv.outer > 1;
  return transposed ? MatrixView{1, mv.outer, mv.m} : mv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(const at::Tensor& weight_, at::Tensor& u,
                                                                    at::Tensor& v, int64_t n_power_iterations,
                                                                    double eps, int64_t dim, c10::string_view order_,
                                                                    bool training) {
  const MatrixView mv = matrix_view(weight_, dim);
  const bool vu = check_power_iteration_args(weight_, u, v, mv, n_power_iterations, eps, order_);
  const c10::cuda::CUDAGuard guard(weight_.device());
  const at::Tensor weight = weight_.contiguous();
  const auto acc_dtype = accumulation_type(weight.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor sigma = at::empty({}, weight.options().dtype(acc_dtype));
  at::Tensor u_used = at::empty_like(u), v_used = at::empty_like(v);
  at::Tensor keep_counters;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sn_power_iteration_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t m = mv.m, n = mv.n();
    bool transposed = false;
    const MatrixView kv = kernel_view(mv, transposed);
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* uu = u_used.mutable_data_ptr<scalar_t>();
    scalar_t* vv = v_used.mutable_data_ptr<scalar_t>();
    acc_t* sig = sigma.mutable_data_ptr<acc_t>();
    const Plan plan = make_plan(w, kv);
    const int64_t s_len = kv.m + (plan.wpr > 1 ? kv.m * plan.wpr : 0);  // s, then the row slices' partials
    if (!training) {
      at::Tensor s = at::empty({s_len}, weight.options().dtype(acc_dtype));
      acc_t* sp = s.mutable_data_ptr<acc_t>();
      unsigned int* counter = stream_counters(weight.device(), stream, 1, keep_counters);
      // sigma = u . (W v) = v . (W^T u): the row pass over the kernels' matrix, its vector as x
      const Finish fin{eps, true, false, true};
      acc_t* slices = plan.wpr > 1 ? sp + kv.m : sp;
      if (transposed)
        launch_row_dot<scalar_t, scalar_t>(w, kv, plan, up, slices, sp, counter, fin, nullptr, vv, sig, vp, up, uu,
                                           nullptr, stream);
      else
        launch_row_dot<scalar_t, scalar_t>(w, kv, plan, vp, slices, sp, counter, fin, nullptr, uu, sig, up, vp, vv,
                                           nullptr, stream);
      return;
    }
    // workspace: partials (chunks * kv.n) | u (m) | v (n) | s, row slices (s_len) | t = column sums (kv.n) | tile sums
    at::Tensor ws =
        at::empty({plan.chunks * kv.n() + m + n + s_len + kv.n() + plan.tiles}, weight.options().dtype(acc_dtype));
    acc_t* partial = ws.mutable_data_ptr<acc_t>();
    acc_t* ua = partial + plan.chunks * kv.n();
    acc_t* va = ua + m;
    acc_t* sb = va + n;
    acc_t* s_part = plan.wpr > 1 ? sb + kv.m : sb;
    acc_t* tb = sb + s_len;
    acc_t* tile_sq = tb + kv.n();
    unsigned int* counters = stream_counters(weight.device(), stream, plan.tiles + 1, keep_counters);
    // y = normalize(A x) by the row pass (A = the kernels' matrix) or A^T x by the column pass, into the
    // vector (out, used, acc, the stored previous one on the first iteration)
    const auto row_pass = [&](const auto* x, const Finish& fin, scalar_t* out, scalar_t* used, acc_t* acc,
                              const scalar_t* prev) {
      launch_row_dot<scalar_t>(w, kv, plan, x, s_part, sb, counters, fin, out, used, sig, prev, nullptr, nullptr, acc,
                               stream);
    };
    const auto col_pass = [&](const auto* x, const Finish& fin, scalar_t* out, scalar_t* used, acc_t* acc,
                              const scalar_t* prev) {
      launch_col_partial<scalar_t>(w, kv, plan, x, partial, tb, tile_sq, counters, fin, out, used, sig, acc, prev,
                                   stream);
    };
    const auto to_u = [&](const auto* x, const Finish& fin, const scalar_t* prev) {  // u = normalize(W x)
      if (transposed)
        col_pass(x, fin, up, uu, ua, prev);
      else
        row_pass(x, fin, up, uu, ua, prev);
    };
    const auto to_v = [&](const auto* x, const Finish& fin, const scalar_t* prev) {  // v = normalize(W^T x)
      if (transposed)
        row_pass(x, fin, vp, vv, va, prev);
      else
        col_pass(x, fin, vp, vv, va, prev);
    };
    for (int64_t it = 0; it < n_power_iterations; ++it) {
      const bool last = it + 1 == n_power_iterations;
      const Finish first_half{eps, false, last, false}, second_half{eps, false, last, last};
      // on the first iteration the previous u, v (kept by a rejected step) are read from u, v themselves
      const scalar_t* u_prev = it == 0 ? up : nullptr;
      const scalar_t* v_prev = it == 0 ? vp : nullptr;
      if (vu) {
        if (it == 0)
          to_v(static_cast<const scalar_t*>(up), first_half, v_prev);
        else
          to_v(static_cast<const acc_t*>(ua), first_half, v_prev);
        to_u(static_cast<const acc_t*>(va), second_half, u_prev);
      } else {
        if (it == 0)
          to_u(static_cast<const scalar_t*>(vp), first_half, u_prev);
        else
          to_u(static_cast<const acc_t*>(va), first_half, u_prev);
        to_v(static_cast<const acc_t*>(ua), second_half, v_prev);
      }
    }
  });
  return {sigma, u_used, v_used};
}

at::Tensor normalize_cuda(const at::Tensor& weight_, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                          int64_t dim) {
  TORCH_CHECK(sigma.numel() == 1 && sigma.scalar_type() == accumulation_type(weight_.scalar_type()),
              "sn_kernels: sigma must be one element in the accumulation dtype");
  TORCH_CHECK(sigma.device() == weight_.device(), "sn_kernels: sigma must be on the weight's device");
  const c10::cuda::CUDAGuard guard(weight_.device());
  const at::Tensor weight = weight_.is_non_overlapping_and_dense() ? weight_ : weight_.contiguous();
  at::Tensor out = at::empty_like(weight);
  const int64_t numel = weight.numel();
  if (numel == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sn_normalize_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const acc_t* sig = sigma.const_data_ptr<acc_t>();
    if (numel % VEC == 0 && aligned16(w) && aligned16(y)) {
      const auto kernel = normalize_kernel<scalar_t, acc_t, VEC>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel / VEC, THREADS), THREADS, 0, stream>>>(
          w, y, numel, sig);
    } else {
      const auto kernel = normalize_kernel<scalar_t, acc_t, 1>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel, THREADS), THREADS, 0, stream>>>(w, y, numel, sig);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor backward_cuda(const at::Tensor& grad_, const at::Tensor& weight_, const at::Tensor& u_,
                         const at::Tensor& v_, const at::Tensor& sigma, int64_t dim) {
  const MatrixView mv = matrix_view(weight_, dim);
  check_args(weight_, u_, v_, mv);
  TORCH_CHECK(grad_.sizes() == weight_.sizes() && grad_.scalar_type() == weight_.scalar_type(),
              "sn_kernels: grad must have the weight's shape and dtype");
  TORCH_CHECK(sigma.numel() == 1 && sigma.scalar_type() == accumulation_type(weight_.scalar_type()),
              "sn_kernels: sigma must be one element in the accumulation dtype");
  const c10::cuda::CUDAGuard guard(weight_.device());
  const at::Tensor weight = weight_.contiguous(), grad = grad_.contiguous();
  const at::Tensor u = u_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  const int64_t numel = weight.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sn_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const bool vec_ok = numel % VEC == 0 && aligned16(w) && aligned16(g) && aligned16(y);
    // the number of partials depends on the shape only (a fixed summation order)
    const int64_t per_block = THREADS * (vec_ok ? VEC : 1) * 8;
    const int nparts = static_cast<int>(std::min<int64_t>(MAX_DOT_BLOCKS, (numel + per_block - 1) / per_block));
    at::Tensor part = at::empty({nparts}, weight.options().dtype(accumulation_type(weight.scalar_type())));
    acc_t* pp = part.mutable_data_ptr<acc_t>();
    const acc_t* sig = sigma.const_data_ptr<acc_t>();
    if (vec_ok) {
      dot_partial_kernel<scalar_t, acc_t, VEC><<<nparts, THREADS, 0, stream>>>(g, w, numel, pp);
    } else {
      dot_partial_kernel<scalar_t, acc_t, 1><<<nparts, THREADS, 0, stream>>>(g, w, numel, pp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const bool small = numel <= INT32_MAX;  // then the (o, i, k) of an element come from 32-bit dividers
    const Div32 div_inner(small ? static_cast<unsigned>(mv.inner) : 1u);
    const Div32 div_m(small ? static_cast<unsigned>(mv.m) : 1u);
    if (vec_ok && mv.outer == 1 && mv.inner % VEC == 0) {
      const auto kernel = grad_kernel<scalar_t, acc_t, VEC>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel / VEC, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig, div_inner, div_m);
    } else {
      const auto kernel = grad_kernel<scalar_t, acc_t, 1>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig, div_inner, div_m);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_kernels, CUDA, m) {
  m.impl("native_power_iteration", &power_iteration_cuda);
  m.impl("native_normalize", &normalize_cuda);
  m.impl("native_backward", &backward_cuda);
}

}  // namespace sn_kernels
