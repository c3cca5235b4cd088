// The float32 inner loops compiled for AVX2+FMA+F16C; used only when the CPU reports all three (every
// AVX2 CPU has F16C).
#include "cpu_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SN_HAVE_AVX2_TU 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace sn_kernels {
namespace avx2 {
#define SN_F32_LANES 32
#define SN_F32_AVX2 1
#include "cpu_f32_loops.h"
}  // namespace avx2
}  // namespace sn_kernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace sn_kernels {

const F32Loops* f32_loops_avx2() {
#ifdef SN_HAVE_AVX2_TU
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &avx2::table : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace sn_kernels
