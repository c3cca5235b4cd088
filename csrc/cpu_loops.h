// The float32 inner-loop table of the CPU kernels (baseline or AVX2+FMA+F16C, chosen at run time), with the
// W / sigma loops of the other dtypes.
#pragma once

#include <cstdlib>
#include <cstring>

namespace sn_kernels {

// the longest piece (dim != 0) that dot_rows_f16 takes: its buffer of widened elements holds this many floats
constexpr long DOT_ROWS_WIDE = 4096;

struct F32Loops {
  float (*dot)(const float*, const float*, long);
  void (*axpy)(float*, const float*, float, long);
  void (*axpy4)(float*, const float*, const float*, const float*, const float*, const float*, long);
  void (*divide)(float*, const float*, float, long);
  // grad_row, grad_rows: multiplied by `inv` (grad_factor: 1 / sigma), or divided by sigma where inv is 0
  void (*grad_row)(float*, const float*, const float*, float, float, float, float, long);
  // many short rows per call (the (outer, m, inner) layouts of dim != 0, tall narrow weights):
  // the same arithmetic per element as the per-row loops above
  void (*dot_rows)(float*, const float*, const float*, long, long, long, long);
  void (*add_rows_outer)(float*, const float*, const float*, long, long, long, long);
  void (*grad_rows)(float*, const float*, const float*, const float*, float, float, float, long, long, long, long);
  // W / sigma of float64, bfloat16 and float16 weights (16-bit ones as their bits), rounded as the generic
  // loops and ATen's conversions round; divide_f16 is nullptr without F16C (the baseline table)
  void (*divide_f64)(double*, const double*, double, long);
  void (*divide_bf16)(unsigned short*, const unsigned short*, float, long);
  void (*divide_f16)(unsigned short*, const unsigned short*, float, long);
  // float16 bits widened to float32 (exact); nullptr without F16C
  void (*widen_f16)(float*, const unsigned short*, long);
  // dot_rows on float16 bits, widened as they are read (rows of more than 8 elements when outer == 1, pieces of
  // at most DOT_ROWS_WIDE otherwise): the float32 loop's sums on the exactly widened values, the same bits; nullptr without F16C
  void (*dot_rows_f16)(float*, const unsigned short*, const float*, long, long, long, long);
  // dot and dot_rows of float64 weights (the AVX2 table only; nullptr in the baseline one, which keeps the generic
  // loops)
  double (*dot_f64)(const double*, const double*, long);
  void (*dot_rows_f64)(double*, const double*, const double*, long, long, long, long);
};

// nullptr when this build or this CPU has no AVX2+FMA (the float16 entries: nullptr without F16C)
const F32Loops* f32_loops_avx2();

// The table the kernels use: AVX2+FMA when available, unless SN_KERNELS_CPU_ISA=baseline
// (tests compare the two); ``baseline`` otherwise.
inline const F32Loops* select_f32_loops(const F32Loops* baseline) {
  const char* isa = std::getenv("SN_KERNELS_CPU_ISA");
  const bool baseline_only = isa != nullptr && std::strcmp(isa, "baseline") == 0;
  const F32Loops* t = baseline_only ? nullptr : f32_loops_avx2();
  return t != nullptr ? t : baseline;
}

}  // namespace sn_kernels
