// Vector steps of the CPU power iteration, written once for the per-weight kernels
// (sn_kernels_cpu.cpp) and the grouped ones (sn_kernels_grouped_cpu.cpp), so that both give the
// same bits.  No includes (<algorithm>, <cmath>, <cstdint>, <limits> come first in the includer):
// include inside a namespace, after `sumsq(const acc_t*, int64_t)` is declared there for every
// accumulation type used; its dot product decides the rounding.
#pragma once

// prev <- x / max(|x|, eps), unless |x| is zero or not finite (a zero or non-finite weight): then
// prev is kept, so u and v recover once the weight is finite again.  Returns |x|^2 / max(|x|, eps).
template <typename acc_t>
acc_t normalize_into(const acc_t* x, acc_t* prev, int64_t len, double eps) {
  const acc_t norm = std::sqrt(sumsq(x, len));
  const acc_t denom = std::max(norm, static_cast<acc_t>(eps));
  if (std::isfinite(norm) && norm > 0)
    for (int64_t k = 0; k < len; ++k) prev[k] = x[k] / denom;
  return norm * norm / denom;
}

// After matvec_and_back: u <- s / max(|s|, eps) and t <- r / max(|s|, eps) = W^T u.  Returns false,
// changing nothing, when that shortcut does not give normalize_into + matvec_t's result: |s| zero
// or not finite (u must keep its previous value) or r overflowed (|W|^2 beyond the dtype's range).
template <typename acc_t>
bool scale_back(const acc_t* s, acc_t* u, acc_t* t, int64_t m, int64_t n, double eps) {
  const acc_t norm = std::sqrt(sumsq(s, m));
  if (!(std::isfinite(norm) && norm > 0) || !std::isfinite(sumsq(t, n))) return false;
  const acc_t denom = std::max(norm, static_cast<acc_t>(eps));
  for (int64_t k = 0; k < m; ++k) u[k] = s[k] / denom;
  for (int64_t k = 0; k < n; ++k) t[k] /= denom;
  return true;
}

// sigma, or +inf where sigma == 0: a zero weight normalizes to 0 (and gets a zero gradient), not 0/0
template <typename acc_t>
inline acc_t safe_sigma(acc_t s) {
  return s == 0 ? std::numeric_limits<acc_t>::infinity() : s;
}

// The factor grad_W = (G - c u v^T) / sigma is multiplied by: 1 / sigma where sigma and 1 / sigma are both normal
// numbers (one more rounding per element than the division, and a multiply instead of a division: 4x the
// throughput on an AVX2 core, benchmarks/NOTES.md, L13); 0 otherwise (sigma subnormal or above 2^126, zero,
// infinite or NaN), where the grad_W loops divide by sigma instead
template <typename acc_t>
inline acc_t grad_factor(acc_t sigma) {
  const acc_t r = acc_t(1) / sigma;
  return std::isnormal(sigma) && std::isnormal(r) ? r : acc_t(0);
}
