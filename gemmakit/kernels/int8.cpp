// int8 weights with one scale per output row times a few rows of activations, summed in fp32: the decode
// step's products for an int8 model (gemmakit.quant.Int8Linear), built with kernels/q4_0.cpp by
// gemmakit.kernels.load for the machine it runs on.
//
// y[m, n] = scale[n] * sum_i q[n, i] * x[m, i]     (the sum in fp32; y in x's dtype)
//
// Two layouts, as kernels/bf16.cpp: weight [out, in] (a decoder layer's projections, four rows per pass,
// 16 inputs per load widened int8 -> int32 -> fp32) and tiles [out / 32, in, 32] (Int8Linear.retile's LM
// head: input j of a tile's 32 rows is one 32-byte load, two registers of running sums, no horizontal
// sums). Each output adds its products in the same order whatever the number of activation rows, so a row
// gets the same bits alone or in a batch. Without AVX-512 the plain C++ loops are built (int8_isa says
// which); gemmakit then keeps inductor's code for these products.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
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
constexpr int64_t kRows = 4;    // weight rows per pass of int8_linear
constexpr int64_t kTile = 32;   // rows per tile of int8_tiles
constexpr int kMaxX = 4;        // activation rows per pass over a tile

// y[i] = row i of w [rows, k] . x (fp32), for rows <= 4.
void rows_dot(const int8_t* w, int64_t k, int64_t rows, const float* x, float* y) {
  const int64_t chunks = k / kChunk;
  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
#if GK_AVX512
    if (rows - i0 == kRows) {
      __m512 acc[kRows];
      for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 xc = _mm512_loadu_ps(x + c * kChunk);
        for (int i = 0; i < kRows; ++i) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (i0 + i) * k + c * kChunk));
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), xc, acc[i]);
        }
      }
      for (int i = 0; i < kRows; ++i) {
        float s = _mm512_reduce_add_ps(acc[i]);
        for (int64_t j = chunks * kChunk; j < k; ++j) s += static_cast<float>(w[(i0 + i) * k + j]) * x[j];
        y[i0 + i] = s;
      }
      continue;
    }
    // The end of a matrix (fewer than 4 rows): one at a time, in the same order as above.
    for (int64_t i = i0; i < rows; ++i) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * k + c * kChunk));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), _mm512_loadu_ps(x + c * kChunk), acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t j = chunks * kChunk; j < k; ++j) s += static_cast<float>(w[i * k + j]) * x[j];
      y[i] = s;
    }
#else
    for (int64_t i = i0; i < std::min(rows, i0 + kRows); ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += static_cast<float>(w[i * k + j]) * x[j];
      y[i] = s;
    }
#endif
  }
}

// y[r][0..32) = the 32 rows of one tile [k, 32] times R rows of activations x [R, k] (fp32).
template <int R>
void tile_dot(const int8_t* w, int64_t k, const float* x, float* y) {
#if GK_AVX512
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * kTile));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
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
      for (int i = 0; i < kTile; ++i) acc[i] += static_cast<float>(w[j * kTile + i]) * x[r * k + j];
    std::memcpy(y + r * kTile, acc, sizeof(acc));
  }
#endif
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t k, int64_t n, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), op, ": the weights must be contiguous int8");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, op, ": scale must be [", n, "], got ", scale.sizes());
  TORCH_CHECK(x.size(-1) == k, op, ": input width ", x.size(-1), " != the weights' ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": activations must be float32, bfloat16 or float16, got ", x.scalar_type());
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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2, "int8_linear: weight must be [out, in], got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  check(x, weight, scale, k, n, "int8_linear");
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  const std::vector<float> xs = as_float(x2), sc = as_float(scale);
  at::Tensor y = output(x, n);
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const int64_t groups = (n + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (kRows * k));  // >= ~32 KiB of weights per thread
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "int8_linear", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      float sums[kRows];
      for (int64_t g = begin; g < end; ++g) {
        const int64_t row = g * kRows, rows = std::min<int64_t>(kRows, n - row);
        for (int64_t r = 0; r < m; ++r) {
          rows_dot(w + row * k, k, rows, xs.data() + r * k, sums);
          for (int64_t i = 0; i < rows; ++i) out[r * n + row + i] = static_cast<scalar_t>(sums[i] * sc[row + i]);
        }
      }
    });
  });
  return y;
}

using TileFn = void (*)(const int8_t*, int64_t, const float*, float*);
constexpr TileFn kTileFns[kMaxX] = {&tile_dot<1>, &tile_dot<2>, &tile_dot<3>, &tile_dot<4>};

at::Tensor int8_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(2) == kTile, "int8_tiles: tiles must be [out / 32, in, 32], got ",
              tiles.sizes());
  const int64_t count = tiles.size(0), k = tiles.size(1), n = count * kTile;
  check(x, tiles, scale, k, n, "int8_tiles");
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  const std::vector<float> xs = as_float(x2), sc = as_float(scale);
  at::Tensor y = output(x, n);
  const int8_t* w = tiles.const_data_ptr<int8_t>();
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (kTile * k));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "int8_tiles", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      float sums[kMaxX * kTile];
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t r = 0; r < m; r += kMaxX) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxX, m - r));
          kTileFns[rows - 1](w + t * k * kTile, k, xs.data() + r * k, sums);
          for (int i = 0; i < rows; ++i)
            for (int64_t j = 0; j < kTile; ++j)
              out[(r + i) * n + t * kTile + j] = static_cast<scalar_t>(sums[i * kTile + j] * sc[t * kTile + j]);
        }
      }
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
  m.def("int8_isa() -> str", &int8_isa);
}

GK_FRAGMENT_IMPL(GK_NAMESPACE, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_tiles", &int8_tiles);
}
