// The float32 inner loops compiled for AVX2+FMA+F16C; used when the CPU reports AVX2 and FMA, the float16
// loops only with F16C (every AVX2 CPU has it).
#include "cpu_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

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
  // F16C from CPUID (leaf 1, ECX bit 29): __builtin_cpu_supports("f16c") needs GCC 11 or clang 18
  static const F32Loops* table = [] {
    const F32Loops* none = nullptr;
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return none;
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    return f16c ? &avx2::table : &avx2::table_without_f16c;
  }();
  return table;
#else
  return nullptr;
#endif
}

}  // namespace sn_kernels
