// Multi-tensor CUDA kernels of sn_kernels.group: every weight of one (device, dtype) list in a fixed
// number of launches, whatever the number of weights.
//
//   training, k power iterations   2k mat-vec passes + 1 division (W / sigma)      = 2k + 1 launches
//   eval                           1 pass (sigma = u . W v, copies of u and v) + 1 = 2
//   backward                       <G, W> partials + grad = (G - c u v^T) / sigma  = 2
//
// Design.  A launch covers a list of weights; weight i owns the blocks [first[i], first[i + 1]) of the
// grid and a block finds its weight by a binary search of `first`.  Inside its range a block runs the
// per-weight kernels' body (cuda_common.cuh) with its index in the range in place of blockIdx, over
// the same plan (make_plan: the row split of W x, the (tiles, chunks) grid of W^T y), the same
// workspace layout and the same ticket counters (per weight: an offset into the stream's counters),
// so the last block of each weight finishes that weight, and every weight's results are bit-identical
// to the per-weight kernels' (sn_kernels_cuda.cu).  A pass that computes u runs the row body on a
// weight whose kernels' matrix is W and the column body on one read transposed (kernel_view), in the
// same launch.  The elementwise passes (W / sigma, grad) cut each weight into items of ELEM_ITEM
// elements, so weights whose sizes differ by 10^4x balance across the blocks.
//
// Metadata.  The per-launch table (the weights' addresses, matrix views, workspace and counter
// offsets, block ranges) is ONE kernel argument passed by value (GroupArgs), as apex's
// multi_tensor_apply does: no host-to-device copy, nothing for a CUDA graph to keep alive, so the
// launches capture and replay as any kernel.  Its size limit is checked at compile time: 32764 bytes
// (CUDA >= 12.1 on sm_70 and newer: every arch of the build, __CUDA_ARCH_LIST__) or the classic 4096;
// GroupArgs<...>::CAPACITY weights fit (at least 256 with the large limit: static_assert).  A longer
// list is cut into consecutive slices of CAPACITY weights (and of fewer than 2^31 blocks per launch),
// each slice running the launches above: ceil(weights / CAPACITY) x (2k + 1) launches in all.
//
// Determinism.  The plans and item sizes depend on the shapes (and the 16-byte alignment that picks
// the vector width) only; every sum has a fixed order (fixed trees, the last block of a ticket sums the
// partials in index order), no float atomics.  No host synchronisation; the weights' device is
// guarded and the work queued on its current stream.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda_common.cuh"
#include "grouped_cuda.h"

namespace sn_kernels {
namespace cuda {
namespace {

// ------------------------------------------------------------------ the kernel-argument limit

// the lowest compute capability the build compiles for (nvcc defines __CUDA_ARCH_LIST__ in the host and
// the device passes alike, so both see the same GroupArgs layout)
constexpr int lowest_arch() {
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  int lowest = archs[0];
  for (int a : archs) lowest = a < lowest ? a : lowest;
  return lowest;
#else
  return 0;
#endif
}

constexpr bool LARGE_PARAMS = CUDART_VERSION >= 12010 && lowest_arch() >= 700;
constexpr size_t PARAM_BYTES = LARGE_PARAMS ? 32764 : 4096;

constexpr int64_t ELEM_ITEM = 16384;  // elements per block of the elementwise passes (a multiple of every VEC)
constexpr int64_t MAX_GRID = INT32_MAX;  // blocks per launch (gridDim.x)

// One launch: what every block does (Pass) and the weights, weight i owning the blocks
// [first[i], first[i + 1]).  Passed by value as the kernel's only argument.
template <typename Weight, typename Pass>
struct GroupArgs {
  static constexpr int CAPACITY =
      static_cast<int>((PARAM_BYTES - sizeof(Pass) - 2 * sizeof(uint32_t) - 16) / (sizeof(Weight) + sizeof(uint32_t)));
  Pass pass;
  int32_t count;
  uint32_t first[CAPACITY + 1];
  Weight weight[CAPACITY];
};

// the weight that owns `block`: the last i with first[i] <= block (first[0] == 0, strictly increasing)
__device__ __forceinline__ int weight_of(const uint32_t* first, int count, uint32_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first[mid] <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// This block's weight in a launch and its index among that weight's blocks.
template <typename Weight>
struct Mine {
  const Weight& weight;
  int64_t block;
};

template <typename Args>
__device__ __forceinline__ auto mine(const Args& args) {
  const int i = weight_of(args.first, args.count, blockIdx.x);
  return Mine<std::remove_cv_t<std::remove_reference_t<decltype(args.weight[0])>>>{
      args.weight[i], static_cast<int64_t>(blockIdx.x - args.first[i])};
}

// f(std::integral_constant<int, VEC>) where `vector` (a per-weight choice), else f(... 1)
template <int VEC, typename F>
__device__ __forceinline__ void by_width(bool vector, F f) {
  if (vector)
    f(std::integral_constant<int, VEC>{});
  else
    f(std::integral_constant<int, 1>{});
}

// the share of this thread in item `item` of an elementwise pass over [0, len), `per_item` per item
__device__ __forceinline__ Stride item_stride(int64_t item, int64_t len, int64_t per_item) {
  const int64_t lo = item * per_item;
  return {lo + threadIdx.x, blockDim.x, min64(len, lo + per_item)};
}

// ------------------------------------------------------------------ forward

// One weight of a forward launch.
struct FwdWeight {
  const void* w;      // the weight (contiguous)
  const void* u_in;   // the stored u, v (read only: the op is functional)
  const void* v_in;
  void* u_new;        // the returned u, v
  void* v_new;
  void* out;          // W / sigma
  void* sigma;        // accumulation dtype
  MatrixView kv;      // the kernels' matrix (kernel_view)
  int64_t ws;         // offset of the weight's workspace (accumulation dtype elements)
  uint32_t counters;  // offset of the weight's ticket counters
  int32_t vec;        // elements per load of the mat-vec passes (matvec_vec)
  bool transposed;    // kv is W^T (kernel_view)
  bool vec_elem;      // W / sigma by 16-byte vectors
};

// u has m elements of the (m, n) view: kv.m, or kv.inner when kv is W^T
__host__ __device__ inline int64_t u_len(const FwdWeight& e) { return e.transposed ? e.kv.inner : e.kv.m; }

struct FwdPass {
  void* ws;                // accumulation dtype
  unsigned int* counters;
  Finish fin;
  bool to_u;               // this pass computes u = normalize(W v), else v = normalize(W^T u)
  bool prev_stored;        // a rejected step keeps the stored vector (first iteration), else the workspace's
};

using FwdArgs = GroupArgs<FwdWeight, FwdPass>;
static_assert(sizeof(FwdArgs) <= PARAM_BYTES, "the forward launch's argument exceeds the kernel-argument limit");
static_assert(!LARGE_PARAMS || FwdArgs::CAPACITY >= 256, "a forward launch should take 256 weights");

// A half power iteration of every weight: u = normalize(W x) or v = normalize(W^T x), x the stored
// vector (X_STORED: the first pass) or the workspace's.  Block `block` of a weight runs block `block`
// of the per-weight kernel that power_iteration_cuda would launch for that half (row_dot or
// col_partial), with the same arguments, except that the result goes to u_new / v_new only.
template <typename scalar_t, bool X_STORED>
__global__ void __launch_bounds__(THREADS) group_matvec_kernel(const FwdArgs args) {
  using acc_t = acc_type_t<scalar_t>;
  using x_t = std::conditional_t<X_STORED, scalar_t, acc_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto me = mine(args);
  const auto& e = me.weight;
  const int64_t block = me.block;
  const FwdPass& pass = args.pass;
  const MatrixView& kv = e.kv;
  const Plan p = make_plan(kv, e.vec);
  acc_t* ws = static_cast<acc_t*>(pass.ws) + e.ws;
  const Workspace lay = workspace_layout(kv, u_len(e), p, true);
  const bool to_u = pass.to_u;
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  const x_t* x;
  if constexpr (X_STORED)
    x = static_cast<const scalar_t*>(to_u ? e.v_in : e.u_in);
  else
    x = ws + (to_u ? lay.va : lay.ua);
  const scalar_t* prev = pass.prev_stored ? static_cast<const scalar_t*>(to_u ? e.u_in : e.v_in) : nullptr;
  scalar_t* out = static_cast<scalar_t*>(to_u ? e.u_new : e.v_new);
  acc_t* acc = ws + (to_u ? lay.ua : lay.va);
  acc_t* sigma = static_cast<acc_t*>(e.sigma);
  unsigned int* counters = pass.counters + e.counters;
  if (to_u != e.transposed) {  // W x (to u) or W^T x (to v, kv = W^T): the row pass of kv
    by_width<VEC>(e.vec == VEC, [&](auto width) {
      row_dot_block<scalar_t, acc_t, x_t, width()>(block, p.row_blocks, w, kv.outer, kv.m, kv.inner, x, p.wpr, p.span,
                                                   ws + lay.s_part, ws + lay.s, counters, pass.fin, out, nullptr,
                                                   sigma, prev, nullptr, nullptr, acc);
    });
  } else {  // the column pass of kv, as a (tiles, chunks) grid
    const int64_t tile = block % p.tiles, chunk = block / p.tiles;
    by_width<VEC>(e.vec == VEC, [&](auto width) {
      col_partial_block<scalar_t, acc_t, x_t, width()>(tile, chunk, p.tiles, p.chunks, w, kv.outer, kv.m, kv.inner,
                                                       x, p.rows, ws + lay.partial, ws + lay.t, ws + lay.tile_sq,
                                                       counters, pass.fin, out, nullptr, sigma, acc, prev);
    });
  }
}

// Eval: sigma = u . (W v) of every weight, and the copies u_new = u, v_new = v: the row pass of the
// kernels' matrix with its own vector as x (for kv = W^T: sigma = v . (W^T u), the roles of u, v swapped),
// as power_iteration_cuda launches it.
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) group_eval_kernel(const FwdArgs args) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto me = mine(args);
  const auto& e = me.weight;
  const int64_t block = me.block;
  const MatrixView& kv = e.kv;
  const Plan p = make_plan(kv, e.vec);
  acc_t* ws = static_cast<acc_t*>(args.pass.ws) + e.ws;
  const Workspace lay = workspace_layout(kv, u_len(e), p, false);
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  // (a, b) = (u, v) of the kernels' matrix: a has kv.m elements, b kv.n
  const scalar_t* a_in = static_cast<const scalar_t*>(e.transposed ? e.v_in : e.u_in);
  const scalar_t* b_in = static_cast<const scalar_t*>(e.transposed ? e.u_in : e.v_in);
  scalar_t* a_new = static_cast<scalar_t*>(e.transposed ? e.v_new : e.u_new);
  scalar_t* b_new = static_cast<scalar_t*>(e.transposed ? e.u_new : e.v_new);
  acc_t* sigma = static_cast<acc_t*>(e.sigma);
  unsigned int* counter = args.pass.counters + e.counters;
  by_width<VEC>(e.vec == VEC, [&](auto width) {
    row_dot_block<scalar_t, acc_t, scalar_t, width()>(block, p.row_blocks, w, kv.outer, kv.m, kv.inner, b_in, p.wpr,
                                                      p.span, ws + lay.s_part, ws + lay.s, counter, args.pass.fin,
                                                      nullptr, a_new, sigma, a_in, b_in, b_new, nullptr);
  });
}

// W / sigma of every weight, item (weight, block) = ELEM_ITEM elements
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) group_divide_kernel(const FwdArgs args) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto me = mine(args);
  const auto& e = me.weight;
  const int64_t block = me.block;
  const int64_t numel = e.kv.outer * e.kv.m * e.kv.inner;
  const acc_t sig = safe_sigma(*static_cast<const acc_t*>(e.sigma));
  by_width<VEC>(e.vec_elem, [&](auto width) {
    divide_strided<scalar_t, acc_t, width()>(static_cast<const scalar_t*>(e.w), static_cast<scalar_t*>(e.out), sig,
                                             item_stride(block, numel / width(), ELEM_ITEM / width()));
  });
}

// ------------------------------------------------------------------ backward

// One weight of a backward launch.
struct BwdWeight {
  const void* g;      // the incoming gradient (contiguous)
  const void* w;
  const void* u;
  const void* v;
  const void* sigma;  // accumulation dtype
  void* out;          // grad_W
  int64_t m, inner, numel;  // the (outer, m, inner) view
  int64_t partial;    // offset of the weight's <G, W> partials in the workspace
  Div32 div_inner, div_m;   // grad_dividers
  int32_t nparts;     // dot_parts: as many as backward_cuda's dot_partial blocks
  bool vec_dot;       // <G, W> by 16-byte vectors (backward_cuda's rule)
  bool vec_grad;      // grad by 16-byte vectors
};

struct BwdPass {
  void* ws;  // accumulation dtype
};

using BwdArgs = GroupArgs<BwdWeight, BwdPass>;
static_assert(sizeof(BwdArgs) <= PARAM_BYTES, "the backward launch's argument exceeds the kernel-argument limit");
static_assert(!LARGE_PARAMS || BwdArgs::CAPACITY >= 256, "a backward launch should take 256 weights");

// partial b of <G, W>: block b of backward_cuda's dot_partial grid of nparts blocks
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) group_dot_kernel(const BwdArgs args) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto me = mine(args);
  const auto& e = me.weight;
  const int64_t block = me.block;
  acc_t acc;
  by_width<VEC>(e.vec_dot, [&](auto width) {
    acc = dot_strided<scalar_t, acc_t, width()>(static_cast<const scalar_t*>(e.g), static_cast<const scalar_t*>(e.w),
                                                grid_stride(block, e.nparts, e.numel / width()));
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) static_cast<acc_t*>(args.pass.ws)[e.partial + block] = acc;
}

// grad = (G - c u v^T) / sigma, item (weight, block) = ELEM_ITEM elements; every block sums the weight's
// partials into c in the same fixed order
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) group_grad_kernel(const BwdArgs args) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto me = mine(args);
  const auto& e = me.weight;
  const int64_t block = me.block;
  const acc_t sig = safe_sigma(*static_cast<const acc_t*>(e.sigma));
  const acc_t c = grad_coefficient(static_cast<const acc_t*>(args.pass.ws) + e.partial, e.nparts, sig);
  by_width<VEC>(e.vec_grad, [&](auto width) {
    grad_strided<scalar_t, acc_t, width()>(static_cast<const scalar_t*>(e.g), static_cast<scalar_t*>(e.out), e.m,
                                           e.inner, e.numel, static_cast<const scalar_t*>(e.u),
                                           static_cast<const scalar_t*>(e.v), c, sig, e.div_inner, e.div_m,
                                           item_stride(block, e.numel / width(), ELEM_ITEM / width()));
  });
}

// ------------------------------------------------------------------ host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The weights [begin, end) of a list in launches of at most CAPACITY weights and fewer than MAX_GRID
// blocks per launch: the next slice after `begin` (blocks[i]: weight i's largest block count of any pass).
template <typename Args>
size_t slice_end(const std::vector<int64_t>& blocks, size_t begin) {
  int64_t total = 0;
  size_t end = begin;
  while (end < blocks.size() && end - begin < static_cast<size_t>(Args::CAPACITY) && total + blocks[end] <= MAX_GRID)
    total += blocks[end++];
  TORCH_CHECK(end > begin, "sn_kernels: a weight too large for one grouped CUDA launch (", blocks[begin], " blocks)");
  return end;
}

// Launches `kernel` over the weights [begin, end) of `args` (already filled from index 0), weight i owning
// blocks_of(i) blocks.
template <typename Args, typename Kernel, typename BlocksOf>
void launch(Kernel kernel, Args& args, size_t begin, size_t end, BlocksOf blocks_of, cudaStream_t stream) {
  uint32_t total = 0;
  for (size_t i = begin; i < end; ++i) {
    args.first[i - begin] = total;
    total += static_cast<uint32_t>(blocks_of(i));
  }
  args.first[end - begin] = total;
  args.count = static_cast<int32_t>(end - begin);
  kernel<<<total, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a weight's block counts in the forward's launches
struct FwdBlocks {
  int64_t row, col, elem;
  int64_t most() const { return std::max({row, col, elem}); }
};

template <typename scalar_t>
void forward_cuda(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                  const std::vector<at::Tensor>& vs, const std::vector<MatrixView>& views, int64_t iterations,
                  double eps, bool vu, bool training, std::vector<at::Tensor>& outs, std::vector<at::Tensor>& sigmas,
                  std::vector<at::Tensor>& new_us, std::vector<at::Tensor>& new_vs) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const size_t k = weights.size();
  const at::Device device = weights[0].device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = weights[0].options().dtype(accumulation_type(weights[0].scalar_type()));
  std::vector<FwdWeight> table(k);
  std::vector<FwdBlocks> blocks(k);
  std::vector<int64_t> most(k);
  int64_t ws_size = 0, counters = 0;
  for (size_t i = 0; i < k; ++i) {
    const at::Tensor& w = weights[i];
    outs[i] = at::empty_like(w);
    sigmas[i] = at::empty({}, acc_opts);
    new_us[i] = at::empty_like(us[i]);
    new_vs[i] = at::empty_like(vs[i]);
    FwdWeight& e = table[i];
    e.w = w.const_data_ptr<scalar_t>();
    e.u_in = us[i].const_data_ptr<scalar_t>();
    e.v_in = vs[i].const_data_ptr<scalar_t>();
    e.u_new = new_us[i].mutable_data_ptr<scalar_t>();
    e.v_new = new_vs[i].mutable_data_ptr<scalar_t>();
    e.out = outs[i].mutable_data_ptr<scalar_t>();
    e.sigma = sigmas[i].mutable_data_ptr<acc_t>();
    e.kv = kernel_view(views[i], e.transposed);
    e.vec = matvec_vec(w.const_data_ptr<scalar_t>(), e.kv);
    const int64_t numel = w.numel();
    e.vec_elem = numel % VEC == 0 && aligned16(static_cast<const scalar_t*>(e.w)) &&
                 aligned16(static_cast<scalar_t*>(e.out));
    const Plan p = make_plan(e.kv, e.vec);
    e.ws = ws_size;
    ws_size += workspace_layout(e.kv, u_len(e), p, training).size;
    e.counters = static_cast<uint32_t>(counters);
    counters += training ? p.tiles + 1 : 1;
    blocks[i] = {p.row_blocks, p.tiles * p.chunks, ceil_div(numel, ELEM_ITEM)};
    most[i] = blocks[i].most();
  }
  TORCH_CHECK(counters <= UINT32_MAX, "sn_kernels: too many ticket counters for one grouped CUDA call");
  at::Tensor ws = at::empty({std::max<int64_t>(ws_size, 1)}, acc_opts);
  at::Tensor keep_counters;
  FwdArgs args{};
  args.pass.ws = ws.mutable_data_ptr<acc_t>();
  args.pass.counters = stream_counters(device, stream, counters, keep_counters);
  for (size_t begin = 0; begin < k;) {
    const size_t end = slice_end<FwdArgs>(most, begin);
    std::copy(table.begin() + begin, table.begin() + end, args.weight);
    const auto elem_blocks = [&](size_t i) { return blocks[i].elem; };
    if (!training) {
      args.pass.fin = Finish{eps, true, false, true};
      launch(group_eval_kernel<scalar_t>, args, begin, end, [&](size_t i) { return blocks[i].row; }, stream);
    }
    for (int64_t it = 0; training && it < iterations; ++it) {
      const bool last = it + 1 == iterations;
      // "uv": u = normalize(W v), then v = normalize(W^T u); "vu" the other way round.  On the first
      // iteration the first half reads the stored vector, and a rejected step keeps the stored ones.
      for (int half = 0; half < 2; ++half) {
        args.pass.fin = Finish{eps, false, last, last && half == 1};
        args.pass.to_u = vu == (half == 1);
        args.pass.prev_stored = it == 0;
        const bool row = args.pass.to_u;  // the row pass of W (the column pass where kv = W^T)
        const auto matvec_blocks = [&](size_t i) {
          return row != table[i].transposed ? blocks[i].row : blocks[i].col;
        };
        if (it == 0 && half == 0)
          launch(group_matvec_kernel<scalar_t, true>, args, begin, end, matvec_blocks, stream);
        else
          launch(group_matvec_kernel<scalar_t, false>, args, begin, end, matvec_blocks, stream);
      }
    }
    launch(group_divide_kernel<scalar_t>, args, begin, end, elem_blocks, stream);
    begin = end;
  }
}

template <typename scalar_t>
void backward_cuda(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& weights,
                   const std::vector<at::Tensor>& us, const std::vector<at::Tensor>& vs,
                   const std::vector<at::Tensor>& sigmas, const std::vector<MatrixView>& views,
                   std::vector<at::Tensor>& outs) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const size_t k = weights.size();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<BwdWeight> table(k);
  std::vector<int64_t> grad_blocks(k), most(k);
  int64_t ws_size = 0;
  for (size_t i = 0; i < k; ++i) {
    const at::Tensor& w = weights[i];
    outs[i] = at::empty(w.sizes(), w.options());
    BwdWeight& e = table[i];
    e.g = grads[i].const_data_ptr<scalar_t>();
    e.w = w.const_data_ptr<scalar_t>();
    e.u = us[i].const_data_ptr<scalar_t>();
    e.v = vs[i].const_data_ptr<scalar_t>();
    e.sigma = sigmas[i].const_data_ptr<acc_t>();
    e.out = outs[i].mutable_data_ptr<scalar_t>();
    const MatrixView& mv = views[i];
    e.m = mv.m;
    e.inner = mv.inner;
    e.numel = w.numel();
    const GradDividers div = grad_dividers(mv);
    e.div_inner = div.inner;
    e.div_m = div.m;
    // backward_cuda's choices
    e.vec_dot = e.numel % VEC == 0 && aligned16(static_cast<const scalar_t*>(e.w)) &&
                aligned16(static_cast<const scalar_t*>(e.g)) && aligned16(static_cast<scalar_t*>(e.out));
    e.vec_grad = e.vec_dot && mv.outer == 1 && mv.inner % VEC == 0;
    e.nparts = e.vec_dot ? dot_parts<VEC>(e.numel) : dot_parts<1>(e.numel);
    e.partial = ws_size;
    ws_size += e.nparts;
    grad_blocks[i] = ceil_div(e.numel, ELEM_ITEM);
    most[i] = std::max<int64_t>(grad_blocks[i], e.nparts);
  }
  const auto acc_opts = weights[0].options().dtype(accumulation_type(weights[0].scalar_type()));
  at::Tensor ws = at::empty({std::max<int64_t>(ws_size, 1)}, acc_opts);
  BwdArgs args{};
  args.pass.ws = ws.mutable_data_ptr<acc_t>();
  for (size_t begin = 0; begin < k;) {
    const size_t end = slice_end<BwdArgs>(most, begin);
    std::copy(table.begin() + begin, table.begin() + end, args.weight);
    launch(group_dot_kernel<scalar_t>, args, begin, end, [&](size_t i) { return table[i].nparts; }, stream);
    launch(group_grad_kernel<scalar_t>, args, begin, end, [&](size_t i) { return grad_blocks[i]; }, stream);
    begin = end;
  }
}

}  // namespace
}  // namespace cuda

bool group_cuda_qualifies(const at::Tensor& weight) {
  const auto t = weight.scalar_type();
  return weight.is_cuda() && weight.is_contiguous() &&
         (t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
group_forward_cuda(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                   const std::vector<at::Tensor>& vs, const std::vector<MatrixView>& views,
                   int64_t n_power_iterations, double eps, bool vu, bool training) {
  const size_t k = weights.size();
  std::vector<at::Tensor> outs(k), sigmas(k), new_us(k), new_vs(k);
  if (k == 0) return {outs, sigmas, new_us, new_vs};
  const c10::cuda::CUDAGuard guard(weights[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "sn_group_forward_cuda", [&] {
    cuda::forward_cuda<scalar_t>(weights, us, vs, views, n_power_iterations, eps, vu, training, outs, sigmas, new_us,
                                 new_vs);
  });
  return {std::move(outs), std::move(sigmas), std::move(new_us), std::move(new_vs)};
}

std::vector<at::Tensor> group_backward_cuda(const std::vector<at::Tensor>& grads,
                                            const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                                            const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
                                            const std::vector<MatrixView>& views) {
  const size_t k = weights.size();
  std::vector<at::Tensor> outs(k);
  if (k == 0) return outs;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  // contiguous copies where needed (as backward_cuda makes), alive until the launches are queued
  std::vector<at::Tensor> g(k), u(k), v(k);
  for (size_t i = 0; i < k; ++i) {
    g[i] = grads[i].contiguous();
    u[i] = us[i].contiguous();
    v[i] = vs[i].contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "sn_group_backward_cuda", [&] {
    cuda::backward_cuda<scalar_t>(g, weights, u, v, sigmas, views, outs);
  });
  return outs;
}

}  // namespace sn_kernels
