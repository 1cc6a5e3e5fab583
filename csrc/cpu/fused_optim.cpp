// Fused multi-tensor Lion / AdamW steps and the gradient pass (sum of squares,
// non-finite flag) for CPU tensors (shardopt `cpu` backend).
//
// One call updates every tensor of the argument lists.  The work is cut into
// (tensor, chunk) units of at most kChunk elements and the units are shared
// out over OpenMP threads, so a list of many small tensors and a single huge
// tensor both keep every core busy.
//
// Numerics (see shardopt/kernels/torch_ops.py, the reference):
//   * all arithmetic is fp32 with the same order of operations as torch_ops;
//     the scalars are rounded to fp32 exactly like torch does it (Python
//     doubles cast to float, `1 - beta` taken in double first);
//   * only plain IEEE mul/add/sub/div/sqrt are used, and the file must be
//     compiled with -ffp-contract=off (no FMA contraction) and without
//     -ffast-math, so an element's result never depends on whether it lands
//     in the vector body or a scalar remainder.  A ZeRO-1 partition may start
//     at any element; the results are bitwise identical wherever it starts;
//   * bf16 params are widened exactly, updated in fp32 and stored with
//     round-to-nearest-even (like Tensor.copy_ from fp32);
//   * bf16 optimizer state (state_dtype="bf16") is widened exactly, the same
//     fp32 math runs, and the new values are stored with the stochastic
//     rounding of shardopt/kernels/state_precision.py, bit for bit: the random
//     bits are a hash of the element's new fp32 value and a per-tensor salt
//     (step * 0x9E3779B9 mod 2^32).  The state type is a template parameter,
//     so the fp32-state loops are the code they always were;
//   * int8 optimizer state (state_dtype="int8", lion_step_int8 /
//     adamw_step_int8): codes (int8 "signed" for the momenta, uint8 "sqrt"
//     for AdamW's second moments) plus one fp32 scale per block of 256
//     elements.  Each block is dequantized exactly as state_precision.dequantize
//     does, the same fp32 math as the fp32-state loops runs, and the block is
//     requantized from a stack buffer with its new absmax (max square root)
//     and the value-keyed stochastic rounding of state_precision.quantize, bit
//     for bit (the same hash and salt as bf16 state, of the new value or of its
//     square root).  Work units start at block boundaries;
//   * grads may be fp32, bf16, fp16 or fp64 (widened/rounded like .float());
//     the steps read them as torch_ops.effective_grads does:
//       g = float(g); g = -g if maximize; g = clamp(g, -v, v); g = g * grad_scale
//     (one fp32 multiply by -1 or 1, a NaN-preserving clamp against +-inf when
//     there is no clip value, a multiply by 1: all exact, so one compiled form
//     serves every combination of the options).  Gradients are never written.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__F16C__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__FAST_MATH__)
#error "fused_optim.cpp must not be compiled with -ffast-math (results must be IEEE exact)"
#endif

// No FMA contraction in the kernels below, even if a build forgets
// -ffp-contract=off (GCC's default for C++ is "fast").
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(_OPENMP)
#define SHARDOPT_SIMD _Pragma("omp simd")
// a loop that also takes the max of the uint32 variable `bmax` (int8 blocks)
#define SHARDOPT_SIMD_BMAX _Pragma("omp simd reduction(max : bmax)")
#elif defined(__clang__)
#define SHARDOPT_SIMD _Pragma("clang loop vectorize(enable)")
#define SHARDOPT_SIMD_BMAX SHARDOPT_SIMD
#elif defined(__GNUC__)
#define SHARDOPT_SIMD _Pragma("GCC ivdep")
#define SHARDOPT_SIMD_BMAX SHARDOPT_SIMD
#else
#define SHARDOPT_SIMD
#define SHARDOPT_SIMD_BMAX
#endif

namespace {

// Elements per work unit: 32K fp32 = 128 KiB per stream, big enough to
// amortize scheduling, small enough to balance a handful of tensors.
#ifndef SHARDOPT_CHUNK_ELEMS
#define SHARDOPT_CHUNK_ELEMS 32768
#endif
constexpr int64_t kChunk = SHARDOPT_CHUNK_ELEMS;
// Each thread of a call gets at least this many elements (see pick_threads).
#ifndef SHARDOPT_MIN_PER_THREAD
#define SHARDOPT_MIN_PER_THREAD (1 << 17)
#endif
constexpr int64_t kMinPerThread = SHARDOPT_MIN_PER_THREAD;
// fp16 grads are widened into a stack buffer of this many floats at a time.
constexpr int64_t kHalfBlock = 2048;
// Elements per fp32 scale of int8 state (state_precision.BLOCK).
constexpr int64_t kQBlock = 256;
static_assert(kChunk % kQBlock == 0, "int8 units hold whole blocks");

// ---------------------------------------------------------------- storage

struct bf16_storage {
  uint16_t x;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float load_f32(const float* p, int64_t i) { return p[i]; }
inline float load_f32(const double* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_f32(const bf16_storage* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(p[i].x) << 16);
}

inline void store_f32(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f32(bf16_storage* p, int64_t i, float v) {
  // Round to nearest even; NaN becomes the canonical quiet NaN 0x7FC0.
  const uint32_t u = float_to_bits(v);
  const uint32_t bias = ((u >> 16) & 1u) + 0x7FFFu;
  const uint32_t r = (u + bias) >> 16;
  p[i].x = static_cast<uint16_t>(v != v ? 0x7FC0u : r);
}

// The 32-bit finalizer of state_precision.mix32 (uint32 arithmetic wraps mod 2^32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// state_precision.salt: (step * 0x9E3779B9) mod 2^32, for any int64 step.
inline uint32_t state_salt(int64_t step) {
  return static_cast<uint32_t>(static_cast<uint64_t>(step) * 0x9E3779B9ull);
}

// Optimizer state: fp32 is stored as it is (the salt is unused); bf16 by
// state_precision.round_bf16: (u + (mix32(u ^ salt) & 0xFFFF)) >> 16 for a
// finite value (a carry into the exponent is the next bf16 value, up to inf),
// round to nearest for inf/NaN (inf stays inf; NaN is the canonical quiet NaN
// 0x7FC0, as store_f32 writes it).  No 32-bit overflow: |u| <= 0x7F7FFFFF
// for a finite value, so u + 0xFFFF keeps the sign bit.
inline void store_state(float* p, int64_t i, float v, uint32_t /*salt*/) { p[i] = v; }
inline void store_state(bf16_storage* p, int64_t i, float v, uint32_t salt) {
  const uint32_t u = float_to_bits(v);
  const uint32_t sr = (u + (mix32(u ^ salt) & 0xFFFFu)) >> 16;
  const uint32_t special = v != v ? 0x7FC0u : (u >> 16);  // inf: the low bits are zero
  p[i].x = static_cast<uint16_t>((u & 0x7F800000u) == 0x7F800000u ? special : sr);
}

// fp16 -> fp32 for a block (exact conversion).
void half_block_to_float(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// ------------------------------------------------------- gradient transform

// What the steps do to a gradient before their own math (torch_ops.effective_grads).
// Used only when some option is set (the XF template flag): the plain path is
// unchanged code.
struct GradXform {
  float sign = 1.0f;                      // -1 for maximize
  float lo = -INFINITY, hi = INFINITY;  // clip_value (rounded to fp32)
  float scale = 1.0f;                     // grad_scale
};

template <bool XF>
inline float xform(float g, const GradXform& x) {
  if (!XF) return g;
  g = g * x.sign;
  // torch.clamp keeps NaN: both comparisons are false for it.
  g = g < x.lo ? x.lo : g;
  g = g > x.hi ? x.hi : g;
  return g * x.scale;
}

// ------------------------------------------------------------------- Lion

struct LionScalars {
  float lr, b1, omb1, b2, omb2, wd;
};

template <bool WD, bool XF, typename PT, typename GT, typename MT>
void lion_block(PT* __restrict p, const GT* __restrict g, MT* __restrict m, int64_t n,
                const LionScalars& s, const GradXform& x, uint32_t salt) {
  const float lr = s.lr, b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, wd = s.wd;
  SHARDOPT_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float pf = load_f32(p, i);
    const float gf = xform<XF>(load_f32(g, i), x);
    const float mf = load_f32(m, i);
    const float c = mf * b1 + gf * omb1;
    // torch.sign: (c > 0) - (c < 0); sign(0) = sign(-0) = sign(nan) = 0.
    float u = (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);
    if (WD) u = u + pf * wd;
    store_f32(p, i, pf - u * lr);
    store_state(m, i, mf * b2 + gf * omb2, salt);
  }
}

// ------------------------------------------------------------------ AdamW

struct AdamWScalars {
  float b1, omb1, b2, omb2, eps, decay, step_size, bc2_sqrt;
};

// sqrt over a block.  IEEE sqrt is correctly rounded, so the vector and
// scalar forms agree bitwise.  (The compiler will not vectorize std::sqrt
// itself unless -fno-math-errno is given, because of errno.)
inline void sqrt_block(const float* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_sqrt_ps(_mm512_loadu_ps(src + i)));
#endif
#if defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_sqrt_ps(_mm256_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = std::sqrt(src[i]);
}

// With -fno-math-errno (passed by the JIT loader) the compiler vectorizes
// std::sqrt and AdamW runs as one pass per element.  Without it (e.g. a
// prebuilt extension compiled with other flags) the "split" form is used:
// the same operations in the same order, done in three passes over an
// L1-resident sub-block with an intrinsic sqrt in the middle.  Both forms
// give bitwise identical results; the split one is always compiled so the
// tests can check that.
#if defined(__NO_MATH_ERRNO__)
constexpr bool kOnePassAdamW = true;
#else
constexpr bool kOnePassAdamW = false;
#endif

// torch.maximum: NaN if either is NaN.
inline float nan_max(float a, float b) {
  const float r = a > b ? a : b;
  return (a != a || b != b) ? a + b : r;
}

template <bool WD, bool XF, bool AMS, typename PT, typename GT, typename MT>
void adamw_block_onepass(PT* __restrict p, const GT* __restrict g, MT* __restrict m,
                         MT* __restrict v, MT* __restrict vmax, int64_t n,
                         const AdamWScalars& s, const GradXform& x, uint32_t salt) {
  const float b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, eps = s.eps;
  const float decay = s.decay, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt;
  SHARDOPT_SIMD
  for (int64_t i = 0; i < n; ++i) {
    float pf = load_f32(p, i);
    const float gf = xform<XF>(load_f32(g, i), x);
    if (WD) pf = pf * decay;
    // the update reads the new fp32 moments; only the stored copies round
    const float mf = load_f32(m, i) * b1 + gf * omb1;
    const float vf = load_f32(v, i) * b2 + (gf * gf) * omb2;
    store_state(m, i, mf, salt);
    store_state(v, i, vf, salt);
    float vd = vf;
    if (AMS) {
      vd = nan_max(load_f32(vmax, i), vf);
      store_state(vmax, i, vd, salt);
    }
    const float denom = std::sqrt(vd) / bc2_sqrt + eps;
    store_f32(p, i, pf - (mf / denom) * step_size);
  }
}

template <bool WD, bool XF, bool AMS, typename PT, typename GT, typename MT>
void adamw_block_split(PT* __restrict p, const GT* __restrict g, MT* __restrict m,
                       MT* __restrict v, MT* __restrict vmax, int64_t n,
                       const AdamWScalars& s, const GradXform& x, uint32_t salt) {
  constexpr int64_t kSub = 512;
  // fp32 state is its own scratch; bf16 state keeps the unrounded moments here
  constexpr bool kWide = std::is_same_v<MT, float>;
  constexpr int64_t kWork = kWide ? 1 : kSub;
  alignas(64) float root[kSub];
  alignas(64) float mwork[kWork];
  alignas(64) float dwork[kWork];
  const float b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, eps = s.eps;
  const float decay = s.decay, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt;
  for (int64_t off = 0; off < n; off += kSub) {
    const int64_t len = std::min(kSub, n - off);
    PT* __restrict pp = p + off;
    const GT* __restrict gg = g + off;
    MT* __restrict mm = m + off;
    MT* __restrict vv = v + off;
    MT* __restrict vm = AMS ? vmax + off : nullptr;
    if constexpr (kWide) {
      SHARDOPT_SIMD
      for (int64_t i = 0; i < len; ++i) {
        const float gf = xform<XF>(load_f32(gg, i), x);
        mm[i] = mm[i] * b1 + gf * omb1;
        vv[i] = vv[i] * b2 + (gf * gf) * omb2;
        if (AMS) vm[i] = nan_max(vm[i], vv[i]);
      }
      sqrt_block(AMS ? vm : vv, root, len);
    } else {
      SHARDOPT_SIMD
      for (int64_t i = 0; i < len; ++i) {
        const float gf = xform<XF>(load_f32(gg, i), x);
        const float mf = load_f32(mm, i) * b1 + gf * omb1;
        const float vf = load_f32(vv, i) * b2 + (gf * gf) * omb2;
        mwork[i] = mf;
        store_state(mm, i, mf, salt);
        store_state(vv, i, vf, salt);
        float vd = vf;
        if (AMS) {
          vd = nan_max(load_f32(vm, i), vf);
          store_state(vm, i, vd, salt);
        }
        dwork[i] = vd;
      }
      sqrt_block(dwork, root, len);
    }
    SHARDOPT_SIMD
    for (int64_t i = 0; i < len; ++i) {
      float pf = load_f32(pp, i);
      if (WD) pf = pf * decay;
      const float denom = root[i] / bc2_sqrt + eps;
      const float mf = kWide ? load_f32(mm, i) : mwork[i];
      store_f32(pp, i, pf - (mf / denom) * step_size);
    }
  }
}

// The options of one AdamW call, as template flags.
template <bool WD_, bool SPLIT_, bool XF_, bool AMS_>
struct AdamWCfg {
  static constexpr bool WD = WD_, SPLIT = SPLIT_, XF = XF_, AMS = AMS_;
};

template <typename C, typename PT, typename GT, typename MT>
inline void adamw_block(PT* p, const GT* g, MT* m, MT* v, MT* vmax, int64_t n,
                        const AdamWScalars& s, const GradXform& x, uint32_t salt) {
  if constexpr (kOnePassAdamW && !C::SPLIT)
    adamw_block_onepass<C::WD, C::XF, C::AMS>(p, g, m, v, vmax, n, s, x, salt);
  else
    adamw_block_split<C::WD, C::XF, C::AMS>(p, g, m, v, vmax, n, s, x, salt);
}

// ------------------------------------------------------- int8 state blocks
//
// state_dtype="int8" (state_precision's int8 blocks): one code per element
// (int8 for the "signed" mapping of the momenta, uint8 for the "sqrt" mapping
// of AdamW's second moments) and one fp32 scale per kQBlock consecutive
// elements in flat order.  A step handles one block at a time: the old codes
// are dequantized into registers as state_precision.dequantize does, the fp32
// math of the fp32-state loops runs unchanged, the new fp32 values go to a
// small stack buffer (L1), and the block is requantized from it exactly as
// state_precision._quantize_flat does: new absmax (max sqrt), then the codes
// with the value-keyed stochastic rounding (mix32 of the new value's bits, or
// of its square root's, xor the salt).  No loop branches per element and every
// loop vectorizes (see floor_split); the units of a call start at block
// boundaries.

// state_precision.quantize's r = (h >> 8) * 2^-24 and the "sqrt" mapping's constants.
constexpr float kTwoM24 = 0x1p-24f;
constexpr float kSqrtSubLimit = 0x1p-14f;  // smallest normal "sqrt" code value (code 16)
constexpr float kSqrtSubStep = 0x1p18f;    // 1 / the step of the codes below 16

// state_precision.SQRT_TABLE[c], exactly: c * 2^-18 for c < 16, else the fp32
// with bits (c + 1792) << 19, i.e. (1 + (c & 15)/16) * 2^((c >> 4) - 15).
// (The select tests sub itself, c * 2^-18 < 2^-14, not c: see floor_split.)
inline float sqrt_code_value(uint32_t c) {
  const float sub = static_cast<float>(static_cast<int32_t>(c)) * 0x1p-18f;
  const float normal = bits_to_float((c + 1792u) << 19);
  return sub < kSqrtSubLimit ? sub : normal;
}

// Dequantized state (state_precision.dequantize): code * scale, or (T[code] * scale)^2.
inline float load_q8(const int8_t* c, int64_t i, float scale) {
  return static_cast<float>(c[i]) * scale;
}
inline float load_q8(const uint8_t* c, int64_t i, float scale) {
  const float s = sqrt_code_value(c[i]) * scale;
  return s * s;
}

// torch.amax of a block's |x| as fp32 bits: |x|'s bits order like its value,
// and every NaN's lie above inf's, so the integer max is the absmax, or a NaN
// if any element is NaN (what amax gives), and at least +0 (the reference
// pads a short block with zeros).  The steps fold it into the loop that
// computes the new values (abs_bits, a uint32 max reduction: no float
// compare, so it vectorizes without any NaN caveat).
inline uint32_t abs_bits(float v) { return float_to_bits(v) & 0x7FFFFFFFu; }

// A block's length: N when the caller instantiates a full block (the loops
// then have a constant trip count, measurably faster), else the argument.
template <int64_t N>
constexpr int64_t block_len(int64_t n) {
  return N > 0 ? N : n;
}

template <int64_t N = 0>
inline uint32_t block_absmax_bits(const float* __restrict x, int64_t n_) {
  const int64_t n = block_len<N>(n_);
  uint32_t bmax = 0;
  SHARDOPT_SIMD_BMAX
  for (int64_t i = 0; i < n; ++i) bmax = std::max(bmax, abs_bits(x[i]));
  return bmax;
}

// GCC tuned for AVX-512 x86 vectorizes with 256-bit vectors by default; the int8
// blocks are arithmetic-heavy enough that 512-bit ones are faster (about 15%
// per block from L1, 8% streaming from memory, measured on Sapphire Rapids), so
// the block kernels below ask for them, and stay out of line (one call per
// block) so that no caller compiles them with its own preference.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#define SHARDOPT_Q8_WIDE 1
#define SHARDOPT_Q8_BLOCK __attribute__((noinline))
#else
#define SHARDOPT_Q8_BLOCK
#endif

// r in [0, 1): the top 24 bits of the hash (exact in fp32).
inline float uniform24(uint32_t h) {
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * kTwoM24;
}

// floor(y) for |y| < 2^22 without a float -> int conversion: t = y + 1.5*2^23
// rounds y to the nearest integer k (ulp 1 there) and bits(t) - bits(1.5*2^23)
// is k; d = (t - 1.5*2^23) - y = k - y is exact, and k - 1 is the floor where
// d > 0.  Both steps' callers know |y| < 2^22 wherever y is finite, and d is
// not finite exactly where y is not (its bits are returned for that test).
//
// Why not std::floor and a select on isfinite(q): under GCC's default
// -ftrapping-math a float op (or conversion) whose result only one side of a
// select needs is moved under a branch, where it may not be executed
// speculatively, and the loop does not vectorize.  Here every float op feeds
// d, which decides the select, and what follows is integer arithmetic.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

struct SplitFloor {
  int32_t value;  // floor(y) where y is finite
  uint32_t d_bits;
};

inline SplitFloor floor_split(float y) {
  const float t = y + kRoundMagic;
  const float d = (t - kRoundMagic) - y;
  const uint32_t bd = float_to_bits(d);
  const int32_t k = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kRoundMagic));
  return SplitFloor{k - (static_cast<int32_t>(bd) > 0 ? 1 : 0), bd};  // d > 0: a positive float's bits
}

inline bool finite_bits(uint32_t b) { return (b & 0x7F800000u) != 0x7F800000u; }

// The "signed" mapping of one block of new values x (state_precision._quantize_flat):
// scale = absmax / 127, q = x / scale, code = clamp(floor(q + r), -127, 127), 0 where q is
// not finite; r from mix32(bits(x) ^ salt).  absmax_bits: block_absmax_bits(x, n).
template <int64_t N = 0>
inline void quantize_signed(const float* __restrict x, int64_t n_, uint32_t absmax_bits,
                            uint32_t salt, int8_t* __restrict codes, float* __restrict scale_out) {
  const int64_t n = block_len<N>(n_);
  const float scale = bits_to_float(absmax_bits) / 127.0f;
  *scale_out = scale;
  if (scale > 0.0f && scale < INFINITY) {
    // the usual block: every q is finite, |q| <= 127 * 1.5 (a subnormal scale rounds
    // by at most half of itself), and floor_split needs no finiteness test.  The
    // codes go through an int32 buffer: narrowing in the loop would make it run
    // 32 lanes per iteration (the int8 store's width), which spills registers.
    int64_t i0 = 0;
#if defined(__AVX512F__)
    // The same math in AVX-512 intrinsics, 16 lanes at a time: floor(q + r) is one
    // conversion rounding toward -inf (exact for |q + r| < 2^31), and the narrowing
    // store saturates at 127, so only the lower clamp is left.  What GCC makes of
    // the loop below takes about 30 instructions per 16 codes, these about 19.  With
    // lion_q8_block's own intrinsics, side by side on Zen 4 (2 threads): the int8
    // Lion step 0.46 -> 0.35 ms per 1M elements in L3, 9.4 -> 8.4 ms on 23.1M.
    {
      const __m512 vscale = _mm512_set1_ps(scale);
      const __m512i vsalt = _mm512_set1_epi32(static_cast<int32_t>(salt));
      const __m512i k1 = _mm512_set1_epi32(0x7FEB352D);
      const __m512i k2 = _mm512_set1_epi32(static_cast<int32_t>(0x846CA68Bu));
      const __m512 two_m24 = _mm512_set1_ps(kTwoM24);
      const __m512i lo = _mm512_set1_epi32(-127);
      for (; i0 + 16 <= n; i0 += 16) {
        const __m512 v = _mm512_loadu_ps(x + i0);
        __m512i h = _mm512_xor_si512(_mm512_castps_si512(v), vsalt);  // mix32(bits(v) ^ salt)
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
        h = _mm512_mullo_epi32(h, k1);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
        h = _mm512_mullo_epi32(h, k2);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
        const __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), two_m24);
        const __m512 y = _mm512_add_ps(_mm512_div_ps(v, vscale), r);
        __m512i c = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        c = _mm512_max_epi32(c, lo);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i0), _mm512_cvtsepi32_epi8(c));
      }
      if (i0 == n) return;
    }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
    // AVX2: 8 lanes; floor by vroundps, the narrowing by two saturating packs (which
    // interleave the 128-bit lanes: one permute puts the 32 codes back in order).
    {
      const __m256 vscale = _mm256_set1_ps(scale);
      const __m256i vsalt = _mm256_set1_epi32(static_cast<int32_t>(salt));
      const __m256i k1 = _mm256_set1_epi32(0x7FEB352D);
      const __m256i k2 = _mm256_set1_epi32(static_cast<int32_t>(0x846CA68Bu));
      const __m256 two_m24 = _mm256_set1_ps(kTwoM24);
      const __m256i lo = _mm256_set1_epi32(-127);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      auto code8 = [&](int64_t i) {
        const __m256 v = _mm256_loadu_ps(x + i);
        __m256i h = _mm256_xor_si256(_mm256_castps_si256(v), vsalt);
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        h = _mm256_mullo_epi32(h, k1);
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
        h = _mm256_mullo_epi32(h, k2);
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        const __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), two_m24);
        const __m256 y = _mm256_add_ps(_mm256_div_ps(v, vscale), r);
        return _mm256_max_epi32(_mm256_cvttps_epi32(_mm256_floor_ps(y)), lo);
      };
      for (; i0 + 32 <= n; i0 += 32) {
        const __m256i ab = _mm256_packs_epi32(code8(i0), code8(i0 + 8));
        const __m256i cd = _mm256_packs_epi32(code8(i0 + 16), code8(i0 + 24));
        const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i0), q);
      }
      if (i0 == n) return;
    }
#endif
    alignas(64) int32_t wide[kQBlock];
    SHARDOPT_SIMD
    for (int64_t i = i0; i < n; ++i) {
      const float v = x[i];
      const float y = v / scale + uniform24(mix32(float_to_bits(v) ^ salt));
      const float t = y + kRoundMagic;
      int32_t c = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kRoundMagic)) -
                  ((t - kRoundMagic) > y ? 1 : 0);
      c = c < -127 ? -127 : c;
      c = c > 127 ? 127 : c;
      wide[i] = c;
    }
    SHARDOPT_SIMD
    for (int64_t i = i0; i < n; ++i) codes[i] = static_cast<int8_t>(wide[i]);
    return;
  }
  // scale 0 (an all-zero block, or one that underflows), inf or NaN: q may be inf or NaN
  SHARDOPT_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float q = v / scale;
    // |q| <= 127 * 1.5 where finite (a subnormal scale rounds by at most half of itself)
    const SplitFloor f = floor_split(q + uniform24(mix32(float_to_bits(v) ^ salt)));
    int32_t c = f.value;
    c = c < -127 ? -127 : c;
    c = c > 127 ? 127 : c;
    // q (so q + r) inf or NaN: an all-zero block (0 / 0), an inf or NaN value: code 0
    codes[i] = static_cast<int8_t>(finite_bits(f.d_bits) ? c : 0);
  }
}

// The "sqrt" mapping of one block, given the square roots s of the new values
// (the caller has them already: AdamW's denominator is the same sqrt): scale =
// max(s), w = s / scale; w >= 2^-14: ((bits(w) + (h & 0x7FFFF)) >> 19) - 1792,
// below: floor(w * 2^18 + r); 0 where w is not finite; h = mix32(bits(s) ^ salt).
// max_bits: block_absmax_bits(s, n) (s >= 0 or NaN; a root -0 counts as +0).
template <int64_t N = 0>
inline void quantize_sqrt_roots(const float* __restrict s, int64_t n_, uint32_t max_bits,
                                uint32_t salt, uint8_t* __restrict codes,
                                float* __restrict scale_out) {
  const int64_t n = block_len<N>(n_);
  const float scale = bits_to_float(max_bits);
  SHARDOPT_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float si = s[i];
    const float w = si / scale;
    const uint32_t h = mix32(float_to_bits(si) ^ salt);
    const uint32_t bw = float_to_bits(w);
    // w in [2^-14, 1] where selected: no carry past bit 31
    const uint32_t normal = ((bw + (h & 0x7FFFFu)) >> 19) - 1792u;
    // w <= 1 where finite: y <= 2^18 + 1 (below 2^-14, y in [0, 17))
    const SplitFloor sub = floor_split(w * kSqrtSubStep + uniform24(h));
    // w >= 2^-14 by the bits (w >= +0 or -0 where finite: the integer order is the value order)
    const uint32_t c = static_cast<int32_t>(bw) >= static_cast<int32_t>(float_to_bits(kSqrtSubLimit))
                           ? normal
                           : static_cast<uint32_t>(sub.value);
    codes[i] = static_cast<uint8_t>(finite_bits(sub.d_bits) ? c : 0u);  // w inf or NaN: 0
  }
  *scale_out = scale;
}

template <bool WD, bool XF, int64_t N, typename PT, typename GT>
SHARDOPT_Q8_BLOCK void lion_q8_block(PT* __restrict p, const GT* __restrict g,
                                     int8_t* __restrict mc, float* __restrict ms, int64_t n_,
                                     const LionScalars& s, const GradXform& x, uint32_t salt) {
  const int64_t n = block_len<N>(n_);
  const float lr = s.lr, b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, wd = s.wd;
  const float sc = *ms;
  alignas(64) float nm[kQBlock];
#if defined(__AVX512F__)
  // A full block of fp32 params and grads with no gradient transform (what a plain
  // fp32 model's step runs): the loops below in AVX-512 intrinsics, the old codes
  // dequantized in the same loop (one sign-extending load; see quantize_signed).
  if constexpr (N == kQBlock && !XF && std::is_same_v<PT, float> && std::is_same_v<GT, float>) {
    const __m512 vb1 = _mm512_set1_ps(b1), vomb1 = _mm512_set1_ps(omb1);
    const __m512 vb2 = _mm512_set1_ps(b2), vomb2 = _mm512_set1_ps(omb2);
    const __m512 vlr = _mm512_set1_ps(lr), vwd = _mm512_set1_ps(wd), vsc = _mm512_set1_ps(sc);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512 minus_one = _mm512_set1_ps(-1.0f);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t i = 0; i < N; i += 16) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mc + i));
      const __m512 mf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), vsc);
      const __m512 pf = _mm512_loadu_ps(p + i);
      const __m512 gf = _mm512_loadu_ps(g + i);
      const __m512 c = _mm512_add_ps(_mm512_mul_ps(mf, vb1), _mm512_mul_ps(gf, vomb1));
      // sign(c): +0 where c is 0 or NaN, as (c > 0) - (c < 0) gives
      __m512 u = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ), one);
      u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ), minus_one);
      if (WD) u = _mm512_add_ps(u, _mm512_mul_ps(pf, vwd));
      _mm512_storeu_ps(p + i, _mm512_sub_ps(pf, _mm512_mul_ps(u, vlr)));
      const __m512 mn = _mm512_add_ps(_mm512_mul_ps(mf, vb2), _mm512_mul_ps(gf, vomb2));
      _mm512_store_ps(nm + i, mn);
      vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(mn), abs_mask));
    }
    const auto bmax = static_cast<uint32_t>(_mm512_reduce_max_epu32(vmax));
    quantize_signed<N>(nm, n, bmax, salt, mc, ms);
    return;
  }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
  // The same block in AVX2 intrinsics, 8 lanes at a time (the sign by two compares
  // and masks, the absmax by an unsigned max of the bits).
  if constexpr (N == kQBlock && !XF && std::is_same_v<PT, float> && std::is_same_v<GT, float>) {
    const __m256 vb1 = _mm256_set1_ps(b1), vomb1 = _mm256_set1_ps(omb1);
    const __m256 vb2 = _mm256_set1_ps(b2), vomb2 = _mm256_set1_ps(omb2);
    const __m256 vlr = _mm256_set1_ps(lr), vwd = _mm256_set1_ps(wd), vsc = _mm256_set1_ps(sc);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 minus_one = _mm256_set1_ps(-1.0f);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i vmax = _mm256_setzero_si256();
    for (int64_t i = 0; i < N; i += 8) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mc + i));
      const __m256 mf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), vsc);
      const __m256 pf = _mm256_loadu_ps(p + i);
      const __m256 gf = _mm256_loadu_ps(g + i);
      const __m256 c = _mm256_add_ps(_mm256_mul_ps(mf, vb1), _mm256_mul_ps(gf, vomb1));
      // sign(c): +0 where c is 0 or NaN, as (c > 0) - (c < 0) gives
      __m256 u = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ), one),
                              _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_LT_OQ), minus_one));
      if (WD) u = _mm256_add_ps(u, _mm256_mul_ps(pf, vwd));
      _mm256_storeu_ps(p + i, _mm256_sub_ps(pf, _mm256_mul_ps(u, vlr)));
      const __m256 mn = _mm256_add_ps(_mm256_mul_ps(mf, vb2), _mm256_mul_ps(gf, vomb2));
      _mm256_store_ps(nm + i, mn);
      vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(mn), abs_mask));
    }
    __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
    quantize_signed<N>(nm, n, static_cast<uint32_t>(_mm_cvtsi128_si32(m4)), salt, mc, ms);
    return;
  }
#endif
  // dequantized first, in a loop of its own, for the same reason as quantize_signed's
  // int32 buffer: side by side on 23M elements (Zen 3, 2 threads) the two took the
  // int8 Lion step from 11.2 to 10.2 ms; for AdamW's three buffers it did not help.
  alignas(64) float old[kQBlock];
  SHARDOPT_SIMD
  for (int64_t i = 0; i < n; ++i) old[i] = load_q8(mc, i, sc);
  uint32_t bmax = 0;
  SHARDOPT_SIMD_BMAX
  for (int64_t i = 0; i < n; ++i) {
    const float pf = load_f32(p, i);
    const float gf = xform<XF>(load_f32(g, i), x);
    const float mf = old[i];
    const float c = mf * b1 + gf * omb1;
    float u = (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);
    if (WD) u = u + pf * wd;
    store_f32(p, i, pf - u * lr);
    const float mn = mf * b2 + gf * omb2;
    nm[i] = mn;
    bmax = std::max(bmax, abs_bits(mn));
  }
  quantize_signed<N>(nm, n, bmax, salt, mc, ms);
}

template <bool WD, bool XF, bool AMS, int64_t N, typename PT, typename GT>
SHARDOPT_Q8_BLOCK void adamw_q8_block(PT* __restrict p, const GT* __restrict g,
                                      int8_t* __restrict mc, float* __restrict ms,
                                      uint8_t* __restrict vc, float* __restrict vs,
                                      uint8_t* __restrict xc, float* __restrict xs, int64_t n_,
                                      const AdamWScalars& s, const GradXform& x, uint32_t salt) {
  const int64_t n = block_len<N>(n_);
  const float b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, eps = s.eps;
  const float decay = s.decay, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt;
  constexpr int64_t kMax = AMS ? kQBlock : 1;
  alignas(64) float mw[kQBlock];
  alignas(64) float vw[kQBlock];
  alignas(64) float vroot[kQBlock];
  alignas(64) float xw[kMax];
  alignas(64) float xroot[kMax];
  const float msc = *ms, vsc = *vs, xsc = AMS ? *xs : 0.0f;
  uint32_t bmax = 0;  // of the new exp_avg
  SHARDOPT_SIMD_BMAX
  for (int64_t i = 0; i < n; ++i) {
    const float gf = xform<XF>(load_f32(g, i), x);
    const float mf = load_q8(mc, i, msc) * b1 + gf * omb1;
    const float vf = load_q8(vc, i, vsc) * b2 + (gf * gf) * omb2;
    mw[i] = mf;
    vw[i] = vf;
    if (AMS) xw[i] = nan_max(load_q8(xc, i, xsc), vf);
    bmax = std::max(bmax, abs_bits(mf));
  }
  const uint32_t m_max = bmax;
  sqrt_block(vw, vroot, n);
  if (AMS) sqrt_block(xw, xroot, n);
  const float* __restrict root = AMS ? xroot : vroot;
  bmax = 0;  // of the denominator's roots (exp_avg_sq's, or the amsgrad maxima's)
  SHARDOPT_SIMD_BMAX
  for (int64_t i = 0; i < n; ++i) {
    float pf = load_f32(p, i);
    if (WD) pf = pf * decay;
    const float denom = root[i] / bc2_sqrt + eps;
    store_f32(p, i, pf - (mw[i] / denom) * step_size);
    bmax = std::max(bmax, abs_bits(root[i]));
  }
  quantize_signed<N>(mw, n, m_max, salt, mc, ms);
  if (AMS) {
    quantize_sqrt_roots<N>(xroot, n, bmax, salt, xc, xs);
    quantize_sqrt_roots<N>(vroot, n, block_absmax_bits<N>(vroot, n), salt, vc, vs);
  } else {
    quantize_sqrt_roots<N>(vroot, n, bmax, salt, vc, vs);
  }
}

#if defined(SHARDOPT_Q8_WIDE)
#pragma GCC pop_options
#endif

// How far ahead (in elements) a step prefetches the lines of its streams;
// kNoPrefetch: never.  SHARDOPT_STREAM_PREFETCH / SHARDOPT_Q8_PREFETCH (0 or
// 1) override the choice below.
constexpr int64_t kNoPrefetch = INT64_MAX / 4;
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || \
    defined(__znver5__)
#define SHARDOPT_ZEN 1
#else
#define SHARDOPT_ZEN 0
#endif
// int8 state: a block is mostly arithmetic (the hash, the division, the
// rounding) on L1-resident data, and the hardware prefetcher alone does not
// keep enough lines in flight across it.  1.25 blocks ahead measured best on a
// Xeon: a Lion step on 23M elements about 15% faster than without, 10% faster
// than 2 blocks ahead.  On Zen 3 it is 4% slower (Lion, 11.6 against 11.2 ms;
// AdamW 1%).
#ifndef SHARDOPT_Q8_PREFETCH
#define SHARDOPT_Q8_PREFETCH (!SHARDOPT_ZEN)
#endif
constexpr int64_t kQPrefetch = SHARDOPT_Q8_PREFETCH ? kQBlock + kQBlock / 4 : kNoPrefetch;
// The fp32/bf16-state steps are pure streams (3-4 read, 2-3 written).  On a
// Xeon the hardware prefetcher alone kept a Lion step on 23M elements at ~41
// GB/s, and prefetching each stream 2 blocks ahead gave ~10% more (1 block:
// less, 4 or 8: less again).  On Zen 3 (EPYC, -march=native defines
// __znver3__) the same prefetches made it ~13% slower (10.1 against 11.5 ms,
// 46 against 40 GB/s, side by side; AdamW 2%), so Zen builds leave both to the
// hardware.  The gradient pass (kStatPrefetch) follows the same switch.
#ifndef SHARDOPT_STREAM_PREFETCH
#define SHARDOPT_STREAM_PREFETCH (!SHARDOPT_ZEN)
#endif
constexpr int64_t kPrefetch = SHARDOPT_STREAM_PREFETCH ? 2 * kQBlock : kNoPrefetch;

template <typename T>
inline void prefetch_span(const T* ptr, int64_t n, bool write) {
  const char* c = reinterpret_cast<const char*>(ptr);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t k = 0; k < bytes; k += 64) {
    if (write)
      __builtin_prefetch(c + k, 1);
    else
      __builtin_prefetch(c + k, 0);
  }
#else
  (void)c;
  (void)bytes;
  (void)write;
#endif
}

// Runs f(g block, offset, length) over the blocks of blk (<= kQBlock) elements
// of n (int8 state: the tensor's scale block), prefetching the block AHEAD
// elements ahead (int8 state: kQPrefetch; fp32/bf16 state: kPrefetch) through
// pre(offset, length), up to `until` elements (the tensor's end: a thread's
// next unit usually follows this one).  fp16 grads are widened per block; the
// other grad types are read in place.
template <int64_t AHEAD = kQPrefetch, typename GT, typename P, typename F>
inline void with_block_grads(const GT* g, int64_t n, int64_t until, const P& pre, const F& f,
                             int64_t blk = kQBlock) {
  for (int64_t off = 0; off < n; off += blk) {
    const int64_t len = std::min(blk, n - off);
    if (off + AHEAD < until) {
      const int64_t ahead = off + AHEAD;
      prefetch_span(g + ahead, std::min(blk, until - ahead), false);
      pre(ahead, std::min(blk, until - ahead));
    }
    if constexpr (std::is_same_v<GT, at::Half>) {
      alignas(64) float buf[kQBlock];
      half_block_to_float(g + off, buf, len);
      f(static_cast<const float*>(buf), off, len);
    } else {
      f(g + off, off, len);
    }
  }
}

// ------------------------------------------------------- validation, units

enum class PKind : uint8_t { F32, BF16 };
enum class GKind : uint8_t { F32, BF16, F16, F64 };
// the state tensors of one param share it; INT8 state runs the *_q8 kernels
enum class SKind : uint8_t { F32, BF16, INT8 };

struct TensorRef {
  void* p;
  const void* g;
  void* m;     // int8 state: the codes
  void* v;     // AdamW only
  void* vmax;  // AdamW with amsgrad only
  float* ms;   // int8 state only: the block scales of m, v, vmax
  float* vs;
  float* vmaxs;
  int64_t numel;
  int64_t qb = kQBlock;  // int8 state only: elements per scale (state_precision.int8_block), <= kQBlock
  uint32_t salt;  // low-precision state's rounding salt (state_salt of the param's step)
  PKind pk;
  GKind gk;
  SKind sk;
};

struct Unit {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " (" << t.scalar_type() << ")";
  return os.str();
}

void check_tensor(const char* fn, const char* list, int64_t i, const at::Tensor& t,
                  const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), fn, ": ", list, "[", i, "] is undefined (None)");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", list, "[", i, "] must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", list, "[", i, "] must be a dense (strided) tensor");
  TORCH_CHECK(t.numel() == ref.numel(), fn, ": ", list, "[", i, "] has shape ", shape_str(t),
              " with ", t.numel(), " elements but params[", i, "] has shape ", shape_str(ref), " with ",
              ref.numel(), " elements");
  TORCH_CHECK(t.is_contiguous(), fn, ": ", list, "[", i, "] with shape ", shape_str(t),
              " and strides ", t.strides(), " must be contiguous");
}

GKind grad_kind(const char* fn, int64_t i, const at::Tensor& g) {
  switch (g.scalar_type()) {
    case at::kFloat: return GKind::F32;
    case at::kBFloat16: return GKind::BF16;
    case at::kHalf: return GKind::F16;
    case at::kDouble: return GKind::F64;
    default:
      TORCH_CHECK(false, fn, ": grads[", i, "] has dtype ", g.scalar_type(),
                  "; expected float32, bfloat16, float16 or float64");
  }
  return GKind::F32;
}

// exp_avg_sqs / max_exp_avg_sqs: exp_avgs[i]'s dtype (a param's state is all fp32 or all bf16).
void check_state(const char* fn, const char* list, int64_t i, const at::Tensor& t,
                 const at::Tensor& ref, const at::Tensor& first) {
  check_tensor(fn, list, i, t, ref);
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), fn, ": ", list, "[", i, "] has dtype ",
              t.scalar_type(), " but exp_avgs[", i, "] has ", first.scalar_type(),
              "; a parameter's optimizer state must be all float32 or all bfloat16");
}

// The param / grad half of a TensorRef (checked; pointers are set by the caller).
TensorRef param_ref(const char* fn, int64_t i, const at::Tensor& p, const at::Tensor& g) {
  TORCH_CHECK(p.defined(), fn, ": params[", i, "] is undefined (None)");
  check_tensor(fn, "params", i, p, p);
  check_tensor(fn, "grads", i, g, p);
  TensorRef r{};
  r.numel = p.numel();
  switch (p.scalar_type()) {
    case at::kFloat: r.pk = PKind::F32; break;
    case at::kBFloat16: r.pk = PKind::BF16; break;
    default:
      TORCH_CHECK(false, fn, ": params[", i, "] has dtype ", p.scalar_type(),
                  "; only float32 and bfloat16 params are supported");
  }
  r.gk = grad_kind(fn, i, g);
  return r;
}

std::vector<TensorRef> collect(const char* fn, const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& exp_avgs,
                               const std::vector<at::Tensor>* exp_avg_sqs,
                               const std::vector<at::Tensor>* max_exp_avg_sqs,
                               const std::vector<int64_t>* state_steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n &&
                  (exp_avg_sqs == nullptr || exp_avg_sqs->size() == n) &&
                  (max_exp_avg_sqs == nullptr || max_exp_avg_sqs->size() == n) &&
                  (state_steps == nullptr || state_steps->size() == n),
              fn, ": tensor lists must have equal lengths, got params=", n, ", grads=", grads.size(),
              ", exp_avgs=", exp_avgs.size(),
              exp_avg_sqs ? ", exp_avg_sqs=" + std::to_string(exp_avg_sqs->size()) : std::string(),
              max_exp_avg_sqs ? ", max_exp_avg_sqs=" + std::to_string(max_exp_avg_sqs->size())
                              : std::string(),
              state_steps ? ", state_step=" + std::to_string(state_steps->size()) : std::string());
  std::vector<TensorRef> refs;
  refs.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const at::Tensor& p = params[k];
    TensorRef r = param_ref(fn, i, p, grads[k]);
    check_tensor(fn, "exp_avgs", i, exp_avgs[k], p);
    const at::Tensor& m = exp_avgs[k];
    switch (m.scalar_type()) {
      case at::kFloat: r.sk = SKind::F32; break;
      case at::kBFloat16: r.sk = SKind::BF16; break;
      default:
        TORCH_CHECK(false, fn, ": exp_avgs[", i, "] has dtype ", m.scalar_type(),
                    "; optimizer state must be float32 or bfloat16");
    }
    if (exp_avg_sqs) check_state(fn, "exp_avg_sqs", i, (*exp_avg_sqs)[k], p, m);
    if (max_exp_avg_sqs) check_state(fn, "max_exp_avg_sqs", i, (*max_exp_avg_sqs)[k], p, m);
    TORCH_CHECK(r.sk == SKind::F32 || state_steps != nullptr, fn, ": exp_avgs[", i,
                "] is bfloat16 state, whose stochastic rounding needs state_step (the parameter's "
                "step count)");
    r.salt = state_steps ? state_salt((*state_steps)[k]) : 0u;
    if (r.numel == 0) continue;
    r.p = p.data_ptr();
    r.g = grads[k].data_ptr();
    r.m = m.data_ptr();
    r.v = exp_avg_sqs ? (*exp_avg_sqs)[k].data_ptr() : nullptr;
    r.vmax = max_exp_avg_sqs ? (*max_exp_avg_sqs)[k].data_ptr() : nullptr;
    refs.push_back(r);
  }
  return refs;
}

// One int8 state list of a call: codes (int8 "signed" or uint8 "sqrt") and
// their fp32 block scales (state_precision.Q8's codes / scale).
struct Q8List {
  const char* codes_name;  // e.g. "exp_avg_codes"
  const char* scales_name;
  const std::vector<at::Tensor>* codes;
  const std::vector<at::Tensor>* scales;
  bool sqrt;
};

std::vector<TensorRef> collect_int8(const char* fn, const std::vector<at::Tensor>& params,
                                    const std::vector<at::Tensor>& grads,
                                    const std::vector<Q8List>& lists,
                                    const std::vector<int64_t>& state_steps,
                                    const c10::optional<std::vector<int64_t>>& blocks) {
  const size_t n = params.size();
  TORCH_CHECK(!blocks.has_value() || blocks->size() == n, fn, ": blocks has ",
              blocks.has_value() ? blocks->size() : 0, " entries for ", n, " params");
  std::ostringstream lens;
  bool equal = grads.size() == n && state_steps.size() == n;
  for (const Q8List& l : lists) {
    equal = equal && l.codes->size() == n && l.scales->size() == n;
    lens << ", " << l.codes_name << "=" << l.codes->size() << ", " << l.scales_name << "="
         << l.scales->size();
  }
  TORCH_CHECK(equal, fn, ": tensor lists must have equal lengths, got params=", n,
              ", grads=", grads.size(), lens.str(), ", state_step=", state_steps.size());
  std::vector<TensorRef> refs;
  refs.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const at::Tensor& p = params[k];
    TensorRef r = param_ref(fn, i, p, grads[k]);
    r.sk = SKind::INT8;
    void** code_ptrs[3] = {&r.m, &r.v, &r.vmax};
    float** scale_ptrs[3] = {&r.ms, &r.vs, &r.vmaxs};
    if (blocks.has_value()) {
      r.qb = (*blocks)[k];
      TORCH_CHECK(r.qb >= 1 && r.qb <= kQBlock, fn, ": blocks[", i, "] is ", r.qb,
                  "; a block holds 1 to ", kQBlock, " elements");
    }
    const int64_t n_blocks = (r.numel + r.qb - 1) / r.qb;
    for (size_t l = 0; l < lists.size(); ++l) {
      const Q8List& q = lists[l];
      const at::Tensor& c = (*q.codes)[k];
      const at::Tensor& sc = (*q.scales)[k];
      check_tensor(fn, q.codes_name, i, c, p);
      const auto want = q.sqrt ? at::kByte : at::kChar;
      TORCH_CHECK(c.scalar_type() == want, fn, ": ", q.codes_name, "[", i, "] has dtype ",
                  c.scalar_type(), "; the ", q.sqrt ? "\"sqrt\"" : "\"signed\"",
                  " int8 mapping's codes are ", q.sqrt ? "uint8" : "int8");
      TORCH_CHECK(sc.defined() && sc.device().is_cpu() && sc.layout() == at::kStrided &&
                      sc.scalar_type() == at::kFloat && sc.is_contiguous(),
                  fn, ": ", q.scales_name, "[", i, "] must be a contiguous float32 CPU tensor, got ",
                  sc.defined() ? shape_str(sc) : std::string("undefined"));
      TORCH_CHECK(sc.numel() == n_blocks, fn, ": ", q.scales_name, "[", i, "] has ", sc.numel(),
                  " scales but params[", i, "] has ", r.numel, " elements: ", n_blocks,
                  " blocks of ", r.qb);
      if (r.numel == 0) continue;
      *code_ptrs[l] = c.data_ptr();
      *scale_ptrs[l] = sc.data_ptr<float>();
    }
    r.salt = state_salt(state_steps[k]);
    if (r.numel == 0) continue;
    r.p = p.data_ptr();
    r.g = grads[k].data_ptr();
    refs.push_back(r);
  }
  return refs;
}

// The kernels write through raw pointers; bump the version counters like an
// in-place ATen op would, so autograd can detect a stale saved tensor.
void bump_versions(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

// Splits every tensor into units of at most kChunk elements.  Tensors are
// cut evenly (e.g. 40000 -> 2 x 20000) so no unit is a tiny tail; with align
// for int8 state every unit but a tensor's last is a multiple of its block r.qb.
std::vector<Unit> make_units(const std::vector<TensorRef>& refs, int64_t* total) {
  std::vector<Unit> units;
  int64_t sum = 0;
  for (const auto& r : refs) sum += (r.numel + kChunk - 1) / kChunk;
  units.reserve(static_cast<size_t>(sum));
  *total = 0;
  for (size_t t = 0; t < refs.size(); ++t) {
    const int64_t n = refs[t].numel;
    *total += n;
    const int64_t align = refs[t].sk == SKind::INT8 ? refs[t].qb : 1;
    const int64_t pieces = (n + kChunk - 1) / kChunk;
    const int64_t nb = (n + align - 1) / align;  // pieces <= nb: kChunk >= align
    const int64_t base = nb / pieces, extra = nb % pieces;
    int64_t begin = 0;  // in units of align
    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t len = base + (k < extra ? 1 : 0);
      units.push_back(Unit{static_cast<int64_t>(t), begin * align, std::min(n, (begin + len) * align)});
      begin += len;
    }
  }
  return units;
}

// Threads for a call: one per kMinPerThread elements, at most torch's
// intra-op thread count.  Small calls stay on the calling thread: waking
// sleeping OpenMP workers costs tens of microseconds on an idle machine and
// milliseconds on a busy one, more than such a call takes serially.
int pick_threads(int64_t total, int64_t n_units) {
  int nt = at::get_num_threads();
  if (nt < 1) nt = 1;
  const int64_t by_work = total / kMinPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({nt, n_units, by_work})));
}

struct alignas(64) PaddedCounter {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

// Runs body(unit) for every unit.  Thread t owns the t-th contiguous run of
// units (so each thread streams through contiguous memory); a thread that
// finishes its run takes the remaining units of the others' runs.  A worker
// that starts late (busy machine) therefore delays the call by its start-up
// only, not by a whole share of the work.
template <typename F>
void run_units(const std::vector<Unit>& units, int nthreads, const F& body) {
  const int64_t nu = static_cast<int64_t>(units.size());
#ifdef _OPENMP
  if (nthreads > 1) {
    std::vector<PaddedCounter> runs(static_cast<size_t>(nthreads));
    for (int t = 0; t < nthreads; ++t) {
      runs[t].next.store(nu * t / nthreads, std::memory_order_relaxed);
      runs[t].end = nu * (t + 1) / nthreads;
    }
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      for (int j = 0; j < nthreads; ++j) {
        PaddedCounter& run = runs[static_cast<size_t>((tid + j) % nthreads)];
        for (;;) {
          const int64_t k = run.next.fetch_add(1, std::memory_order_relaxed);
          if (k >= run.end) break;
          body(units[static_cast<size_t>(k)]);
        }
      }
    }
    return;
  }
#endif
  (void)nthreads;
  for (int64_t k = 0; k < nu; ++k) body(units[static_cast<size_t>(k)]);
}

// -------------------------------------------------------------- dispatch

// Calls f(p, g, b, n) with the unit's param and grad pointers at their real
// types (p and g already advanced to the unit's start b).
template <typename F>
inline void with_types(const TensorRef& r, const Unit& u, const F& f) {
  const int64_t b = u.begin, n = u.end - u.begin;
  auto with_p = [&](auto* p) {
    switch (r.gk) {
      case GKind::F32: f(p, static_cast<const float*>(r.g) + b, b, n); break;
      case GKind::BF16: f(p, static_cast<const bf16_storage*>(r.g) + b, b, n); break;
      case GKind::F16: f(p, static_cast<const at::Half*>(r.g) + b, b, n); break;
      case GKind::F64: f(p, static_cast<const double*>(r.g) + b, b, n); break;
    }
  };
  if (r.pk == PKind::F32)
    with_p(static_cast<float*>(r.p) + b);
  else
    with_p(static_cast<bf16_storage*>(r.p) + b);
}

// Calls f(ptr) with a state pointer of the tensor's state type (nullptr stays nullptr).
template <typename F>
inline void with_state(const TensorRef& r, const F& f) {
  if (r.sk == SKind::F32)
    f(static_cast<float*>(nullptr));
  else
    f(static_cast<bf16_storage*>(nullptr));
}

template <typename MT>
inline MT* at_elem(void* base, int64_t b) {
  return base ? static_cast<MT*>(base) + b : nullptr;
}

template <bool WD, bool XF>
void lion_unit(const TensorRef& r, const Unit& u, const LionScalars& s, const GradXform& x) {
  with_types(r, u, [&](auto* p, auto* g, int64_t b, int64_t n) {
    with_state(r, [&](auto* tag) {
      using MT = std::remove_pointer_t<decltype(tag)>;
      MT* m = at_elem<MT>(r.m, b);
      auto pre = [&](int64_t off, int64_t len) {
        prefetch_span(p + off, len, true);
        prefetch_span(m + off, len, true);
      };
      with_block_grads<kPrefetch>(g, n, r.numel - b, pre, [&](auto* gb, int64_t off, int64_t len) {
        lion_block<WD, XF>(p + off, gb, m + off, len, s, x, r.salt);
      });
    });
  });
}

template <typename C>
void adamw_unit(const TensorRef& r, const Unit& u, const AdamWScalars& s, const GradXform& x) {
  with_types(r, u, [&](auto* p, auto* g, int64_t b, int64_t n) {
    with_state(r, [&](auto* tag) {
      using MT = std::remove_pointer_t<decltype(tag)>;
      MT* m = at_elem<MT>(r.m, b);
      MT* v = at_elem<MT>(r.v, b);
      MT* vmax = C::AMS ? at_elem<MT>(r.vmax, b) : nullptr;
      auto pre = [&](int64_t off, int64_t len) {
        prefetch_span(p + off, len, true);
        prefetch_span(m + off, len, true);
        prefetch_span(v + off, len, true);
        if (C::AMS) prefetch_span(vmax + off, len, true);
      };
      with_block_grads<kPrefetch>(g, n, r.numel - b, pre, [&](auto* gb, int64_t off, int64_t len) {
        adamw_block<C>(p + off, gb, m + off, v + off, C::AMS ? vmax + off : nullptr, len, s, x, r.salt);
      });
    });
  });
}

// int8 state: the unit starts at a boundary of the tensor's blocks (make_units aligns to r.qb).
template <bool WD, bool XF>
void lion_q8_unit(const TensorRef& r, const Unit& u, const LionScalars& s, const GradXform& x) {
  with_types(r, u, [&](auto* p, auto* g, int64_t b, int64_t n) {
    int8_t* mc = static_cast<int8_t*>(r.m) + b;
    float* ms = r.ms + b / r.qb;
    auto pre = [&](int64_t off, int64_t len) {
      prefetch_span(p + off, len, true);
      prefetch_span(mc + off, len, true);
    };
    with_block_grads(g, n, r.numel - b, pre, [&](auto* gb, int64_t off, int64_t len) {
      if (len == kQBlock)
        lion_q8_block<WD, XF, kQBlock>(p + off, gb, mc + off, ms + off / r.qb, len, s, x, r.salt);
      else
        lion_q8_block<WD, XF, 0>(p + off, gb, mc + off, ms + off / r.qb, len, s, x, r.salt);
    }, r.qb);
  });
}

template <typename C>
void adamw_q8_unit(const TensorRef& r, const Unit& u, const AdamWScalars& s, const GradXform& x) {
  with_types(r, u, [&](auto* p, auto* g, int64_t b, int64_t n) {
    const int64_t sb = b / r.qb;
    int8_t* mc = static_cast<int8_t*>(r.m) + b;
    uint8_t* vc = static_cast<uint8_t*>(r.v) + b;
    uint8_t* xc = C::AMS ? static_cast<uint8_t*>(r.vmax) + b : nullptr;
    float* ms = r.ms + sb;
    float* vs = r.vs + sb;
    float* xs = C::AMS ? r.vmaxs + sb : nullptr;
    auto pre = [&](int64_t off, int64_t len) {
      prefetch_span(p + off, len, true);
      prefetch_span(mc + off, len, true);
      prefetch_span(vc + off, len, true);
      if (C::AMS) prefetch_span(xc + off, len, true);
    };
    with_block_grads(g, n, r.numel - b, pre, [&](auto* gb, int64_t off, int64_t len) {
      const int64_t k = off / r.qb;
      auto block = [&](auto full) {
        adamw_q8_block<C::WD, C::XF, C::AMS, decltype(full)::value>(
            p + off, gb, mc + off, ms + k, vc + off, vs + k, C::AMS ? xc + off : nullptr,
            C::AMS ? xs + k : nullptr, len, s, x, r.salt);
      };
      if (len == kQBlock)
        block(std::integral_constant<int64_t, kQBlock>{});
      else
        block(std::integral_constant<int64_t, 0>{});
    }, r.qb);
  });
}

// A 0-d (or one-element) CPU flag / scale tensor, read on the host.
float host_scalar(const char* fn, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.numel() == 1, fn, ": ", what, " must be a one-element tensor, got ",
              t.defined() ? shape_str(t) : std::string("undefined"));
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", what, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", what, " must be a float tensor, got ",
              t.scalar_type());
  // fp32 as torch_ops uses it (grad_scale.to(float32)); a wider tensor rounds once.
  return t.to(at::kFloat).item<float>();
}

// Host side of the options shared by both steps.  Returns false when found_inf
// is set (the call is a no-op).
bool read_options(const char* fn, bool maximize, c10::optional<double> clip_value,
                  const c10::optional<at::Tensor>& grad_scale,
                  const c10::optional<at::Tensor>& found_inf, GradXform* x, bool* any) {
  if (found_inf.has_value() && host_scalar(fn, "found_inf", *found_inf) != 0.0f) return false;
  *any = false;
  if (maximize) {
    x->sign = -1.0f;
    *any = true;
  }
  if (clip_value.has_value()) {
    const float v = static_cast<float>(*clip_value);  // like torch.tensor(v, dtype=float32)
    x->lo = -v;
    x->hi = v;
    *any = true;
  }
  if (grad_scale.has_value()) {
    x->scale = host_scalar(fn, "grad_scale", *grad_scale);
    *any = true;
  }
  return true;
}

// ------------------------------------------------------------ entry points

LionScalars lion_scalars(double lr, double beta1, double beta2, double weight_decay) {
  LionScalars s;
  s.lr = static_cast<float>(lr);
  s.b1 = static_cast<float>(beta1);
  s.omb1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.omb2 = static_cast<float>(1.0 - beta2);
  s.wd = static_cast<float>(weight_decay);
  return s;
}

// Same double-precision formulas as torch_ops.adamw_scalars.
AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWScalars s;
  s.b1 = static_cast<float>(beta1);
  s.omb1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.omb2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / bc1);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  return s;
}

// Runs f(wd, xf) with the two option flags as std::true_type / std::false_type.
template <typename F>
inline void with_flags(bool wd, bool xf, const F& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (wd)
    xf ? f(T{}, T{}) : f(T{}, N{});
  else
    xf ? f(N{}, T{}) : f(N{}, N{});
}

// The gradient options of every step entry point, as pybind passes them.
struct GradOptions {
  bool maximize;
  c10::optional<double> clip_value;
  const c10::optional<at::Tensor>& grad_scale;
  const c10::optional<at::Tensor>& found_inf;
};

// What every step entry point does once collect() has checked its tensors:
// reads the options (a set found_inf makes the call a no-op), bumps the
// versions of the tensors it writes, cuts the work into units and, with the
// GIL released, runs unit(wd, xf, ams, u, x) for every unit u on the threads,
// the weight-decay, gradient-transform and amsgrad flags as std::true_type /
// std::false_type (a Lion unit ignores ams).
template <typename F>
void run_step(const char* fn, const std::vector<TensorRef>& refs,
              const std::vector<const std::vector<at::Tensor>*>& written, const GradOptions& o, bool wd,
              bool ams, const F& unit) {
  GradXform x;
  bool xf = false;
  if (!read_options(fn, o.maximize, o.clip_value, o.grad_scale, o.found_inf, &x, &xf)) return;
  if (refs.empty()) return;
  for (const auto* w : written) bump_versions(*w);
  int64_t total = 0;
  const auto units = make_units(refs, &total);
  const int nt = pick_threads(total, static_cast<int64_t>(units.size()));
  pybind11::gil_scoped_release no_gil;
  with_flags(wd, xf, [&](auto wdc, auto xfc) {
    auto go = [&](auto amsc) {
      run_units(units, nt, [&](const Unit& u) { unit(wdc, xfc, amsc, u, x); });
    };
    ams ? go(std::true_type{}) : go(std::false_type{});
  });
}

void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, double lr, double beta1, double beta2,
               double weight_decay, bool maximize, c10::optional<double> clip_value,
               const c10::optional<at::Tensor>& grad_scale,
               const c10::optional<at::Tensor>& found_inf,
               const c10::optional<std::vector<int64_t>>& state_step) {
  const auto refs = collect("lion_step", params, grads, exp_avgs, nullptr, nullptr,
                            state_step.has_value() ? &*state_step : nullptr);
  const LionScalars s = lion_scalars(lr, beta1, beta2, weight_decay);
  run_step("lion_step", refs, {&params, &exp_avgs}, {maximize, clip_value, grad_scale, found_inf},
           weight_decay != 0.0, false, [&](auto wd, auto xfc, auto, const Unit& u, const GradXform& x) {
             lion_unit<decltype(wd)::value, decltype(xfc)::value>(refs[u.tensor], u, s, x);
           });
}

// Lion with int8 momenta ("signed" codes + block scales, state_precision.Q8);
// state_step: one salt per tensor.
void lion_step_int8(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avg_codes,
                    const std::vector<at::Tensor>& exp_avg_scales, double lr, double beta1,
                    double beta2, double weight_decay, const std::vector<int64_t>& state_step,
                    bool maximize, c10::optional<double> clip_value,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<std::vector<int64_t>>& blocks) {
  const char* fn = "lion_step_int8";
  const auto refs = collect_int8(
      fn, params, grads, {Q8List{"exp_avg_codes", "exp_avg_scales", &exp_avg_codes, &exp_avg_scales, false}},
      state_step, blocks);
  const LionScalars s = lion_scalars(lr, beta1, beta2, weight_decay);
  run_step(fn, refs, {&params, &exp_avg_codes, &exp_avg_scales}, {maximize, clip_value, grad_scale, found_inf},
           weight_decay != 0.0, false, [&](auto wd, auto xfc, auto, const Unit& u, const GradXform& x) {
             lion_q8_unit<decltype(wd)::value, decltype(xfc)::value>(refs[u.tensor], u, s, x);
           });
}

// AdamW on fp32/bf16 state; SPLIT forces the split (intrinsic-sqrt) form, bound
// as _adamw_step_split for the tests.
template <bool SPLIT>
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t step, const c10::optional<std::vector<at::Tensor>>& max_exp_avg_sqs,
                bool maximize, c10::optional<double> clip_value,
                const c10::optional<at::Tensor>& grad_scale,
                const c10::optional<at::Tensor>& found_inf,
                const c10::optional<std::vector<int64_t>>& state_step) {
  TORCH_CHECK(step >= 1, "adamw_step: step must be >= 1 (already incremented), got ", step);
  const bool ams = max_exp_avg_sqs.has_value();
  // bf16 state's rounding salt: state_step per tensor, by default the call's step (as torch_ops)
  const std::vector<int64_t> salts =
      state_step.has_value() ? *state_step : std::vector<int64_t>(params.size(), step);
  const auto refs = collect("adamw_step", params, grads, exp_avgs, &exp_avg_sqs,
                            ams ? &*max_exp_avg_sqs : nullptr, &salts);
  std::vector<const std::vector<at::Tensor>*> written = {&params, &exp_avgs, &exp_avg_sqs};
  if (ams) written.push_back(&*max_exp_avg_sqs);
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  run_step("adamw_step", refs, written, {maximize, clip_value, grad_scale, found_inf}, weight_decay != 0.0,
           ams, [&](auto wd, auto xfc, auto amsc, const Unit& u, const GradXform& x) {
             using C = AdamWCfg<decltype(wd)::value, SPLIT, decltype(xfc)::value, decltype(amsc)::value>;
             adamw_unit<C>(refs[u.tensor], u, s, x);
           });
}

// AdamW with int8 state: exp_avg "signed" codes, exp_avg_sq (and amsgrad's
// max_exp_avg_sq) "sqrt" codes, each with its block scales.  The salt is
// state_step per tensor, by default the call's step (as torch_ops).
void adamw_step_int8(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg_codes,
                     const std::vector<at::Tensor>& exp_avg_scales,
                     const std::vector<at::Tensor>& exp_avg_sq_codes,
                     const std::vector<at::Tensor>& exp_avg_sq_scales, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step,
                     const c10::optional<std::vector<at::Tensor>>& max_exp_avg_sq_codes,
                     const c10::optional<std::vector<at::Tensor>>& max_exp_avg_sq_scales,
                     bool maximize, c10::optional<double> clip_value,
                     const c10::optional<at::Tensor>& grad_scale,
                     const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<std::vector<int64_t>>& state_step,
                     const c10::optional<std::vector<int64_t>>& blocks) {
  const char* fn = "adamw_step_int8";
  TORCH_CHECK(step >= 1, fn, ": step must be >= 1 (already incremented), got ", step);
  TORCH_CHECK(max_exp_avg_sq_codes.has_value() == max_exp_avg_sq_scales.has_value(), fn,
              ": amsgrad needs both max_exp_avg_sq_codes and max_exp_avg_sq_scales");
  const bool ams = max_exp_avg_sq_codes.has_value();
  const std::vector<int64_t> salts =
      state_step.has_value() ? *state_step : std::vector<int64_t>(params.size(), step);
  std::vector<Q8List> lists = {
      Q8List{"exp_avg_codes", "exp_avg_scales", &exp_avg_codes, &exp_avg_scales, false},
      Q8List{"exp_avg_sq_codes", "exp_avg_sq_scales", &exp_avg_sq_codes, &exp_avg_sq_scales, true}};
  if (ams)
    lists.push_back(Q8List{"max_exp_avg_sq_codes", "max_exp_avg_sq_scales", &*max_exp_avg_sq_codes,
                           &*max_exp_avg_sq_scales, true});
  const auto refs = collect_int8(fn, params, grads, lists, salts, blocks);
  std::vector<const std::vector<at::Tensor>*> written = {&params};
  for (const Q8List& l : lists) {
    written.push_back(l.codes);
    written.push_back(l.scales);
  }
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  run_step(fn, refs, written, {maximize, clip_value, grad_scale, found_inf}, weight_decay != 0.0, ams,
           [&](auto wd, auto xfc, auto amsc, const Unit& u, const GradXform& x) {
             // SPLIT is unused: the int8 block always takes its sqrt in a pass of its own
             using C = AdamWCfg<decltype(wd)::value, false, decltype(xfc)::value, decltype(amsc)::value>;
             adamw_q8_unit<C>(refs[u.tensor], u, s, x);
           });
}

// state_precision.quantize / dequantize by the kernels' own block code (for
// the tests: the kernels' quantization is the reference's, bit for bit).
// sqrt selects the "sqrt" mapping (uint8 codes), else "signed" (int8).
std::vector<at::Tensor> quantize_int8(const at::Tensor& x, int64_t step, bool sqrt) {
  const char* fn = "quantize_int8";
  TORCH_CHECK(x.defined() && x.device().is_cpu() && x.scalar_type() == at::kFloat, fn,
              ": takes a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel(), nb = (n + kQBlock - 1) / kQBlock;
  at::Tensor codes = at::empty(xc.sizes(), xc.options().dtype(sqrt ? at::kByte : at::kChar));
  at::Tensor scales = at::empty({nb}, xc.options());
  const float* src = xc.data_ptr<float>();
  float* sc = scales.data_ptr<float>();
  const uint32_t salt = state_salt(step);
  alignas(64) float root[kQBlock];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = b * kQBlock, len = std::min(kQBlock, n - off);
    if (sqrt) {
      sqrt_block(src + off, root, len);
      quantize_sqrt_roots(root, len, block_absmax_bits(root, len), salt,
                          codes.data_ptr<uint8_t>() + off, sc + b);
    } else {
      quantize_signed(src + off, len, block_absmax_bits(src + off, len), salt,
                      codes.data_ptr<int8_t>() + off, sc + b);
    }
  }
  return {codes, scales};
}

at::Tensor dequantize_int8(const at::Tensor& codes, const at::Tensor& scales) {
  const char* fn = "dequantize_int8";
  TORCH_CHECK(codes.defined() && codes.device().is_cpu() && codes.is_contiguous() &&
                  (codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte),
              fn, ": codes must be a contiguous int8 or uint8 CPU tensor");
  const int64_t n = codes.numel(), nb = (n + kQBlock - 1) / kQBlock;
  TORCH_CHECK(scales.defined() && scales.device().is_cpu() && scales.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.numel() == nb,
              fn, ": scales must be ", nb, " contiguous float32 values");
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  const float* sc = scales.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = codes.scalar_type() == at::kChar
                 ? load_q8(codes.data_ptr<int8_t>(), i, sc[i / kQBlock])
                 : load_q8(codes.data_ptr<uint8_t>(), i, sc[i / kQBlock]);
  }
  return out;
}

// ------------------------------------------------------------ grad_stats
//
// float64 [sum of squares of the value-clipped grads, bad] exactly as
// torch_ops.grad_stats defines it (bad = sum of g*0 over the raw grads: 0, or
// NaN when any is inf/NaN).  One read pass at memory speed: squares in fp32,
// summed in kStatLanes independent fp32 lanes over blocks of kStatBlock
// elements (16 terms per lane), the block sums added in fp64.  The relative
// error is then ~1e-7 at worst.  A unit whose fast sums come out non-finite
// (an inf/NaN grad, or a square above the fp32 range) is recomputed in fp64
// exactly as the reference does, so such values give the reference's answer,
// not a spurious overflow.  (|g| below ~1e-19 squares to an fp32 subnormal,
// below ~4e-23 to 0: that changes no clip coefficient or skip decision.)

constexpr int64_t kStatBlock = 512;
constexpr int kStatLanes = 32;
// One read stream per thread: software prefetch 4 blocks ahead lifts the pass
// from ~28 to ~53 GB/s on a 2-core Xeon (the hardware prefetcher alone keeps
// too few lines in flight for a single stream).  On Zen it is the other way
// round, as for the steps' streams (SHARDOPT_STREAM_PREFETCH): on a 2-core
// Zen 4 the pass reads 32 GB/s without and 23 GB/s with it (1 to 32 blocks
// ahead, to L1 or L2: 24-30 GB/s).
constexpr int64_t kStatPrefetch = SHARDOPT_STREAM_PREFETCH ? 4 * kStatBlock : kNoPrefetch;

struct StatsRef {
  const void* g;
  int64_t numel;
  GKind gk;
};

struct Stats {
  double sumsq = 0.0;
  double bad = 0.0;
};

inline double load_f64(const float* p, int64_t i) { return p[i]; }
inline double load_f64(const double* p, int64_t i) { return p[i]; }
inline double load_f64(const bf16_storage* p, int64_t i) { return load_f32(p, i); }
inline double load_f64(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }

// The reference, element by element in fp64 (NaN-preserving clamp, as torch.clamp).
template <typename GT>
Stats stats_exact(const GT* g, int64_t n, bool clip, double v) {
  Stats s;
  for (int64_t i = 0; i < n; ++i) {
    double x = load_f64(g, i);
    s.bad += x * 0.0;
    if (clip) {
      x = x < -v ? -v : x;
      x = x > v ? v : x;
    }
    s.sumsq += x * x;
  }
  return s;
}

// Fast fp32-lane sums over n elements, added into dacc (and bacc: raw g*0).
template <bool CLIP, typename GT>
inline void stats_lanes(const GT* __restrict g, int64_t n, float v, double* __restrict dacc,
                        float* __restrict bacc) {
  for (int64_t off = 0; off < n; off += kStatBlock) {
    const int64_t len = std::min(kStatBlock, n - off);
    const int64_t full = len / kStatLanes * kStatLanes;
    const GT* __restrict gb = g + off;
    if (off + kStatPrefetch < n)
      prefetch_span(gb + kStatPrefetch, std::min(kStatBlock, n - off - kStatPrefetch), false);
    float acc[kStatLanes] = {};
    for (int64_t i = 0; i < full; i += kStatLanes) {
      SHARDOPT_SIMD
      for (int j = 0; j < kStatLanes; ++j) {
        float x = load_f32(gb, i + j);
        if (CLIP) {
          bacc[j] += x * 0.0f;
          x = x < -v ? -v : x;
          x = x > v ? v : x;
        }
        acc[j] += x * x;
      }
    }
    for (int64_t i = full; i < len; ++i) {
      float x = load_f32(gb, i);
      if (CLIP) {
        bacc[0] += x * 0.0f;
        x = x < -v ? -v : x;
        x = x > v ? v : x;
      }
      acc[i - full] += x * x;
    }
    SHARDOPT_SIMD
    for (int j = 0; j < kStatLanes; ++j) dacc[j] += static_cast<double>(acc[j]);
  }
}

template <bool CLIP, typename GT>
void stats_lanes_any(const GT* g, int64_t n, float v, double* dacc, float* bacc) {
  stats_lanes<CLIP>(g, n, v, dacc, bacc);
}

template <bool CLIP>
void stats_lanes_any(const at::Half* g, int64_t n, float v, double* dacc, float* bacc) {
  alignas(64) float buf[kHalfBlock];
  for (int64_t off = 0; off < n; off += kHalfBlock) {
    const int64_t len = std::min(kHalfBlock, n - off);
    half_block_to_float(g + off, buf, len);
    stats_lanes<CLIP>(static_cast<const float*>(buf), len, v, dacc, bacc);
  }
}

template <typename GT>
Stats stats_range(const GT* g, int64_t n, bool clip, float v) {
  if constexpr (!std::is_same_v<GT, double>) {
    double dacc[kStatLanes] = {};
    float bacc[kStatLanes] = {};
    if (clip)
      stats_lanes_any<true>(g, n, v, dacc, bacc);
    else
      stats_lanes_any<false>(g, n, v, dacc, bacc);
    Stats s;
    float bad = 0.0f;
    for (int j = 0; j < kStatLanes; ++j) {
      s.sumsq += dacc[j];
      bad += bacc[j];
    }
    if (std::isfinite(s.sumsq) && bad == 0.0f) return s;
  }
  // a non-finite value (or an fp32 overflow), or fp64 grads: the exact fp64 form
  return stats_exact(g, n, clip, static_cast<double>(v));
}

Stats stats_unit(const StatsRef& r, const Unit& u, bool clip, float v) {
  const int64_t b = u.begin, n = u.end - u.begin;
  switch (r.gk) {
    case GKind::F32: return stats_range(static_cast<const float*>(r.g) + b, n, clip, v);
    case GKind::BF16: return stats_range(static_cast<const bf16_storage*>(r.g) + b, n, clip, v);
    case GKind::F16: return stats_range(static_cast<const at::Half*>(r.g) + b, n, clip, v);
    case GKind::F64: return stats_range(static_cast<const double*>(r.g) + b, n, clip, v);
  }
  return Stats{};
}

at::Tensor grad_stats(const std::vector<at::Tensor>& grads, c10::optional<double> clip_value) {
  const char* fn = "grad_stats";
  std::vector<StatsRef> refs;
  refs.reserve(grads.size());
  std::vector<at::Tensor> copies;  // contiguous copies of tensors with gaps, alive until the end
  for (size_t k = 0; k < grads.size(); ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.defined(), fn, ": grads[", i, "] is undefined (None)");
    TORCH_CHECK(g.device().is_cpu(), fn, ": grads[", i, "] must be a CPU tensor, got device ",
                g.device());
    TORCH_CHECK(g.layout() == at::kStrided, fn, ": grads[", i, "] must be a dense (strided) tensor");
    const GKind gk = grad_kind(fn, i, g);
    if (g.numel() == 0) continue;
    // A sum does not care about element order: any gap-free layout is read as
    // stored; anything else through a contiguous copy.
    const void* ptr = g.data_ptr();
    if (!g.is_non_overlapping_and_dense()) {
      copies.push_back(g.contiguous());
      ptr = copies.back().data_ptr();
    }
    refs.push_back(StatsRef{ptr, g.numel(), gk});
  }
  // Units of kChunk elements (a multiple of kStatBlock), so only a tensor's
  // last unit has a partial block.
  std::vector<Unit> units;
  int64_t total = 0;
  for (size_t t = 0; t < refs.size(); ++t) {
    const int64_t n = refs[t].numel;
    total += n;
    for (int64_t b = 0; b < n; b += kChunk)
      units.push_back(Unit{static_cast<int64_t>(t), b, std::min(n, b + kChunk)});
  }
  const bool clip = clip_value.has_value();
  const float v = clip ? static_cast<float>(*clip_value) : 0.0f;  // like torch.tensor(v, float32)
  std::vector<Stats> part(units.size());
  {
    const int nt = pick_threads(total, static_cast<int64_t>(units.size()));
    pybind11::gil_scoped_release no_gil;
    const Unit* u0 = units.data();
    run_units(units, nt, [&](const Unit& u) {
      part[static_cast<size_t>(&u - u0)] = stats_unit(refs[u.tensor], u, clip, v);
    });
  }
  // fixed order: the result does not depend on the thread count
  Stats s;
  for (const Stats& p : part) {
    s.sumsq += p.sumsq;
    s.bad += p.bad;
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = s.sumsq;
  out.data_ptr<double>()[1] = s.bad;
  return out;
}
// ------------------------------------------------------------ roofline
//
// Stream-style kernels for `shardopt bench`'s memory roofline, cut into units
// and shared out over threads exactly as the steps are.  stream_update is in
// place like an optimizer step (2 reads + 1 write = 12 bytes per element, no
// write-allocate traffic for a separate output); stream_read only reads (4
// bytes per element), like the gradient pass.

std::vector<TensorRef> stream_refs(const char* fn, const std::vector<const at::Tensor*>& ts) {
  const at::Tensor& ref = *ts[0];
  for (size_t k = 0; k < ts.size(); ++k) {
    const at::Tensor& t = *ts[k];
    check_tensor(fn, k == 0 ? "a" : "b", 0, t, ref);
    TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": takes float32 tensors, got ", t.scalar_type());
  }
  TensorRef r{};
  r.numel = ref.numel();
  return r.numel ? std::vector<TensorRef>{r} : std::vector<TensorRef>{};
}

void stream_update(const at::Tensor& a, const at::Tensor& b, double s) {
  const auto refs = stream_refs("stream_update", {&a, &b});
  if (refs.empty()) return;
  a.unsafeGetTensorImpl()->bump_version();
  float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float sf = static_cast<float>(s);
  int64_t total = 0;
  const auto units = make_units(refs, &total);
  const int nt = pick_threads(total, static_cast<int64_t>(units.size()));
  pybind11::gil_scoped_release no_gil;
  run_units(units, nt, [&](const Unit& u) {
    float* __restrict x = pa + u.begin;
    const float* __restrict y = pb + u.begin;
    const int64_t n = u.end - u.begin;
    SHARDOPT_SIMD
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] + sf * y[i];
  });
}

double stream_read(const at::Tensor& a) {
  const auto refs = stream_refs("stream_read", {&a});
  if (refs.empty()) return 0.0;
  const float* pa = a.data_ptr<float>();
  int64_t total = 0;
  const auto units = make_units(refs, &total);
  std::vector<double> part(units.size(), 0.0);
  {
    const int nt = pick_threads(total, static_cast<int64_t>(units.size()));
    pybind11::gil_scoped_release no_gil;
    const Unit* u0 = units.data();
    run_units(units, nt, [&](const Unit& u) {
      const float* __restrict x = pa + u.begin;
      const int64_t n = u.end - u.begin, full = n / kStatLanes * kStatLanes;
      float acc[kStatLanes] = {};
      for (int64_t i = 0; i < full; i += kStatLanes) {
        SHARDOPT_SIMD
        for (int j = 0; j < kStatLanes; ++j) acc[j] += x[i + j];
      }
      double sum = 0.0;
      for (int64_t i = full; i < n; ++i) sum += x[i];
      for (int j = 0; j < kStatLanes; ++j) sum += acc[j];
      part[static_cast<size_t>(&u - u0)] = sum;
    });
  }
  double sum = 0.0;
  for (double p : part) sum += p;
  return sum;
}

std::string build_info() {
  std::ostringstream os;
  os << "chunk=" << kChunk << " min_per_thread=" << kMinPerThread;
#ifdef _OPENMP
  os << " openmp=" << _OPENMP;
#else
  os << " openmp=off";
#endif
#if defined(__AVX512F__)
  os << " simd=avx512";
#elif defined(__AVX2__)
  os << " simd=avx2";
#else
  os << " simd=baseline";
#endif
  os << (kOnePassAdamW ? " adamw=onepass" : " adamw=split");
#if defined(SHARDOPT_Q8_WIDE)
  os << " int8=512bit";
#endif
  os << " prefetch="
     << (SHARDOPT_STREAM_PREFETCH ? (SHARDOPT_Q8_PREFETCH ? "streams,int8" : "streams")
                                  : (SHARDOPT_Q8_PREFETCH ? "int8" : "none"));
#if defined(__FP_FAST_FMAF)
  os << " fma_hw=1 (contraction off)";
#endif
  return os.str();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shardopt fused multi-tensor Lion/AdamW CPU kernels and the gradient pass";
  m.def("lion_step", &lion_step, "Fused multi-tensor Lion step (in place)", py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("weight_decay"), py::arg("maximize") = false, py::arg("clip_value") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("state_step") = py::none());
  for (auto [name, fn, doc] :
       {std::make_tuple("adamw_step", &adamw_step<false>, "Fused multi-tensor AdamW step (in place)"),
        std::make_tuple("_adamw_step_split", &adamw_step<true>,
                        "adamw_step forced to the split (three-pass) form; for tests")}) {
    m.def(name, fn, doc, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
          py::arg("exp_avg_sqs"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
          py::arg("max_exp_avg_sqs") = py::none(), py::arg("maximize") = false, py::arg("clip_value") = py::none(),
          py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
          py::arg("state_step") = py::none());
  }
  m.def("lion_step_int8", &lion_step_int8,
        "Fused multi-tensor Lion step with int8 momenta (codes + block scales, in place)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avg_codes"), py::arg("exp_avg_scales"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
        py::arg("state_step"), py::arg("maximize") = false, py::arg("clip_value") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("blocks") = py::none());
  m.def("adamw_step_int8", &adamw_step_int8,
        "Fused multi-tensor AdamW step with int8 state (codes + block scales, in place)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avg_codes"), py::arg("exp_avg_scales"),
        py::arg("exp_avg_sq_codes"), py::arg("exp_avg_sq_scales"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("max_exp_avg_sq_codes") = py::none(), py::arg("max_exp_avg_sq_scales") = py::none(),
        py::arg("maximize") = false, py::arg("clip_value") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("state_step") = py::none(),
        py::arg("blocks") = py::none());
  m.def("_quantize_int8", &quantize_int8,
        "(codes, scales) of a float32 tensor in int8 blocks by the kernels' code; for tests",
        py::arg("x"), py::arg("step"), py::arg("sqrt"));
  m.def("_dequantize_int8", &dequantize_int8,
        "float32 values of int8 blocks (int8: signed, uint8: sqrt) by the kernels' code; for tests",
        py::arg("codes"), py::arg("scales"));
  m.def("grad_stats", &grad_stats,
        "float64 [sum of squares of the value-clipped grads, 0 or NaN if any raw grad is not finite]",
        py::arg("grads"), py::arg("clip_value") = py::none());
  m.def("stream_update", &stream_update,
        "a += s*b in place (float32, threaded like the steps): bench's in-place stream roofline",
        py::arg("a"), py::arg("b"), py::arg("s"));
  m.def("stream_read", &stream_read,
        "sum of a float32 tensor in fp32 lanes (threaded like the steps): bench's read-only roofline",
        py::arg("a"));
  m.def("build_info", &build_info, "Compile-time configuration of the kernels");
}
