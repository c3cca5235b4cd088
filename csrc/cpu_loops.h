// The float32 inner-loop table of the CPU kernels (baseline or AVX2+FMA, chosen at run time).
#pragma once

namespace sn_kernels {

struct F32Loops {
  float (*dot)(const float*, const float*, long);
  void (*axpy)(float*, const float*, float, long);
  void (*axpy4)(float*, const float*, const float*, const float*, const float*, const float*, long);
  void (*divide)(float*, const float*, float, long);
  void (*grad_row)(float*, const float*, const float*, float, float, float, long);
};

// nullptr when this build or this CPU has no AVX2+FMA
const F32Loops* f32_loops_avx2();

}  // namespace sn_kernels
