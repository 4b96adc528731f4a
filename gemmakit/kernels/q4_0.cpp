// Q4_0 weights times Q8_0 activations: what llama.cpp computes for a Q4_0 matrix (ggml's
// quantize_row_q8_0 and vec_dot_q4_0_q8_0), built by gemmakit.kernels.load for the machine it runs on.
//
// y[m, n] = sum over blocks b of 32 inputs:  d[n, b] * dx[m, b] * (sum_i q[n, 32b + i] * xq[m, 32b + i] - 8 * sx[m, b])
//
// where q are the weights' 4-bit values (0..15; the weight is d * (q - 8)), xq the activations rounded per
// block (dx = amax / 127 kept as fp16, xq = round(x * 127 / amax)) and sx the sum of a block's xq. The
// integer sums are exact, and each output adds its blocks in order with one fused multiply-add per block,
// so every build (AVX-512 VNNI, AVX2, plain C++) and every batch gives a row the same bits.
//
// Weights are laid out in tiles of 16 rows: packed [rows / 16, in / 32, 256] bytes, where byte
// 64 L + 4 j + t of block b holds input 32 b + 4 L + t of row j in its low nibble and input
// 32 b + 16 + 4 L + t in its high one; scales [rows / 16, in / 32, 16] fp16. One 64-byte load then
// feeds two multiply-adds of 16 rows by 4 broadcast activations (AVX-512 VNNI's vpdpbusd).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define GK_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GK_AVX2 1
#include <immintrin.h>
#endif

#ifndef GK_NAMESPACE
#define GK_NAMESPACE gemmakit
#endif

namespace {

constexpr int64_t kTile = 16;        // rows per tile
constexpr int64_t kBlock = 32;       // inputs per block
constexpr int64_t kBlockBytes = 256; // one block of a tile: 16 rows x 32 values x 4 bits

// Rows of activations per pass over a tile's block: their running sums live in registers.
#if GK_AVX512
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 4;
#endif

// One row of activations as Q8_0 blocks (ggml's quantize_row_q8_0: scale by 127 / amax, round to nearest
// even; the scale kept is amax / 127 rounded to fp16).
template <typename T>
void quantize_row(const T* x, int64_t nb, int8_t* q, float* d, int32_t* sum) {
  float xb[kBlock];
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      xb[i] = static_cast<float>(x[b * kBlock + i]);
      amax = std::max(amax, std::fabs(xb[i]));
    }
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    d[b] = static_cast<float>(c10::Half(amax / 127.f));
    int32_t s = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));
      q[b * kBlock + i] = static_cast<int8_t>(v);
      s += v;
    }
    sum[b] = s;
  }
}

// y[r][0..16) = rows t*16 .. t*16+15 of the product, for R rows of activations.
template <int R>
void tile_rows(const uint8_t* w, const c10::Half* s, int64_t nb, const int8_t* xq, int64_t k, const float* dx,
               const int32_t* sx, float* y) {
#if GK_AVX512
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * kBlockBytes;
    __m512i v[8];
    for (int l = 0; l < 4; ++l) {
      const __m512i raw = _mm512_loadu_si512(wb + 64 * l);
      v[l] = _mm512_and_si512(raw, low);
      v[l + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + b * kTile)));
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * k + b * kBlock;
      __m512i a = _mm512_setzero_si512();
      for (int g = 0; g < 8; ++g) {
        int32_t four;
        std::memcpy(&four, xb + 4 * g, 4);
        a = _mm512_dpbusd_epi32(a, v[g], _mm512_set1_epi32(four));
      }
      a = _mm512_sub_epi32(a, _mm512_set1_epi32(8 * sx[r * nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(scale, _mm512_set1_ps(dx[r * nb + b])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * kTile, acc[r]);
#elif GK_AVX2
  // Two halves of 8 rows (32 bytes of each 64-byte group). Without VNNI: u8 x s8 pairs summed to int16
  // (at most 8 groups x 2 x 15 x 127 = 30480: no saturation), then to int32.
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + b * kBlockBytes + 32 * h;
      __m256i v[8];
      for (int l = 0; l < 4; ++l) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * l));
        v[l] = _mm256_and_si256(raw, low);
        v[l + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      }
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b * kTile + 8 * h)));
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = xq + r * k + b * kBlock;
        __m256i p = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
          int32_t four;
          std::memcpy(&four, xb + 4 * g, 4);
          p = _mm256_add_epi16(p, _mm256_maddubs_epi16(v[g], _mm256_set1_epi32(four)));
        }
        __m256i a = _mm256_madd_epi16(p, ones);
        a = _mm256_sub_epi32(a, _mm256_set1_epi32(8 * sx[r * nb + b]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(scale, _mm256_set1_ps(dx[r * nb + b])), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * kTile + 8 * h, acc[r]);
  }
#else
  float acc[R][kTile] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * kBlockBytes;
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * k + b * kBlock;
      for (int j = 0; j < kTile; ++j) {
        int32_t a = 0;
        for (int l = 0; l < 4; ++l) {
          for (int t = 0; t < 4; ++t) {
            const uint8_t byte = wb[64 * l + 4 * j + t];
            a += (byte & 15) * xb[4 * l + t] + (byte >> 4) * xb[16 + 4 * l + t];
          }
        }
        a -= 8 * sx[r * nb + b];
        const float scale = static_cast<float>(s[b * kTile + j]) * dx[r * nb + b];
        acc[r][j] = std::fma(static_cast<float>(a), scale, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * kTile, acc[r], sizeof(acc[r]));
#endif
}

using TileFn = void (*)(const uint8_t*, const c10::Half*, int64_t, const int8_t*, int64_t, const float*,
                        const int32_t*, float*);

template <int... Rs>
constexpr auto tile_table(std::integer_sequence<int, Rs...>) {
  return std::array<TileFn, sizeof...(Rs)>{&tile_rows<Rs + 1>...};
}

// The product for m rows of T activations into y [m, out] (T), after rounding the activations to Q8_0.
template <typename T>
void run(const T* x, int64_t m, int64_t k, const uint8_t* w, const c10::Half* s, int64_t tiles, int64_t out, T* y) {
  const int64_t nb = k / kBlock;
  // Scratch kept between calls (decoding calls this ~130 times per token with the same sizes).
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx;
  thread_local std::vector<int32_t> sx;
  xq.resize(m * k);
  dx.resize(m * nb);
  sx.resize(m * nb);
  int8_t* qp = xq.data();
  float* dp = dx.data();
  int32_t* sp = sx.data();
  const auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row(x + r * k, nb, qp + r * k, dp + r * nb, sp + r * nb);
  };
  if (m * k <= (1 << 16)) {
    quantize(0, m);  // a decode step's rows: not worth waking the threads
  } else {
    at::parallel_for(0, m, 16, quantize);
  }
  static const auto table = tile_table(std::make_integer_sequence<int, kMaxRows>{});
  // At least ~32 KiB of weights per thread: a small matrix is not worth splitting.
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (nb * kBlockBytes));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    float buffer[kMaxRows * kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cols = std::min<int64_t>(kTile, out - t * kTile);
      for (int64_t r = 0; r < m; r += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - r));
        table[rows - 1](w + t * nb * kBlockBytes, s + t * nb * kTile, nb, qp + r * k, k, dp + r * nb, sp + r * nb,
                        buffer);
        for (int i = 0; i < rows; ++i) {
          T* yr = y + (r + i) * out + t * kTile;
          for (int64_t j = 0; j < cols; ++j) yr[j] = static_cast<T>(buffer[i * kTile + j]);
        }
      }
    }
  });
}

at::Tensor q4_0_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(), "q4_0_linear runs on the CPU");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlockBytes && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous(),
              "q4_0_linear: packed must be contiguous uint8 [rows / 16, in / 32, 256], got ", packed.sizes());
  const int64_t tiles = packed.size(0), nb = packed.size(1), k = nb * kBlock, n = tiles * kTile;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({tiles, nb, kTile}),
              "q4_0_linear: scales must be contiguous float16 [", tiles, ", ", nb, ", 16], got ", scales.sizes());
  TORCH_CHECK(x.size(-1) == k, "q4_0_linear: input width ", x.size(-1), " != the weights' ", k);
  TORCH_CHECK(out_features > n - kTile && out_features <= n, "q4_0_linear: ", out_features, " outputs do not fill ",
              tiles, " tiles of 16 rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "q4_0_linear: activations must be float32, bfloat16 or float16, got ", x.scalar_type());
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "q4_0_linear", [&] {
    run<scalar_t>(x2.const_data_ptr<scalar_t>(), m, k, packed.const_data_ptr<uint8_t>(),
                  scales.const_data_ptr<c10::Half>(), tiles, out_features, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

// Which instructions this build uses ("avx512_vnni", "avx2", "c++"), for notices and tests.
std::string q4_0_isa() {
#if GK_AVX512
  return "avx512_vnni";
#elif GK_AVX2
  return "avx2";
#else
  return "c++";
#endif
}

}  // namespace

#define GK_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GK_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GK_LIBRARY(GK_NAMESPACE, m) {
  m.def("q4_0_linear(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
  m.def("q4_0_isa() -> str", &q4_0_isa);
}

GK_LIBRARY_IMPL(GK_NAMESPACE, CPU, m) { m.impl("q4_0_linear", &q4_0_linear); }
