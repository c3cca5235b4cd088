// Shared declarations of the native backend: the matrix view of a weight.
//
// W (the weight with `dim` moved to the front, the rest flattened) is an (m, n)
// matrix.  For a contiguous weight with dim = d its elements are addressed as a
// strided 3-level index (outer, m, inner):
//
//     W[i, o * inner + k] = w[(o * m + i) * inner + k],
//     outer = prod(shape[:d]), m = shape[d], inner = prod(shape[d+1:]),
//
// so no permuted copy is ever made (dim = 0 is outer = 1, inner = n).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace sn_kernels {

// The accumulation type: float for float16/bfloat16/float32, double for double.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The certified carry's rounding factor (1 + 4u), u float64's unit roundoff: certified.py's, applied to the carried
// bound's denominator by the carry's kernel (sn_kernels_carry_cpu.cpp) and its ATen form (sn_kernels_autograd.cpp).
constexpr double kCarryRounding = 1.0 + 4.0 * std::numeric_limits<double>::epsilon() / 2;

struct MatrixView {
  int64_t outer = 1, m = 1, inner = 1;
  int64_t n() const { return outer * inner; }
};

inline MatrixView matrix_view(const at::Tensor& weight, int64_t dim) {
  const int64_t ndim = weight.dim();
  TORCH_CHECK(ndim >= 1, "sn_kernels: spectral norm needs a weight with at least one dimension");
  TORCH_CHECK(dim >= -ndim && dim < ndim, "sn_kernels: dim ", dim, " out of range for a ", ndim, "-d weight");
  if (dim < 0) dim += ndim;
  MatrixView v;
  for (int64_t d = 0; d < dim; ++d) v.outer *= weight.size(d);
  v.m = weight.size(dim);
  for (int64_t d = dim + 1; d < ndim; ++d) v.inner *= weight.size(d);
  return v;
}

inline void check_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const MatrixView& mv) {
  TORCH_CHECK(weight.is_floating_point(), "sn_kernels: weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(mv.m > 0 && mv.n() > 0, "sn_kernels: spectral norm of an empty weight is undefined");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == mv.m, "sn_kernels: u must have shape (", mv.m, ",), got ", u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == mv.n(), "sn_kernels: v must have shape (", mv.n(), ",), got ",
              v.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(),
              "sn_kernels: u, v must have the weight's dtype ", weight.scalar_type());
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(),
              "sn_kernels: u, v must be on the weight's device");
}

inline bool order_is_vu(const std::string& order) {
  TORCH_CHECK(order == "vu" || order == "uv", "sn_kernels: order must be \"vu\" or \"uv\", got \"", order, "\"");
  return order == "vu";
}

// A weight's dtype as Python names it (torch.float16), for messages that match checks.py's.
inline std::string python_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(t);  // ATen's name: the kernels take none of these
  }
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Refuse an eps below the smallest normal number of the accumulation dtype: a smaller one is 0 there
// (1e-50 in float32), or flushed to 0 (a subnormal, under torch.set_flush_denormal(True)), and a zero
// weight's sigma |s|^2 / max(|s|, eps) would be 0/0 = NaN.  checks.py's check_eps_in, in its words.
inline void check_eps_in(double eps, at::ScalarType t) {
  const at::ScalarType acc = accumulation_type(t);
  const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  // (the message is built only when raising; ostream's default format for a double is Python's "g")
  TORCH_CHECK_VALUE(eps >= tiny, "Expected eps to be at least ", tiny, ", the smallest normal ",
                    python_dtype_name(acc), " (", python_dtype_name(t), " weights are computed in ",
                    python_dtype_name(acc), "; a smaller eps is zero there), but got eps=", eps);
}

// Whether a and b (non-empty, strided, on one device) may share memory: overlapping byte extents, addresses
// compared (so views of one buffer through different storages, numpy's, are seen too); a gap of a strided tensor
// counts as its own, a false alarm only for a vector placed inside a strided weight's gaps.
inline bool extents_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.has_storage() || !b.has_storage() || a.device() != b.device()) return false;
  const auto extent = [](const at::Tensor& t) {
    int64_t last = 0;  // the largest element offset from the first (strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::make_pair(first, first + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size())));
  };
  const auto ea = extent(a), eb = extent(b);
  return ea.first != 0 && eb.first != 0 && ea.first < eb.second && eb.first < ea.second;
}

// A training power iteration writes u and v in place between its reads of W, u and v: refuse vectors that share
// memory with each other or with the weight (the writes would feed the later reads, silently)
inline void check_written_vectors(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v) {
  const char* both = extents_overlap(u, v) ? "u and v" : extents_overlap(u, weight) ? "u and the weight"
                     : extents_overlap(v, weight) ? "v and the weight" : nullptr;
  TORCH_CHECK_VALUE(both == nullptr, "sn_kernels: ", both, " share memory; u and v are updated in place by the "
                    "power iteration, so they must not overlap each other or the weight (pass separate tensors)");
}

// The checks shared by the CPU and CUDA power iterations; returns whether the order is "vu".
inline bool check_power_iteration_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                       const MatrixView& mv, int64_t n_power_iterations, double eps,
                                       c10::string_view order, bool training) {
  check_args(weight, u, v, mv);
  TORCH_CHECK(u.is_contiguous() && v.is_contiguous(), "sn_kernels: u and v must be contiguous");
  TORCH_CHECK(n_power_iterations > 0, "sn_kernels: n_power_iterations must be positive");
  TORCH_CHECK(eps > 0 && eps < std::numeric_limits<double>::infinity(), "sn_kernels: eps must be positive and finite");
  check_eps_in(eps, weight.scalar_type());
  if (training) check_written_vectors(weight, u, v);
  return order_is_vu(std::string(order.data(), order.size()));
}

// u, v written in place by a training power iteration: their version counters move, as an in-place op's
// do, so a graph that saved them (a user's penalty on weight_u) refuses a backward after the update
// instead of using the new values silently (no-op for inference tensors in inference mode)
inline void bump_versions(at::Tensor& u, at::Tensor& v) {
  u.unsafeGetTensorImpl()->bump_version();
  v.unsafeGetTensorImpl()->bump_version();
}

}  // namespace sn_kernels
