// Inner loops of the float32 CPU kernels, written once and compiled twice: for the
// baseline ISA (sn_kernels_cpu.cpp) and for AVX2+FMA (sn_kernels_cpu_avx2.cpp, chosen at
// run time when the CPU has it).  No includes, no library calls and internal linkage only,
// so that nothing compiled for AVX2 can be merged into baseline code by the linker.
//
// Include inside a namespace; defines a `static const F32Loops table`.

#ifndef SN_F32_LANES
#define SN_F32_LANES 16
#endif

namespace {

constexpr int kLanes = SN_F32_LANES;

inline float lane_total(float* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// sum_k a[k] * b[k]
float dot(const float* __restrict a, const float* __restrict b, long len) {
  float acc[kLanes] = {};
  long k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  for (int l = 0; k < len; ++k, ++l) acc[l] += a[k] * b[k];
  return lane_total(acc);
}

// y[k] += alpha * a[k]
void axpy(float* __restrict y, const float* __restrict a, float alpha, long len) {
  for (long k = 0; k < len; ++k) y[k] += alpha * a[k];
}

// y[k] += alpha[0] * a0[k] + ... + alpha[3] * a3[k], accumulated in that order: the same roundings as
// four axpy calls, with one load and store of y instead of four
void axpy4(float* __restrict y, const float* __restrict a0, const float* __restrict a1, const float* __restrict a2,
           const float* __restrict a3, const float* __restrict alpha, long len) {
  const float b0 = alpha[0], b1 = alpha[1], b2 = alpha[2], b3 = alpha[3];
  for (long k = 0; k < len; ++k) {
    float acc = y[k];
    acc += b0 * a0[k];
    acc += b1 * a1[k];
    acc += b2 * a2[k];
    acc += b3 * a3[k];
    y[k] = acc;
  }
}

// y[k] = w[k] / sigma
void divide(float* __restrict y, const float* __restrict w, float sigma, long len) {
  for (long k = 0; k < len; ++k) y[k] = w[k] / sigma;
}

// y[k] = (g[k] - c * (ui * v[k])) / sigma
void grad_row(float* __restrict y, const float* __restrict g, const float* __restrict v, float c, float ui,
              float sigma, long len) {
  for (long k = 0; k < len; ++k) y[k] = (g[k] - c * (ui * v[k])) / sigma;
}

}  // namespace

static const sn_kernels::F32Loops table = {&dot, &axpy, &axpy4, &divide, &grad_row};
