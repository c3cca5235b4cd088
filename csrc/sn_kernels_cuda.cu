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
//
// The kernels' bodies, and the plan and workspace layout of the mat-vec passes, are in
// cuda_common.cuh: the multi-tensor kernels of sn_kernels.group (sn_kernels_grouped_cuda.cu)
// run the same bodies on each weight's blocks of their launches.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
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
#include "cuda_common.cuh"

namespace sn_kernels {
using namespace cuda;

namespace {

// The per-weight kernels: each runs one pass body of cuda_common.cuh over its own grid.

template <typename scalar_t, typename acc_t, typename x_t, int VEC>
__global__ void __launch_bounds__(THREADS) row_dot_kernel(
    const scalar_t* __restrict__ w, int64_t outer, int64_t m, int64_t inner, const x_t* __restrict__ x,
    int64_t wpr, int64_t span, acc_t* s_part, acc_t* s, unsigned int* counter, Finish fin, scalar_t* u_out,
    scalar_t* u_used, acc_t* sigma, const scalar_t* u_in, const scalar_t* v_in, scalar_t* v_used, acc_t* u_acc) {
  row_dot_block<scalar_t, acc_t, x_t, VEC>(blockIdx.x, gridDim.x, w, outer, m, inner, x, wpr, span, s_part, s,
                                           counter, fin, u_out, u_used, sigma, u_in, v_in, v_used, u_acc);
}

template <typename scalar_t, typename acc_t, typename y_t, int VEC>
__global__ void __launch_bounds__(THREADS) col_partial_kernel(
    const scalar_t* __restrict__ w, int64_t outer, int64_t m, int64_t inner, const y_t* __restrict__ y,
    int64_t rows_per_chunk, acc_t* partial, acc_t* t, acc_t* tile_sq, unsigned int* counters, Finish fin,
    scalar_t* v_out, scalar_t* v_used, acc_t* sigma, acc_t* v_acc, const scalar_t* v_in) {
  col_partial_block<scalar_t, acc_t, y_t, VEC>(blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, w, outer, m, inner, y,
                                               rows_per_chunk, partial, t, tile_sq, counters, fin, v_out, v_used,
                                               sigma, v_acc, v_in);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) normalize_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                                            int64_t numel, const acc_t* __restrict__ sigma) {
  divide_strided<scalar_t, acc_t, VEC>(w, out, safe_sigma(*sigma), grid_stride(blockIdx.x, gridDim.x, numel / VEC));
}

// partial[b] = sum over this block's grid-stride share of G * W
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(THREADS) dot_partial_kernel(const scalar_t* __restrict__ g,
                                                              const scalar_t* __restrict__ w, int64_t numel,
                                                              acc_t* __restrict__ partial) {
  const acc_t acc = block_sum(dot_strided<scalar_t, acc_t, VEC>(g, w, grid_stride(blockIdx.x, gridDim.x, numel / VEC)));
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
  const acc_t sig = safe_sigma(*sigma);
  const acc_t c = grad_coefficient(partial, nparts, sig);
  grad_strided<scalar_t, acc_t, VEC>(g, out, m, inner, numel, u, v, c, sig, div_inner, div_m,
                                     grid_stride(blockIdx.x, gridDim.x, numel / VEC));
}

// ------------------------------------------------------------------ host side


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

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(const at::Tensor& weight_, at::Tensor& u,
                                                                    at::Tensor& v, int64_t n_power_iterations,
                                                                    double eps, int64_t dim, c10::string_view order_,
                                                                    bool training) {
  const MatrixView mv = matrix_view(weight_, dim);
  const bool vu = check_power_iteration_args(weight_, u, v, mv, n_power_iterations, eps, order_, training);
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
    const Plan plan = make_plan(kv, matvec_vec(w, kv));
    const int64_t s_len = kv.m + (plan.wpr > 1 ? kv.m * plan.wpr : 0);  // s, then the row slices' partials
    if (!training) {
      at::Tensor s = at::empty({s_len}, weight.options().dtype(acc_dtype));
      acc_t* sp = s.mutable_data_ptr<acc_t>();
      unsigned int* counter = cuda::stream_counters(weight.device(), stream, 1, keep_counters);
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
    unsigned int* counters = cuda::stream_counters(weight.device(), stream, plan.tiles + 1, keep_counters);
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
  if (training) bump_versions(u, v);
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
  // the dispatcher sends any call with a CUDA tensor here: a CPU grad or sigma would reach the kernels as a
  // host pointer
  TORCH_CHECK(grad_.device() == weight_.device() && sigma.device() == weight_.device(),
              "sn_kernels: grad and sigma must be on the weight's device");
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
    const int nparts = vec_ok ? dot_parts<VEC>(numel) : dot_parts<1>(numel);
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
    const GradDividers div = grad_dividers(mv);
    if (vec_ok && mv.outer == 1 && mv.inner % VEC == 0) {
      const auto kernel = grad_kernel<scalar_t, acc_t, VEC>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel / VEC, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig, div.inner, div.m);
    } else {
      const auto kernel = grad_kernel<scalar_t, acc_t, 1>;
      kernel<<<grid_for(reinterpret_cast<const void*>(kernel), numel, THREADS), THREADS, 0, stream>>>(
          g, y, mv.m, mv.inner, numel, up, vp, pp, nparts, sig, div.inner, div.m);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

namespace cuda {

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

}  // namespace cuda

TORCH_LIBRARY_IMPL(sn_kernels, CUDA, m) {
  m.impl("native_power_iteration", &power_iteration_cuda);
  m.impl("native_normalize", &normalize_cuda);
  m.impl("native_backward", &backward_cuda);
}

}  // namespace sn_kernels
