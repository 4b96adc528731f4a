// bf16 weights times a few rows of activations, summed in fp32: the decode step's matrix-vector products
// for a bf16 model, built with kernels/q4_0.cpp by gemmakit.kernels.load for the machine it runs on.
//
// Decoding one token reads every weight once, so its speed is the speed at which weights stream from
// memory. A bf16 value is the top half of an fp32 one: 32 bf16 weights (one 64-byte load) widen to two
// registers of 16 fp32 values with one shift (the even elements) and one mask (the odd ones), with no
// rounding. The activations are split the same way into even and odd halves once per call, so each
// running sum meets the right activation without shuffling the weights.
//
// Two layouts:
// - bf16_linear: weight [out, in] as stored (a decoder layer's projections). One row at a time, with an
//   even and an odd running sum; a row's horizontal sum ends its product.
// - bf16_tiles: tiles [out / 32, in, 32] (gemmakit.quant.PackedEmbedding's tied LM head): input j of a
//   tile's 32 rows is one 64-byte load, so the tile's 32 sums stay in two registers for the whole row
//   of inputs and no horizontal sum is needed.
//
// Each output adds its products in the same order whatever the number of activation rows, so a row
// gets the same bits alone or in a batch. Without AVX-512 the plain C++ loops are built (bf16_isa
// says which); gemmakit then keeps inductor's code for these products.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
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

constexpr int64_t kChunk = 32;  // inputs per 64-byte load of bf16 weights
constexpr int64_t kTile = 32;   // rows per tile of bf16_tiles
constexpr int kMaxX = 4;        // activation rows per pass over a tile

// fp32 value of a bf16 given by its bits.
inline float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x [m, k] (any float type) as fp32 rows split per chunk of 32 inputs: the 16 even inputs, then the 16
// odd ones; the k % 32 tail inputs kept in order after the chunks.
template <typename T>
void split_rows(const T* x, int64_t m, int64_t k, float* out) {
  const int64_t chunks = k / kChunk;
  for (int64_t r = 0; r < m; ++r) {
    const T* xr = x + r * k;
    float* o = out + r * k;
    for (int64_t c = 0; c < chunks; ++c) {
      for (int i = 0; i < 16; ++i) {
        o[c * kChunk + i] = static_cast<float>(xr[c * kChunk + 2 * i]);
        o[c * kChunk + 16 + i] = static_cast<float>(xr[c * kChunk + 2 * i + 1]);
      }
    }
    for (int64_t j = chunks * kChunk; j < k; ++j) o[j] = static_cast<float>(xr[j]);
  }
}

// Weight row w [k] . x, x split as split_rows lays it out. One row at a time: consecutive rows are then
// one sequential stream for the prefetchers. (Four rows per pass, interleaved, streamed 100 [2048, 640]
// matrices at 17.5 GB/s on the 2-core AMD EPYC, one row per pass at 23 GB/s.)
float row_dot(const uint16_t* w, int64_t k, const float* xs) {
  const int64_t chunks = k / kChunk;
  float s = 0.f;
#if GK_AVX512
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i raw = _mm512_loadu_si512(w + c * kChunk);
    even = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), _mm512_loadu_ps(xs + c * kChunk), even);
    odd = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(raw, high)), _mm512_loadu_ps(xs + c * kChunk + 16), odd);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
#else
  for (int64_t c = 0; c < chunks; ++c) {
    for (int l = 0; l < 16; ++l) {
      s += widen(w[c * kChunk + 2 * l]) * xs[c * kChunk + l];
      s += widen(w[c * kChunk + 2 * l + 1]) * xs[c * kChunk + 16 + l];
    }
  }
#endif
  for (int64_t j = chunks * kChunk; j < k; ++j) s += widen(w[j]) * xs[j];
  return s;
}

// y[r][0..32) = the 32 rows of one tile [k, 32] times R rows of activations x [R, k] (fp32, in order).
template <int R>
void tile_dot(const uint16_t* w, int64_t k, const float* x, float* y) {
#if GK_AVX512
  // Two sets of sums (inputs j even / odd) so that consecutive multiply-adds do not wait on each other.
  __m512 even[2][R], odd[2][R];
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < R; ++r) even[p][r] = odd[p][r] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t j = 0;
  for (; j + 1 < k; j += 2) {
    for (int p = 0; p < 2; ++p) {
      const __m512i raw = _mm512_loadu_si512(w + (j + p) * kTile);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));  // tile rows 0, 2, ..., 30
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(raw, high));  // tile rows 1, 3, ..., 31
      for (int r = 0; r < R; ++r) {
        const __m512 xj = _mm512_set1_ps(x[r * k + j + p]);
        even[p][r] = _mm512_fmadd_ps(we, xj, even[p][r]);
        odd[p][r] = _mm512_fmadd_ps(wo, xj, odd[p][r]);
      }
    }
  }
  if (j < k) {
    const __m512i raw = _mm512_loadu_si512(w + j * kTile);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
    for (int r = 0; r < R; ++r) {
      const __m512 xj = _mm512_set1_ps(x[r * k + j]);
      even[0][r] = _mm512_fmadd_ps(we, xj, even[0][r]);
      odd[0][r] = _mm512_fmadd_ps(wo, xj, odd[0][r]);
    }
  }
  // Interleave the even and odd rows back into order: rows 0..15, then 16..31.
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int r = 0; r < R; ++r) {
    const __m512 e = _mm512_add_ps(even[0][r], even[1][r]);
    const __m512 o = _mm512_add_ps(odd[0][r], odd[1][r]);
    _mm512_storeu_ps(y + r * kTile, _mm512_permutex2var_ps(e, first, o));
    _mm512_storeu_ps(y + r * kTile + 16, _mm512_permutex2var_ps(e, second, o));
  }
#else
  for (int r = 0; r < R; ++r) {
    float acc[kTile] = {};
    for (int64_t j = 0; j < k; ++j)
      for (int i = 0; i < kTile; ++i) acc[i] += widen(w[j * kTile + i]) * x[r * k + j];
    std::memcpy(y + r * kTile, acc, sizeof(acc));
  }
#endif
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t k, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), op, ": the weights must be contiguous bfloat16");
  TORCH_CHECK(x.size(-1) == k, op, ": input width ", x.size(-1), " != the weights' ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": activations must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// x2 [m, k] as fp32: split per chunk as row_dot reads it, or in order as tile_dot does.
std::vector<float> rows_of(const at::Tensor& x2, bool split) {
  const int64_t m = x2.size(0), k = x2.size(1);
  std::vector<float> out(m * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "bf16_rows", [&] {
    const scalar_t* x = x2.const_data_ptr<scalar_t>();
    if (split) {
      split_rows(x, m, k, out.data());
    } else {
      for (int64_t i = 0; i < m * k; ++i) out[i] = static_cast<float>(x[i]);
    }
  });
  return out;
}

at::Tensor output(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "bf16_linear: weight must be [out, in], got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  check(x, weight, k, "bf16_linear");
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  const std::vector<float> xs = rows_of(x2, /*split=*/true);
  at::Tensor y = output(x, n);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<c10::BFloat16>());
  // At least ~32 KiB of weights per thread: a small matrix is not worth splitting.
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (k * 2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bf16_linear", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t r = 0; r < m; ++r) out[r * n + i] = static_cast<scalar_t>(row_dot(w + i * k, k, xs.data() + r * k));
    });
  });
  return y;
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, float*);
constexpr TileFn kTileFns[kMaxX] = {&tile_dot<1>, &tile_dot<2>, &tile_dot<3>, &tile_dot<4>};

at::Tensor bf16_tiles(const at::Tensor& x, const at::Tensor& tiles) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(2) == kTile, "bf16_tiles: tiles must be [out / 32, in, 32], got ",
              tiles.sizes());
  const int64_t count = tiles.size(0), k = tiles.size(1), n = count * kTile;
  check(x, tiles, k, "bf16_tiles");
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  const std::vector<float> xs = rows_of(x2, /*split=*/false);
  at::Tensor y = output(x, n);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(tiles.const_data_ptr<c10::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (kTile * k * 2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bf16_tiles", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      float sums[kMaxX * kTile];
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t r = 0; r < m; r += kMaxX) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxX, m - r));
          kTileFns[rows - 1](w + t * k * kTile, k, xs.data() + r * k, sums);
          for (int i = 0; i < rows; ++i)
            for (int64_t j = 0; j < kTile; ++j) out[(r + i) * n + t * kTile + j] = static_cast<scalar_t>(sums[i * kTile + j]);
        }
      }
    });
  });
  return y;
}

// Which instructions this build uses ("avx512", "c++"), for gemmakit.kernels.bf16 and tests.
std::string bf16_isa() {
#if GK_AVX512
  return "avx512";
#else
  return "c++";
#endif
}

}  // namespace

// A fragment: kernels/q4_0.cpp's TORCH_LIBRARY opens the namespace. (Through a macro so that GK_NAMESPACE
// expands before the library macros paste it into names.)
#define GK_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define GK_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GK_FRAGMENT(GK_NAMESPACE, m) {
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_tiles(Tensor x, Tensor tiles) -> Tensor");
  m.def("bf16_isa() -> str", &bf16_isa);
}

GK_FRAGMENT_IMPL(GK_NAMESPACE, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("bf16_tiles", &bf16_tiles);
}
