// The eager-mode entry point of the native backend's W / sigma: `native_normalize_eager`, the
// same computation as `native_normalize` with its autograd formula in C++.
//
// `native_normalize` gets its gradient from Python (torch.library.register_autograd), which is what
// torch.compile traces.  In eager mode that Python backward (plus a Python autograd.Function) costs
// tens of microseconds per weight, as much as the kernels themselves for small weights, so eager
// calls go through this op instead: a C++ autograd::Function whose backward is the
// `native_backward` kernel, or, when the backward itself is differentiated (create_graph=True),
// the same formula in differentiable ATen ops (sn_kernels/backends/pytorch.py `backward`).
// `native_spectral_normalize_eager` runs the power iteration and this W / sigma in one call, and
// `native_group_normalize_eager` does both for a whole group (sn_kernels.group) with one node.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <typeinfo>
#include <vector>

namespace sn_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The handle of the op `name`, looked up once per signature: each Sig is used with a single name (checked: a second
// name would get the first one's op).
template <typename Sig>
const c10::TypedOperatorHandle<Sig>& typed_op(const char* name) {
  static const char* const first = name;
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  TORCH_INTERNAL_ASSERT(name == first || std::strcmp(name, first) == 0, "typed_op: ", name, " has ", first,
                        "'s signature");
  return op;
}

using NormalizeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t);
using PowerIterationSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                          int64_t, double, int64_t, c10::string_view,
                                                                          bool);

const c10::TypedOperatorHandle<NormalizeSig>& normalize_op() {
  return typed_op<NormalizeSig>("sn_kernels::native_normalize");
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  return typed_op<BackwardSig>("sn_kernels::native_backward");
}
const c10::TypedOperatorHandle<PowerIterationSig>& power_iteration_op() {
  return typed_op<PowerIterationSig>("sn_kernels::native_power_iteration");
}

// a sparse gradient of W / sigma (nn.Embedding(sparse=True)) made dense, as the weight's gradient is anyway
// (its u v^T term fills every entry): the kernels and the formula take strided tensors
void dense(at::Tensor& grad) {
  if (grad.defined() && grad.layout() != at::kStrided) grad = grad.to_dense();
}

// grad_W = (G - <G, W> / sigma u v^T) / sigma in plain ATen ops, differentiable itself: sigma is
// re-attached to W through d sigma / dW = u v^T (same value), as in reference.backward.  Returns it in the
// accumulation dtype, with c = <G, W> / sigma (the learnable gain's gradient).
std::tuple<at::Tensor, at::Tensor> differentiable_parts(const at::Tensor& grad, const at::Tensor& weight,
                                                        const at::Tensor& u, const at::Tensor& v,
                                                        const at::Tensor& sigma, int64_t dim) {
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
  return {(G - c * uvT) / s, c};
}

at::Tensor differentiable_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                   const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  return std::get<0>(differentiable_parts(grad, weight, u, v, sigma, dim)).to(weight.scalar_type());
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
    dense(grads[0]);
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

// ---------------------------------------------------------------- the learnable gain (gain=True)
//
// gamma W / sigma_eff = W / scaled with scaled = sigma_eff / gamma: the same division pass with another
// scalar.  Its gradients are (G - <G, W>/sigma_eff u v^T) / scaled for W and <G, W>/sigma_eff for gamma, the dot
// the backward kernel computes anyway (`native_backward_gain`), so the gain costs no pass over W of its own
// (benchmarks/NOTES.md, P3).  The composition (W / sigma_eff) * gamma, which rounds twice, is kept where gamma
// would have to be read from another device (a synchronisation), and in the cases `fused_divisor` lists.

// a dense CPU tensor with its own memory: no wrapper (functionalization, vmap) or Python subclass
// (fake tensors), whose data a memcpy or a read would bypass
bool plain_cpu(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.device().is_cpu() && t.layout() == at::kStrided && typeid(*impl) == typeid(c10::TensorImpl) &&
         !impl->is_python_dispatch() && t.is_contiguous();
}

// scaled = sigma_eff / gamma (gamma rounded to the weight's dtype, as the composition multiplies by it), in
// sigma_eff's (accumulation) dtype, where the fused route applies; nullopt where the call composes.  It composes:
// - where W / scaled would not be gamma W / sigma_eff to rounding: gamma zero, non-finite or beyond 2^-60 .. 2^60,
//   and scaled not a normal number (a tiny sigma_eff over a large gamma; scaled 0 would read as a zero weight's);
// - for a frozen weight with a trained gamma: the node saves W for gamma's gradient (an inference tensor cannot be
//   saved, and a later in-place change of W would be refused) where the composition saves W / sigma_eff;
// - for a forward-mode tangent on gamma (forward_ad): the node has no forward formula.
std::optional<at::Tensor> fused_divisor(const at::Tensor& weight, const at::Tensor& sigma_eff, const at::Tensor& gain) {
  if (!weight.device().is_cpu() || !plain_cpu(gain) || !plain_cpu(sigma_eff) || sigma_eff.dim() != 0 ||
      gain.numel() != 1 || !at::isFloatingType(gain.scalar_type()) || !at::isFloatingType(sigma_eff.scalar_type()))
    return std::nullopt;
  // (the frozen weight's test is the same in no_grad and inference mode, so each mode gives the same bits)
  if ((gain.requires_grad() && !weight.requires_grad()) || gain._fw_grad(0).defined())
    return std::nullopt;
  at::Tensor g = gain;
  if (g.scalar_type() != weight.scalar_type()) {
    at::NoGradGuard no_grad;
    g = g.to(weight.scalar_type());
  }
  const double gamma = g.item<double>();
  if (!std::isfinite(gamma) || std::fabs(gamma) < 0x1p-60 || std::fabs(gamma) > 0x1p60) return std::nullopt;
  return AT_DISPATCH_FLOATING_TYPES(sigma_eff.scalar_type(), "gain_divisor", [&]() -> std::optional<at::Tensor> {
    const scalar_t sigma = *sigma_eff.const_data_ptr<scalar_t>();
    const scalar_t scaled = sigma / static_cast<scalar_t>(gamma);
    if (sigma != 0 && !std::isnormal(scaled)) return std::nullopt;
    return at::scalar_tensor(scaled, sigma_eff.options());
  });
}

// gamma's gradient, in gamma's dtype and shape
at::Tensor gain_grad(const at::Tensor& dot, const at::Tensor& gain) {
  return dot.to(gain.scalar_type()).reshape(gain.sizes());
}

using BackwardGainSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           int64_t);

// gamma's own value is in `scaled`; the node keeps gamma itself (not a saved variable, whose version an in-place
// update of gamma after the forward would fail, as the composition's copy in another dtype does not) for its
// gradient's dtype and shape, and for a double backward, which differentiates through it.
struct GainNormalizeFunction : public torch::autograd::Function<GainNormalizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& gain, const at::Tensor& u,
                            const at::Tensor& v, const at::Tensor& sigma_eff, const at::Tensor& scaled, int64_t dim) {
    ctx->save_for_backward({weight, u, v, sigma_eff, scaled});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["gain"] = gain;
    ctx->saved_data["gain_version"] = static_cast<int64_t>(gain._version());
    at::AutoDispatchBelowADInplaceOrView guard;
    return normalize_op().call(weight, u, v, scaled, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    const bool want_w = ctx->needs_input_grad(0), want_gain = ctx->needs_input_grad(1);
    if (!want_w && !want_gain) return out;
    dense(grads[0]);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor gain = ctx->saved_data["gain"].toTensor();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    at::Tensor grad_w, dot;
    if (at::GradMode::is_enabled()) {  // create_graph=True: gamma (W / sigma_eff)'s gradients in ATen ops
      TORCH_CHECK(static_cast<int64_t>(gain._version()) == ctx->saved_data["gain_version"].toInt(),
                  "one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: the spectral-norm gain changed after the forward, and a double backward needs it");
      at::Tensor unscaled;
      std::tie(unscaled, dot) = differentiable_parts(grads[0], weight, saved[1], saved[2], saved[3], dim);
      grad_w = (unscaled * gain.reshape({}).to(weight.scalar_type()).to(unscaled.scalar_type()))
                   .to(weight.scalar_type());
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(grad_w, dot) = typed_op<BackwardGainSig>("sn_kernels::native_backward_gain")
                                  .call(grads[0], weight, saved[1], saved[2], saved[3], saved[4], dim);
    }
    if (want_w) out[0] = grad_w;
    if (want_gain) out[1] = gain_grad(dot, gain);
    return out;
  }
};

// W / sigma_eff times the gain, with autograd (`record`) or below it: fused where fused_divisor applies
at::Tensor normalize_with_gain(const at::Tensor& weight, const at::Tensor& u_used, const at::Tensor& v_used,
                               const at::Tensor& sigma_eff, int64_t dim, const at::Tensor& gain, bool record) {
  const std::optional<at::Tensor> divisor = fused_divisor(weight, sigma_eff, gain);
  if (divisor.has_value()) {
    const at::Tensor& scaled = *divisor;
    if (record) return GainNormalizeFunction::apply(weight, gain, u_used, v_used, sigma_eff, scaled, dim);
    return normalize_op().call(weight, u_used, v_used, scaled, dim);
  }
  const at::Tensor out = record ? NormalizeFunction::apply(weight, u_used, v_used, sigma_eff, dim)
                                : normalize_op().call(weight, u_used, v_used, sigma_eff, dim);
  return at::mul(out, gain.reshape({}).to(out.scalar_type()));
}

// The kernels check devices too, but a mixed call (a meta or CUDA vector with a CPU weight) would be
// dispatched to the other device's kernel, or to the shape-only fake: refuse it before dispatching.
void check_one_device(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v) {
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(),
              "sn_kernels: u, v must be on the weight's device ", weight.device());
}

// The Lipschitz variants' divisor and backward vector, in the ATen ops (and order) of
// backends/contract.py `lipschitz_scale`, so that both routes round alike: hard W coeff / sigma divides by
// sigma / coeff with u / coeff; soft W / max(1, sigma / coeff) divides by max(1, sigma / coeff) with
// u / coeff where sigma > coeff and 0 elsewhere (W passes through unchanged there).  Never differentiated
// (sigma and u carry no gradient); sigma itself is returned unscaled.
//
// For CPU float32 / float64 (the power iteration's own u copy, `u_used`, scaled in place) the same arithmetic
// is written out: up to six ATen calls on a 0-d sigma and a short u cost about 30 microseconds here, more than the
// kernels of a small weight.  ATen divides by a Python-float scalar in the tensor's dtype, coeff rounded to
// it first; tests/test_native.py holds both routes to the same bits.
template <typename scalar_t>
at::Tensor lipschitz_scale_cpu(const at::Tensor& sigma, at::Tensor& u_used, double coeff, bool soft) {
  const scalar_t c = static_cast<scalar_t>(coeff);
  const scalar_t ratio = *sigma.const_data_ptr<scalar_t>() / c;
  scalar_t* u = u_used.mutable_data_ptr<scalar_t>();
  const int64_t m = u_used.numel();
  scalar_t sigma_eff = ratio;
  if (!soft) {
    for (int64_t i = 0; i < m; ++i) u[i] = u[i] / c;
  } else {
    const scalar_t t = static_cast<scalar_t>(ratio > 1 ? 1 : 0) / c;
    for (int64_t i = 0; i < m; ++i) u[i] = u[i] * t;
    sigma_eff = ratio < 1 ? scalar_t(1) : ratio;  // NaN stays NaN, as clamp_min
  }
  return at::scalar_tensor(sigma_eff, sigma.options());
}

std::tuple<at::Tensor, at::Tensor> lipschitz_scale(const at::Tensor& sigma, const at::Tensor& u, double coeff,
                                                   bool soft, const at::Tensor& buffer) {
  // u: the power iteration's copy (never the caller's buffer, which must keep the iterated u)
  // (plain tensors only: a traced call's fake or functional tensors have no data to read)
  if (plain_cpu(sigma) && plain_cpu(u) && sigma.dim() == 0 && u.scalar_type() == sigma.scalar_type() &&
      (u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble) && !u.is_alias_of(buffer)) {
    at::Tensor u_eff = u;
    at::Tensor sigma_eff = AT_DISPATCH_FLOATING_TYPES(
        u.scalar_type(), "lipschitz_scale", [&] { return lipschitz_scale_cpu<scalar_t>(sigma, u_eff, coeff, soft); });
    return {sigma_eff, u_eff};
  }
  const at::Tensor ratio = at::div(sigma, coeff);
  if (!soft) return {ratio, at::div(u, coeff)};
  const at::Tensor active = at::gt(ratio, 1);
  return {at::clamp_min(ratio, 1.0), at::mul(u, at::div(active.to(u.scalar_type()), coeff))};
}

// power iteration (u, v updated in place, never differentiated), the Lipschitz scaling when coeff is
// given, then W / sigma with its gradient: the whole eager forward of spectral_normalize in one call
std::tuple<at::Tensor, at::Tensor> spectral_normalize_eager_autograd(const at::Tensor& weight, at::Tensor& u,
                                                                     at::Tensor& v, int64_t n_power_iterations,
                                                                     double eps, int64_t dim, c10::string_view order,
                                                                     bool training, std::optional<double> coeff,
                                                                     bool soft, const std::optional<at::Tensor>& gain) {
  check_one_device(weight, u, v);
  at::Tensor sigma, u_used, v_used, sigma_eff;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(sigma, u_used, v_used) =
        power_iteration_op().call(weight, u, v, n_power_iterations, eps, dim, order, training);
    sigma_eff = sigma;
    if (coeff.has_value()) std::tie(sigma_eff, u_used) = lipschitz_scale(sigma, u_used, *coeff, soft, u);
  }
  if (gain.has_value() && gain->defined())
    return {normalize_with_gain(weight, u_used, v_used, sigma_eff, dim, *gain, true), sigma};
  return {NormalizeFunction::apply(weight, u_used, v_used, sigma_eff, dim), sigma};
}

std::tuple<at::Tensor, at::Tensor> spectral_normalize_eager_plain(const at::Tensor& weight, at::Tensor& u,
                                                                  at::Tensor& v, int64_t n_power_iterations,
                                                                  double eps, int64_t dim, c10::string_view order,
                                                                  bool training, std::optional<double> coeff,
                                                                  bool soft, const std::optional<at::Tensor>& gain) {
  check_one_device(weight, u, v);
  auto [sigma, u_used, v_used] = power_iteration_op().call(weight, u, v, n_power_iterations, eps, dim, order, training);
  at::Tensor sigma_eff = sigma;
  if (coeff.has_value()) std::tie(sigma_eff, u_used) = lipschitz_scale(sigma, u_used, *coeff, soft, u);
  if (gain.has_value() && gain->defined())
    return {normalize_with_gain(weight, u_used, v_used, sigma_eff, dim, *gain, false), sigma};
  return {normalize_op().call(weight, u_used, v_used, sigma_eff, dim), sigma};
}

// ---------------------------------------------------------------- the certified carry (certified.py)
//
// `native_carry_eager(weight, ref, base, k1, coeff, soft) -> (weight_sn, den)`: `native_carry_forward` with a C++
// autograd node whose backward is `native_carry_backward`, as `native_normalize_eager` is for W / sigma.  The
// Python autograd.Function it replaces cost about as much per step as the carry's kernels on a small weight.
// A double backward (create_graph=True) differentiates the same forward written in ATen ops (certified.py's
// `_scaled` of `_carried`: the distance's subgradient is 0 at W = W_ref, as linalg_vector_norm's).

using CarryForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, double, double, bool);
using CarryBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, double, double, bool);

// the carry's W_sn in differentiable ATen ops (certified._carried and _scaled), for a double backward
at::Tensor carry_differentiable(const at::Tensor& weight, const at::Tensor& ref, const at::Tensor& base, double k1,
                                double coeff, bool soft) {
  const at::Tensor nrm = at::linalg_vector_norm(at::sub(weight, ref).reshape({-1}).to(at::kDouble), 2);
  const at::Tensor den = (nrm * k1 + base) * kCarryRounding;
  at::Tensor scale = at::reciprocal(den) * coeff;
  if (soft) scale = at::clamp_max(scale, 1.0);
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double cap = acc == at::kDouble ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  scale = at::where(scale <= cap, scale, at::zeros_like(scale));
  return (weight.to(acc) * scale.to(acc)).to(weight.scalar_type());
}

struct CarryFunction : public torch::autograd::Function<CarryFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& ref,
                               const at::Tensor& base, double k1, double coeff, bool soft) {
    at::Tensor out, den, nrm;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, den, nrm) = typed_op<CarryForwardSig>("sn_kernels::native_carry_forward")
                                    .call(weight, ref, base, k1, coeff, soft);
    }
    ctx->save_for_backward({weight, ref, base, den, nrm});
    ctx->saved_data["k1"] = k1;
    ctx->saved_data["coeff"] = coeff;
    ctx->saved_data["soft"] = soft;
    ctx->mark_non_differentiable({den});
    return {out, den};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    dense(grads[0]);
    const auto saved = ctx->get_saved_variables();
    const double k1 = ctx->saved_data["k1"].toDouble(), coeff = ctx->saved_data["coeff"].toDouble();
    const bool soft = ctx->saved_data["soft"].toBool();
    if (at::GradMode::is_enabled()) {
      const at::Tensor scaled = carry_differentiable(saved[0], saved[1], saved[2], k1, coeff, soft);
      out[0] = torch::autograd::grad({scaled}, {saved[0]}, {grads[0]}, /*retain_graph=*/true,
                                     /*create_graph=*/true)[0];
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      out[0] = typed_op<CarryBackwardSig>("sn_kernels::native_carry_backward")
                   .call(grads[0], saved[0], saved[1], saved[3], saved[4], k1, coeff, soft);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> carry_eager_autograd(const at::Tensor& weight, const at::Tensor& ref,
                                                        const at::Tensor& base, double k1, double coeff, bool soft) {
  auto outs = CarryFunction::apply(weight, ref, base, k1, coeff, soft);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor> carry_eager_plain(const at::Tensor& weight, const at::Tensor& ref,
                                                     const at::Tensor& base, double k1, double coeff, bool soft) {
  auto [out, den, nrm] =
      typed_op<CarryForwardSig>("sn_kernels::native_carry_forward").call(weight, ref, base, k1, coeff, soft);
  return {out, den};
}

// ---------------------------------------------------------------- a whole group (sn_kernels.group)
//
// `native_group_normalize_eager`: `native_group_forward`, the iterated u, v copied into the buffers,
// and ONE autograd node for the group, all in C++.  grouped.py's Python node (_GroupNormalize) and
// the Python copy cost about 35 microseconds per forward + backward of SNGAN's 11 weights, as much as
// the forward kernels of small weights (benchmarks/NOTES.md, G5).

using GroupForwardSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                   std::vector<at::Tensor>>(at::TensorList, at::TensorList, at::TensorList,
                                                            at::IntArrayRef, int64_t, double, c10::string_view, bool);
using GroupBackwardSig = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                                 at::TensorList, at::IntArrayRef);

// what the forward computed: W / sigma (the node's outputs), and sigma, u, v as the backward uses them
struct GroupResult {
  std::vector<at::Tensor> outs, sigmas, us, vs;
};

// bufs[i].copy_(fresh[i]) for every i, version counters moved as by copy_: a memcpy for contiguous CPU
// vectors of one dtype (a dispatched copy costs more than the forward of a small weight), the others
// (CUDA buffers) in one _foreach_copy_ (one multi-tensor launch, not one per buffer)
void copy_into(at::TensorList bufs, const std::vector<at::Tensor>& fresh) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> dst, src;
  for (size_t i = 0; i < bufs.size(); ++i) {
    const at::Tensor& b = bufs[i];
    const at::Tensor& f = fresh[i];
    if (b.scalar_type() == f.scalar_type() && b.sizes() == f.sizes() && plain_cpu(b) && plain_cpu(f) &&
        !b.is_inference()) {
      std::memcpy(b.mutable_data_ptr(), f.const_data_ptr(), b.nbytes());
      b.unsafeGetTensorImpl()->bump_version();
    } else {
      dst.push_back(b);
      src.push_back(f);
    }
  }
  if (!dst.empty()) at::_foreach_copy_(dst, src);
}

GroupResult run_group_forward(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                              int64_t n_power_iterations, double eps, c10::string_view order, bool training) {
  GroupResult r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(r.outs, r.sigmas, r.us, r.vs) = typed_op<GroupForwardSig>("sn_kernels::native_group_forward")
                                                 .call(weights, us, vs, dims, n_power_iterations, eps, order, training);
  }
  if (training) {  // the buffers take the iterated u, v
    std::vector<at::Tensor> bufs(us.begin(), us.end()), fresh(r.us);
    bufs.insert(bufs.end(), vs.begin(), vs.end());
    fresh.insert(fresh.end(), r.vs.begin(), r.vs.end());
    copy_into(bufs, fresh);
  }
  return r;
}

// The group's node.  Per model call (`shared` false) it saves the weights, u, v and sigma as saved
// variables, like any node, so that activation checkpointing swaps in a recomputed forward's; with
// sn_kernels.group(model, optimizer=...) (`shared`) every forward of an optimizer step shares the node and
// each may backward through it, which saved variables (freed after a backward) do not allow: it keeps
// them in saved_data then, with the weights' versions for the in-place check.  It never references its
// outputs (output -> node -> output would be a cycle nothing frees).
struct GroupFunction : public torch::autograd::Function<GroupFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, GroupResult* r, at::IntArrayRef dims,
                               bool shared) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["dims"] = dims.vec();
    ctx->saved_data["shared"] = shared;
    if (shared) {
      std::vector<int64_t> versions;
      versions.reserve(weights.size());
      for (const at::Tensor& w : weights) versions.push_back(static_cast<int64_t>(w._version()));
      ctx->saved_data["weights"] = weights.vec();
      ctx->saved_data["versions"] = versions;
      ctx->saved_data["us"] = r->us;
      ctx->saved_data["vs"] = r->vs;
      ctx->saved_data["sigmas"] = r->sigmas;
    } else {
      variable_list saved(weights.begin(), weights.end());
      for (const auto* list : {&r->us, &r->vs, &r->sigmas}) saved.insert(saved.end(), list->begin(), list->end());
      ctx->save_for_backward(saved);
    }
    return std::move(r->outs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool shared = ctx->saved_data["shared"].toBool();
    const size_t k = grads.size();
    std::vector<at::Tensor> weights, us, vs, sigmas;
    if (shared) {
      weights = ctx->saved_data["weights"].toTensorVector();
      us = ctx->saved_data["us"].toTensorVector();
      vs = ctx->saved_data["vs"].toTensorVector();
      sigmas = ctx->saved_data["sigmas"].toTensorVector();
    } else {  // autograd checks the versions of saved variables itself
      const variable_list saved = ctx->get_saved_variables();
      weights.assign(saved.begin(), saved.begin() + k);
      us.assign(saved.begin() + k, saved.begin() + 2 * k);
      vs.assign(saved.begin() + 2 * k, saved.begin() + 3 * k);
      sigmas.assign(saved.begin() + 3 * k, saved.end());
    }
    std::vector<size_t> todo;
    for (size_t i = 0; i < k; ++i) {
      if (!grads[i].defined() || !ctx->needs_input_grad(i)) continue;
      TORCH_CHECK(!shared || static_cast<int64_t>(weights[i]._version()) ==
                                 ctx->saved_data["versions"].toIntVector()[i],
                  "one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: a grouped spectral-norm weight of shape ", weights[i].sizes(),
                  " changed after its W/sigma was computed (sn_kernels.group)");
      todo.push_back(i);
    }
    variable_list out(k + 3);  // the weights, then the three non-tensor arguments
    if (todo.empty()) return out;
    for (size_t i : todo) dense(grads[i]);
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    // create_graph=True: the formula in differentiable ATen ops; so too for gradients batched by vmap
    // (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)), which the grouped op, taking
    // lists, has no batching rule for
    const bool batched = std::any_of(todo.begin(), todo.end(), [&](size_t i) {
      const c10::DispatchKeySet keys = grads[i].key_set();  // legacy vmap (is_grads_batched) or torch.func's
      return keys.has(c10::DispatchKey::Batched) || keys.has(c10::DispatchKey::FuncTorchBatched);
    });
    if (at::GradMode::is_enabled() || batched) {
      for (size_t i : todo) out[i] = differentiable_backward(grads[i], weights[i], us[i], vs[i], sigmas[i], dims[i]);
      return out;
    }
    std::vector<at::Tensor> g, w, u, v, s;
    std::vector<int64_t> d;
    for (size_t i : todo) {
      g.push_back(grads[i]);
      w.push_back(weights[i]);
      u.push_back(us[i]);
      v.push_back(vs[i]);
      s.push_back(sigmas[i]);
      d.push_back(dims[i]);
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<at::Tensor> res =
        typed_op<GroupBackwardSig>("sn_kernels::native_group_backward").call(g, w, u, v, s, d);
    for (size_t j = 0; j < todo.size(); ++j) out[todo[j]] = std::move(res[j]);
    return out;
  }
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> group_normalize_eager_autograd(
    at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
    double eps, c10::string_view order, bool training, bool shared) {
  GroupResult r = run_group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training);
  std::vector<at::Tensor> sigmas = r.sigmas;
  return {GroupFunction::apply(weights, &r, dims, shared), std::move(sigmas)};
}

// below autograd (inference mode): the forward and the buffers' update, no node
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> group_normalize_eager_plain(
    at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
    double eps, c10::string_view order, bool training, bool /*shared*/) {
  GroupResult r = run_group_forward(weights, us, vs, dims, n_power_iterations, eps, order, training);
  return {std::move(r.outs), std::move(r.sigmas)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sn_kernels, m) {
  // the certified carry's eager call (certified.py): native_carry_forward with a C++ autograd node
  m.def("native_carry_eager(Tensor weight, Tensor ref, Tensor base, float k1, float coeff, bool soft) "
        "-> (Tensor, Tensor)");
  // sn_kernels.group's eager call on the native backend (grouped.py): native_group_forward, u, v
  // updated in place, one C++ autograd node whose backward is native_group_backward
  m.def("native_group_normalize_eager(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, "
        "int n_power_iterations, float eps, str order, bool training, bool shared=False) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(sn_kernels, Autograd, m) {
  m.impl("native_normalize_eager", &normalize_eager_autograd);
  m.impl("native_spectral_normalize_eager", &spectral_normalize_eager_autograd);
  m.impl("native_group_normalize_eager", &group_normalize_eager_autograd);
  m.impl("native_carry_eager", &carry_eager_autograd);
}

TORCH_LIBRARY_IMPL(sn_kernels, CompositeExplicitAutograd, m) {
  m.impl("native_normalize_eager", &normalize_eager_plain);
  m.impl("native_spectral_normalize_eager", &spectral_normalize_eager_plain);
  m.impl("native_group_normalize_eager", &group_normalize_eager_plain);
  m.impl("native_carry_eager", &carry_eager_plain);
}

}  // namespace sn_kernels
