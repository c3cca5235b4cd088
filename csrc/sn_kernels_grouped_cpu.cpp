// Grouped (multi-tensor) entry points of the native backend, for sn_kernels.group:
//
//   native_group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training)
//       -> (weight_sns, sigmas, u_useds, v_useds)
//   native_group_backward(grads, weights, us, vs, sigmas, dims) -> grad_weights
//
// One call runs the power iteration and W / sigma of every weight of a (device, dtype) group, and one
// call computes all their weight gradients: the per-weight Python and dispatcher costs (argument
// checks, op lookups, autograd nodes) are paid once per group instead of once per weight.  Each weight
// runs the per-weight kernels of its device (native_power_iteration, native_normalize, native_backward)
// in order, so the results are bit-identical to the per-module native path.  Work inside a weight is
// split by those kernels (row chunks fixed by the shape); weights are processed one after another (no
// cross-weight chunk table yet).  Not differentiable itself: sn_kernels/grouped.py wraps the pair in
// one autograd node.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace sn_kernels {
namespace {

using PowerIterationSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                          int64_t, double, int64_t, c10::string_view,
                                                                          bool);
using NormalizeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& find_op(const char* name) {
  // one handle per name (each instantiation is called with a single name)
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return op;
}

void check_lengths(size_t k, size_t a, size_t b, size_t c, const char* what) {
  TORCH_CHECK(a == k && b == k && c == k, "sn_kernels: ", what, ": the tensor lists must have the same length");
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
group_forward(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
              int64_t n_power_iterations, double eps, c10::string_view order, bool training) {
  const size_t k = weights.size();
  check_lengths(k, us.size(), vs.size(), dims.size(), "native_group_forward");
  const auto& pi = find_op<PowerIterationSig>("sn_kernels::native_power_iteration");
  const auto& nz = find_op<NormalizeSig>("sn_kernels::native_normalize");
  std::vector<at::Tensor> out(k), sigmas(k), u_used(k), v_used(k);
  at::AutoDispatchBelowADInplaceOrView guard;
  for (size_t i = 0; i < k; ++i) {
    TORCH_CHECK(us[i].device() == weights[i].device() && vs[i].device() == weights[i].device(),
                "sn_kernels: u, v must be on the weight's device ", weights[i].device());
    at::Tensor u = us[i], v = vs[i];  // handles: the kernel updates their data in place
    std::tie(sigmas[i], u_used[i], v_used[i]) =
        pi.call(weights[i], u, v, n_power_iterations, eps, dims[i], order, training);
    out[i] = nz.call(weights[i], u_used[i], v_used[i], sigmas[i], dims[i]);
  }
  return {std::move(out), std::move(sigmas), std::move(u_used), std::move(v_used)};
}

std::vector<at::Tensor> group_backward(at::TensorList grads, at::TensorList weights, at::TensorList us,
                                       at::TensorList vs, at::TensorList sigmas, at::IntArrayRef dims) {
  const size_t k = weights.size();
  check_lengths(k, grads.size(), us.size(), vs.size(), "native_group_backward");
  check_lengths(k, sigmas.size(), dims.size(), k, "native_group_backward");
  const auto& bw = find_op<BackwardSig>("sn_kernels::native_backward");
  std::vector<at::Tensor> out(k);
  at::AutoDispatchBelowADInplaceOrView guard;
  for (size_t i = 0; i < k; ++i) out[i] = bw.call(grads[i], weights[i], us[i], vs[i], sigmas[i], dims[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sn_kernels, m) {
  m.def("native_group_forward(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, "
        "int n_power_iterations, float eps, str order, bool training) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("native_group_backward(Tensor[] grads, Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor[] sigmas, "
        "int[] dims) -> Tensor[]");
}

// the per-weight kernels dispatch on the device: one implementation serves CPU and CUDA groups
TORCH_LIBRARY_IMPL(sn_kernels, CompositeExplicitAutograd, m) {
  m.impl("native_group_forward", &group_forward);
  m.impl("native_group_backward", &group_backward);
}

}  // namespace sn_kernels
