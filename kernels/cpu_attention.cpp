// Paged decode attention on the CPU: each sequence's one query token against its context, read in
// place from the paged KV cache (no gather, no fp32 copy of K and V), fp32 arithmetic.
//
//   q       [B, Hq, D]                      bf16 / fp16 / fp32
//   cache   [NB, L, 2, T, Hkv, D]           same dtype (lmdisagg.kv.layout)
//   tables  [B, MB] int64                   block ids of each sequence (padded)
//   lens    [B] int64                       context length of each sequence (0: a padded row)
//   out     [B, Hq, D]                      q's dtype
//
// One work item per (sequence, KV head): the G = Hq / Hkv query heads that share the KV head are
// scored together, so each K and V row is read once. Two passes over the context (scores, then
// the weighted sum of V), with the scores of one item in a buffer of G * len floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (softmax after subtracting the max), written so loops over it vectorize
// (std::exp does not without -ffast-math): Cephes' expf, range reduction by ln 2 in two parts and
// a degree-6 polynomial, ~1 ulp; below -87 (exp < 1.7e-38) it returns exp(-87).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One (sequence, KV head): out[G, D] = softmax(q[G, D] . K[n, D]^T) V[n, D]. DC, GC > 0: D and G
// fixed at compile time (the common head shapes: the loops over them unroll and vectorize whole);
// 0: taken from d, g. The context is walked block by block (no division per token).
template <typename T, int DC, int GC>
void item(const T* q, const T* cache, const int64_t* table, int64_t n, int64_t Tb, int64_t row, int64_t stride,
          float scale, int64_t d, int64_t g, T* o, std::vector<float>& buf) {
  const int64_t D = DC ? DC : d, G = GC ? GC : g;
  buf.resize(2 * G * D + G * n);
  float* qf = buf.data();
  float* acc = qf + G * D;
  float* scores = acc + G * D;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * scale;
  for (int64_t j = 0, t = 0; t < n; ++j) {     // pass 1: q . k for the G heads, block by block
    const T* k = cache + table[j] * stride;
    for (const int64_t stop = std::min(n, t + Tb); t < stop; ++t, k += row) {
      for (int64_t h = 0; h < G; ++h) {
        const float* qh = qf + h * D;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += qh[i] * to_float(k[i]);
        scores[h * n + t] = s;
      }
    }
  }
  for (int64_t h = 0; h < G; ++h) {            // softmax per head
    float* s = scores + h * n;
    const float m = *std::max_element(s, s + n);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = exp_nonpositive(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
  }
  for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t j = 0, t = 0; t < n; ++j) {     // pass 2: the weighted sum of V
    const T* v = cache + table[j] * stride + Tb * row;
    for (const int64_t stop = std::min(n, t + Tb); t < stop; ++t, v += row) {
      for (int64_t h = 0; h < G; ++h) {
        const float p = scores[h * n + t];
        float* a = acc + h * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) a[i] += p * to_float(v[i]);
      }
    }
  }
  for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T>(acc[i]);
}

template <typename T>
using Item = void (*)(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, float, int64_t,
                      int64_t, T*, std::vector<float>&);

template <typename T, int DC>
Item<T> pick_g(int64_t g) {
  switch (g) {
    case 1: return item<T, DC, 1>;
    case 2: return item<T, DC, 2>;
    case 3: return item<T, DC, 3>;
    case 4: return item<T, DC, 4>;
    case 6: return item<T, DC, 6>;
    case 8: return item<T, DC, 8>;
    default: return item<T, 0, 0>;
  }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t L = cache.size(1), Tb = cache.size(3), Hkv = cache.size(4);
  const int64_t G = Hq / Hkv, MB = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t row = Hkv * D;                 // one token's K (or V) in a block
  const int64_t stride = L * 2 * Tb * row;     // one block, every layer
  const Item<T> f = D == 64 ? pick_g<T, 64>(G) : D == 128 ? pick_g<T, 128>(G) : item<T, 0, 0>;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, h = w % Hkv, n = lp[b];
      T* o = op + (b * Hq + h * G) * D;
      if (n <= 0) {
        for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T>(0.0f);
        continue;
      }
      f(qp + (b * Hq + h * G) * D, cp + layer * 2 * Tb * row + h * D, tp + b * MB, n, Tb, row, stride,
        static_cast<float>(scale), D, G, o, buf);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
                        const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 6, "paged_decode: q [B, Hq, D], cache [NB, L, 2, T, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "paged_decode: q and cache differ in dtype");
  TORCH_CHECK(q.size(2) == cache.size(5) && q.size(1) % cache.size(4) == 0, "paged_decode: head shapes differ");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "paged_decode: int64 tables and lens");
  TORCH_CHECK(tables.dim() == 2 && lens.dim() == 1, "paged_decode: tables [B, MB], lens [B]");
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "paged_decode: one table and length per row");
  TORCH_CHECK(layer >= 0 && layer < cache.size(1), "paged_decode: layer out of range");
  TORCH_CHECK(cache.is_contiguous(), "paged_decode: the cache must be contiguous");
  const auto qc = q.contiguous();
  const auto tc = tables.contiguous();
  const auto lc = lens.contiguous();
  const int64_t cap = tc.size(1) * cache.size(3);
  const int64_t* l = lc.data_ptr<int64_t>();
  const int64_t* t = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < lc.size(0); ++b) {  // every block read lies in the cache
    TORCH_CHECK(l[b] <= cap, "paged_decode: a context is longer than its block table");
    for (int64_t j = 0; j * cache.size(3) < l[b]; ++j)
      TORCH_CHECK(t[b * tc.size(1) + j] >= 0 && t[b * tc.size(1) + j] < cache.size(0), "paged_decode: block id out of range");
  }
  auto out = at::empty_like(qc);
  switch (q.scalar_type()) {
    case at::kBFloat16: decode<c10::BFloat16>(qc, cache, layer, tc, lc, scale, out); break;
    case at::kHalf: decode<c10::Half>(qc, cache, layer, tc, lc, scale, out); break;
    case at::kFloat: decode<float>(qc, cache, layer, tc, lc, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode: bf16, fp16 or fp32, not ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lmdisagg_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor cache, int layer, Tensor tables, Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmdisagg_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
}
