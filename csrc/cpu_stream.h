// Non-temporal ("streaming") stores for the CPU kernels' outputs that leave the caches anyway: a weight-sized
// output of STREAM_MIN elements or more (8 MiB of float32, a quarter of an L3 of 32 MiB) is computed by the
// usual loop into an L1 buffer of STREAM_BLOCK floats and then written around the caches, so the values are
// the same and the write costs |W| of memory traffic instead of 2|W| (no read-for-ownership of the lines).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sn_kernels {

constexpr int64_t STREAM_MIN = 1 << 21;
constexpr int64_t STREAM_BLOCK = 2048;  // floats per L1 buffer
constexpr int64_t STREAM_ROW = 512;     // grad_W rows shorter than this keep the plain stores (a buffer per row)

// SN_KERNELS_STREAM=0 turns the non-temporal stores off (for measurements; the same values either way)
inline bool stream_on() {
  static const bool on = [] {
    const char* e = std::getenv("SN_KERNELS_STREAM");
    return e == nullptr || std::string(e) != "0";
  }();
  return on;
}

// whether an output of `numel` float32 elements is written with non-temporal stores
inline bool streamed(int64_t numel) { return numel >= STREAM_MIN && stream_on(); }

// whether a grad_W of `numel` float32 elements in rows of `inner` is written around the caches, a row at a
// time through the L1 buffer (rows shorter than STREAM_ROW keep the plain stores)
inline bool streamed_rows(int64_t inner, int64_t numel) { return inner >= STREAM_ROW && streamed(numel); }

// dst[0, len) = src[0, len), dst written around the caches
inline void stream_store(float* dst, const float* src, int64_t len) {
#if defined(__SSE2__)
  int64_t k = 0;
  for (; k < len && (reinterpret_cast<uintptr_t>(dst + k) & 15) != 0; ++k) dst[k] = src[k];
  for (; k + 16 <= len; k += 16) {
    _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
    _mm_stream_ps(dst + k + 4, _mm_loadu_ps(src + k + 4));
    _mm_stream_ps(dst + k + 8, _mm_loadu_ps(src + k + 8));
    _mm_stream_ps(dst + k + 12, _mm_loadu_ps(src + k + 12));
  }
  for (; k + 4 <= len; k += 4) _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
  for (; k < len; ++k) dst[k] = src[k];
#else
  std::copy(src, src + len, dst);
#endif
}

// orders the streamed stores before what follows (the end of a parallel region)
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// fill(out, k, len) for k in [k0, k1) by blocks, written around the caches: fill writes out[0, len), the
// elements k .. k + len of the output, into an L1 buffer (the same loop, so the same values)
template <typename Fill>
inline void stream_blocks(float* y, int64_t k0, int64_t k1, const Fill& fill) {
  alignas(64) float buf[STREAM_BLOCK];
  for (int64_t k = k0; k < k1; k += STREAM_BLOCK) {
    const int64_t len = std::min(STREAM_BLOCK, k1 - k);
    fill(buf, k, len);
    stream_store(y + k, buf, len);
  }
}

}  // namespace sn_kernels
