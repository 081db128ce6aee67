// The softmax exponential of rerankd's CPU attention kernels (amx_attention.cpp,
// avx512_attention.cpp). A header edit rebuilds both: their build directories hash every
// header in this folder (rerankd.ops.amx_kernel.build_directory).
#pragma once

#include <immintrin.h>

// e^x for x <= 0 (a softmax's shifted scores): 2^(x log2 e) split into an integer power
// (vscalefps) and a fraction in [-0.5, 0.5] (degree-5 Taylor, < 3e-6 relative, far below
// bf16's 2^-9). Ten vector ops, against ATen's exp_u20 and its longer range reduction: 5 % of
// a W-CPU layer's attention in the AMX kernel (20.2 ms against 21.4, one thread, 9 rounds
// interleaved), 3 % in the AVX512-BF16 kernel (67.3 against 69.3 ms, the AMX Xeon's cores,
// 7 rounds), the same max |delta| to float32 SDPA in both.
inline __m512 exp_nonpositive(__m512 x) {
  // max's second operand wins when either is NaN: a NaN score stays NaN (the engine
  // refuses NaN scores rather than serve them)
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-87.f), x),
                                 _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
