// Inner loops of the float32 CPU kernels (and W / sigma of the other dtypes), written once and compiled
// for the baseline ISA (sn_kernels_cpu.cpp, sn_kernels_grouped_cpu.cpp) and for AVX2+FMA+F16C
// (sn_kernels_cpu_avx2.cpp, SN_F32_AVX2 defined, chosen at run time when the CPU has it).  No includes, no
// library calls and internal linkage only, so that nothing compiled for AVX2 can be merged into baseline
// code by the linker.
//
// Include inside a namespace; defines a `static const F32Loops table` (and, for AVX2,
// `table_without_f16c`: its float16 entries nullptr).

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

#ifndef SN_F32_AVX2
// sum_k a[k] * b[k]
float dot(const float* __restrict a, const float* __restrict b, long len) {
  float acc[kLanes] = {};
  long k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  for (int l = 0; k < len; ++k, ++l) acc[l] += a[k] * b[k];
  return lane_total(acc);
}
#else
typedef float sn_v8sf __attribute__((vector_size(32)));
typedef int sn_v8si __attribute__((vector_size(32)));
typedef short sn_v8hi __attribute__((vector_size(16)));
typedef double sn_v4df __attribute__((vector_size(32)));
typedef long long sn_v4di __attribute__((vector_size(32)));
static_assert(kLanes == 32, "the AVX2 dot keeps 32 lanes in four vectors");

inline sn_v8sf load8(const float* p) {
  sn_v8sf v;
  __builtin_memcpy(&v, p, 32);
  return v;
}

// p[0, n) for 1 <= n <= 8, zeros after: a masked load reads nothing past p + n
inline sn_v8sf load8_first(const float* p, long n) {
  const sn_v8si lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return __builtin_ia32_maskloadps256(reinterpret_cast<const sn_v8sf*>(p), lane < static_cast<int>(n));
}

inline sn_v8sf widen8_f16(const unsigned short* w) {  // float16 bits, widened exactly
  sn_v8hi h;
  __builtin_memcpy(&h, w, 16);
  return __builtin_ia32_vcvtph2ps256(h);
}

// float16 bits p[0, n) for 1 <= n <= 8 widened, zeros after (as load8_first's lanes)
inline sn_v8sf widen8_first_f16(const unsigned short* p, long n) {
  unsigned short in[8] = {};
  for (long j = 0; j < n; ++j) in[j] = p[j];
  return widen8_f16(in);
}

inline sn_v4df load4(const double* p) {
  sn_v4df v;
  __builtin_memcpy(&v, p, 32);
  return v;
}

// p[0, n) for 1 <= n <= 4, zeros after: a masked load reads nothing past p + n
inline sn_v4df load4_first(const double* p, long n) {
  const sn_v4di lane = {0, 1, 2, 3};
  return __builtin_ia32_maskloadpd256(reinterpret_cast<const sn_v4df*>(p), lane < static_cast<long long>(n));
}

// One vector of a's lanes (8 float32, 8 float16 widened exactly, 4 float64), and its first n lanes with zeros after
inline sn_v8sf lanes_of(const float* p) { return load8(p); }
inline sn_v8sf lanes_of(const unsigned short* p) { return widen8_f16(p); }
inline sn_v4df lanes_of(const double* p) { return load4(p); }
inline sn_v8sf first_lanes_of(const float* p, long n) { return load8_first(p, n); }
inline sn_v8sf first_lanes_of(const unsigned short* p, long n) { return n == 8 ? widen8_f16(p) : widen8_first_f16(p, n); }
inline sn_v4df first_lanes_of(const double* p, long n) { return load4_first(p, n); }

inline sn_v8sf fmadd(const sn_v8sf& a, const sn_v8sf& b, const sn_v8sf& c) { return __builtin_ia32_vfmaddps256(a, b, c); }
inline sn_v4df fmadd(const sn_v4df& a, const sn_v4df& b, const sn_v4df& c) { return __builtin_ia32_vfmaddpd256(a, b, c); }

// the last levels of lane_total: float32 lanes l + 4, l + 2, l + 1; float64 lanes l + 2, l + 1
inline float total8(const sn_v8sf& t) {
  const float q0 = t[0] + t[4], q1 = t[1] + t[5], q2 = t[2] + t[6], q3 = t[3] + t[7];
  return (q0 + q2) + (q1 + q3);
}
inline double total8(const sn_v4df& t) { return (t[0] + t[2]) + (t[1] + t[3]); }

// sum_k a[k] * b[k] in four vectors of lanes (32 float32 lanes, or 16 float64), in registers: the compiler kept the
// 32 lanes of the scalar loop in memory (a store and load per tail element, the lane tree through the stack: ~20 ns a
// row of 10 to 100 elements).  Each lane is one FMA chain; the tail's lanes through a masked load (lanes past the
// tail add 0 * 0, which changes only a -0 lane (an underflowed negative product), to +0: a zero sum may lose its
// sign); the tree as lane_total pairs its lanes.  One template for float32, float16 bits (each lane widened exactly
// as it is loaded: the float32 dot's bits on the widened values) and float64 (dot_f64).
template <typename Src, typename T>
inline T dot_of(const Src* __restrict a, const T* __restrict b, long len) {
  using V = decltype(lanes_of(b));
  constexpr long L = sizeof(V) / sizeof(T);
  V acc[4] = {};
  long k = 0;
  for (; k + 4 * L <= len; k += 4 * L)
    for (int j = 0; j < 4; ++j) acc[j] = fmadd(lanes_of(a + k + L * j), lanes_of(b + k + L * j), acc[j]);
  for (int j = 0; k < len; ++j, k += L) {
    const long n = len - k < L ? len - k : L;
    acc[j] = fmadd(first_lanes_of(a + k, n), first_lanes_of(b + k, n), acc[j]);
  }
  return total8((acc[0] + acc[2]) + (acc[1] + acc[3]));  // lanes l + 4 L / 2, then l + L, then total8
}

float dot(const float* __restrict a, const float* __restrict b, long len) { return dot_of(a, b, len); }
#endif

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
#ifndef SN_F32_AVX2
void divide(float* __restrict y, const float* __restrict w, float sigma, long len) {
  for (long k = 0; k < len; ++k) y[k] = w[k] / sigma;
}
#else
typedef unsigned int sn_v8su __attribute__((vector_size(32)));

// y[k] = w[k] / sigma with the division's bits, from the reciprocal (benchmarks/NOTES.md, L15): with
// z = RN(1 / sigma), q = RN(w z), r = RN(w - q sigma) (one FMA) and RN(q + r z) (one FMA) is the correctly
// rounded quotient w / sigma whenever nothing under- or overflows: Markstein's division with an FMA, the
// divisor known in advance (cited as known by Brisebarre, Muller and Raina, IEEE Trans. Computers 53(8),
// 2004).  q can be 1.5 ulp off, and r is then not always exact, so the claim rests on sweeps against the
// division (NOTES L15), the hardest cases, near rounding midpoints, for every mantissa of sigma included.  A
// multiply and two FMAs cost 0.7 of vdivps here, range check included.  Eight lanes take that route when
// every |w| lies in [lo, hi] = [2^-100 max(1, |sigma|), 2^100 min(1, |sigma|)] (so both w and w / sigma stay
// 2^25 or more inside the exponent range), tested on the bits in one unsigned compare; a block with a zero, a
// subnormal, a value outside that range, an infinity or a NaN, and a sigma or 1 / sigma that is not a normal
// number, are divided.
void divide(float* __restrict y, const float* __restrict w, float sigma, long len) {
  long k = 0;
  const float z = 1.0f / sigma;
  if (__builtin_isnormal(sigma) && __builtin_isnormal(z)) {
    const float a = __builtin_fabsf(sigma);
    const float lo = 0x1p-100f * (a > 1.0f ? a : 1.0f), hi = 0x1p100f * (a < 1.0f ? a : 1.0f);
    unsigned int lo_bits, hi_bits;
    __builtin_memcpy(&lo_bits, &lo, 4);
    __builtin_memcpy(&hi_bits, &hi, 4);
    const unsigned int span = hi_bits - lo_bits;
    const sn_v8sf vs = {sigma, sigma, sigma, sigma, sigma, sigma, sigma, sigma};
    const sn_v8sf vz = {z, z, z, z, z, z, z, z};
    for (; k + 8 <= len; k += 8) {
      const sn_v8sf x = load8(w + k);
      sn_v8su bits;
      __builtin_memcpy(&bits, &x, 32);
      const sn_v8si inside = ((bits & 0x7FFFFFFFu) - lo_bits) <= span;  // lo <= |w| <= hi, not NaN
      sn_v8sf mask, out;
      __builtin_memcpy(&mask, &inside, 32);
      if (__builtin_ia32_movmskps256(mask) == 0xFF) {
        const sn_v8sf q = x * vz;
        out = fmadd(fmadd(-q, vs, x), vz, q);
      } else {
        out = x / vs;
      }
      __builtin_memcpy(y + k, &out, 32);
    }
  }
  for (; k < len; ++k) y[k] = w[k] / sigma;
}
#endif

// W / sigma of the other dtypes, with the roundings of the generic loops and ATen's conversions: float64
// divided as it is; bfloat16 widened exactly (its bits shifted), divided in float32 and rounded to nearest
// even (NaN to 0x7FC0), as c10::BFloat16 rounds.  Here so that they run AVX2 where ATen's division does.
// They keep the division: `divide`'s route from 1 / sigma, tried on bfloat16's and float16's conversions,
// was slower than the vectorized division beside them (0.89 against 0.74 and 0.43 against 0.39 ns per
// element; benchmarks/NOTES.md, L15).
void divide_f64(double* __restrict y, const double* __restrict w, double sigma, long len) {
  for (long k = 0; k < len; ++k) y[k] = w[k] / sigma;
}

void divide_bf16(unsigned short* __restrict y, const unsigned short* __restrict w, float sigma, long len) {
  for (long k = 0; k < len; ++k) {
    const unsigned int bits = static_cast<unsigned int>(w[k]) << 16;
    float x;
    __builtin_memcpy(&x, &bits, 4);
    const float q = x / sigma;
    unsigned int r;
    __builtin_memcpy(&r, &q, 4);
    y[k] = q != q ? static_cast<unsigned short>(0x7FC0)
                  : static_cast<unsigned short>((r + 0x7FFFu + ((r >> 16) & 1u)) >> 16);
  }
}

#ifdef SN_F32_AVX2
// float16 bits, eight at a time through `eight(out, in)`; the tail through a zero-padded block
template <typename T, typename Eight>
inline void by_eight_f16(T* __restrict y, const unsigned short* __restrict w, long len, const Eight& eight) {
  long k = 0;
  for (; k + 8 <= len; k += 8) eight(y + k, w + k);
  if (k < len) {
    unsigned short in[8] = {};
    T out[8];
    for (long j = k; j < len; ++j) in[j - k] = w[j];
    eight(out, in);
    for (long j = k; j < len; ++j) y[j] = out[j - k];
  }
}

// float16: F16C's conversions (exact widening; vcvtps2ph with immediate 0 rounds to nearest even, as
// ATen's conversion does)
void divide_f16(unsigned short* __restrict y, const unsigned short* __restrict w, float sigma, long len) {
  const sn_v8sf s = {sigma, sigma, sigma, sigma, sigma, sigma, sigma, sigma};
  by_eight_f16(y, w, len, [&](unsigned short* out, const unsigned short* in) {
    const sn_v8hi r = __builtin_ia32_vcvtps2ph256(widen8_f16(in) / s, 0);
    __builtin_memcpy(out, &r, 16);
  });
}

// y[k] = float(w[k]) for float16 bits w: exact
void widen_f16(float* __restrict y, const unsigned short* __restrict w, long len) {
  by_eight_f16(y, w, len, [](float* out, const unsigned short* in) {
    const sn_v8sf x = widen8_f16(in);
    __builtin_memcpy(out, &x, 32);
  });
}
#define SN_DIVIDE_F16 &divide_f16
#define SN_WIDEN_F16 &widen_f16
#else
#define SN_DIVIDE_F16 nullptr
#define SN_WIDEN_F16 nullptr
#endif

// y[k] = (g[k] - c * (ui * v[k])) * inv, or / sigma where inv is 0 (grad_factor)
void grad_row(float* __restrict y, const float* __restrict g, const float* __restrict v, float c, float ui,
              float sigma, float inv, long len) {
  if (inv != 0)
    for (long k = 0; k < len; ++k) y[k] = (g[k] - c * (ui * v[k])) * inv;
  else
    for (long k = 0; k < len; ++k) y[k] = (g[k] - c * (ui * v[k])) / sigma;
}

// dot(a, b, len) for len <= P <= 16 <= kLanes: each lane holds 0 + one product and the lane tree only adds
// zeros above lane P (no lane is ever -0), so the tree over P lanes gives dot's bits without its setup
template <int P>
inline float tree_dot(const float* a, const float* b, long len) {
  float acc[P];
  for (int l = 0; l < P; ++l) acc[l] = l < len ? 0.0f + a[l] * b[l] : 0.0f;
  for (int w = P / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

#ifdef SN_F32_AVX2
// the same trees on vectors (the compiler built them lane by lane): 0 + a b in each lane as one FMA with 0
template <>
inline float tree_dot<8>(const float* a, const float* b, long len) {
  const sn_v8sf zero = {};
  return total8(__builtin_ia32_vfmaddps256(load8_first(a, len), load8_first(b, len), zero));
}
// tree_dot<16> for 8 < len <= 16 (reads a[0, 8) whole), lanes l + 8 first as the tree over 16: float32, or float16
// bits widened as they are loaded (the same bits on the widened values)
template <typename Src>
inline float tree16_of(const Src* a, const float* b, long len) {
  const sn_v8sf zero = {};
  const sn_v8sf lo = fmadd(lanes_of(a), load8(b), zero);
  const sn_v8sf hi = fmadd(first_lanes_of(a + 8, len - 8), load8_first(b + 8, len - 8), zero);
  return total8(lo + hi);
}
template <>
inline float tree_dot<16>(const float* a, const float* b, long len) {
  return tree16_of(a, b, len);
}

// s[r] += dot of row r of a (float16 bits, len > 8 elements a row) with b: add_row_dots' arithmetic, each row
// widened in registers as it is read
inline void add_row_dots_f16(float* __restrict s, const unsigned short* __restrict a, const float* __restrict b,
                             long len, long rows) {
  if (len <= 16) {
    for (long r = 0; r < rows; ++r) s[r] += tree16_of(a + r * len, b, len);
  } else {
    for (long r = 0; r < rows; ++r) s[r] += dot_of(a + r * len, b, len);
  }
}

// the floats of float16 bits p[0, count), widened into buf (count <= its size)
inline const float* floats_of(const unsigned short* p, long count, float* buf) {
  widen_f16(buf, p, count);
  return buf;
}
#endif

inline const float* floats_of(const float* p, long, float*) { return p; }

// s[r] += dot(a + r * len, b, len) for r < rows
inline void add_row_dots(float* __restrict s, const float* __restrict a, const float* __restrict b, long len,
                         long rows) {
  if (len == 1) {
    const float b0 = b[0];  // one lane: 0 + a b (+0 for a zero product)
    for (long r = 0; r < rows; ++r) s[r] += 0.0f + a[r] * b0;
  } else if (len <= 2) {
    for (long r = 0; r < rows; ++r) s[r] += tree_dot<2>(a + r * len, b, len);
  } else if (len <= 4) {
    for (long r = 0; r < rows; ++r) s[r] += tree_dot<4>(a + r * len, b, len);
  } else if (len <= 8) {
    for (long r = 0; r < rows; ++r) s[r] += tree_dot<8>(a + r * len, b, len);
  } else if (len <= 16) {
    for (long r = 0; r < rows; ++r) s[r] += tree_dot<16>(a + r * len, b, len);
  } else {
    for (long r = 0; r < rows; ++r) s[r] += dot(a + r * len, b, len);
  }
}

// the sum of len partial sums (a fixed pairwise order over kLanes lanes)
inline float row_total(const float* x, long len) {
  float acc[kLanes] = {};
  for (long k = 0; k < len; ++k) acc[k % kLanes] += x[k];
  return lane_total(acc);
}

#ifdef SN_F32_AVX2
// float64 rows (dot_rows_f64: dot_rows_of with T = double): dot_of's sixteen lanes in four vectors of four, a row's
// piece partials by a 16-lane tree.  Shape-determined, as the float32 loops.
inline double dot_f64(const double* __restrict a, const double* __restrict b, long len) { return dot_of(a, b, len); }

// dot_f64 of rows of 2 to 16 elements, C = ceil(len / 4) chunks: dot_of's arithmetic with b's chunks loaded once
// (masked, zeros past len) and each row's chunks loaded whole, their lanes past len cleared by a bit mask (an
// entry of the next row, Inf or NaN included, never enters; a cleared lane is +0, as a masked load gives): the
// same lanes, FMAs and tree (with the +0 vectors of the chunks a row lacks, which turn an underflowed -0 lane
// into +0 as in dot_of), so dot_f64's bits.  Rows whose whole chunks would read past row `rows - 1` take
// dot_f64 itself.
template <int C>
inline void add_short_row_dots_f64(double* __restrict s, const double* __restrict a, const double* __restrict b,
                                   long len, long rows) {
  const sn_v4di lane = {0, 1, 2, 3};
  sn_v4df bv[C];
  sn_v4di keep[C];
  for (int j = 0; j < C; ++j) {
    const long n = len - 4 * j < 4 ? len - 4 * j : 4;
    keep[j] = lane < static_cast<long long>(n);  // all ones where the lane is in the row
    bv[j] = load4_first(b + 4 * j, n);
  }
  const sn_v4df zero = {};
  // row r reads a[r len, r len + 4 C): inside the rows while r len + 4 C <= rows len
  const long whole = rows * len >= 4 * C ? (rows * len - 4 * C) / len + 1 : 0;
  long r = 0;
  for (; r < whole; ++r) {
    const double* row = a + r * len;
    sn_v4df acc[4] = {};
    for (int j = 0; j < C; ++j) {
      const sn_v4di bits = reinterpret_cast<sn_v4di>(load4(row + 4 * j)) & keep[j];
      acc[j] = fmadd(reinterpret_cast<sn_v4df>(bits), bv[j], zero);
    }
    s[r] += total8((acc[0] + acc[2]) + (acc[1] + acc[3]));  // dot_of's tree, its +0 vectors included
  }
  for (; r < rows; ++r) s[r] += dot_f64(a + r * len, b, len);
}

inline void add_row_dots(double* __restrict s, const double* __restrict a, const double* __restrict b, long len,
                         long rows) {
  if (len == 1) {
    const double b0 = b[0];  // one lane: 0 + a b, a vectorized loop over the rows
    for (long r = 0; r < rows; ++r) s[r] += 0.0 + a[r] * b0;
  } else if (len <= 4) {
    add_short_row_dots_f64<1>(s, a, b, len, rows);
  } else if (len <= 8) {
    add_short_row_dots_f64<2>(s, a, b, len, rows);
  } else if (len <= 12) {
    add_short_row_dots_f64<3>(s, a, b, len, rows);
  } else if (len <= 16) {
    add_short_row_dots_f64<4>(s, a, b, len, rows);
  } else {
    for (long r = 0; r < rows; ++r) s[r] += dot_f64(a + r * len, b, len);
  }
}

inline double row_total(const double* x, long len) {
  double acc[16] = {};
  for (long k = 0; k < len; ++k) acc[k % 16] += x[k];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

inline const double* floats_of(const double* p, long, double*) { return p; }
#endif

// s[r] += sum_{o < outer, k < len} a[o * ostride + r * len + k] * b[o * len + k] for r < rows.
// outer == 1, len == 1 or len > 128: each row's dot (add_row_dots), its sum taken over o in order.  Otherwise (the
// (outer, m, inner) layouts of dim != 0: ConvTranspose kernels, Conv1d/3d along a later dim) a row is
// `outer` pieces of `len` elements, too short for a dot each (a lane tree per piece cost ~16 ns): the
// partial sums of every (row, k) are carried across o instead, a multiply-add per element in memory
// order over a block of rows against b's piece (tiled over eight rows for pieces under 32 elements, so
// that one vectorized loop serves any len), and each row's len partials added by row_total at the end.
// The order depends on the shape alone.  The sums are kept in a local block: threads sharing a cache line of s would otherwise contend.
// For float16 bits `a` (len <= DOT_ROWS_WIDE), each stretch of a that a loop reads (a block's rows of one piece)
// is first widened into an L1 buffer: the same loops on the same exactly widened values, so the float32 bits.
// T: the accumulation type (float, or double for float64 weights in the AVX2 table, dot_rows_f64).
template <typename T, typename Src>
void dot_rows_of(T* __restrict s, const Src* __restrict a, const T* __restrict b, long len, long rows, long outer,
                 long ostride) {
  constexpr bool widen = sizeof(Src) != sizeof(T);
  constexpr long ACC = DOT_ROWS_WIDE;  // (row, k) partial sums, and a widened stretch: 16 KiB each of float32
  if (widen && len > ACC) __builtin_trap();  // no stretch would fit the buffer (callers keep such W on a float32 copy)
  constexpr long MAX_TILED = 128;  // longer pieces take the dots (their per-piece cost is amortized)
  constexpr long MAX_UNROLLED = 32;  // shorter pieces are multiplied against v's piece tiled over 8 rows
  T wide[widen ? ACC : 1];
  if (outer == 1 || len == 1 || len > MAX_TILED) {
    constexpr long BLOCK = 512;
    T acc[BLOCK];
    // widened: at most ACC elements a stretch (which rows share a block does not change any row's sums)
    const long block = widen && BLOCK * len > ACC ? ACC / len : BLOCK;
    for (long r0 = 0; r0 < rows; r0 += block) {
      const long nr = rows - r0 < block ? rows - r0 : block;
      for (long r = 0; r < nr; ++r) acc[r] = s[r0 + r];
      for (long o = 0; o < outer; ++o)
        add_row_dots(acc, floats_of(a + o * ostride + r0 * len, nr * len, wide), b + o * len, len, nr);
      for (long r = 0; r < nr; ++r) s[r0 + r] = acc[r];
    }
    return;
  }
  T part[ACC];
  T pat[8 * MAX_UNROLLED];
  const bool tiled = len < MAX_UNROLLED;  // longer pieces vectorize on their own
  const long tile = tiled ? 8 * len : len;
  const long block = ACC / (8 * len) * 8;  // rows per block: a multiple of 8, at least 32
  for (long r0 = 0; r0 < rows; r0 += block) {
    const long nr = rows - r0 < block ? rows - r0 : block;
    const long count = nr * len;
    for (long j = 0; j < count; ++j) part[j] = T(0);
    for (long o = 0; o < outer; ++o) {
      const T* __restrict ao = floats_of(a + o * ostride + r0 * len, count, wide);
      const T* __restrict bo = b + o * len;
      const T* __restrict p = bo;
      if (tiled) {
        for (long q = 0; q < 8; ++q)
          for (long k = 0; k < len; ++k) pat[q * len + k] = bo[k];
        p = pat;
      }
      for (long j0 = 0; j0 < count; j0 += tile) {
        const long lim = count - j0 < tile ? count - j0 : tile;
        T* __restrict pj = part + j0;
        const T* __restrict aj = ao + j0;
        for (long t = 0; t < lim; ++t) pj[t] += aj[t] * p[t];
      }
    }
    for (long r = 0; r < nr; ++r) s[r0 + r] += row_total(part + r * len, len);
  }
}

void dot_rows(float* __restrict s, const float* __restrict a, const float* __restrict b, long len, long rows,
              long outer, long ostride) {
  dot_rows_of(s, a, b, len, rows, outer, ostride);
}

#ifdef SN_F32_AVX2
// dot_rows on float16 bits a (rows of at most DOT_ROWS_WIDE elements, or of more than 8 when outer == 1): rows of
// one piece (outer == 1) widened in registers by the dots themselves, pieces through the L1 buffer
void dot_rows_f16(float* __restrict s, const unsigned short* __restrict a, const float* __restrict b, long len,
                  long rows, long outer, long ostride) {
  if (outer == 1 && len > 8) return add_row_dots_f16(s, a, b, len, rows);
  dot_rows_of(s, a, b, len, rows, outer, ostride);
}
#define SN_DOT_ROWS_F16 &dot_rows_f16

void dot_rows_f64(double* __restrict s, const double* __restrict a, const double* __restrict b, long len, long rows,
                  long outer, long ostride) {
  dot_rows_of(s, a, b, len, rows, outer, ostride);
}
#define SN_DOT_ROWS_F64 &dot_f64, &dot_rows_f64
#else
#define SN_DOT_ROWS_F16 nullptr
#define SN_DOT_ROWS_F64 nullptr, nullptr
#endif

// out[o * len + k] += sum_{r < rows} y[r] * a[o * ostride + r * len + k] for o < outer, k < len, the rows added
// in order with axpy's roundings; eight outer indices at a time, so that short rows give independent chains
void add_rows_outer(float* __restrict out, const float* __restrict a, const float* __restrict y, long len, long rows,
                    long outer, long ostride) {
  for (long o0 = 0; o0 < outer; o0 += 8) {
    const long o1 = o0 + 8 < outer ? o0 + 8 : outer;
    for (long r = 0; r < rows; ++r) {
      const float yr = y[r];
      for (long o = o0; o < o1; ++o) {
        float* __restrict t = out + o * len;
        const float* ar = a + o * ostride + r * len;
        for (long k = 0; k < len; ++k) t[k] += yr * ar[k];
      }
    }
  }
}

// rows [r0, r1) of the (outer * m, len) layout: y[r][k] = (g[r][k] - c * (u[r % m] * v[(r / m) * len + k])) * inv
// (or / sigma where inv is 0), grad_row's arithmetic
void grad_rows(float* __restrict y, const float* __restrict g, const float* __restrict u, const float* __restrict v,
               float c, float sigma, float inv, long len, long m, long r0, long r1) {
  for (long r = r0, o = r0 / m, i = r0 % m; r < r1; r += m - i, ++o, i = 0) {
    const long rows = m - i < r1 - r ? m - i : r1 - r;  // the rows of outer index o
    const float* vo = v + o * len;
    const float* ui = u + i;
    const float* gr = g + r * len;
    float* yr = y + r * len;
    if (len == 1) {  // one element a row: a loop over the rows, vectorized
      const float v0 = vo[0];
      if (inv != 0)
        for (long j = 0; j < rows; ++j) yr[j] = (gr[j] - c * (ui[j] * v0)) * inv;
      else
        for (long j = 0; j < rows; ++j) yr[j] = (gr[j] - c * (ui[j] * v0)) / sigma;
    } else {
      for (long j = 0; j < rows; ++j) grad_row(yr + j * len, gr + j * len, vo, c, ui[j], sigma, inv, len);
    }
  }
}

}  // namespace

static const sn_kernels::F32Loops table = {&dot,      &axpy,           &axpy4,     &divide,     &grad_row,
                                           &dot_rows, &add_rows_outer, &grad_rows, &divide_f64, &divide_bf16,
                                           SN_DIVIDE_F16, SN_WIDEN_F16, SN_DOT_ROWS_F16, SN_DOT_ROWS_F64};
#ifdef SN_F32_AVX2
// for an AVX2+FMA CPU without F16C (none is known, but the check costs nothing): no float16 loops
static const sn_kernels::F32Loops table_without_f16c = {
    &dot, &axpy, &axpy4, &divide, &grad_row, &dot_rows, &add_rows_outer, &grad_rows, &divide_f64, &divide_bf16,
    nullptr, nullptr, nullptr, SN_DOT_ROWS_F64};
#endif
#undef SN_DIVIDE_F16
#undef SN_WIDEN_F16
#undef SN_DOT_ROWS_F16
#undef SN_DOT_ROWS_F64
