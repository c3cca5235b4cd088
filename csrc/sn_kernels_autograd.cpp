// The eager-mode entry point of the native backend's W / sigma: `native_normalize_eager`, the
// same computation as `native_normalize` with its autograd formula in C++.
//
// `native_normalize` gets its gradient from Python (torch.library.register_autograd), which is what
// torch.compile traces.  In eager mode that Python backward (plus a Python autograd.Function) costs
// tens of microseconds per weight, as much as the kernels themselves for small weights, so eager
// calls go through this op instead: a C++ autograd::Function whose backward is the
// `native_backward` kernel, or, when the backward itself is differentiated (create_graph=True),
// the same formula in differentiable ATen ops (sn_kernels/reference.py `backward`).
// `native_spectral_normalize_eager` runs the power iteration and this W / sigma in one call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

namespace sn_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          int64_t)>&
normalize_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_kernels::native_normalize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, int64_t)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_kernels::native_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

using PowerIterationSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                          int64_t, double, int64_t, c10::string_view,
                                                                          bool);

const c10::TypedOperatorHandle<PowerIterationSig>& power_iteration_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_kernels::native_power_iteration", "")
                             .typed<PowerIterationSig>();
  return op;
}

// grad_W = (G - <G, W> / sigma u v^T) / sigma in plain ATen ops, differentiable itself: sigma is
// re-attached to W through d sigma / dW = u v^T (same value), as in reference.backward.
at::Tensor differentiable_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                   const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const auto acc = sigma.scalar_type();
  const int64_t ndim = weight.dim();
  if (dim < 0) dim += ndim;
  at::Tensor s = at::where(sigma == 0, at::full_like(sigma, std::numeric_limits<double>::infinity()), sigma);
  const at::Tensor G = grad.to(acc), W = weight.to(acc);
  std::vector<int64_t> shape;
  shape.reserve(ndim);
  shape.push_back(weight.size(dim));
  for (int64_t d = 0; d < ndim; ++d)
    if (d != dim) shape.push_back(weight.size(d));
  const at::Tensor uvT = at::outer(u.to(acc), v.to(acc)).reshape(shape).movedim(0, dim);
  if (W.requires_grad()) s = s + (uvT * (W - W.detach())).sum();
  const at::Tensor c = (G * W).sum() / s;
  return ((G - c * uvT) / s).to(weight.scalar_type());
}

struct NormalizeFunction : public torch::autograd::Function<NormalizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                            const at::Tensor& sigma, int64_t dim) {
    ctx->save_for_backward({weight, u, v, sigma});
    ctx->saved_data["dim"] = dim;
    at::AutoDispatchBelowADInplaceOrView guard;
    return normalize_op().call(weight, u, v, sigma, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    if (at::GradMode::is_enabled()) {
      out[0] = differentiable_backward(grads[0], saved[0], saved[1], saved[2], saved[3], dim);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      out[0] = backward_op().call(grads[0], saved[0], saved[1], saved[2], saved[3], dim);
    }
    return out;
  }
};

at::Tensor normalize_eager_autograd(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                    const at::Tensor& sigma, int64_t dim) {
  return NormalizeFunction::apply(weight, u, v, sigma, dim);
}

// below autograd (inference mode, or any backend): just the kernel
at::Tensor normalize_eager_plain(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                 const at::Tensor& sigma, int64_t dim) {
  return normalize_op().call(weight, u, v, sigma, dim);
}

// The kernels check devices too, but a mixed call (a meta or CUDA vector with a CPU weight) would be
// dispatched to the other device's kernel, or to the shape-only fake: refuse it before dispatching.
void check_one_device(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v) {
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(),
              "sn_kernels: u, v must be on the weight's device ", weight.device());
}

// power iteration (u, v updated in place, never differentiated) then W / sigma with its gradient:
// the whole default forward of spectral_normalize in one call
std::tuple<at::Tensor, at::Tensor> spectral_normalize_eager_autograd(const at::Tensor& weight, at::Tensor& u,
                                                                     at::Tensor& v, int64_t n_power_iterations,
                                                                     double eps, int64_t dim, c10::string_view order,
                                                                     bool training) {
  check_one_device(weight, u, v);
  at::Tensor sigma, u_used, v_used;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(sigma, u_used, v_used) =
        power_iteration_op().call(weight, u, v, n_power_iterations, eps, dim, order, training);
  }
  return {NormalizeFunction::apply(weight, u_used, v_used, sigma, dim), sigma};
}

std::tuple<at::Tensor, at::Tensor> spectral_normalize_eager_plain(const at::Tensor& weight, at::Tensor& u,
                                                                  at::Tensor& v, int64_t n_power_iterations,
                                                                  double eps, int64_t dim, c10::string_view order,
                                                                  bool training) {
  check_one_device(weight, u, v);
  auto [sigma, u_used, v_used] = power_iteration_op().call(weight, u, v, n_power_iterations, eps, dim, order, training);
  return {normalize_op().call(weight, u_used, v_used, sigma, dim), sigma};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_kernels, Autograd, m) {
  m.impl("native_normalize_eager", &normalize_eager_autograd);
  m.impl("native_spectral_normalize_eager", &spectral_normalize_eager_autograd);
}

TORCH_LIBRARY_IMPL(sn_kernels, CompositeExplicitAutograd, m) {
  m.impl("native_normalize_eager", &normalize_eager_plain);
  m.impl("native_spectral_normalize_eager", &spectral_normalize_eager_plain);
}

}  // namespace sn_kernels
