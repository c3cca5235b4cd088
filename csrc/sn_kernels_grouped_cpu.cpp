// Grouped (multi-tensor) entry points of the native backend, for sn_kernels.group:
//
//   native_group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training)
//       -> (weight_sns, sigmas, new_us, new_vs)
//   native_group_backward(grads, weights, us, vs, sigmas, dims) -> grad_weights
//
// Both ops are functional: the forward returns the iterated u, v as new tensors and the caller copies
// them into the buffers (sn_kernels/grouped.py, one torch._foreach_copy_), so the ops can be traced
// (fake implementations in sn_kernels/backends/native.py, torch.compile, opcheck's AOT dispatch test).
//
// CPU float32 weights whose matrix view is row-major (dim = 0, or nothing before dim): one call runs
// every weight's power iteration and W / sigma, and one call every weight's gradient, as a few
// parallel phases over a per-call TABLE of (weight, chunk) work items, as apex's multi_tensor_apply
// does: a phase lists the items of all the weights (row chunks of W v and W^T u, column ranges,
// element ranges of W / sigma, blocks of <G, W>, row ranges of grad_W), sorts them largest first and
// the threads take them from a shared counter, so a 3x64 weight and a 1536x13824 one share the same
// few parallel regions instead of each weight paying its own (forward: 3 regions for "uv", 4 for
// "vu"; backward: 2; not 3-5 per weight).  A small weight (see run_whole) is one item that runs its
// whole forward (every iteration and W / sigma) or whole backward on one core, out of its L2.  Only the assignment of
// items to threads varies: every item writes its own outputs, and every sum is over the partition
// of the per-weight kernels (sn_kernels_cpu.cpp: the same row chunks, chunk order, dot blocks and
// inner loops), so the results are bit-identical to the per-module native path for any thread count.
//
// Contiguous CUDA weights of float32, float16, bfloat16 or float64 run the multi-tensor CUDA kernels
// (sn_kernels_grouped_cuda.cu, CUDA builds only): a fixed number of launches for all the weights of one
// (device, dtype), results bit-identical to the per-weight CUDA kernels.
//
// Other weights (other dtypes, other layouts, non-contiguous) run the per-weight kernels
// (native_power_iteration, native_normalize, native_backward) inside the same call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu_block_cache.h"
#include "cpu_loops.h"
#include "cpu_stream.h"
#ifdef SN_KERNELS_WITH_CUDA
#include "grouped_cuda.h"
#endif

namespace sn_kernels {
namespace grouped_baseline {
#include "cpu_f32_loops.h"
}  // namespace grouped_baseline
}  // namespace sn_kernels

namespace sn_kernels {
namespace {

// The partition constants of sn_kernels_cpu.cpp (results depend on them: keep them equal)
constexpr int64_t MAX_CHUNKS = 32;       // row chunks of W^T u
constexpr int64_t MIN_CHUNK_ROWS = 32;
constexpr int64_t DOT_BLOCK = 1 << 14;   // elements per partial of <G, W>
// Scheduling only (no effect on results)
constexpr int64_t GRAIN = 1 << 15;       // a phase of less work runs on the calling thread
constexpr int64_t RUN_ITEMS = 8;         // items per thread from which a phase runs in contiguous runs
constexpr int64_t ITEM = 1 << 16;        // elements per item of the splittable phases
constexpr int64_t WHOLE_MAX = 1 << 15;   // a weight this small is always one item (whole forward / backward)
// A weight of up to L2_WHOLE elements (1 MiB of float32, a core's L2 here) is one item too when the group
// has enough other work to keep the threads busy (at least 2 x threads x its size in all): its passes
// then run back to back on one core while it is in that core's L2 (the fused pass leaves W there for
// W / sigma; the <G, W> pass leaves G for grad_W), instead of each phase streaming every weight again
constexpr int64_t L2_WHOLE = 1 << 18;
// The other weights run in bands of consecutive weights of at most BAND elements in all (8 MiB of float32,
// a quarter of the L3 here; a larger weight is a band of its own), every phase of a band before the next
// band: a weight's later passes (W / sigma after the power iteration, grad_W after <G, W>) then find it
// in the L3 as the per-weight kernels do, instead of each phase streaming the whole group from memory
constexpr int64_t BAND = 1 << 21;

// W / sigma and grad_W of weights of STREAM_MIN elements or more (cpu_stream.h: they leave the caches anyway)
// are written with non-temporal stores, computed by the same loops into an L1 buffer, so the values are the same.

bool run_whole(int64_t numel, int64_t group_numel) {
  return numel <= WHOLE_MAX ||
         (numel <= L2_WHOLE && numel * 2 * std::max<int64_t>(1, at::get_num_threads()) <= group_numel);
}

// run_whole of each of a group's weights (`numels`), except that of the L2-sized whole ones (more than
// WHOLE_MAX elements) the `count mod threads` smallest go through the phases instead, split over every
// thread: whole items are dealt to the threads one weight at a time, and SNGAN's seven 128x1152 weights
// on 2 threads left one core a weight more than the other (4 against 3; now 3 whole each and the seventh
// shared: benchmarks/NOTES.md, G8).  Which items run whole never changes a result.
std::vector<char> whole_weights(const std::vector<int64_t>& numels) {
  int64_t group_numel = 0;
  for (int64_t n : numels) group_numel += n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<char> whole(numels.size());
  std::vector<size_t> l2;
  for (size_t j = 0; j < numels.size(); ++j) {
    whole[j] = run_whole(numels[j], group_numel);
    if (whole[j] && numels[j] > WHOLE_MAX) l2.push_back(j);
  }
  const size_t spare = l2.size() % static_cast<size_t>(threads);
  std::stable_sort(l2.begin(), l2.end(), [&](size_t a, size_t b) { return numels[a] < numels[b]; });
  for (size_t q = 0; q < spare; ++q) whole[l2[q]] = 0;
  return whole;
}

// float32 loops: the run-time selected table of sn_kernels_cpu.cpp (same choice, same code)
const F32Loops& f32() {
  static const F32Loops* table = select_f32_loops(&grouped_baseline::table);
  return *table;
}

inline float dot(const float* a, const float* b, int64_t len) { return f32().dot(a, b, len); }
inline float sumsq(const float* x, int64_t len) { return dot(x, x, len); }

// out[0, len) += sum_{i in [i0, i1)} y[i] w[i * stride + col0 + k], rows added in order
inline void add_rows(float* out, const float* w, int64_t col0, int64_t len, const float* y, int64_t i0, int64_t i1,
                     int64_t stride) {
  const F32Loops& L = f32();
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const float* r = w + i * stride + col0;
    L.axpy4(out, r, r + stride, r + 2 * stride, r + 3 * stride, y + i, len);
  }
  for (; i < i1; ++i) L.axpy(out, w + i * stride + col0, y[i], len);
}

#include "cpu_vector_steps.h"  // normalize_into, scale_back, safe_sigma: the per-weight kernels' code

// ------------------------------------------------------------------ one weight's state and its pieces

struct Fw {
  const float* w = nullptr;
  float* y = nullptr;  // W / sigma
  int64_t m = 0, n = 0, chunk_rows = 0, chunks = 0;
  std::vector<float> ua, va, s, t, part;
  float sig = 0;
  bool whole = false;
  bool stream = false;  // W / sigma written with non-temporal stores
  bool chunked() const { return chunks > 1; }
  int64_t chunk_end(int64_t c) const { return std::min(m, (c + 1) * chunk_rows); }
};

// s[i] = W_i . v for rows [i0, i1) (matvec of sn_kernels_cpu.cpp, outer = 1)
void rows_dot(Fw& f, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float acc = 0;
    acc += dot(f.w + i * f.n, f.va.data(), f.n);
    f.s[i] = acc;
  }
}

// chunk c of matvec_and_back: s for its rows, and its partial of W^T s
void fused_chunk(Fw& f, int64_t c) {
  const int64_t n = f.n, i1 = f.chunk_end(c);
  float* out = f.part.data() + c * n;
  std::fill(out, out + n, 0.f);
  const F32Loops& L = f32();
  int64_t i = c * f.chunk_rows;
  for (; i + 4 <= i1; i += 4) {
    const float* row = f.w + i * n;
    for (int q = 0; q < 4; ++q) f.s[i + q] = dot(row + q * n, f.va.data(), n);
    L.axpy4(out, row, row + n, row + 2 * n, row + 3 * n, f.s.data() + i, n);
  }
  for (; i < i1; ++i) {
    f.s[i] = dot(f.w + i * n, f.va.data(), n);
    L.axpy(out, f.w + i * n, f.s[i], n);
  }
}

// chunk c of matvec_t (y = u): its partial of W^T u
void t_chunk(Fw& f, int64_t c) {
  float* out = f.part.data() + c * f.n;
  std::fill(out, out + f.n, 0.f);
  add_rows(out, f.w, 0, f.n, f.ua.data(), c * f.chunk_rows, f.chunk_end(c), f.n);
}

// columns [j0, j1) of W^T u without chunks (one chunk: each column summed over all rows in order)
void t_cols(Fw& f, int64_t j0, int64_t j1) {
  std::fill(f.t.begin() + j0, f.t.begin() + j1, 0.f);
  add_rows(f.t.data() + j0, f.w, j0, j1 - j0, f.ua.data(), 0, f.m, f.n);
}

// t[j0, j1) = the chunk partials added in chunk order
void combine(Fw& f, int64_t j0, int64_t j1) {
  const float* part = f.part.data();
  for (int64_t j = j0; j < j1; ++j) f.t[j] = part[j];
  for (int64_t c = 1; c < f.chunks; ++c) {
    const float* p = part + c * f.n;
    for (int64_t j = j0; j < j1; ++j) f.t[j] += p[j];
  }
}

// t = W^T u on one thread (matvec_t)
void matvec_t_serial(Fw& f) {
  if (!f.chunked()) return t_cols(f, 0, f.n);
  for (int64_t c = 0; c < f.chunks; ++c) t_chunk(f, c);
  combine(f, 0, f.n);
}

// after the fused pass of "uv": u, v, sigma (the fallback of power_iteration_cpu when the shortcut fails)
void finish_fused(Fw& f, double eps) {
  if (scale_back(f.s.data(), f.ua.data(), f.t.data(), f.m, f.n, eps)) {
    f.sig = normalize_into(f.t.data(), f.va.data(), f.n, eps);
    return;
  }
  normalize_into(f.s.data(), f.ua.data(), f.m, eps);  // s is what matvec would give (same row dots)
  matvec_t_serial(f);
  f.sig = normalize_into(f.t.data(), f.va.data(), f.n, eps);
}

void divide_range(Fw& f, int64_t k0, int64_t k1) {
  const float sig = safe_sigma(f.sig);
  if (!f.stream) return f32().divide(f.y + k0, f.w + k0, sig, k1 - k0);
  // elementwise: the same quotients as in place
  stream_blocks(f.y, k0, k1, [&](float* buf, int64_t k, int64_t len) { f32().divide(buf, f.w + k, sig, len); });
  stream_fence();
}

// the whole forward of a small weight on one thread: power_iteration_cpu then normalize_cpu
void forward_whole(Fw& f, int64_t iterations, double eps, bool vu, bool training) {
  if (training) {
    for (int64_t it = 0; it < iterations; ++it) {
      if (vu) {
        matvec_t_serial(f);
        normalize_into(f.t.data(), f.va.data(), f.n, eps);
        rows_dot(f, 0, f.m);
        f.sig = normalize_into(f.s.data(), f.ua.data(), f.m, eps);
      } else if (f.chunked()) {
        for (int64_t c = 0; c < f.chunks; ++c) fused_chunk(f, c);
        combine(f, 0, f.n);
        finish_fused(f, eps);
      } else {
        rows_dot(f, 0, f.m);
        normalize_into(f.s.data(), f.ua.data(), f.m, eps);
        t_cols(f, 0, f.n);
        f.sig = normalize_into(f.t.data(), f.va.data(), f.n, eps);
      }
    }
  } else {
    rows_dot(f, 0, f.m);
    f.sig = dot(f.ua.data(), f.s.data(), f.m);
  }
  divide_range(f, 0, f.m * f.n);
}

// ------------------------------------------------------------------ the work table

enum Kind : int32_t { WHOLE, ROWS, FUSED_CHUNK, T_CHUNK, T_COLS, COMBINE, DIVIDE, DOT_BLOCKS, GRAD_ROWS, BWD_WHOLE };

struct Item {
  int64_t cost;  // elements touched: the sort key
  int32_t weight;
  int32_t kind;
  int64_t a, b;
};

// Runs every item once.  Which thread runs an item never changes a result (each item writes its own
// outputs).  A phase of many items (a phase over large weights) gives each thread one contiguous run of
// items of about equal cost, in the order they were made (each weight's items in memory order), so each
// thread streams memory in order as at::parallel_for's ranges do: items handed out in turn from a shared
// counter broke every thread's stream at each item, 10-13 % slower on weights of 5-21 M elements
// (benchmarks/NOTES.md, G3).  A phase of few items (the small weights, whole) takes them largest first
// from a shared counter, which balances items of very different costs.
template <typename F>
void run_items(std::vector<Item>& items, const F& fn) {
  if (items.empty()) return;
  int64_t total = 0;
  for (const Item& it : items) total += it.cost;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  if (threads <= 1 || total < GRAIN || at::in_parallel_region()) {
    for (const Item& it : items) fn(it);
    return;
  }
  if (static_cast<int64_t>(items.size()) >= RUN_ITEMS * threads) {
    // coarse items (whole weights, each over 1 / (RUN_ITEMS * threads) of the phase) are dealt largest
    // first to the least loaded thread; the fine ones then fill each thread up to its share, one
    // contiguous run each in the order made (cut by cumulative cost alone, whole items in a row gave one
    // core a weight more than the other: benchmarks/NOTES.md, G8)
    std::vector<size_t> coarse, fine;
    for (size_t k = 0; k < items.size(); ++k)
      (items[k].cost * RUN_ITEMS * threads > total ? coarse : fine).push_back(k);
    std::stable_sort(coarse.begin(), coarse.end(),
                     [&](size_t x, size_t y) { return items[x].cost > items[y].cost; });
    std::vector<std::vector<size_t>> dealt(threads);
    std::vector<int64_t> load(threads, 0);
    for (size_t k : coarse) {
      const size_t t = std::min_element(load.begin(), load.end()) - load.begin();
      dealt[t].push_back(k);
      load[t] += items[k].cost;
    }
    const int64_t share = (total + threads - 1) / threads;
    std::vector<size_t> start(threads + 1, fine.size());
    start[0] = 0;
    size_t pos = 0;
    for (int64_t t = 0; t + 1 < threads; ++t) {
      for (; pos < fine.size() && load[t] < share; ++pos) load[t] += items[fine[pos]].cost;
      start[t + 1] = pos;
    }
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t q = t0; q < t1; ++q) {
        for (size_t k : dealt[q]) fn(items[k]);
        for (size_t k = start[q]; k < start[q + 1]; ++k) fn(items[fine[k]]);
      }
    });
    return;
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t k = next.fetch_add(1, std::memory_order_relaxed); k < items.size();
         k = next.fetch_add(1, std::memory_order_relaxed))
      fn(items[k]);
  });
}

// the indices j < sizes.size() with sizes[j] > 0, in bands of consecutive indices of at most BAND elements
// in all (one index alone when larger); at least one band, possibly empty
std::vector<std::vector<int64_t>> bands_of(const std::vector<int64_t>& sizes) {
  std::vector<std::vector<int64_t>> bands(1);
  int64_t in_band = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(sizes.size()); ++j) {
    if (sizes[j] <= 0) continue;
    if (!bands.back().empty() && in_band + sizes[j] > BAND) {
      bands.emplace_back();
      in_band = 0;
    }
    bands.back().push_back(j);
    in_band += sizes[j];
  }
  return bands;
}

// items [0, len) of a splittable dimension, each of about ITEM elements (`per` elements per index)
void split(std::vector<Item>& items, int32_t weight, int32_t kind, int64_t len, int64_t per) {
  const int64_t step = std::max<int64_t>(1, ITEM / std::max<int64_t>(1, per));
  for (int64_t a = 0; a < len; a += step) {
    const int64_t b = std::min(len, a + step);
    items.push_back({(b - a) * per, weight, kind, a, b});
  }
}

bool fast_path(const at::Tensor& w, const at::Tensor& u, const at::Tensor& v, const MatrixView& mv) {
  return w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && mv.outer == 1 &&
         u.is_contiguous() && v.is_contiguous();
}

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& find_op(const char* name) {
  // one handle per name (each instantiation is called with a single name)
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return op;
}

using PowerIterationSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                          int64_t, double, int64_t, c10::string_view,
                                                                          bool);
using NormalizeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t);

void check_lengths(size_t k, size_t a, size_t b, size_t c, const char* what) {
  TORCH_CHECK(a == k && b == k && c == k, "sn_kernels: ", what, ": the tensor lists must have the same length");
}

at::Tensor copy_of(const at::Tensor& x) { return x.clone(at::MemoryFormat::Contiguous); }

// The weights that take the multi-tensor CUDA kernels (grouped_cuda.h), by (device, dtype): indices into
// the op's lists.  Empty in a CPU-only build.
struct CudaGroups {
  std::map<std::pair<int, int>, std::vector<size_t>> of;

  // takes weight i when it qualifies (and `also`: the op's own conditions)
  bool take(const at::Tensor& w, size_t i, bool also = true) {
#ifdef SN_KERNELS_WITH_CUDA
    if (also && group_cuda_qualifies(w)) {
      of[{w.get_device(), static_cast<int>(w.scalar_type())}].push_back(i);
      return true;
    }
#endif
    (void)w, (void)i, (void)also;
    return false;
  }
};

template <typename T>
std::vector<T> pick(const std::vector<size_t>& idx, c10::ArrayRef<T> all) {
  std::vector<T> out;
  out.reserve(idx.size());
  for (size_t i : idx) out.push_back(all[i]);
  return out;
}

// ------------------------------------------------------------------ forward

// The forward's working memory, kept per calling thread from call to call (never shrunk: about the
// largest group's u, v, s, t and chunk partials, 4 bytes per row and column and per chunk-row of its
// chunked weights).  Allocated and freed at every call, it let glibc trim its heap (or unmap a large
// partial buffer) and the next call pay page faults and, on a VM, waits for the other CPU's TLB flush:
// sngan_cifar_d's 0.2 ms forward took 0.6-1.0 ms in a fifth of the benchmark's rounds (benchmarks/
// NOTES.md, G4).
struct Scratch {
  std::vector<Fw> fw;
  std::vector<Item> whole, items;
};

Scratch& forward_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
group_forward(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
              int64_t n_power_iterations, double eps, c10::string_view order, bool training) {
  const size_t k = weights.size();
  check_lengths(k, us.size(), vs.size(), dims.size(), "native_group_forward");
  std::vector<MatrixView> views(k);
  bool vu = true;
  for (size_t i = 0; i < k; ++i) {  // every argument checked before any work
    views[i] = matrix_view(weights[i], dims[i]);
    vu = check_power_iteration_args(weights[i], us[i], vs[i], views[i], n_power_iterations, eps, order,
                                    training);
  }
  if (k == 0) (void)order_is_vu(std::string(order.data(), order.size()));
  std::vector<at::Tensor> out(k), sigmas(k), new_u(k), new_v(k);
  Scratch& scratch = forward_scratch();
  std::vector<Fw>& fw = scratch.fw;  // fw[0, nf) are this call's, made below
  std::vector<size_t> fast;  // fw[j] is weights[fast[j]]
  CudaGroups cuda;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto& pi = find_op<PowerIterationSig>("sn_kernels::native_power_iteration");
    const auto& nz = find_op<NormalizeSig>("sn_kernels::native_normalize");
    for (size_t i = 0; i < k; ++i) {
      const at::Tensor& w = weights[i];
      if (fast_path(w, us[i], vs[i], views[i])) {
        fast.push_back(i);
        continue;
      }
      if (cuda.take(w, i)) continue;
      // the per-weight kernels, on copies of u and v (the op does not mutate its inputs)
      at::Tensor u = copy_of(us[i]), v = copy_of(vs[i]);
      at::Tensor u_used, v_used;
      std::tie(sigmas[i], u_used, v_used) = pi.call(w, u, v, n_power_iterations, eps, dims[i], order, training);
      out[i] = nz.call(w, u_used, v_used, sigmas[i], dims[i]);
      new_u[i] = u_used;
      new_v[i] = v_used;
    }
  }
#ifdef SN_KERNELS_WITH_CUDA
  for (const auto& group : cuda.of) {
    const std::vector<size_t>& idx = group.second;
    auto res = group_forward_cuda(pick(idx, weights), pick(idx, us), pick(idx, vs),
                                  pick(idx, c10::ArrayRef<MatrixView>(views)), n_power_iterations, eps, vu, training);
    for (size_t j = 0; j < idx.size(); ++j) {
      out[idx[j]] = std::move(std::get<0>(res)[j]);
      sigmas[idx[j]] = std::move(std::get<1>(res)[j]);
      new_u[idx[j]] = std::move(std::get<2>(res)[j]);
      new_v[idx[j]] = std::move(std::get<3>(res)[j]);
    }
  }
#endif
  if (fast.empty()) return {std::move(out), std::move(sigmas), std::move(new_u), std::move(new_v)};

  std::vector<Item>& whole = scratch.whole;
  whole.clear();
  std::vector<int64_t> numels(fast.size());
  for (size_t j = 0; j < fast.size(); ++j) numels[j] = weights[fast[j]].numel();
  const std::vector<char> is_whole = whole_weights(numels);
  if (fw.size() < fast.size()) fw.resize(fast.size());  // never shrunk: its vectors keep their capacity
  for (size_t j = 0; j < fast.size(); ++j) {
    const size_t i = fast[j];
    const at::Tensor& w = weights[i];
    Fw& f = fw[j];  // every field set below
    f.m = views[i].m;
    f.n = views[i].n();
    f.w = w.const_data_ptr<float>();
    out[i] = cached_empty_cpu(w.sizes(), w.strides(), w.scalar_type());
    f.y = out[i].mutable_data_ptr<float>();
    f.chunk_rows = std::max<int64_t>(MIN_CHUNK_ROWS, (f.m + MAX_CHUNKS - 1) / MAX_CHUNKS);
    f.chunks = (f.m + f.chunk_rows - 1) / f.chunk_rows;
    const float* u0 = us[i].const_data_ptr<float>();
    const float* v0 = vs[i].const_data_ptr<float>();
    f.ua.assign(u0, u0 + f.m);
    f.va.assign(v0, v0 + f.n);
    f.s.resize(f.m);
    f.t.resize(f.n);
    if (training && f.chunked()) f.part.resize(static_cast<size_t>(f.chunks * f.n));
    f.whole = is_whole[j];
    f.sig = 0;
    f.stream = streamed(f.m * f.n);
    if (f.whole) whole.push_back({f.m * f.n * (training ? n_power_iterations + 1 : 2), int32_t(j), WHOLE, 0, 0});
  }
  const int64_t nf = static_cast<int64_t>(fast.size());
  // the large weights go through phases; the small ones run whole in the first phase's table
  auto body = [&](const Item& it) {
    Fw& f = fw[it.weight];
    switch (it.kind) {
      case WHOLE: forward_whole(f, n_power_iterations, eps, vu, training); break;
      case ROWS: rows_dot(f, it.a, it.b); break;
      case FUSED_CHUNK: fused_chunk(f, it.a); break;
      case T_CHUNK: t_chunk(f, it.a); break;
      case T_COLS: t_cols(f, it.a, it.b); break;
      case COMBINE: combine(f, it.a, it.b); break;
      case DIVIDE: divide_range(f, it.a, it.b); break;
      default: break;
    }
  };
  std::vector<int64_t> band_sizes(nf);
  for (int64_t j = 0; j < nf; ++j) band_sizes[j] = fw[j].whole ? 0 : fw[j].m * fw[j].n;
  const std::vector<std::vector<int64_t>> bands = bands_of(band_sizes);
  std::vector<Item>& items = scratch.items;
  const int64_t iterations = training ? n_power_iterations : 1;
  for (size_t bi = 0; bi < bands.size(); ++bi) {
    const std::vector<int64_t>& band = bands[bi];
    for (int64_t it = 0; it < iterations; ++it) {
      // phase 1: "uv": fused chunks (or row dots); "vu": W^T u chunks (or columns); eval: row dots
      items.clear();
      if (it == 0 && bi == 0) items = whole;  // the small weights, whole, beside the first band
      for (int64_t j : band) {
        Fw& f = fw[j];
        if (!training || (!vu && !f.chunked())) {
          split(items, j, ROWS, f.m, f.n);
        } else if (!vu) {
          for (int64_t c = 0; c < f.chunks; ++c)
            items.push_back({(f.chunk_end(c) - c * f.chunk_rows) * f.n, int32_t(j), FUSED_CHUNK, c, c + 1});
        } else if (f.chunked()) {
          for (int64_t c = 0; c < f.chunks; ++c)
            items.push_back({(f.chunk_end(c) - c * f.chunk_rows) * f.n, int32_t(j), T_CHUNK, c, c + 1});
        } else {
          split(items, j, T_COLS, f.n, f.m);
        }
      }
      run_items(items, body);
      if (!training) {
        for (int64_t j : band) fw[j].sig = dot(fw[j].ua.data(), fw[j].s.data(), fw[j].m);
        break;
      }
      // phase 2: combine the chunk partials; after "uv" row dots: u, then W^T u by columns;
      // after "vu" columns: v, then the row dots
      items.clear();
      for (int64_t j : band) {
        Fw& f = fw[j];
        if (f.chunked()) {
          split(items, j, COMBINE, f.n, f.chunks);
        } else if (!vu) {
          normalize_into(f.s.data(), f.ua.data(), f.m, eps);
          split(items, j, T_COLS, f.n, f.m);
        } else {
          normalize_into(f.t.data(), f.va.data(), f.n, eps);
          split(items, j, ROWS, f.m, f.n);
        }
      }
      run_items(items, body);
      // phase 3 ("vu", chunked): v, then the row dots
      items.clear();
      for (int64_t j : band) {
        Fw& f = fw[j];
        if (!vu && f.chunked()) {
          finish_fused(f, eps);
        } else if (!vu) {
          f.sig = normalize_into(f.t.data(), f.va.data(), f.n, eps);
        } else if (f.chunked()) {
          normalize_into(f.t.data(), f.va.data(), f.n, eps);
          split(items, j, ROWS, f.m, f.n);
        } else {
          f.sig = normalize_into(f.s.data(), f.ua.data(), f.m, eps);
        }
      }
      run_items(items, body);
      if (vu)
        for (int64_t j : band)
          if (fw[j].chunked()) fw[j].sig = normalize_into(fw[j].s.data(), fw[j].ua.data(), fw[j].m, eps);
    }
    // W / sigma of the band's weights
    items.clear();
    for (int64_t j : band) split(items, j, DIVIDE, fw[j].m * fw[j].n, 1);
    run_items(items, body);
  }
  for (int64_t j = 0; j < nf; ++j) {
    const size_t i = fast[j];
    Fw& f = fw[j];
    sigmas[i] = at::empty({}, weights[i].options());
    *sigmas[i].mutable_data_ptr<float>() = f.sig;
    new_u[i] = at::empty({f.m}, us[i].options());
    new_v[i] = at::empty({f.n}, vs[i].options());
    std::copy(f.ua.begin(), f.ua.end(), new_u[i].mutable_data_ptr<float>());
    std::copy(f.va.begin(), f.va.end(), new_v[i].mutable_data_ptr<float>());
  }
  return {std::move(out), std::move(sigmas), std::move(new_u), std::move(new_v)};
}

// ------------------------------------------------------------------ backward

struct Bw {
  const float* g = nullptr;
  const float* w = nullptr;
  const float* u = nullptr;
  const float* v = nullptr;
  float* y = nullptr;
  int64_t m = 0, inner = 0, rows = 0, numel = 0, blocks = 0;
  float sig = 0, inv = 0, c = 0;  // inv: grad_factor(sig)
  std::vector<float> part;
  bool whole = false;
  bool stream = false;  // grad_W written with non-temporal stores (cpu_stream.h)
};

void dot_blocks(Bw& b, int64_t b0, int64_t b1) {
  for (int64_t q = b0; q < b1; ++q) {
    const int64_t k0 = q * DOT_BLOCK;
    b.part[q] = dot(b.g + k0, b.w + k0, std::min(DOT_BLOCK, b.numel - k0));
  }
}

void finish_dot(Bw& b) {
  float c = 0;
  for (int64_t q = 0; q < b.blocks; ++q) c += b.part[q];
  b.c = c / b.sig;
}

// grad_W = (G - c u v^T) / sigma for rows [r0, r1) of the (outer * m, inner) layout
void grad_rows(Bw& b, int64_t r0, int64_t r1) {
  const F32Loops& L = f32();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r / b.m, i = r % b.m;
    const float *g = b.g + r * b.inner, *v = b.v + o * b.inner;
    if (!b.stream) {
      L.grad_row(b.y + r * b.inner, g, v, b.c, b.u[i], b.sig, b.inv, b.inner);
      continue;
    }
    stream_blocks(b.y + r * b.inner, 0, b.inner, [&](float* buf, int64_t k, int64_t len) {
      L.grad_row(buf, g + k, v + k, b.c, b.u[i], b.sig, b.inv, len);  // the same loop: the same values
    });
  }
  if (b.stream) stream_fence();
}

std::vector<at::Tensor> group_backward(at::TensorList grads, at::TensorList weights, at::TensorList us,
                                       at::TensorList vs, at::TensorList sigmas, at::IntArrayRef dims) {
  const size_t k = weights.size();
  check_lengths(k, grads.size(), us.size(), vs.size(), "native_group_backward");
  check_lengths(k, sigmas.size(), dims.size(), k, "native_group_backward");
  std::vector<at::Tensor> out(k), gc(k);
  std::vector<Bw> bw;
  bw.reserve(k);
  std::vector<Item> items;
  std::vector<MatrixView> views(k);
  CudaGroups cuda;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto& op = find_op<BackwardSig>("sn_kernels::native_backward");
    for (size_t i = 0; i < k; ++i) {
      const at::Tensor& w = weights[i];
      const MatrixView mv = matrix_view(w, dims[i]);
      views[i] = mv;
      if (cuda.take(w, i, grads[i].device() == w.device() && sigmas[i].device() == w.device())) {
        // backward_cuda's checks
        check_args(w, us[i], vs[i], mv);
        TORCH_CHECK(grads[i].sizes() == w.sizes() && grads[i].scalar_type() == w.scalar_type(),
                    "sn_kernels: grad must have the weight's shape and dtype");
        TORCH_CHECK(sigmas[i].numel() == 1 && sigmas[i].scalar_type() == accumulation_type(w.scalar_type()),
                    "sn_kernels: sigma must be one element in the accumulation dtype");
        continue;
      }
      const bool fast = w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                        us[i].is_contiguous() && vs[i].is_contiguous() && grads[i].device() == w.device();
      if (!fast) {
        out[i] = op.call(grads[i], w, us[i], vs[i], sigmas[i], dims[i]);
        continue;
      }
      // backward_cpu's checks
      check_args(w, us[i], vs[i], mv);
      TORCH_CHECK(grads[i].sizes() == w.sizes(), "sn_kernels: grad must have the weight's shape");
      TORCH_CHECK(grads[i].scalar_type() == w.scalar_type(), "sn_kernels: grad must have the weight's dtype");
      TORCH_CHECK(sigmas[i].numel() == 1 && sigmas[i].scalar_type() == accumulation_type(w.scalar_type()) &&
                      sigmas[i].device().is_cpu(),
                  "sn_kernels: sigma must be one element in the accumulation dtype");
      gc[i] = grads[i].contiguous();
      out[i] = cached_empty_cpu(w.sizes(), w.strides(), w.scalar_type());
      bw.emplace_back();
      Bw& b = bw.back();
      b.g = gc[i].const_data_ptr<float>();
      b.w = w.const_data_ptr<float>();
      b.u = us[i].const_data_ptr<float>();
      b.v = vs[i].const_data_ptr<float>();
      b.y = out[i].mutable_data_ptr<float>();
      b.m = mv.m;
      b.inner = mv.inner;
      b.rows = mv.outer * mv.m;
      b.numel = w.numel();
      b.blocks = (b.numel + DOT_BLOCK - 1) / DOT_BLOCK;
      b.sig = safe_sigma(*sigmas[i].const_data_ptr<float>());
      b.inv = grad_factor(b.sig);
      b.stream = streamed_rows(b.inner, b.numel);
      b.part.resize(b.blocks);
    }
  }
#ifdef SN_KERNELS_WITH_CUDA
  for (const auto& group : cuda.of) {
    const std::vector<size_t>& idx = group.second;
    std::vector<at::Tensor> res =
        group_backward_cuda(pick(idx, grads), pick(idx, weights), pick(idx, us), pick(idx, vs), pick(idx, sigmas),
                            pick(idx, c10::ArrayRef<MatrixView>(views)));
    for (size_t j = 0; j < idx.size(); ++j) out[idx[j]] = std::move(res[j]);
  }
#endif
  std::vector<int64_t> numels(bw.size());
  for (size_t j = 0; j < bw.size(); ++j) numels[j] = bw[j].numel;
  const std::vector<char> is_whole = whole_weights(numels);
  std::vector<int64_t> band_sizes(bw.size());
  for (size_t j = 0; j < bw.size(); ++j) {
    Bw& b = bw[j];
    b.whole = is_whole[j];
    if (b.whole) items.push_back({2 * b.numel, static_cast<int32_t>(j), BWD_WHOLE, 0, 0});
    band_sizes[j] = b.whole ? 0 : b.numel;
  }
  auto body = [&](const Item& it) {
    Bw& b = bw[it.weight];
    switch (it.kind) {
      case BWD_WHOLE:
        dot_blocks(b, 0, b.blocks);
        finish_dot(b);
        grad_rows(b, 0, b.rows);
        break;
      case DOT_BLOCKS: dot_blocks(b, it.a, it.b); break;
      case GRAD_ROWS: grad_rows(b, it.a, it.b); break;
      default: break;
    }
  };
  // the large weights by bands (BAND): <G, W> of a band's weights, then their grad_W, while G is in the L3;
  // the whole ones beside the first band
  for (const std::vector<int64_t>& band : bands_of(band_sizes)) {
    for (int64_t j : band) split(items, static_cast<int32_t>(j), DOT_BLOCKS, bw[j].blocks, DOT_BLOCK);
    run_items(items, body);
    items.clear();
    for (int64_t j : band) {
      finish_dot(bw[j]);
      split(items, static_cast<int32_t>(j), GRAD_ROWS, bw[j].rows, bw[j].inner);
    }
    run_items(items, body);
    items.clear();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sn_kernels, m) {
  m.def("native_group_forward(Tensor[] weights, Tensor[] us, Tensor[] vs, int[] dims, "
        "int n_power_iterations, float eps, str order, bool training) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("native_group_backward(Tensor[] grads, Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor[] sigmas, "
        "int[] dims) -> Tensor[]");
}

// one implementation serves CPU and CUDA groups (CUDA weights: the multi-tensor CUDA kernels, or the
// per-weight kernels, which dispatch on the device)
TORCH_LIBRARY_IMPL(sn_kernels, CompositeExplicitAutograd, m) {
  m.impl("native_group_forward", &group_forward);
  m.impl("native_group_backward", &group_backward);
}

}  // namespace sn_kernels
