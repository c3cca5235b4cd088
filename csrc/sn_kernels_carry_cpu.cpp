// The Weyl carry of a certified spectral norm (bound="upper" / "operator", sn_kernels/certified.py) on
// the CPU, as two ops instead of about twenty tensor ops and five fresh weight-sized temporaries:
//
//   native_carry_forward(weight, ref, base, k1, coeff, soft) -> (weight_sn, den, nrm)
//       nrm = ||fl(W - W_ref)||_F (the difference rounded in W's dtype, its squares summed in float64),
//       den = (nrm k1 + base)(1 + 4u), s = coeff / den (soft: min(s, 1)), weight_sn = W fl_acc(s)
//   native_carry_backward(grad, weight, ref, den, nrm, k1, coeff, soft) -> grad_weight
//       G s + (W - W_ref) <G, W> (-coeff k1 (1 + 4u) / (den^2 nrm)): the gradient of that forward
//       (s held where soft clamps it; 0 for the second term where nrm = 0, vector_norm's subgradient)
//
// The scalar arithmetic is certified.py's, operation for operation in float64 (the rounding accounting
// there covers it: three roundings of non-negative terms), and weight_sn = fl(W fl(s)) in the
// accumulation dtype as the Python path computes it.  Sums go over fixed blocks of BLOCK elements and,
// inside a block, over LANES interleaved partial sums, then in order: the same bits for any thread count
// (and for the hand-vectorized float32 loops and the plain ones).
// Outputs come from the block cache (cpu_block_cache.h): a fresh weight-sized tensor every step would
// page-fault at every page.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"
#include "cpu_block_cache.h"

namespace sn_kernels {
namespace {

constexpr int64_t BLOCK = 1 << 14;  // elements per partial sum (results depend on it)
constexpr int LANES = 8;            // interleaved sums inside a block (results depend on it)

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// `other` (named `name` in the message: the reference or the gradient) must match the weight
void check_pair(const at::Tensor& weight, const at::Tensor& other, const char* what, const char* name) {
  TORCH_CHECK(weight.device().is_cpu() && other.device().is_cpu(), "sn_kernels: ", what, " runs on CPU tensors");
  TORCH_CHECK(weight.sizes() == other.sizes() && weight.scalar_type() == other.scalar_type(), "sn_kernels: ", what,
              ": the ", name, " must have the weight's shape and dtype");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "sn_kernels: ", what, " takes a real floating-point weight");
}

double scalar_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu() && t.scalar_type() == at::kDouble, "sn_kernels: ", what,
              " must be one float64 element on the CPU");
  return *t.const_data_ptr<double>();
}

// sum over k in [k0, k1) of f(k) in float64 in LANES interleaved sums (element k0 + j to lane j mod LANES),
// then the lanes in order
template <typename F>
double lane_sum(int64_t k0, int64_t k1, const F& f) {
  double acc[LANES] = {};
  int64_t k = k0;
  for (; k + LANES <= k1; k += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += f(k + l);
  for (int l = 0; k < k1; ++k, ++l) acc[l] += f(k);
  double s = 0;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

#if defined(__SSE2__)
// lane_sum of x(k) y(k) for float32 x, y (as float64: the products are exact), vectorized by hand: the
// compiler keeps the float -> float64 conversions scalar.  The same lanes, so the same sum.  With
// `diff`, x(k) = fl32(a[k] - b[k]) and y = x; else x = a, y = b.
template <bool diff>
double lane_sum_f32(const float* a, const float* b, int64_t k0, int64_t k1) {
  __m128d acc[LANES / 2];
  for (auto& v : acc) v = _mm_setzero_pd();
  int64_t k = k0;
  for (; k + LANES <= k1; k += LANES) {
    for (int h = 0; h < 2; ++h) {
      const __m128 x4 = _mm_loadu_ps(a + k + 4 * h), y4 = _mm_loadu_ps(b + k + 4 * h);
      const __m128 p4 = diff ? _mm_sub_ps(x4, y4) : x4, q4 = diff ? p4 : y4;
      const __m128d plo = _mm_cvtps_pd(p4), phi = _mm_cvtps_pd(_mm_movehl_ps(p4, p4));
      const __m128d qlo = _mm_cvtps_pd(q4), qhi = _mm_cvtps_pd(_mm_movehl_ps(q4, q4));
      acc[2 * h] = _mm_add_pd(acc[2 * h], _mm_mul_pd(plo, qlo));
      acc[2 * h + 1] = _mm_add_pd(acc[2 * h + 1], _mm_mul_pd(phi, qhi));
    }
  }
  alignas(16) double lanes[LANES];
  for (int l = 0; l < LANES / 2; ++l) _mm_store_pd(lanes + 2 * l, acc[l]);
  for (int l = 0; k < k1; ++k, ++l) {
    const double x = diff ? static_cast<double>(a[k] - b[k]) : static_cast<double>(a[k]);
    lanes[l] += x * (diff ? x : static_cast<double>(b[k]));
  }
  double s = 0;
  for (int l = 0; l < LANES; ++l) s += lanes[l];
  return s;
}
#endif

// sum over k of x(k) y(k) in float64 (x = fl(a - b), y = x with `diff`; else x = a, y = b): fixed blocks of
// BLOCK elements, each a lane_sum, the blocks added in order
template <bool diff, typename scalar_t>
double block_sum(const scalar_t* a, const scalar_t* b, int64_t n) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  std::vector<double> part(static_cast<size_t>(blocks));
  at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t k0 = q * BLOCK, k1 = std::min(n, k0 + BLOCK);
#if defined(__SSE2__)
      if constexpr (std::is_same<scalar_t, float>::value) {
        part[static_cast<size_t>(q)] = lane_sum_f32<diff>(a, b, k0, k1);
        continue;
      }
#endif
      part[static_cast<size_t>(q)] = lane_sum(k0, k1, [&](int64_t k) {
        if (diff) {
          const double d = static_cast<double>(static_cast<scalar_t>(a[k] - b[k]));  // rounded in the dtype
          return d * d;
        }
        return static_cast<double>(a[k]) * static_cast<double>(b[k]);
      });
    }
  });
  double total = 0;
  for (double p : part) total += p;
  return total;
}

// s = coeff / den, min(s, 1) with soft; 0 above `cap`, the accumulation type's largest finite value: a weight
// that is zero or nearly so has a bound so small that s overflows (and 0 * inf is NaN), so it normalizes to
// 0 with a zero gradient, as plain spectral norm does a zero weight; a smaller s only lowers ||W s||, so the
// certificate holds (certified._scaled does the same)
double scale_of(double den, double coeff, bool soft, double cap) {
  const double s = soft ? std::min(coeff / den, 1.0) : coeff / den;
  return s <= cap ? s : 0.0;  // NaN too (a NaN or Inf weight since the reference): W_sn 0 where W is finite
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> carry_forward(const at::Tensor& weight, const at::Tensor& ref,
                                                             const at::Tensor& base, double k1, double coeff,
                                                             bool soft) {
  check_pair(weight, ref, "native_carry_forward", "reference");
  const double b = scalar_of(base, "native_carry_forward: base");
  const at::Tensor w = weight.contiguous(), r = ref.contiguous();
  const int64_t n = w.numel();
  at::Tensor out = cached_empty_cpu(w.sizes(), w.strides(), w.scalar_type());
  double nrm = 0, den = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_carry_forward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* a = w.const_data_ptr<scalar_t>();
    const scalar_t* c = r.const_data_ptr<scalar_t>();
    nrm = std::sqrt(block_sum<true>(a, c, n));
    den = (nrm * k1 + b) * kCarryRounding;
    const acc_t s = static_cast<acc_t>(scale_of(den, coeff, soft, std::numeric_limits<acc_t>::max()));
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, BLOCK, [&](int64_t k0, int64_t k1_) {
      for (int64_t k = k0; k < k1_; ++k) y[k] = static_cast<scalar_t>(static_cast<acc_t>(a[k]) * s);
    });
  });
  const auto f64 = weight.options().dtype(at::kDouble);
  return {out, at::scalar_tensor(den, f64), at::scalar_tensor(nrm, f64)};
}

at::Tensor carry_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& ref,
                          const at::Tensor& den_t, const at::Tensor& nrm_t, double k1, double coeff, bool soft) {
  check_pair(weight, ref, "native_carry_backward", "reference");
  check_pair(weight, grad, "native_carry_backward", "gradient");
  const double den = scalar_of(den_t, "native_carry_backward: den");
  const double nrm = scalar_of(nrm_t, "native_carry_backward: nrm");
  const at::Tensor g = grad.contiguous(), w = weight.contiguous(), r = ref.contiguous();
  const int64_t n = w.numel();
  at::Tensor out = cached_empty_cpu(w.sizes(), w.strides(), w.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_carry_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const double cap = std::numeric_limits<acc_t>::max();
    const double s = scale_of(den, coeff, soft, cap);
    // d s / d nrm: 0 where s is clamped, to 1 by soft (clamp's gradient passes at s = 1 itself) or to 0 above
    // cap, or where nrm = 0
    const bool through = !(soft && coeff / den > 1.0) && !(coeff / den > cap) && nrm > 0;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* a = w.const_data_ptr<scalar_t>();
    const scalar_t* c = r.const_data_ptr<scalar_t>();
    double t = 0;  // the factor of (W - W_ref)
    if (through) {
      const double gw = block_sum<false>(gp, a, n);
      t = -gw * coeff / (den * den) * kCarryRounding * k1 / nrm;
    }
    const acc_t sa = static_cast<acc_t>(s), ta = static_cast<acc_t>(t);
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, BLOCK, [&](int64_t k0, int64_t k1_) {
      for (int64_t k = k0; k < k1_; ++k) {
        const acc_t d = static_cast<acc_t>(static_cast<scalar_t>(a[k] - c[k]));
        y[k] = static_cast<scalar_t>(static_cast<acc_t>(gp[k]) * sa + d * ta);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sn_kernels, m) {
  m.def("native_carry_forward(Tensor weight, Tensor ref, Tensor base, float k1, float coeff, bool soft) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("native_carry_backward(Tensor grad, Tensor weight, Tensor ref, Tensor den, Tensor nrm, float k1, "
        "float coeff, bool soft) -> Tensor");
}

TORCH_LIBRARY_IMPL(sn_kernels, CPU, m) {
  m.impl("native_carry_forward", &carry_forward);
  m.impl("native_carry_backward", &carry_backward);
}

}  // namespace sn_kernels
