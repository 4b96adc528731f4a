// 8-bit weights times a few rows of activations, summed in fp32: the decode step's products for an int8,
// fp8 or q8_0 model (gemmakit.quant.Int8Linear, Fp8Linear, BlockInt8Linear), built with kernels/q4_0.cpp
// by gemmakit.kernels.load for the machine it runs on.
//
// int8, fp8 (e4m3fn):  y[m, n] = scale[n] * sum_i q[n, i] * x[m, i]                   (the sum in fp32)
// q8_0:                y[m, n] = sum_b d[n, b] * sum_{i in block b} q[n, i] * x[m, i]  (blocks of 32)
// y in x's dtype.
//
// An fp8 weight is widened through float16: its sign, exponent and mantissa bits moved into a half's
// places make the half equal to the value times 2^-8 (the exponent bias is 15 instead of 7; e4m3's
// subnormals land on the half's subnormals), which vcvtph2ps widens exactly. The sums are then 2^-8 of
// the true ones, exactly (powers of two), and the row's scale times 256 is applied to the sum.
//
// Two layouts, as kernels/bf16.cpp: weight [out, in] (a decoder layer's projections and a q8_0 head, one
// row at a time, 16 inputs per load widened to fp32) and tiles [out / 32, in, 32] (Int8Linear.retile's LM
// head, int8 or fp8: input j of a tile's 32 rows is one 32-byte load, two registers of running sums, no
// horizontal sums). Each output adds its products in the same order whatever the number of activation rows, so a row
// gets the same bits alone or in a batch. Without AVX-512 the plain C++ loops are built (int8_isa says
// which); gemmakit then keeps inductor's code for these products.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define GK_AVX512 1
#include <immintrin.h>
#endif

#ifndef GK_NAMESPACE
#define GK_NAMESPACE gemmakit
#endif

namespace {

constexpr int64_t kChunk = 16;  // inputs per load of a weight row
constexpr int64_t kTile = 32;   // rows per tile of the tile products
constexpr int64_t kBlock = 32;  // inputs per q8_0 block
constexpr int kMaxX = 4;        // activation rows per pass over a tile

// A weight format: its stored type, how 16 (or 32) stored values widen to fp32 with AVX-512, one value
// without, and the factor (kUnit) by which the widened values are smaller than the true ones.
struct Int8 {
  using T = int8_t;
  static constexpr float kUnit = 1.f;
  static float scalar(T v) { return static_cast<float>(v); }
#if GK_AVX512
  static __m512 widen16(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void widen32(const T* p, __m512& lo, __m512& hi) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  }
#endif
};

struct Fp8 {  // float8_e4m3fn, widened through float16 (see the top of this file)
  using T = uint8_t;
  static constexpr float kUnit = 256.f;
  static float scalar(T v) {
    return static_cast<float>(c10::Float8_e4m3fn(v, c10::Float8_e4m3fn::from_bits())) / kUnit;
  }
#if GK_AVX512
  static __m256i halves(__m256i b) {  // 16 bytes zero-extended to 16 bits each -> float16 bits
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
    return _mm256_or_si256(sign, _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
  }
  static __m512 widen16(const T* p) {
    return _mm512_cvtph_ps(halves(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
  }
  static void widen32(const T* p, __m512& lo, __m512& hi) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
    const __m512i h = _mm512_or_si512(sign, _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x7f)), 7));
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  }
#endif
};

// Row w [k] . x (fp32, in units of 1 / F::kUnit). One row at a time, as kernels/bf16.cpp: consecutive
// rows are one sequential stream (four rows per pass, interleaved, streamed 100 int8 [2048, 640] matrices
// at 12.5 GB/s on the 2-core AMD EPYC, one row per pass at 21 GB/s).
template <class F>
float row_dot(const typename F::T* w, int64_t k, const float* x) {
  float s = 0.f;
  int64_t j = 0;
#if GK_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; j + kChunk <= k; j += kChunk) acc = _mm512_fmadd_ps(F::widen16(w + j), _mm512_loadu_ps(x + j), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; j < k; ++j) s += F::scalar(w[j]) * x[j];
  return s;
}

// sum_b d[b] * (block b of row w [k]) . (block b of x) (q8_0: k % 32 == 0, d [k / 32]).
float block_dot(const int8_t* w, int64_t k, const float* x, const float* d) {
  float s = 0.f;
#if GK_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const int8_t* q = w + b * kBlock;
    const __m512 part = _mm512_fmadd_ps(Int8::widen16(q + kChunk), _mm512_loadu_ps(x + b * kBlock + kChunk),
                                        _mm512_mul_ps(Int8::widen16(q), _mm512_loadu_ps(x + b * kBlock)));
    acc = _mm512_fmadd_ps(part, _mm512_set1_ps(d[b]), acc);
  }
  s = _mm512_reduce_add_ps(acc);
#else
  for (int64_t b = 0; b < k / kBlock; ++b) {
    float part = 0.f;
    for (int64_t j = b * kBlock; j < (b + 1) * kBlock; ++j) part += static_cast<float>(w[j]) * x[j];
    s += part * d[b];
  }
#endif
  return s;
}

// y[r][0..32) = the 32 rows of one tile [k, 32] times R rows of activations x [R, k] (fp32, in units of
// 1 / F::kUnit).
template <class F, int R>
void tile_dot(const typename F::T* w, int64_t k, const float* x, float* y) {
#if GK_AVX512
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    __m512 w0, w1;
    F::widen32(w + j * kTile, w0, w1);
    for (int r = 0; r < R; ++r) {
      const __m512 xj = _mm512_set1_ps(x[r * k + j]);
      lo[r] = _mm512_fmadd_ps(w0, xj, lo[r]);
      hi[r] = _mm512_fmadd_ps(w1, xj, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * kTile, lo[r]);
    _mm512_storeu_ps(y + r * kTile + 16, hi[r]);
  }
#else
  for (int r = 0; r < R; ++r) {
    float acc[kTile] = {};
    for (int64_t j = 0; j < k; ++j)
      for (int i = 0; i < kTile; ++i) acc[i] += F::scalar(w[j * kTile + i]) * x[r * k + j];
    std::memcpy(y + r * kTile, acc, sizeof(acc));
  }
#endif
}

void check(const at::Tensor& x, const at::Tensor& w, at::ScalarType type, int64_t k, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(w.scalar_type() == type && w.is_contiguous(), op, ": the weights must be contiguous ",
              type == at::kChar ? "int8" : "float8_e4m3fn", ", got ", w.scalar_type());
  TORCH_CHECK(x.size(-1) == k, op, ": input width ", x.size(-1), " != the weights' ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": activations must be float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_scale(const at::Tensor& scale, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(scale.device().is_cpu() && scale.sizes() == shape, op, ": scale must be ", shape, ", got ", scale.sizes());
}

std::vector<float> as_float(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<float> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "int8_as_float", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) out[i] = static_cast<float>(p[i]);
  });
  return out;
}

at::Tensor output(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

// y [..., n] for x [..., k]: the weight rows over the threads (>= ~32 KiB of weights each), `dot(row, x_r)`
// the product of one weight row and one activation row, which `finish(row, sum)` turns into the output.
template <class Dot, class Finish>
at::Tensor by_rows(const at::Tensor& x, int64_t n, int64_t k, Dot dot, Finish finish) {
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  const std::vector<float> xs = as_float(x2);
  at::Tensor y = output(x, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "int8_rows", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, (32 << 10) / k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t r = 0; r < m; ++r) out[r * n + i] = static_cast<scalar_t>(finish(i, dot(i, xs.data() + r * k)));
    });
  });
  return y;
}

template <class F>
at::Tensor scaled_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, at::ScalarType type,
                         const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [out, in], got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  check(x, weight, type, k, op);
  check_scale(scale, {n}, op);
  std::vector<float> sc = as_float(scale);
  for (float& v : sc) v *= F::kUnit;
  const auto* w = reinterpret_cast<const typename F::T*>(weight.const_data_ptr());
  return by_rows(
      x, n, k, [&](int64_t row, const float* xr) { return row_dot<F>(w + row * k, k, xr); },
      [&](int64_t row, float sum) { return sum * sc[row]; });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  return scaled_linear<Int8>(x, weight, scale, at::kChar, "int8_linear");
}

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  return scaled_linear<Fp8>(x, weight, scale, at::kFloat8_e4m3fn, "fp8_linear");
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % kBlock == 0, "q8_0_linear: weight must be [out, in] with in a "
              "multiple of 32, got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  check(x, weight, at::kChar, k, "q8_0_linear");
  check_scale(scale, {n, k / kBlock}, "q8_0_linear");
  const std::vector<float> d = as_float(scale);
  const int8_t* w = weight.const_data_ptr<int8_t>();
  return by_rows(
      x, n, k, [&](int64_t row, const float* xr) { return block_dot(w + row * k, k, xr, d.data() + row * (k / kBlock)); },
      [](int64_t, float sum) { return sum; });
}

template <class F>
at::Tensor scaled_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale, at::ScalarType type,
                        const char* op) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(2) == kTile, op, ": tiles must be [out / 32, in, 32], got ", tiles.sizes());
  const int64_t count = tiles.size(0), k = tiles.size(1), n = count * kTile;
  check(x, tiles, type, k, op);
  check_scale(scale, {n}, op);
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  const std::vector<float> xs = as_float(x2);
  std::vector<float> sc = as_float(scale);
  for (float& v : sc) v *= F::kUnit;
  at::Tensor y = output(x, n);
  const auto* w = reinterpret_cast<const typename F::T*>(tiles.const_data_ptr());
  using TileFn = void (*)(const typename F::T*, int64_t, const float*, float*);
  constexpr TileFn fns[kMaxX] = {&tile_dot<F, 1>, &tile_dot<F, 2>, &tile_dot<F, 3>, &tile_dot<F, 4>};
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (kTile * k));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "int8_tiles", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      float sums[kMaxX * kTile];
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t r = 0; r < m; r += kMaxX) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxX, m - r));
          fns[rows - 1](w + t * k * kTile, k, xs.data() + r * k, sums);
          for (int i = 0; i < rows; ++i)
            for (int64_t j = 0; j < kTile; ++j)
              out[(r + i) * n + t * kTile + j] = static_cast<scalar_t>(sums[i * kTile + j] * sc[t * kTile + j]);
        }
      }
    });
  });
  return y;
}

at::Tensor int8_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale) {
  return scaled_tiles<Int8>(x, tiles, scale, at::kChar, "int8_tiles");
}

at::Tensor fp8_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale) {
  return scaled_tiles<Fp8>(x, tiles, scale, at::kFloat8_e4m3fn, "fp8_tiles");
}

// One fp8 row times its scale into out (float, bfloat16 or float16, rounded to nearest even as torch rounds
// q.to(dtype) * scale: the product of a 4-bit and an at most 24-bit significand is exact in fp32 first).
template <class T>
void widen_row(const uint8_t* q, int64_t k, float scale, T* out) {
  int64_t j = 0;
#if GK_AVX512
  const __m512 s = _mm512_set1_ps(scale * Fp8::kUnit);
  for (; j + kChunk <= k; j += kChunk) {
    const __m512 v = _mm512_mul_ps(Fp8::widen16(q + j), s);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out + j, v);
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {  // round to nearest even (no NaN here)
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
  for (; j < k; ++j) out[j] = static_cast<T>(Fp8::scalar(q[j]) * (scale * Fp8::kUnit));
}

// w = q * scale [out, in] in scale's dtype: Fp8Linear's weights for BLAS (prefill), where torch widens
// float8 one element at a time.
at::Tensor fp8_dequantize(const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2, "fp8_dequantize: weight must be [out, in], got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat8_e4m3fn && weight.is_contiguous(),
              "fp8_dequantize: the weights must be contiguous float8_e4m3fn on the CPU, got ", weight.scalar_type());
  check_scale(scale, {n}, "fp8_dequantize");
  const std::vector<float> sc = as_float(scale);
  at::Tensor y = at::empty({n, k}, scale.options());
  const auto* q = reinterpret_cast<const uint8_t*>(weight.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "fp8_dequantize", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) widen_row<scalar_t>(q + i * k, k, sc[i], out + i * k);
    });
  });
  return y;
}

// Which instructions this build uses ("avx512", "c++"), for gemmakit.kernels and tests.
std::string int8_isa() {
#if GK_AVX512
  return "avx512";
#else
  return "c++";
#endif
}

}  // namespace

// A fragment: kernels/q4_0.cpp's TORCH_LIBRARY opens the namespace (see kernels/bf16.cpp for the macros).
#define GK_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define GK_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GK_FRAGMENT(GK_NAMESPACE, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int8_tiles(Tensor x, Tensor tiles, Tensor scale) -> Tensor");
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("fp8_tiles(Tensor x, Tensor tiles, Tensor scale) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("fp8_dequantize(Tensor weight, Tensor scale) -> Tensor");
  m.def("int8_isa() -> str", &int8_isa);
}

GK_FRAGMENT_IMPL(GK_NAMESPACE, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_tiles", &int8_tiles);
  m.impl("fp8_linear", &fp8_linear);
  m.impl("fp8_tiles", &fp8_tiles);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("fp8_dequantize", &fp8_dequantize);
}
