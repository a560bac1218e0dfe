// The compressed window's two passes over CPU memory (pma_dist/kernels/_codes.py says what they
// compute; pma_dist/kernels/_cpu.py checks dtypes, sizes and contiguity before passing raw
// addresses here).
//
// encode: per element, d = q(live - R) and R += deq(d), with a NaN/Inf in live (a non-finite
//   difference), or a finite one whose deq(d) or R + deq(d) rounds past float32's range, stored
//   as d = 0 and R left as it is; true when every element was stored. q is a
//   round to bfloat16, or, per block of elements along a row, a round to float8 e4m3 after
//   scaling by a power of two chosen so that the block's largest |d| fits (448).
// merge: out = W * R - S, S = sum_k deq(d_k) * P_k summed in float32 (the differences are
//   small), the last subtraction in float64, rounded once.
//
// Both give the same bits as the torch expressions of _codes.py on the same inputs: each fp32
// operation is the same single rounding (no contraction into fused multiply-adds), and the
// loops are written branch-free so that the compiler vectorizes them.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr std::int64_t kGrain = 1 << 14;
constexpr int kMaxBlock = 128;
constexpr int kExponentBias = 127;

float from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

std::uint32_t to_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

template <typename In>
float widen(In value);

template <>
float widen<float>(float value) {
  return value;
}

template <>
float widen<std::uint16_t>(std::uint16_t bits) {  // bfloat16: the upper half of a float32
  return from_bits(static_cast<std::uint32_t>(bits) << 16);
}

// 1 where `bits` is NaN/Inf (every exponent bit set), else 0.
inline std::uint32_t nonfinite(std::uint32_t bits) {
  return static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
}

// `value` where flag is 0, `old` where it is 1 (no branch: the loops vectorize).
inline std::uint32_t keep_unless(std::uint32_t value, std::uint32_t old, std::uint32_t flag) {
  return (value & (flag - 1u)) | (old & (0u - flag));
}

// Round to nearest even, as c10::BFloat16 does for finite values.
inline std::uint16_t bf16_of(std::uint32_t bits) {
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Round |x| <= 448 to float8 e4m3fn, to nearest even, as c10's fp8e4m3fn_from_fp32_value
// does (its saturation never applies: no |x| <= 448 rounds past 448), and return the rounded
// value too, exactly, so that the encoder needs no decode. Both of c10's paths are computed
// and one kept by a mask, so that the loop vectorizes: from 2^-6 up, the float32 rounded to 3
// fraction bits; below, x + 2^14, whose last bits are the subnormal code (steps of 2^-9).
inline float e4m3_round(float x, std::uint8_t& code) {
  const std::uint32_t bits = to_bits(x);
  const std::uint32_t sign = bits & 0x80000000u;
  const std::uint32_t magnitude = bits ^ sign;
  const std::uint32_t rounded = (magnitude + 0x7FFFFu + ((magnitude >> 20) & 1u)) & 0xFFF00000u;
  const std::uint32_t normal_code = (rounded - (120u << 23)) >> 20;
  const float shifted = from_bits(magnitude) + 0x1p14f;
  const std::uint32_t small_code = to_bits(shifted) - (141u << 23);
  const float small_value = shifted - 0x1p14f;
  const std::uint32_t keep_small = 0u - static_cast<std::uint32_t>(magnitude < (121u << 23));
  code = static_cast<std::uint8_t>(
      (((small_code & keep_small) | (normal_code & ~keep_small)) & 0x7Fu) | (sign >> 24));
  const std::uint32_t value = (to_bits(small_value) & keep_small) | (rounded & ~keep_small);
  return from_bits(value | sign);
}

// The value of an e4m3fn code (never NaN here), exactly: its significand (8 + m, or m below
// the normal range) times 2^(max(e, 1) - 10), both normal float32 numbers, so that no operand
// is subnormal (which costs some CPUs a microcode assist per operation).
inline float e4m3_value(std::uint8_t code) {
  const std::uint32_t magnitude = code & 0x7Fu;
  const std::uint32_t exponent = magnitude >> 3;
  const std::uint32_t normal = static_cast<std::uint32_t>(exponent != 0);
  const std::uint32_t significand = (magnitude & 7u) | (normal << 3);
  const std::uint32_t power = (exponent + 1u - normal + 127u - 10u) << 23;
  const float value = static_cast<float>(static_cast<std::int32_t>(significand)) * from_bits(power);
  return from_bits(to_bits(value) | (static_cast<std::uint32_t>(code & 0x80u) << 24));
}

// The smallest e with amax <= 448 * 2^e, clamped to the E8M0 range, from the bits of a finite
// amax >= 0: amax = 1.f * 2^(k - 127), and 448 = 1.75 * 2^8, so e = k - 135 when 1.f <= 1.75,
// else k - 134 (amax == 0 or subnormal: the smallest).
inline int block_exponent(std::uint32_t amax) {
  const int k = static_cast<int>(amax >> 23);
  if (k == 0) {
    return -kExponentBias;
  }
  const int e = (amax & 0x7FFFFFu) <= 0x600000u ? k - 135 : k - 134;
  return std::clamp(e, -kExponentBias, kExponentBias);
}

// 2^e as a float32, exactly, for e in [-127, 127] (2^-127 is a subnormal).
inline float power_of_two(int e) {
  return e >= -126 ? from_bits(static_cast<std::uint32_t>(e + 127) << 23) : from_bits(1u << 22);
}

// The loops below are compiled for AVX-512 (x86-64-v4), for AVX2 and for the baseline x86-64
// (SSE2), and the one the CPU runs is picked when the library loads (GCC's target_clones):
// 16 or 8 float lanes instead of 4. The operations are the same, so are the bits.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PMA_VECTOR __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PMA_VECTOR
#endif
#define PMA_INLINE inline __attribute__((always_inline))

template <typename In>
PMA_INLINE std::uint32_t encode_bf16_run(float* r, const In* x, std::uint16_t* d,
                                         std::int64_t begin, std::int64_t end) {
  std::uint32_t bad = 0;
  for (std::int64_t i = begin; i < end; ++i) {
    const std::uint32_t bits = to_bits(widen<In>(x[i]) - r[i]);
    const std::uint32_t q = bf16_of(bits & (nonfinite(bits) - 1u));  // a NaN/Inf: +0
    const std::uint32_t next = to_bits(r[i] + from_bits(q << 16));
    const std::uint32_t flag = nonfinite(bits) | nonfinite(next);
    bad |= flag;
    d[i] = static_cast<std::uint16_t>(q & (flag - 1u));
    r[i] = from_bits(keep_unless(next, to_bits(r[i]), flag));
  }
  return bad;
}

PMA_VECTOR std::uint32_t encode_bf16_f32(float* r, const float* x, std::uint16_t* d,
                                         std::int64_t begin, std::int64_t end) {
  return encode_bf16_run(r, x, d, begin, end);
}

PMA_VECTOR std::uint32_t encode_bf16_b16(float* r, const std::uint16_t* x, std::uint16_t* d,
                                         std::int64_t begin, std::int64_t end) {
  return encode_bf16_run(r, x, d, begin, end);
}

inline std::uint32_t encode_bf16_any(float* r, const float* x, std::uint16_t* d,
                                     std::int64_t begin, std::int64_t end) {
  return encode_bf16_f32(r, x, d, begin, end);
}

inline std::uint32_t encode_bf16_any(float* r, const std::uint16_t* x, std::uint16_t* d,
                                     std::int64_t begin, std::int64_t end) {
  return encode_bf16_b16(r, x, d, begin, end);
}

template <typename In>
bool encode_bf16(std::intptr_t base, std::intptr_t live, std::intptr_t delta, std::int64_t numel) {
  float* r = reinterpret_cast<float*>(base);
  const In* x = reinterpret_cast<const In*>(live);
  std::uint16_t* d = reinterpret_cast<std::uint16_t*>(delta);
  std::atomic<bool> finite{true};
  at::parallel_for(0, numel, kGrain, [&](std::int64_t begin, std::int64_t end) {
    if (encode_bf16_any(r, x, d, begin, end)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

// Blocks [begin, end) of rows of `row` elements, `block` (<= 128) to a block along each row.
template <typename In>
PMA_INLINE std::uint32_t encode_fp8_run(float* r, const In* x, std::uint8_t* q, std::uint8_t* e,
                                        std::int64_t begin, std::int64_t end, std::int64_t row,
                                        std::int64_t block) {
  const std::int64_t per_row = (row + block - 1) / block;
  std::uint32_t bad = 0;
  float diff[kMaxBlock];
  std::uint8_t code[kMaxBlock];
  for (std::int64_t b = begin; b < end; ++b) {
    const std::int64_t first = (b / per_row) * row + (b % per_row) * block;
    const std::int64_t count = std::min(block, row - (b % per_row) * block);
    const In* block_live = x + first;
    float* block_base = r + first;
    std::uint32_t amax = 0, base_max = 0;
    for (std::int64_t c = 0; c < count; ++c) {
      std::uint32_t bits = to_bits(widen<In>(block_live[c]) - block_base[c]);
      const std::uint32_t flag = nonfinite(bits);
      bad |= flag;
      bits &= flag - 1u;  // a NaN/Inf stored as no change
      diff[c] = from_bits(bits);
      amax = std::max(amax, bits & 0x7FFFFFFFu);
      base_max = std::max(base_max, to_bits(block_base[c]) & 0x7FFFFFFFu);
    }
    const int exponent = block_exponent(amax);
    const float down = power_of_two(-exponent);
    const float up = power_of_two(exponent);
    if (exponent < 119 && base_max < (253u << 23)) {  // |deq(d)| < 2^127, |R| < 2^126: finite
      for (std::int64_t c = 0; c < count; ++c) {
        block_base[c] = block_base[c] + e4m3_round(diff[c] * down, code[c]) * up;
      }
      std::memcpy(q + first, code, count);
      e[b] = static_cast<std::uint8_t>(exponent + kExponentBias);
      continue;
    }
    for (std::int64_t c = 0; c < count; ++c) {
      std::uint8_t q_c;
      const float value = e4m3_round(diff[c] * down, q_c) * up;
      const std::uint32_t next = to_bits(block_base[c] + value);
      const std::uint32_t flag = nonfinite(next);  // 256 * 2^120 overflows, so may R + value
      bad |= flag;
      code[c] = static_cast<std::uint8_t>(q_c & (flag - 1u));
      block_base[c] = from_bits(keep_unless(next, to_bits(block_base[c]), flag));
    }
    std::memcpy(q + first, code, count);  // bytes may alias anything: stored apart
    e[b] = static_cast<std::uint8_t>(exponent + kExponentBias);
  }
  return bad;
}

PMA_VECTOR std::uint32_t encode_fp8_f32(float* r, const float* x, std::uint8_t* q,
                                        std::uint8_t* e, std::int64_t begin, std::int64_t end,
                                        std::int64_t row, std::int64_t block) {
  return encode_fp8_run(r, x, q, e, begin, end, row, block);
}

PMA_VECTOR std::uint32_t encode_fp8_b16(float* r, const std::uint16_t* x, std::uint8_t* q,
                                        std::uint8_t* e, std::int64_t begin, std::int64_t end,
                                        std::int64_t row, std::int64_t block) {
  return encode_fp8_run(r, x, q, e, begin, end, row, block);
}

inline std::uint32_t encode_fp8_any(float* r, const float* x, std::uint8_t* q, std::uint8_t* e,
                                    std::int64_t begin, std::int64_t end, std::int64_t row,
                                    std::int64_t block) {
  return encode_fp8_f32(r, x, q, e, begin, end, row, block);
}

inline std::uint32_t encode_fp8_any(float* r, const std::uint16_t* x, std::uint8_t* q,
                                    std::uint8_t* e, std::int64_t begin, std::int64_t end,
                                    std::int64_t row, std::int64_t block) {
  return encode_fp8_b16(r, x, q, e, begin, end, row, block);
}

template <typename In>
bool encode_fp8(std::intptr_t base, std::intptr_t live, std::intptr_t codes, std::intptr_t exps,
                std::int64_t rows, std::int64_t row, std::int64_t block) {
  float* r = reinterpret_cast<float*>(base);
  const In* x = reinterpret_cast<const In*>(live);
  std::uint8_t* q = reinterpret_cast<std::uint8_t*>(codes);
  std::uint8_t* e = reinterpret_cast<std::uint8_t*>(exps);
  const std::int64_t blocks = rows * ((row + block - 1) / block);
  std::atomic<bool> finite{true};
  const std::int64_t grain = std::max<std::int64_t>(1, kGrain / block);
  at::parallel_for(0, blocks, grain, [&](std::int64_t begin, std::int64_t end) {
    if (encode_fp8_any(r, x, q, e, begin, end, row, block)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

// Whether 2^e * P, rounded to float32, is exact (normal and finite): then d * (2^e * P) is
// (d * 2^e) * P to the bit, d * 2^e being exact for every finite decoded difference, and the
// merge saves one multiply an element. The torch expressions compute (d * 2^e) * P.
inline bool exact_scale(float scale) {
  const std::uint32_t magnitude = to_bits(scale) & 0x7FFFFFFFu;
  return magnitude >= 0x00800000u && magnitude < 0x7F800000u;
}

PMA_INLINE float finish(double weight, float base, float sum) {
  return static_cast<float>(weight * static_cast<double>(base) - static_cast<double>(sum));
}

constexpr std::int64_t kRun = 1 << 14;
// Elements a merge sums at a time, plane after plane: the sums stay in cache while each plane
// is read in one long run (many short interleaved runs of ten planes starve the prefetchers).

PMA_VECTOR void merge_bf16_run(float* o, const float* r, double weight,
                               const std::uintptr_t* deltas, const float* p, std::size_t planes,
                               std::int64_t begin, std::int64_t end, float* sum) {
  for (std::int64_t first = begin; first < end; first += kRun) {
    const std::int64_t count = std::min<std::int64_t>(kRun, end - first);
    for (std::int64_t c = 0; c < count; ++c) {
      sum[c] = 0.0f;
    }
    std::size_t k = 0;
    for (; k + 1 < planes; k += 2) {  // two planes a pass: half the trips through `sum`
      const std::uint16_t* d0 = reinterpret_cast<const std::uint16_t*>(deltas[k]) + first;
      const std::uint16_t* d1 = reinterpret_cast<const std::uint16_t*>(deltas[k + 1]) + first;
      const float w0 = p[k], w1 = p[k + 1];
      for (std::int64_t c = 0; c < count; ++c) {
        float acc = sum[c] + from_bits(static_cast<std::uint32_t>(d0[c]) << 16) * w0;
        sum[c] = acc + from_bits(static_cast<std::uint32_t>(d1[c]) << 16) * w1;
      }
    }
    for (; k < planes; ++k) {
      const std::uint16_t* d = reinterpret_cast<const std::uint16_t*>(deltas[k]) + first;
      const float weight_k = p[k];
      for (std::int64_t c = 0; c < count; ++c) {
        sum[c] = sum[c] + from_bits(static_cast<std::uint32_t>(d[c]) << 16) * weight_k;
      }
    }
    for (std::int64_t c = 0; c < count; ++c) {
      o[first + c] = finish(weight, r[first + c], sum[c]);
    }
  }
}

void merge_bf16(std::intptr_t out, std::intptr_t base, double weight,
                const std::vector<std::intptr_t>& deltas, const std::vector<double>& coeffs,
                std::int64_t numel) {
  float* o = reinterpret_cast<float*>(out);
  const float* r = reinterpret_cast<const float*>(base);
  const std::vector<float> p(coeffs.begin(), coeffs.end());
  const std::vector<std::uintptr_t> planes(deltas.begin(), deltas.end());
  at::parallel_for(0, numel, kRun, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> sum(kRun);
    merge_bf16_run(o, r, weight, planes.data(), p.data(), planes.size(), begin, end, sum.data());
  });
}

PMA_VECTOR void merge_fp8_run(float* o, const float* r, double weight,
                              const std::uintptr_t* codes, const std::uintptr_t* exps,
                              const float* p, std::size_t planes, std::int64_t begin,
                              std::int64_t end, std::int64_t row, std::int64_t block, float* sum) {
  const std::int64_t per_row = (row + block - 1) / block;
  const std::int64_t span = std::max<std::int64_t>(1, kRun / block);
  for (std::int64_t b0 = begin; b0 < end; b0 += span) {
    const std::int64_t b1 = std::min(end, b0 + span);
    const std::int64_t start = (b0 / per_row) * row + (b0 % per_row) * block;
    const std::int64_t last = b1 - 1;
    const std::int64_t stop = (last / per_row) * row + (last % per_row) * block +
                              std::min(block, row - (last % per_row) * block);
    for (std::int64_t c = 0; c < stop - start; ++c) {
      sum[c] = 0.0f;
    }
    std::size_t k = 0;
    for (; k + 1 < planes; k += 2) {  // two planes a pass: half the trips through `sum`
      const std::uint8_t* q0 = reinterpret_cast<const std::uint8_t*>(codes[k]);
      const std::uint8_t* q1 = reinterpret_cast<const std::uint8_t*>(codes[k + 1]);
      const std::uint8_t* e0 = reinterpret_cast<const std::uint8_t*>(exps[k]);
      const std::uint8_t* e1 = reinterpret_cast<const std::uint8_t*>(exps[k + 1]);
      for (std::int64_t b = b0; b < b1; ++b) {
        const std::int64_t first = (b / per_row) * row + (b % per_row) * block;
        const std::int64_t count = std::min(block, row - (b % per_row) * block);
        const float up0 = power_of_two(e0[b] - kExponentBias), w0 = p[k];
        const float up1 = power_of_two(e1[b] - kExponentBias), w1 = p[k + 1];
        const float s0 = up0 * w0, s1 = up1 * w1;
        float* out_sum = sum + (first - start);
        const std::uint8_t* c0 = q0 + first;
        const std::uint8_t* c1 = q1 + first;
        if (exact_scale(s0) && exact_scale(s1)) {
          for (std::int64_t c = 0; c < count; ++c) {
            const float acc = out_sum[c] + e4m3_value(c0[c]) * s0;
            out_sum[c] = acc + e4m3_value(c1[c]) * s1;
          }
        } else {
          for (std::int64_t c = 0; c < count; ++c) {
            const float acc = out_sum[c] + (e4m3_value(c0[c]) * up0) * w0;
            out_sum[c] = acc + (e4m3_value(c1[c]) * up1) * w1;
          }
        }
      }
    }
    for (; k < planes; ++k) {
      const std::uint8_t* q = reinterpret_cast<const std::uint8_t*>(codes[k]);
      const std::uint8_t* e = reinterpret_cast<const std::uint8_t*>(exps[k]);
      for (std::int64_t b = b0; b < b1; ++b) {
        const std::int64_t first = (b / per_row) * row + (b % per_row) * block;
        const std::int64_t count = std::min(block, row - (b % per_row) * block);
        const float up = power_of_two(e[b] - kExponentBias), weight_k = p[k];
        const float scale = up * weight_k;
        float* out_sum = sum + (first - start);
        const std::uint8_t* block_codes = q + first;
        if (exact_scale(scale)) {
          for (std::int64_t c = 0; c < count; ++c) {
            out_sum[c] = out_sum[c] + e4m3_value(block_codes[c]) * scale;
          }
        } else {
          for (std::int64_t c = 0; c < count; ++c) {
            out_sum[c] = out_sum[c] + (e4m3_value(block_codes[c]) * up) * weight_k;
          }
        }
      }
    }
    for (std::int64_t c = 0; c < stop - start; ++c) {
      o[start + c] = finish(weight, r[start + c], sum[c]);
    }
  }
}

void merge_fp8(std::intptr_t out, std::intptr_t base, double weight,
               const std::vector<std::intptr_t>& codes, const std::vector<std::intptr_t>& exps,
               const std::vector<double>& coeffs, std::int64_t rows, std::int64_t row,
               std::int64_t block) {
  float* o = reinterpret_cast<float*>(out);
  const float* r = reinterpret_cast<const float*>(base);
  const std::vector<float> p(coeffs.begin(), coeffs.end());
  const std::vector<std::uintptr_t> planes(codes.begin(), codes.end());
  const std::vector<std::uintptr_t> scales(exps.begin(), exps.end());
  const std::int64_t per_row = (row + block - 1) / block;
  const std::int64_t grain = std::max<std::int64_t>(1, kGrain / block);
  at::parallel_for(0, rows * per_row, grain, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> sum(kRun + kMaxBlock);
    merge_fp8_run(o, r, weight, planes.data(), scales.data(), p.data(), planes.size(), begin,
                  end, row, block, sum.data());
  });
}

}  // namespace

void register_delta_codes(pybind11::module_& module) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("encode_bf16_float32", &encode_bf16<float>, release());
  module.def("encode_bf16_bfloat16", &encode_bf16<std::uint16_t>, release());
  module.def("encode_fp8_float32", &encode_fp8<float>, release());
  module.def("encode_fp8_bfloat16", &encode_fp8<std::uint16_t>, release());
  module.def("merge_bf16", &merge_bf16, release());
  module.def("merge_fp8", &merge_fp8, release());
}
