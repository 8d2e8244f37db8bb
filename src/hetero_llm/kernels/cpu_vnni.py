"""CPU W8A16 GEMV on AVX-512 VNNI, compiled on first use.

torch's weight-only INT8 GEMV (`_weight_int8pack_mm`) converts every int8 weight
to bf16 before multiplying and tops out near 26 GB/s on 2 cores. VNNI multiplies
int8 by int8 directly, but needs int8 activations. This kernel keeps 16-bit-class
activations anyway: each row of x is split into two int8 levels,
    x ~= s1*q1 + s2*q2,  s1 = max|x|/127,  s2 = s1/254,
(error <= s1/508: finer than bf16 for all but the row's smallest values) and both
levels are multiplied with the same weight load, so the weight is read once.
Measured: 40-64 GB/s and ~80x less error than the bf16 kernel (2e-5 vs 2e-3 relative).

The C++ source is compiled with torch.utils.cpp_extension (g++ and ninja) the
first time a model uses it, then cached by torch. Without AVX-512 VNNI, a
compiler or ninja, with HETERO_LLM_NO_CPP_KERNELS=1, or with HETERO_LLM_CPU_ISA=avx2
(or none), nothing is compiled and the int8pack path is used.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from ._build import already_built, clear_stale_lock

log = logging.getLogger("hetero_llm")

_HEADER = Path(__file__).with_name("cpu_vector.h")  # shared with cpu_decode.cpp
MAX_ROWS = 4  # rows per call the kernel takes; more go to the GEMM paths
K_MULTIPLE = 64  # one VNNI register of int8 per step

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

struct Args {
  float* y; const int8_t* w; const float* scale; const int32_t* rowsum;
  const uint8_t* u; const float* s1; const float* s2; int64_t K, N;
};

template <int M>
void rows_times_weight(const Args& a) {
  at::parallel_for(0, a.N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* wrow = a.w + n * a.K;
      __m512i acc[2 * M];
      for (int i = 0; i < 2 * M; ++i) acc[i] = _mm512_setzero_si512();
      for (int64_t k = 0; k < a.K; k += 64) {
        const __m512i wv = _mm512_loadu_si512(wrow + k);  // each weight is read once for all levels
        for (int i = 0; i < 2 * M; ++i)
          acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_load_si512(a.u + i * a.K + k), wv);
      }
      const int64_t offset = 128 * static_cast<int64_t>(a.rowsum[n]);  // undo the +128 of the levels
      for (int m = 0; m < M; ++m) {
        const int64_t d1 = static_cast<int64_t>(_mm512_reduce_add_epi32(acc[2 * m])) - offset;
        const int64_t d2 = static_cast<int64_t>(_mm512_reduce_add_epi32(acc[2 * m + 1])) - offset;
        a.y[m * a.N + n] = a.scale[n] * (a.s1[m] * static_cast<float>(d1) + a.s2[m] * static_cast<float>(d2));
      }
    }
  });
}

// y (M, N) fp32 = x (M, K) . (W (N, K) int8 * scale (N,))^T for M <= 4, K % 64 == 0.
torch::Tensor a16w8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor rowsum) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w: contiguous int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 4 && K % 64 == 0, "M <= 4 and K % 64 == 0");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto sc = scale.to(torch::kFloat32).contiguous();
  auto rs = rowsum.to(torch::kInt32).contiguous();
  const float* xp = xf.data_ptr<float>();
  // Two unsigned levels per row (q + 128: VNNI multiplies u8 by s8), 64-byte aligned.
  std::vector<uint8_t> buf(2 * M * K + 64);
  uint8_t* u = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  float s1[4], s2[4];
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
    s1[m] = (amax > 0.f && std::isfinite(amax)) ? amax / 127.f : 1.f;
    s2[m] = s1[m] / 254.f;
    const float inv1 = 1.f / s1[m], inv2 = 1.f / s2[m];
    uint8_t* u1 = u + (2 * m) * K;
    uint8_t* u2 = u + (2 * m + 1) * K;
    for (int64_t k = 0; k < K; ++k) {
      float q1 = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] * inv1)));
      float r = row[k] - q1 * s1[m];
      float q2 = std::min(127.f, std::max(-127.f, std::nearbyint(r * inv2)));
      u1[k] = static_cast<uint8_t>(static_cast<int>(q1) + 128);
      u2[k] = static_cast<uint8_t>(static_cast<int>(q2) + 128);
    }
  }
  auto out = torch::empty({M, N}, torch::kFloat32);
  const Args args{out.data_ptr<float>(), w.data_ptr<int8_t>(), sc.data_ptr<float>(), rs.data_ptr<int32_t>(),
                  u, s1, s2, K, N};
  switch (M) {  // the row count is a template argument so the accumulators stay in registers
    case 1: rows_times_weight<1>(args); break;
    case 2: rows_times_weight<2>(args); break;
    case 3: rows_times_weight<3>(args); break;
    default: rows_times_weight<4>(args); break;
  }
  return out;
}

// Prompts (quant/cpu_prefill.py): x (M, K) -> q (2M, K) int8, the two levels of every row (q1 over
// q2, x ~= s1 * (q1 + q2 / 254)), and s1 (M, 1); one pass per row instead of torch's eight.
std::vector<torch::Tensor> split_levels(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  auto q = torch::empty({2 * M, K}, torch::kInt8);
  auto s1 = torch::empty({M, 1}, torch::kFloat32);
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s1.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = xp + m * K;
      const int64_t K16 = K - K % 16;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t k = 0; k < K16; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
      float amax = _mm512_reduce_max_ps(vmax);
      for (int64_t k = K16; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = (amax > 0.f && std::isfinite(amax)) ? amax / 127.f : 1.f;
      const float inv1 = 1.f / s, inv2 = 254.f / s;
      int8_t* q1 = qp + m * K;
      int8_t* q2 = qp + (M + m) * K;
      // 16 at a time: round to nearest even (as torch.round), saturate to int8 on the store.
      const __m512 vs = _mm512_set1_ps(s), vi1 = _mm512_set1_ps(inv1), vi2 = _mm512_set1_ps(inv2);
      const __m512i lo = _mm512_set1_epi32(-127);
      for (int64_t k = 0; k < K16; k += 16) {
        const __m512 v = _mm512_loadu_ps(row + k);
        const __m512 a = _mm512_roundscale_ps(_mm512_mul_ps(v, vi1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 r = _mm512_sub_ps(v, _mm512_mul_ps(a, vs));
        const __m512 b = _mm512_roundscale_ps(_mm512_mul_ps(r, vi2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + k),
                         _mm512_cvtsepi32_epi8(_mm512_max_epi32(_mm512_cvtps_epi32(a), lo)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + k),
                         _mm512_cvtsepi32_epi8(_mm512_max_epi32(_mm512_cvtps_epi32(b), lo)));
      }
      for (int64_t k = K16; k < K; ++k) {
        const float a = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] * inv1)));
        const float b = std::min(127.f, std::max(-127.f, std::nearbyint((row[k] - a * s) * inv2)));
        q1[k] = static_cast<int8_t>(a);
        q2[k] = static_cast<int8_t>(b);
      }
      sp[m] = s;
    }
  });
  return {q, s1};
}

// y (M, N) fp32 = s1 * (acc1 + acc2 / 254) * scale for acc (2M, N) int32 = [q1; q2] . W^T.
torch::Tensor combine_levels(torch::Tensor acc, torch::Tensor s1, torch::Tensor scale) {
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) % 2 == 0 && acc.scalar_type() == torch::kInt32, "acc: (2M, N) int32");
  auto a = acc.contiguous();
  auto s = s1.to(torch::kFloat32).contiguous();
  auto sc = scale.to(torch::kFloat32).contiguous();
  const int64_t M = a.size(0) / 2, N = a.size(1);
  TORCH_CHECK(s.numel() == M && sc.numel() == N, "s1: M values, scale: N values");
  auto y = torch::empty({M, N}, torch::kFloat32);
  const int32_t* ap = a.data_ptr<int32_t>();
  const float* spp = s.data_ptr<float>();
  const float* scp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* a1 = ap + m * N;
      const int32_t* a2 = ap + (M + m) * N;
      float* out = yp + m * N;
      const float sm = spp[m];
      for (int64_t n = 0; n < N; ++n)
        out[n] = (static_cast<float>(a1[n]) + static_cast<float>(a2[n]) * (1.f / 254.f)) * sm * scp[n];
    }
  });
  return y;
}

// combine_levels fused with what follows a prompt's matmul in a decoder layer, so its (M, N) output
// is written once and no further pass runs over it: + addend (o_proj and down_proj adding the
// residual), or, for gate_up's [gate | up] output, silu(gate) * up (M, N / 2).
static inline __m512 combined(const int32_t* a1, const int32_t* a2, int64_t n, __m512 sm, const float* scp) {
  const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(a2 + n)), _mm512_set1_ps(1.f / 254.f),
                                   _mm512_cvtepi32_ps(_mm512_loadu_si512(a1 + n)));
  return _mm512_mul_ps(_mm512_mul_ps(v, sm), _mm512_loadu_ps(scp + n));
}

static inline float combined1(const int32_t* a1, const int32_t* a2, int64_t n, float sm, const float* scp) {
  return (static_cast<float>(a1[n]) + static_cast<float>(a2[n]) * (1.f / 254.f)) * sm * scp[n];
}

torch::Tensor combine_levels_add(torch::Tensor acc, torch::Tensor s1, torch::Tensor scale, torch::Tensor addend) {
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) % 2 == 0 && acc.scalar_type() == torch::kInt32, "acc: (2M, N) int32");
  auto a = acc.contiguous();
  const int64_t M = a.size(0) / 2, N = a.size(1);
  auto s = s1.to(torch::kFloat32).contiguous();
  auto sc = scale.to(torch::kFloat32).contiguous();
  auto r = addend.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s.numel() == M && sc.numel() == N && r.numel() == M * N, "s1: M, scale: N, addend: M x N values");
  auto y = torch::empty({M, N}, torch::kFloat32);
  const int32_t* ap = a.data_ptr<int32_t>();
  const float *spp = s.data_ptr<float>(), *scp = sc.data_ptr<float>(), *rp = r.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t N16 = N - N % 16;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t *a1 = ap + m * N, *a2 = ap + (M + m) * N;
      const float* add = rp + m * N;
      float* out = yp + m * N;
      const __m512 sm = _mm512_set1_ps(spp[m]);
      for (int64_t n = 0; n < N16; n += 16)
        _mm512_storeu_ps(out + n, _mm512_add_ps(combined(a1, a2, n, sm, scp), _mm512_loadu_ps(add + n)));
      for (int64_t n = N16; n < N; ++n) out[n] = combined1(a1, a2, n, spp[m], scp) + add[n];
    }
  });
  return y;
}

torch::Tensor combine_levels_silu_glu(torch::Tensor acc, torch::Tensor s1, torch::Tensor scale) {
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) % 2 == 0 && acc.size(1) % 2 == 0 && acc.scalar_type() == torch::kInt32,
              "acc: (2M, 2I) int32");
  auto a = acc.contiguous();
  const int64_t M = a.size(0) / 2, N = a.size(1), I = N / 2;
  auto s = s1.to(torch::kFloat32).contiguous();
  auto sc = scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s.numel() == M && sc.numel() == N, "s1: M values, scale: 2I values");
  auto y = torch::empty({M, I}, torch::kFloat32);
  const int32_t* ap = a.data_ptr<int32_t>();
  const float *spp = s.data_ptr<float>(), *scp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t I16 = I - I % 16;
  using namespace hetero_llm_vec;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t *a1 = ap + m * N, *a2 = ap + (M + m) * N;
      float* out = yp + m * I;
      const __m512 sm = _mm512_set1_ps(spp[m]);
      for (int64_t i = 0; i < I16; i += 16) {
        const __m512 g = combined(a1, a2, i, sm, scp);
        const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f),
                                                                          vexp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), combined(a1, a2, I + i, sm, scp)));
      }
      for (int64_t i = I16; i < I; ++i) {
        const float g = combined1(a1, a2, i, spp[m], scp);
        out[i] = g / (1.f + expf_fast(-g)) * combined1(a1, a2, I + i, spp[m], scp);
      }
    }
  });
  return y;
}
"""


def _cpu_has_vnni() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512_vnni"))


@functools.lru_cache(maxsize=1)
def vnni_possible() -> bool:
    """Cheap check (nothing compiled): CPU, compiler and ninja are there, not disabled."""
    if os.environ.get("HETERO_LLM_NO_CPP_KERNELS", "") not in ("", "0"):
        return False
    from .cpu_decode import requested_isa

    if requested_isa() in ("avx2", "none"):  # HETERO_LLM_CPU_ISA caps our kernels below AVX-512
        return False
    try:
        import ninja  # noqa: F401  (torch's JIT builder needs it)
    except ImportError:
        return False
    return _cpu_has_vnni() and shutil.which(os.environ.get("CXX", "c++")) is not None


@functools.lru_cache(maxsize=1)
def vnni_kernel():
    """The compiled module, or None if it cannot be built or fails its self-test."""
    if not vnni_possible():
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        # The fp32 vector helpers (vexp) come first; the name carries a digest of both, since
        # torch rebuilds an inline module only when its name changes.
        source = _HEADER.read_text() + _SOURCE
        digest = hashlib.sha256(source.encode()).hexdigest()[:10]
        if not already_built(f"hetero_llm_vnni_{digest}"):  # said once, not on every process's load
            log.warning("hetero_llm: compiling the AVX-512 VNNI INT8 kernel (once; cached by torch)...")
        clear_stale_lock(f"hetero_llm_vnni_{digest}")
        module = load_inline(f"hetero_llm_vnni_{digest}", cpp_sources=[source],
                             functions=["a16w8_gemv", "split_levels", "combine_levels", "combine_levels_add",
                                        "combine_levels_silu_glu"],
                             extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, failed build: use torch's kernels
        log.warning("hetero_llm: VNNI kernel unavailable (%s); using torch's int8 GEMV", exc)
        return None
    return module if _self_test(module) else None


def _self_test(module) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    w = torch.randint(-127, 128, (40, 128), generator=g, dtype=torch.int8)
    s = torch.rand(40, generator=g) + 0.5
    got = module.a16w8_gemv(x, w, s, w.sum(1, dtype=torch.int32))
    want = a16w8_gemv_ref(x, w, s)
    if not bool((got - want).abs().max() <= 1e-3 * want.abs().max()):
        return False
    # The prompt helpers: split then combine reproduces x W^T (an exact integer product in between).
    q, s1 = module.split_levels(x)
    acc = (q.long() @ w.long().T).int()
    got = module.combine_levels(acc, s1, s)
    if not bool((got - want).abs().max() <= 1e-3 * want.abs().max()):
        return False
    added = module.combine_levels_add(acc, s1, s, torch.ones_like(want))
    gate, up = want.split(20, dim=1)
    glu = module.combine_levels_silu_glu(acc, s1, s)
    return (bool((added - want - 1).abs().max() <= 1e-3 * want.abs().max() + 1e-6)
            and bool((glu - torch.nn.functional.silu(gate) * up).abs().max() <= 1e-3 * (gate * up).abs().max()))


def a16w8_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: x (M, K) times the dequantized weight, in fp64, returned in fp32."""
    return (x.double() @ (qweight.double() * scale.double()[:, None]).T).float()


def a16w8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, rowsum: torch.Tensor) -> torch.Tensor:
    """y = x W^T (W = qweight * scale per row) for x (M <= 4, K), K a multiple of 64; fp32 out.

    `rowsum` is qweight.sum(1) as int32 (precomputed by the module). Raises
    RuntimeError if the kernel is not available here (check vnni_kernel()).
    """
    module = vnni_kernel()
    if module is None:
        raise RuntimeError("the VNNI kernel is not available on this machine")
    return module.a16w8_gemv(x, qweight, scale, rowsum)
