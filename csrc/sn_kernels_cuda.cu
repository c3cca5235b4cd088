// The native backend: CUDA kernels.
//
// Launches (one power iteration): "uv" = row_dot (s = W v, last block: u = s/|s|) +
// col_partial (t = W^T u, last block per column tile combines the row chunks, last
// tile: v = t/|t|, sigma) ; "vu" the same two in the other order; + normalize = 3.
// Eval: row_dot (last block: sigma = u.s) + normalize = 2.  Backward: dot_partial
// (<G, W> per block) + grad (every block sums the partials in the same fixed order) = 2.
// All reductions are fixed-order trees (no float atomics); the "last block" is found
// with an integer counter per stream that the last block resets to zero, so no memset
// is needed.  sigma is read from device memory: no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <type_traits>

#include "common.h"

namespace sn_kernels {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int64_t TARGET_BLOCKS = 512;  // the row-chunk split of W^T u depends on the shape only
constexpr int MAX_DOT_BLOCKS = 1024;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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

// prev <- x / max(|x|, eps) unless |x| is zero or not finite (a zero or non-finite weight: the previous
// vector is kept, read from prev_in in the weight dtype when given, else from prev); optionally also
// written to out1, out2 (weight dtype).  Returns |x|^2 / max(|x|, eps).  Run by one whole block.
template <typename scalar_t, typename acc_t>
__device__ acc_t block_normalize(const acc_t* x, acc_t* prev, const scalar_t* prev_in, int64_t len, double eps,
                                 scalar_t* out1, scalar_t* out2) {
  acc_t ss = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    const acc_t xk = __ldcg(x + k);
    ss += xk * xk;
  }
  ss = block_sum(ss);
  const acc_t norm = sqrt(ss);
  const acc_t denom = norm > static_cast<acc_t>(eps) ? norm : static_cast<acc_t>(eps);
  const bool accept = isfinite(norm) && norm > 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    const acc_t val = accept ? __ldcg(x + k) / denom : (prev_in != nullptr ? static_cast<acc_t>(prev_in[k]) : prev[k]);
    prev[k] = val;
    if (out1 != nullptr) {
      out1[k] = static_cast<scalar_t>(val);
      out2[k] = static_cast<scalar_t>(val);
    }
  }
  return norm * norm / denom;
}

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

// s = W x, one warp per row; the last block finishes: training: u = s / max(|s|, eps) (+ sigma);
// eval: sigma = u . s, u_used = u, v_used = v.
template <typename scalar_t, typename acc_t, typename x_t, int VEC>
__global__ void __launch_bounds__(THREADS) row_dot_kernel(
    const scalar_t* __restrict__ w, int64_t outer, int64_t m, int64_t inner, const x_t* __restrict__ x,
    acc_t* s, unsigned int* counter, Finish fin, scalar_t* u_out, scalar_t* u_used, acc_t* sigma,
    const scalar_t* u_in, const scalar_t* v_in, scalar_t* v_used, acc_t* u_acc) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  if (row < m) {
    acc_t acc = 0;
    if constexpr (VEC > 1) {
      // outer == 1, inner % VEC == 0, 16-byte aligned rows
      using V = Vec<scalar_t, VEC>;
      const V* wr = reinterpret_cast<const V*>(w + row * inner);
      const int64_t nv = inner / VEC;
#pragma unroll 4
      for (int64_t q = lane; q < nv; q += 32) {
        const V a = wr[q];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(a.v[e]) * ld<acc_t>(x, q * VEC + e);
      }
    } else {
      for (int64_t o = 0; o < outer; ++o) {
        const scalar_t* wr = w + (o * m + row) * inner;
        const x_t* xr = x + o * inner;
        for (int64_t k = lane; k < inner; k += 32) acc += static_cast<acc_t>(wr[k]) * ld<acc_t>(xr, k);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) s[row] = acc;
  }
  if (!arrive_last(counter, gridDim.x)) return;
  if (fin.eval) {
    acc_t d = 0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const scalar_t ui = u_in[i];
      d += static_cast<acc_t>(ui) * __ldcg(s + i);
      u_used[i] = ui;
    }
    d = block_sum(d);
    const int64_t n = outer * inner;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v_used[j] = v_in[j];
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
      for (int64_t i = i0; i < i1; ++i) acc[0] += static_cast<acc_t>(wc[i * inner]) * ld<acc_t>(y, i);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (j0 + e < n) partial[chunk * n + j0 + e] = acc[e];
  }
  // last chunk of this column tile: combine the chunks in order
  if (!arrive_last(counters + 1 + tile, chunks)) return;
  acc_t sq = 0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int64_t j = j0 + e;
    if (j < n) {
      acc_t tj = 0;
      for (int64_t c = 0; c < chunks; ++c) tj += __ldcg(partial + c * n + j);
      t[j] = tj;
      sq += tj * tj;
    }
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) tile_sq[tile] = sq;
  // last tile: v = t / max(|t|, eps)
  if (!arrive_last(counters, gridDim.x)) return;
  acc_t ss = 0;
  for (int64_t q = 0; q < static_cast<int64_t>(gridDim.x); ++q) ss += __ldcg(tile_sq + q);  // fixed order
  const acc_t norm = sqrt(ss);
  const acc_t denom = norm > static_cast<acc_t>(fin.eps) ? norm : static_cast<acc_t>(fin.eps);
  const bool accept = isfinite(norm) && norm > 0;  // else keep the previous v (zero or non-finite weight)
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t vj = accept ? __ldcg(t + j) / denom : (v_in != nullptr ? static_cast<acc_t>(v_in[j]) : v_acc[j]);
    v_acc[j] = vj;
    if (fin.write_out) {
      v_out[j] = static_cast<scalar_t>(vj);
      v_used[j] = static_cast<scalar_t>(vj);
    }
  }
  if (fin.want_sigma && threadIdx.x == 0) *sigma = norm * norm / denom;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) normalize_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                                            int64_t numel, const acc_t* __restrict__ sigma) {
  const acc_t sig = safe_sigma(*sigma);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    const int64_t nv = numel / VEC;
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nv; q += stride) {
      V a = reinterpret_cast<const V*>(w)[q];
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = static_cast<scalar_t>(static_cast<acc_t>(a.v[e]) / sig);
      reinterpret_cast<V*>(out)[q] = a;
    }
  } else {
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < numel; k += stride)
      out[k] = static_cast<scalar_t>(static_cast<acc_t>(w[k]) / sig);
  }
}

// partial[b] = sum over this block's grid-stride share of G * W
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) dot_partial_kernel(const scalar_t* __restrict__ g,
                                                              const scalar_t* __restrict__ w, int64_t numel,
                                                              acc_t* __restrict__ partial) {
  acc_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (VEC > 1) {
    using V = Vec<scalar_t, VEC>;
    const int64_t nv = numel / VEC;
    for (int64_t q = start; q < nv; q += stride) {
      const V a = reinterpret_cast<const V*>(g)[q], b = reinterpret_cast<const V*>(w)[q];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(a.v[e]) * static_cast<acc_t>(b.v[e]);
    }
  } else {
    for (int64_t k = start; k < numel; k += stride) acc += static_cast<acc_t>(g[k]) * static_cast<acc_t>(w[k]);
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
                                                       const acc_t* __restrict__ sigma) {
  acc_t c = 0;
  for (int b = threadIdx.x; b < nparts; b += blockDim.x) c += partial[b];
  c = block_sum(c);
  const acc_t sig = safe_sigma(*sigma);
  c = c / sig;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (VEC > 1) {
    // outer == 1 and inner % VEC == 0: a vector lies in one row
    using V = Vec<scalar_t, VEC>;
    const int64_t nv = numel / VEC;
    for (int64_t q = start; q < nv; q += stride) {
      const int64_t e0 = q * VEC, i = e0 / inner, j = e0 % inner;
      const acc_t ui = static_cast<acc_t>(u[i]);
      V a = reinterpret_cast<const V*>(g)[q];
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        a.v[e] = static_cast<scalar_t>((static_cast<acc_t>(a.v[e]) - c * (ui * static_cast<acc_t>(v[j + e]))) / sig);
      reinterpret_cast<V*>(out)[q] = a;
    }
  } else {
    for (int64_t e = start; e < numel; e += stride) {
      const int64_t k = e % inner, r = e / inner, i = r % m, o = r / m;
      const acc_t uv = static_cast<acc_t>(u[i]) * static_cast<acc_t>(v[o * inner + k]);
      out[e] = static_cast<scalar_t>((static_cast<acc_t>(g[e]) - c * uv) / sig);
    }
  }
}

// ------------------------------------------------------------------ host side

// Per-(device, stream) zero-initialised counters; each kernel's last block resets what it used.
unsigned int* stream_counters(const at::Device& device, cudaStream_t stream, int64_t needed) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> buffers;
  std::lock_guard<std::mutex> lock(mu);
  auto& buf = buffers[{device.index(), stream}];
  if (!buf.defined() || buf.numel() < needed) {
    // a new buffer (zeroed on this stream); the old one may still be in use by queued kernels, so it is
    // kept alive by the caching allocator's stream semantics (record_stream is implicit on the same stream)
    buf = at::zeros({std::max<int64_t>(needed, 1024)}, at::TensorOptions().device(device).dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(buf.data_ptr<int>());
}

template <typename T>
bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

int64_t grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 8));
}

template <typename scalar_t, typename x_t>
void launch_row_dot(const scalar_t* w, const MatrixView& mv, const x_t* x, acc_type_t<scalar_t>* s,
                    unsigned int* counter, Finish fin, scalar_t* u_out, scalar_t* u_used, acc_type_t<scalar_t>* sigma,
                    const scalar_t* u_in, const scalar_t* v_in, scalar_t* v_used, acc_type_t<scalar_t>* u_acc,
                    cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const dim3 grid(static_cast<unsigned>((mv.m + WARPS - 1) / WARPS));
  if (mv.outer == 1 && mv.inner % VEC == 0 && aligned16(w)) {
    row_dot_kernel<scalar_t, acc_t, x_t, VEC><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, x, s, counter, fin, u_out, u_used, sigma, u_in, v_in, v_used, u_acc);
  } else {
    row_dot_kernel<scalar_t, acc_t, x_t, 1><<<grid, THREADS, 0, stream>>>(
        w, mv.outer, mv.m, mv.inner, x, s, counter, fin, u_out, u_used, sigma, u_in, v_in, v_used, u_acc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct ColPlan {
  int vec;
  int64_t tiles, chunks, rows;
};

template <typename scalar_t>
ColPlan col_plan(const scalar_t* w, const MatrixView& mv) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  ColPlan p;
  p.vec = (mv.outer == 1 && mv.inner % VEC == 0 && aligned16(w)) ? VEC : 1;
  const int64_t n = mv.n();
  p.tiles = (n + THREADS * p.vec - 1) / (THREADS * p.vec);
  const int64_t want = std::max<int64_t>(1, TARGET_BLOCKS / p.tiles);
  p.chunks = std::min<int64_t>({want, std::max<int64_t>(1, mv.m / 8), 65535});
  p.rows = (mv.m + p.chunks - 1) / p.chunks;
  p.chunks = (mv.m + p.rows - 1) / p.rows;
  return p;
}

template <typename scalar_t, typename y_t>
void launch_col_partial(const scalar_t* w, const MatrixView& mv, const ColPlan& p, const y_t* y,
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sn_power_iteration_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t m = mv.m, n = mv.n();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* uu = u_used.mutable_data_ptr<scalar_t>();
    scalar_t* vv = v_used.mutable_data_ptr<scalar_t>();
    acc_t* sig = sigma.mutable_data_ptr<acc_t>();
    if (!training) {
      at::Tensor s = at::empty({m}, weight.options().dtype(acc_dtype));
      unsigned int* counter = stream_counters(weight.device(), stream, 1);
      launch_row_dot<scalar_t, scalar_t>(w, mv, vp, s.mutable_data_ptr<acc_t>(), counter,
                                         Finish{eps, true, false, true}, nullptr, uu, sig, up, vp, vv, nullptr,
                                         stream);
      return;
    }
    const ColPlan plan = col_plan(w, mv);
    // workspace: u (m) | v (n) | s = W v (m) | t = W^T u (n) | partials (chunks * n) | tile sums (tiles)
    at::Tensor ws = at::empty({2 * (m + n) + plan.chunks * n + plan.tiles}, weight.options().dtype(acc_dtype));
    acc_t* ua = ws.mutable_data_ptr<acc_t>();
    acc_t* va = ua + m;
    acc_t* sb = va + n;
    acc_t* tb = sb + m;
    acc_t* partial = tb + n;
    acc_t* tile_sq = partial + plan.chunks * n;
    unsigned int* counters = stream_counters(weight.device(), stream, plan.tiles + 1);
    for (int64_t it = 0; it < n_power_iterations; ++it) {
      const bool last = it + 1 == n_power_iterations;
      const Finish first_half{eps, false, last, false}, second_half{eps, false, last, last};
      // on the first iteration the previous u, v (kept by a rejected step) are read from u, v themselves
      const scalar_t* u_prev = it == 0 ? up : nullptr;
      const scalar_t* v_prev = it == 0 ? vp : nullptr;
      if (vu) {
        if (it == 0)
          launch_col_partial<scalar_t, scalar_t>(w, mv, plan, up, partial, tb, tile_sq, counters, first_half, vp, vv,
                                                 sig, va, v_prev, stream);
        else
          launch_col_partial<scalar_t, acc_t>(w, mv, plan, ua, partial, tb, tile_sq, counters, first_half, vp, vv,
                                              sig, va, v_prev, stream);
        launch_row_dot<scalar_t, acc_t>(w, mv, va, sb, counters, second_half, up, uu, sig, u_prev, nullptr, nullptr,
                                        ua, stream);
      } else {
        if (it == 0)
          launch_row_dot<scalar_t, scalar_t>(w, mv, vp, sb, counters, first_half, up, uu, sig, u_prev, nullptr,
                                             nullptr, ua, stream);
        else
          launch_row_dot<scalar_t, acc_t>(w, mv, va, sb, counters, first_half, up, uu, sig, u_prev, nullptr, nullptr,
                                          ua, stream);
        launch_col_partial<scalar_t, acc_t>(w, mv, plan, ua, partial, tb, tile_sq, counters, second_half, vp, vv, sig,
                                            va, v_prev, stream);
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
      normalize_kernel<scalar_t, acc_t, VEC>
          <<<grid_for(numel / VEC, THREADS), THREADS, 0, stream>>>(w, y, numel, sig);
    } else {
      normalize_kernel<scalar_t, acc_t, 1><<<grid_for(numel, THREADS), THREADS, 0, stream>>>(w, y, numel, sig);
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
    if (vec_ok && mv.outer == 1 && mv.inner % VEC == 0) {
      grad_kernel<scalar_t, acc_t, VEC><<<grid_for(numel / VEC, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig);
    } else {
      grad_kernel<scalar_t, acc_t, 1><<<grid_for(numel, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig);
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
