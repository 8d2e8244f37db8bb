// hetero_llm's CPU decode step: every decoder layer of a Llama-style model for one new token,
// in one native call (kernels/cpu_decode.py builds it, decode/native.py runs it).
//
// transformers' forward for one token is ~1,000 small eager ops on a 30-layer model (norms,
// rotary, cache writes, attention, activation, residual adds), each 3-30 us of dispatch on a CPU:
// for a 135M model more than the INT8 matmuls themselves. Here a layer is a handful of loops
// over fp32 rows with the INT8 GEMVs in between, and the only parallel regions are the GEMVs and
// the attention heads.
//
// Activations enter each GEMV as two int8 levels per row, x ~= s1 * (q1 + q2 / 254), the same
// split as the model's own decode GEMV (kernels/cpu_vnni.py), so the results match the eager
// path to fp32 rounding. One source, two instruction sets (the build passes the flags):
//   AVX-512 VNNI: dpbusd multiplies u8 by s8, so the levels are stored +128 and each weight row's
//                 sum (rowsum) undoes the offset;
//   AVX2:         maddubs multiplies u8 by s8 into saturating int16 pairs; |w| (u8) times the
//                 level carrying w's sign (sign_epi8) stays within 2 * 127 * 128 < 32767, so the
//                 products are exact.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vector.h"

namespace {

constexpr int kMaxRows = 4;  // sequences per step (the accumulators live in registers)

#if defined(__AVX512VNNI__)
constexpr int64_t kStep = 64;  // int8 per register
const char* kIsa = "avx512_vnni";
#else
constexpr int64_t kStep = 32;
const char* kIsa = "avx2";
#endif

using namespace hetero_llm_vec;

// An int8 weight (N, K) with one fp32 scale per output row and an optional fp32 bias.
struct Linear {
  torch::Tensor w, scale, rowsum, bias;  // held so the memory stays alive
  const int8_t* wp = nullptr;
  const float* sp = nullptr;
  const int32_t* rp = nullptr;
  const float* bp = nullptr;
  int64_t N = 0, K = 0;
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // RMSNorm weights (offset folded in), fp32
  Linear qkv, o, gate_up, down;
  torch::Tensor keys, values;  // the static cache's (B, Hkv, capacity, D) fp32 tensors
  torch::Tensor length;        // the cache layer's token counter (int64 scalar)
};

// Two int8 levels of B rows of K floats: rows [0, B) hold q1, rows [B, 2B) q2 (+128 for VNNI).
struct Levels {
  std::vector<uint8_t> storage;
  uint8_t* q = nullptr;
  float s1[kMaxRows];
  int64_t B = 0, K = 0;

  void split(const float* x, int64_t rows, int64_t k) {
    B = rows;
    K = k;
    const size_t need = static_cast<size_t>(2 * rows * k + 64);
    if (storage.size() < need) storage.resize(need);
    q = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t m = 0; m < rows; ++m) {
      const float* row = x + m * k;
      const int64_t kv = k - k % kLanes;
      vfloat vmx = vset(0.f);
      for (int64_t i = 0; i < kv; i += kLanes) vmx = vmax(vmx, vabs(vload(row + i)));
      float amax = vhmax(vmx);
      for (int64_t i = kv; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float s = (amax > 0.f && std::isfinite(amax)) ? amax / 127.f : 1.f;
      const float inv1 = 1.f / s, inv2 = 254.f / s;
      int8_t* q1 = reinterpret_cast<int8_t*>(q + m * k);
      int8_t* q2 = reinterpret_cast<int8_t*>(q + (rows + m) * k);
      const vfloat vs = vset(s), vi1 = vset(inv1), vi2 = vset(inv2), lo = vset(-127.f), hi = vset(127.f);
      for (int64_t i = 0; i < kv; i += kLanes) {  // round half to even, as torch.round and nearbyint
        const vfloat v = vload(row + i);
        const vfloat a = vmin(hi, vmax(lo, vround(vmul(v, vi1))));
        const vfloat b = vmin(hi, vmax(lo, vround(vmul(vsub(v, vmul(a, vs)), vi2))));  // as the eager split
        vstore_i8(q1 + i, a);
        vstore_i8(q2 + i, b);
      }
      for (int64_t i = kv; i < k; ++i) {
        const float a = std::min(127.f, std::max(-127.f, std::nearbyint(row[i] * inv1)));
        const float b = std::min(127.f, std::max(-127.f, std::nearbyint((row[i] - a * s) * inv2)));
        q1[i] = static_cast<int8_t>(a);
        q2[i] = static_cast<int8_t>(b);
      }
      s1[m] = s;
    }
#if defined(__AVX512VNNI__)
    for (int64_t i = 0; i < 2 * rows * k; ++i) q[i] ^= 0x80;  // s8 -> u8 + 128
#endif
  }
};

// Exact integer dot products of R consecutive weight rows with the 2B level rows (q1 of each
// activation row, then q2): out[r * 2B + i]. Several rows at once keep 2BR independent
// accumulator chains in flight, so the loop runs at the speed of memory, not of dpbusd's latency.
inline int64_t hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }
template <int B, int R>
inline void row_dots(const Levels& lv, const int8_t* w, int64_t K, int64_t* out) {
#if defined(__AVX512VNNI__)
  __m512i acc[R * 2 * B];
  for (int i = 0; i < R * 2 * B; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kStep) {
    __m512i x[2 * B];
    for (int i = 0; i < 2 * B; ++i) x[i] = _mm512_load_si512(lv.q + i * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * K + k);  // each weight is read once for all rows
      for (int i = 0; i < 2 * B; ++i) acc[r * 2 * B + i] = _mm512_dpbusd_epi32(acc[r * 2 * B + i], x[i], wv);
    }
  }
  for (int i = 0; i < R * 2 * B; ++i) out[i] = hsum(acc[i]);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R * 2 * B];
  for (int i = 0; i < R * 2 * B; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += kStep) {
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      const __m256i wabs = _mm256_abs_epi8(wv);
      for (int i = 0; i < 2 * B; ++i) {
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(lv.q + i * K + k));
        const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
        acc[r * 2 * B + i] = _mm256_add_epi32(acc[r * 2 * B + i], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int i = 0; i < R * 2 * B; ++i) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    out[i] = _mm_cvtsi128_si32(s);
  }
#endif
}

// y[m, n] = scale[n] * s1[m] * (d1 + d2 / 254) + bias[n] (+ add[m, n]) for the R rows from n.
template <int B, int R>
inline void rows_out(const Levels& lv, const Linear& L, int64_t n, float* y, int64_t ldy, const float* add,
                     int64_t ldadd) {
  int64_t d[R * 2 * B];
  row_dots<B, R>(lv, L.wp + n * L.K, L.K, d);
  for (int r = 0; r < R; ++r, ++n) {
    const int64_t* dr = d + r * 2 * B;
#if defined(__AVX512VNNI__)
    const int64_t offset = 128 * static_cast<int64_t>(L.rp[n]);  // undo the +128 of the levels
#else
    const int64_t offset = 0;
#endif
    for (int m = 0; m < B; ++m) {
      float v = L.sp[n] * lv.s1[m] * (static_cast<float>(dr[m] - offset) +
                                       static_cast<float>(dr[B + m] - offset) * (1.f / 254.f));
      if (L.bp) v += L.bp[n];
      if (add) v += add[m * ldadd + n];
      y[m * ldy + n] = v;
    }
  }
}

template <int B>
void gemv_rows(const Levels& lv, const Linear& L, float* y, int64_t ldy, const float* add, int64_t ldadd) {
  constexpr int R = 1;  // one weight row at a time: blocking several measured slower (DRAM streams)
  const int64_t blocks = L.N / R;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) rows_out<B, R>(lv, L, blk * R, y, ldy, add, ldadd);
  });
  for (int64_t n = blocks * R; n < L.N; ++n) rows_out<B, 1>(lv, L, n, y, ldy, add, ldadd);
}

void gemv(const Levels& lv, const Linear& L, float* y, int64_t ldy, const float* add = nullptr,
          int64_t ldadd = 0) {
  switch (lv.B) {
    case 1: gemv_rows<1>(lv, L, y, ldy, add, ldadd); break;
    case 2: gemv_rows<2>(lv, L, y, ldy, add, ldadd); break;
    case 3: gemv_rows<3>(lv, L, y, ldy, add, ldadd); break;
    default: gemv_rows<4>(lv, L, y, ldy, add, ldadd); break;
  }
}

void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t H, float* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* r = x + m * H;
    double ss = 0.0;  // fp32 rows of a few thousand: accumulate wider, as the reduction in torch does pairwise
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(r[i]) * r[i];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / H) + eps);
    for (int64_t i = 0; i < H; ++i) out[m * H + i] = (r[i] * inv) * w[i];
  }
}

Linear make_linear(torch::Tensor w, torch::Tensor scale, torch::Tensor rowsum, torch::Tensor bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous(), "weight: contiguous int8 (N, K)");
  Linear L;
  L.N = w.size(0);
  L.K = w.size(1);
  TORCH_CHECK(L.K % kStep == 0, "in_features must be a multiple of ", kStep);
  L.w = w;
  L.scale = scale.to(torch::kFloat32).reshape({-1}).contiguous();
  L.rowsum = rowsum.to(torch::kInt32).reshape({-1}).contiguous();
  TORCH_CHECK(L.scale.numel() == L.N && L.rowsum.numel() == L.N, "one scale and one row sum per output row");
  L.wp = L.w.data_ptr<int8_t>();
  L.sp = L.scale.data_ptr<float>();
  L.rp = L.rowsum.data_ptr<int32_t>();
  if (bias.defined() && bias.numel() > 0) {
    L.bias = bias.to(torch::kFloat32).contiguous();
    TORCH_CHECK(L.bias.numel() == L.N, "one bias per output row");
    L.bp = L.bias.data_ptr<float>();
  }
  return L;
}

}  // namespace

// The decoder layers of one model against one static cache.
class DecodeLayers {
 public:
  DecodeLayers(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
               double scaling, int64_t activation)
      : H_(heads), Hk_(kv_heads), D_(head_dim), I_(intermediate), eps_(static_cast<float>(eps)),
        scaling_(static_cast<float>(scaling)), act_(activation) {
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must be a multiple of kv_heads, head_dim even");
    TORCH_CHECK(activation == 0 || activation == 1, "activation: 0 (SiLU) or 1 (GELU, tanh)");
  }

  // Per layer: norms, then (weight, scale, rowsum, bias) for qkv, o, gate_up, down, then the cache.
  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, std::vector<torch::Tensor> linears,
                 torch::Tensor keys, torch::Tensor values, torch::Tensor length) {
    TORCH_CHECK(linears.size() == 16, "16 tensors: (weight, scale, rowsum, bias) x (qkv, o, gate_up, down)");
    Layer l;
    l.in_norm = in_norm.to(torch::kFloat32).contiguous();
    l.post_norm = post_norm.to(torch::kFloat32).contiguous();
    l.qkv = make_linear(linears[0], linears[1], linears[2], linears[3]);
    l.o = make_linear(linears[4], linears[5], linears[6], linears[7]);
    l.gate_up = make_linear(linears[8], linears[9], linears[10], linears[11]);
    l.down = make_linear(linears[12], linears[13], linears[14], linears[15]);
    const int64_t hidden = l.in_norm.numel();
    TORCH_CHECK(l.qkv.K == hidden && l.qkv.N == (H_ + 2 * Hk_) * D_, "qkv: (heads + 2 kv_heads) * head_dim outputs");
    TORCH_CHECK(l.o.K == H_ * D_ && l.o.N == hidden, "o_proj shape");
    TORCH_CHECK(l.gate_up.K == hidden && l.gate_up.N == 2 * I_, "gate_up shape");
    TORCH_CHECK(l.down.K == I_ && l.down.N == hidden, "down_proj shape");
    TORCH_CHECK(keys.scalar_type() == torch::kFloat32 && keys.is_contiguous() && values.is_contiguous() &&
                    keys.dim() == 4 && keys.size(1) == Hk_ && keys.size(3) == D_ && values.sizes() == keys.sizes(),
                "cache: contiguous fp32 (batch, kv_heads, capacity, head_dim)");
    TORCH_CHECK(length.scalar_type() == torch::kInt64 && length.numel() == 1, "length: an int64 counter");
    l.keys = keys;
    l.values = values;
    l.length = length;
    layers_.push_back(std::move(l));
  }

  // hidden (B, hidden) fp32 -> hidden after every layer; cos, sin (B, head_dim) for this position.
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(!layers_.empty(), "no layers");
    auto x = hidden.to(torch::kFloat32).contiguous().clone();
    const int64_t B = x.size(0), Hd = x.size(1);
    TORCH_CHECK(B >= 1 && B <= kMaxRows, "1 to 4 sequences per step");
    TORCH_CHECK(B == layers_[0].keys.size(0), "the batch must match the cache");
    auto c = cos.to(torch::kFloat32).contiguous();
    auto s = sin.to(torch::kFloat32).contiguous();
    TORCH_CHECK(c.numel() == B * D_ && s.numel() == B * D_, "cos, sin: (batch, head_dim)");
    const int64_t pos = layers_[0].length.item<int64_t>();  // tokens already cached
    const int64_t capacity = layers_[0].keys.size(2);
    TORCH_CHECK(pos >= 0 && pos < capacity, "the static cache is full");
    const int64_t Nq = H_ * D_, Nkv = Hk_ * D_, Nqkv = Nq + 2 * Nkv;
    std::vector<float> h(B * std::max(Hd, Nq)), qkv(B * Nqkv), attn(B * Nq), gu(B * 2 * I_), act(B * I_);
    float* xp = x.data_ptr<float>();
    for (auto& l : layers_) {
      rms_norm(xp, l.in_norm.data_ptr<float>(), eps_, B, Hd, h.data());
      levels_.split(h.data(), B, Hd);
      gemv(levels_, l.qkv, qkv.data(), Nqkv);
      rotate_and_cache(l, qkv.data(), c.data_ptr<float>(), s.data_ptr<float>(), B, pos);
      attend(l, qkv.data(), attn.data(), B, pos);
      levels_.split(attn.data(), B, Nq);
      gemv(levels_, l.o, xp, Hd, xp, Hd);  // x += o_proj(attention)
      rms_norm(xp, l.post_norm.data_ptr<float>(), eps_, B, Hd, h.data());
      levels_.split(h.data(), B, Hd);
      gemv(levels_, l.gate_up, gu.data(), 2 * I_);
      activate(gu.data(), act.data(), B);
      levels_.split(act.data(), B, I_);
      gemv(levels_, l.down, xp, Hd, xp, Hd);  // x += down_proj(mlp)
      l.length.add_(1);
    }
    return x;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // Rotary on q and k (rotate-half convention), then k and v into the cache at `pos`.
  void rotate_and_cache(Layer& l, float* qkv, const float* cos, const float* sin, int64_t B, int64_t pos) {
    const int64_t half = D_ / 2, Nqkv = (H_ + 2 * Hk_) * D_, capacity = l.keys.size(2);
    float* kc = l.keys.data_ptr<float>();
    float* vc = l.values.data_ptr<float>();
    float tmp[1024];
    TORCH_CHECK(D_ <= 1024, "head_dim up to 1024");
    for (int64_t b = 0; b < B; ++b) {
      const float* cb = cos + b * D_;
      const float* sb = sin + b * D_;
      for (int64_t head = 0; head < H_ + Hk_; ++head) {  // q heads, then k heads
        float* v = qkv + b * Nqkv + head * D_;
        for (int64_t i = 0; i < half; ++i) {
          tmp[i] = v[i] * cb[i] - v[i + half] * sb[i];
          tmp[i + half] = v[i + half] * cb[i + half] + v[i] * sb[i + half];
        }
        std::memcpy(v, tmp, D_ * sizeof(float));
      }
      for (int64_t kh = 0; kh < Hk_; ++kh) {
        const int64_t slot = ((b * Hk_ + kh) * capacity + pos) * D_;
        std::memcpy(kc + slot, qkv + b * Nqkv + (H_ + kh) * D_, D_ * sizeof(float));
        std::memcpy(vc + slot, qkv + b * Nqkv + (H_ + Hk_ + kh) * D_, D_ * sizeof(float));
      }
    }
  }

  // Softmax attention of each query head over the cache's first pos + 1 keys (grouped heads).
  void attend(Layer& l, const float* qkv, float* out, int64_t B, int64_t pos) {
    const int64_t Nqkv = (H_ + 2 * Hk_) * D_, group = H_ / Hk_, capacity = l.keys.size(2), T = pos + 1;
    const float* kc = l.keys.data_ptr<float>();
    const float* vc = l.values.data_ptr<float>();
    at::parallel_for(0, B * H_, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(T);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / H_, head = task % H_, kh = head / group;
        const float* q = qkv + b * Nqkv + head * D_;
        const float* keys = kc + (b * Hk_ + kh) * capacity * D_;
        const float* values = vc + (b * Hk_ + kh) * capacity * D_;
        float best = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          scores[t] = dot(q, keys + t * D_, D_) * scaling_;
          best = std::max(best, scores[t]);
        }
        const int64_t Tv = T - T % kLanes;
        vfloat vtotal = vset(0.f);
        for (int64_t t = 0; t < Tv; t += kLanes) {
          const vfloat e = vexp(vsub(vload(scores.data() + t), vset(best)));
          vstore(scores.data() + t, e);
          vtotal = vadd(vtotal, e);
        }
        float total = vsum(vtotal);
        for (int64_t t = Tv; t < T; ++t) {
          scores[t] = expf_fast(scores[t] - best);
          total += scores[t];
        }
        float* o = out + b * H_ * D_ + head * D_;
        std::fill(o, o + D_, 0.f);
        const float inv = 1.f / total;
        for (int64_t t = 0; t < T; ++t) {
          const float p = scores[t] * inv;
          const float* v = values + t * D_;
          for (int64_t i = 0; i < D_; ++i) o[i] += p * v[i];
        }
      }
    });
  }

  void activate(const float* gu, float* out, int64_t B) {
    for (int64_t b = 0; b < B; ++b) {
      const float* g = gu + b * 2 * I_;
      const float* u = g + I_;
      float* o = out + b * I_;
      if (act_ == 0) {  // SiLU: g * sigmoid(g)
        const int64_t Iv = I_ - I_ % kLanes;
        for (int64_t i = 0; i < Iv; i += kLanes) {
          const vfloat gv = vload(g + i);
          const vfloat sig = vdiv(vset(1.f), vadd(vset(1.f), vexp(vsub(vset(0.f), gv))));
          vstore(o + i, vmul(vmul(gv, sig), vload(u + i)));
        }
        for (int64_t i = Iv; i < I_; ++i) o[i] = g[i] / (1.f + expf_fast(-g[i])) * u[i];
      } else {
        const float c = std::sqrt(2.f / static_cast<float>(M_PI));
        for (int64_t i = 0; i < I_; ++i) {
          const float v = g[i];
          o[i] = 0.5f * v * (1.f + std::tanh(c * (v + 0.044715f * v * v * v))) * u[i];
        }
      }
    }
  }

  int64_t H_, Hk_, D_, I_;
  float eps_, scaling_;
  int64_t act_;
  std::vector<Layer> layers_;
  Levels levels_;
};

// y (M, N) = x (M, K) . (W * scale)^T + bias, M <= 4: the same GEMV, for tests and the head.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor rowsum,
                        torch::Tensor bias) {
  Linear L = make_linear(w, scale, rowsum, bias);
  auto xf = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(xf.dim() == 2 && xf.size(1) == L.K && xf.size(0) >= 1 && xf.size(0) <= kMaxRows, "x: (1..4, K)");
  Levels lv;
  lv.split(xf.data_ptr<float>(), xf.size(0), L.K);
  auto y = torch::empty({xf.size(0), L.N}, torch::kFloat32);
  gemv(lv, L, y.data_ptr<float>(), L.N);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = kIsa;
  m.attr("K_MULTIPLE") = kStep;
  m.attr("MAX_ROWS") = kMaxRows;
  m.def("int8_gemv", &int8_gemv);
  pybind11::class_<DecodeLayers>(m, "DecodeLayers", pybind11::module_local())  // one per build
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("add_layer", &DecodeLayers::add_layer)
      .def("forward", &DecodeLayers::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("num_layers", &DecodeLayers::num_layers);
}
