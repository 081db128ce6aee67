// rerankd's int8 GEMM for CPUs with AVX512-VNNI (with or without AMX): uint8 activations
// (symmetric int8 grid shifted by 128) with one scale per token, int8 weights with one scale
// per output channel, int32 accumulation in oneDNN's brgemm ukernels (ATen's cpublas: AMX
// tiles where the CPU has them, vpdpbusd otherwise), and the epilogue in AVX-512:
//   out = (acc - 128 * colsum(W)) * x_scale[row] * w_scale[col] (+ bias) (+ residual)
// written as bf16 or float32. The gated variant runs gate and up on the same activation block
// and writes act(gate) * up already quantized for the down projection: uint8 rows with one
// scale per row, the scale's 4 bytes stored after the row's last column, the row padded to a
// cache line ("fused rows").
//
// Weights are packed once (`pack_weight`): K padded to a multiple of 4 and N to kPanel
// columns with zeros, each column panel in brgemm's VNNI layout (`cpublas::pack`).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using at::BFloat16;

constexpr int64_t kPanel = 64;     // output columns per packed weight panel
constexpr int64_t kScaleBytes = 4; // a fused row's float32 scale after its columns
constexpr int64_t kRowAlign = 64;  // fused rows start on a cache line (measured: 18 % on the
                                   // down GEMM against rows 4 bytes longer than K)
constexpr int32_t kZeroPoint = 128;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Bytes per fused row: K_pad uint8 columns, the float32 scale, zeros to a cache line.
int64_t fused_width(int64_t k_pad) { return round_up(k_pad + kScaleBytes, kRowAlign); }

// Blocking, measured on the Qwen3-0.6B linears (3,072 rows, one thread, AMX; the activations
// are read from L2, the weights stream from L3 once per row group):
// - kCallRows: activation rows per brgemm call (1,024 -> 4,096: 16.9 ms, against 19.1 with 64
//   and 26.4 with 32);
// - kGroupRows: rows per task of the plain GEMM, whose activation block (512 KB at K = 1,024)
//   stays in L2 while every weight panel passes: the weights are read once per group (before,
//   32-row calls in 128-row groups: 38 ms on 1,024 -> 4,096, against 23 ms);
// - kGatedRows: rows per task of the gated kernel, whose act*up scratch (rows x I floats,
//   1.5 MB at I = 3,072) must stay in L2 until the rows are quantized.
constexpr int64_t kCallRows = 128;
constexpr int64_t kGroupRows = 512;
constexpr int64_t kGatedRows = 128;
constexpr int64_t kMinRows = 32;  // the smallest task a short batch is split into

bool g_native_bf16 = false;  // AVX512-BF16 here (`set_native_bf16`, from rerankd's CPU flags)

// Runs task(t, scratch) for t in [0, n) on the ATen threads, each thread with its own scratch
// (`make()`, once per thread). Every thread takes the next task from a shared counter, so a
// thread the OS preempts (a shared machine) leaves its tasks to the others (whole model, one
// paired run on a shared 2-core AMX Xeon: 1.15x oneDNN W8A8, against 1.11x split statically).
// Each thread fences its non-temporal stores (the plain epilogue) before the join.
template <typename Scratch, typename Make, typename Task>
void run_tasks(int64_t n, Make make, Task task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch = make();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) task(t, scratch);
    _mm_sfence();
    at::native::cpublas::brgemm_release();
  });
}

// Rows per task for `rows` rows: at most `cap`, the groups about equal (a multiple of
// kMinRows), and at least one task per thread where the rows allow.
int64_t group_rows(int64_t rows, int64_t cap) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t groups = std::max((rows + cap - 1) / cap,
                                  std::min(threads, (rows + kMinRows - 1) / kMinRows));
  return std::min(cap, round_up((rows + groups - 1) / groups, kMinRows));
}

// One packed weight: panels (N_pad / kPanel) of (K_pad x kPanel) int8 in VNNI layout, the
// zero-point correction 128 * sum_k W[n, k] and the scales per column (both N_pad long).
struct Weight {
  const int8_t* panels;
  const int32_t* correction;
  const float* scale;
  int64_t k_pad;
  int64_t n;
};

Weight view(const at::Tensor& packed, const at::Tensor& correction, const at::Tensor& scale,
            int64_t n) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) % kPanel == 0, "packed weight layout");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous());
  const int64_t k_pad = packed.size(1) / kPanel;
  TORCH_CHECK(correction.numel() == packed.size(0) * kPanel && scale.numel() == correction.numel(),
              "correction/scale length");
  TORCH_CHECK(correction.scalar_type() == at::kInt && scale.scalar_type() == at::kFloat);
  TORCH_CHECK(n <= correction.numel(), "more output columns than packed");
  return {packed.data_ptr<int8_t>(), correction.data_ptr<int32_t>(), scale.data_ptr<float>(),
          k_pad, n};
}

// int32 acc (rows x kPanel) of rows [m0, m0 + rows) times panel p, into c.
void panel_gemm(const uint8_t* a, int64_t lda, int64_t rows, const Weight& w, int64_t p,
                int32_t* c) {
  at::native::cpublas::brgemm(rows, kPanel, w.k_pad, lda, kPanel, kPanel, false, a,
                              w.panels + p * w.k_pad * kPanel, c);
}

// Dequantized float values of one accumulator row: (acc - correction) * xs * ws.
inline Vec dequant(const int32_t* acc, const Weight& w, int64_t col, float xs) {
  const __m512i corrected = _mm512_sub_epi32(_mm512_loadu_si512(acc),
                                             _mm512_loadu_si512(w.correction + col));
  return Vec(_mm512_cvtepi32_ps(corrected)) * Vec(xs) * Vec::loadu(w.scale + col);
}

template <typename T>
inline Vec load_masked(const T* src, int64_t count);
template <>
inline Vec load_masked(const float* src, int64_t count) {
  return Vec(_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), src));
}
template <>
inline Vec load_masked(const BFloat16* src, int64_t count) {
  const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), src);
  __m512 out;
  at::vec::cvtbf16_fp32(raw, out);
  return Vec(out);
}

// float -> bf16 with round-to-nearest-even: one `vcvtneps2bf16` where the CPU has AVX512-BF16
// (inline assembly: the file is built without -mavx512bf16, to load on VNNI-only CPUs),
// else ATen's integer emulation (the same bits for every non-NaN value).
template <bool kNative>
inline __m256i to_bf16(__m512 v) {
  if constexpr (kNative) {
    __m256i out;
    asm("vcvtneps2bf16 %1, %0" : "=v"(out) : "v"(v));
    return out;
  } else {
    return at::vec::cvtfp32_bf16(v);
  }
}

template <bool kNative>
inline void store_masked(float* dst, Vec v, int64_t count) {
  _mm512_mask_storeu_ps(dst, (__mmask16)((1u << count) - 1), v);
}
template <bool kNative>
inline void store_masked(BFloat16* dst, Vec v, int64_t count) {
  _mm256_mask_storeu_epi16(dst, (__mmask16)((1u << count) - 1), to_bf16<kNative>(v));
}

template <bool kNative>
inline void stream_row(float* dst, const Vec (&v)[4]) {
  for (int q = 0; q < 4; ++q) _mm512_stream_ps(dst + 16 * q, v[q]);
}
template <bool kNative>
inline void stream_row(BFloat16* dst, const Vec (&v)[4]) {
  for (int q = 0; q < 4; q += 2) {
    const __m512i two = _mm512_inserti64x4(
        _mm512_castsi256_si512(to_bf16<kNative>(v[q])), to_bf16<kNative>(v[q + 1]), 1);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 16 * q), two);
  }
}

// out[r, n0:n0+cols] = dequant(acc) (+ bias) (+ residual), in out's dtype. Whole aligned
// cache lines are written with non-temporal stores: the output (T x N, up to 25 MB) is not
// read back by this GEMM, and a plain store first reads each line it fills (in the whole
// model, paired: 1.11x oneDNN W8A8 against 0.99x with plain stores).
template <typename T, bool kNative>
void plain_epilogue(const int32_t* acc, int64_t rows, const Weight& w, int64_t n0, int64_t cols,
                    const float* xs, const float* bias, const T* residual, T* out, int64_t ldo) {
  const bool stream = cols == kPanel &&
                      (reinterpret_cast<uintptr_t>(out + n0) % 64 == 0) &&
                      (ldo * sizeof(T)) % 64 == 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (stream) {
      Vec v[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 16 * q;
        v[q] = dequant(acc + r * kPanel + j, w, n0 + j, xs[r]);
        if (bias) v[q] = v[q] + Vec::loadu(bias + n0 + j);
        if (residual) v[q] = v[q] + load_masked(residual + r * ldo + n0 + j, 16);
      }
      stream_row<kNative>(out + r * ldo + n0, v);
      continue;
    }
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t count = std::min<int64_t>(16, cols - j);
      Vec v = dequant(acc + r * kPanel + j, w, n0 + j, xs[r]);
      if (bias) v = v + load_masked(bias + n0 + j, count);
      if (residual) v = v + load_masked(residual + r * ldo + n0 + j, count);
      store_masked<kNative>(out + r * ldo + n0 + j, v, count);
    }
  }
}

// Scales of activation rows: a separate tensor, or fused after each row's columns.
struct RowScales {
  const float* separate;
  const uint8_t* fused;
  int64_t ld;
  float operator()(int64_t row) const {
    if (separate) return separate[row];
    float s;
    std::memcpy(&s, fused + row * ld, sizeof(float));
    return s;
  }
};

RowScales row_scales(const at::Tensor& qx, const c10::optional<at::Tensor>& sx, int64_t k_pad) {
  TORCH_CHECK(qx.dim() == 2 && qx.scalar_type() == at::kByte && qx.stride(1) == 1,
              "activations: uint8 rows");
  if (sx.has_value()) {
    TORCH_CHECK(qx.size(1) == k_pad, "activation width ", qx.size(1), " != packed K ", k_pad);
    TORCH_CHECK(sx->scalar_type() == at::kFloat && sx->is_contiguous() &&
                sx->numel() == qx.size(0), "one float32 scale per row");
    return {sx->data_ptr<float>(), nullptr, qx.stride(0)};
  }
  TORCH_CHECK(qx.size(1) == fused_width(k_pad), "fused rows: packed K, 4 scale bytes, padding");
  return {nullptr, qx.data_ptr<uint8_t>() + k_pad, qx.stride(0)};
}

template <typename T, bool kNative>
void gemm_typed(const uint8_t* a, int64_t lda, RowScales scales, int64_t rows, const Weight& w,
                const float* bias, const T* residual, T* out) {
  const int64_t panels = (w.n + kPanel - 1) / kPanel;
  const int64_t call = kCallRows;
  const int64_t group = group_rows(rows, kGroupRows);
  const int64_t groups = (rows + group - 1) / group;
  // few row groups (a short batch): split the panels too, about two tasks per thread
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks =
      std::min(panels, std::max<int64_t>(1, (2 * threads + groups - 1) / groups));
  const int64_t per_chunk = (panels + chunks - 1) / chunks;
  struct Scratch {
    std::vector<int32_t> acc;
    std::vector<float> xs;
  };
  run_tasks<Scratch>(
      groups * chunks,
      [&] { return Scratch{std::vector<int32_t>(call * kPanel), std::vector<float>(group)}; },
      [&](int64_t task, Scratch& sc) {
        const int64_t g0 = (task / chunks) * group, g1 = std::min(rows, g0 + group);
        const int64_t p0 = (task % chunks) * per_chunk, p1 = std::min(panels, p0 + per_chunk);
        for (int64_t r = g0; r < g1; ++r) sc.xs[r - g0] = scales(r);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t cols = std::min(kPanel, w.n - p * kPanel);
          for (int64_t m0 = g0; m0 < g1; m0 += call) {
            const int64_t m = std::min(call, g1 - m0);
            panel_gemm(a + m0 * lda, lda, m, w, p, sc.acc.data());
            plain_epilogue<T, kNative>(sc.acc.data(), m, w, p * kPanel, cols, sc.xs.data() + (m0 - g0),
                              bias, residual ? residual + m0 * w.n : nullptr, out + m0 * w.n,
                              w.n);
          }
        }
      });
}

}  // namespace

// W (N, K) int8 -> (panels, K_pad * kPanel) int8 in brgemm's VNNI layout, and the zero-point
// correction 128 * sum_k W[n, k] per column (int32, N_pad long: zero for padding columns).
// The layout (per panel: [K_pad / 4][kPanel][4], four consecutive k of one column together)
// is written here rather than by `cpublas::pack`, which ATen offers only on AMX CPUs: the
// ukernels read the same layout with AVX512-VNNI (`vpdpbusd`) and with AMX tiles (checked
// against `cpublas::pack` on AMX by tests/test_int8_gemm.py, `pack_reference`).
std::vector<at::Tensor> pack_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8 (N, K) weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t k_pad = round_up(k, 4), panels = (n + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, k_pad}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  // (panels, kPanel, K/4, 4) -> (panels, K/4, kPanel, 4)
  at::Tensor packed = padded.view({panels, kPanel, k_pad / 4, 4}).permute({0, 2, 1, 3})
                          .contiguous().view({panels, k_pad * kPanel});
  at::Tensor correction = padded.sum(1, false, at::kInt).mul_(kZeroPoint);
  return {packed, correction.contiguous()};
}

// The same panels packed by ATen's `cpublas::pack` (AMX CPUs only): the layout check.
at::Tensor pack_reference(const at::Tensor& weight) {
  TORCH_CHECK(at::native::cpublas::could_pack(at::kChar), "cpublas::pack: AMX CPUs only");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t k_pad = round_up(k, 4), panels = (n + kPanel - 1) / kPanel;
  at::Tensor kn = at::zeros({k_pad, panels * kPanel}, weight.options());
  kn.narrow(0, 0, k).narrow(1, 0, n).copy_(weight.t());
  at::Tensor packed = at::empty({panels, k_pad * kPanel}, weight.options());
  for (int64_t p = 0; p < panels; ++p) {
    at::native::cpublas::pack(k_pad, kPanel, panels * kPanel, kPanel, at::kChar, at::kChar,
                              kn.data_ptr<int8_t>() + p * kPanel, packed[p].data_ptr<int8_t>());
  }
  return packed;
}

// (T, N) = dequant(qx @ W^T) (+ bias) (+ residual), bf16 or float32 (`bf16`). `sx`: one scale
// per row; without it, `qx` rows are fused (K_pad columns then the float32 scale).
at::Tensor int8_gemm(const at::Tensor& qx, const c10::optional<at::Tensor>& sx,
                     const at::Tensor& packed, const at::Tensor& correction,
                     const at::Tensor& w_scale, int64_t n, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& residual, bool bf16) {
  const Weight w = view(packed, correction, w_scale, n);
  const RowScales scales = row_scales(qx, sx, w.k_pad);
  const int64_t rows = qx.size(0);
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out = at::empty({rows, n}, qx.options().dtype(dtype));
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n);
    b = bias->data_ptr<float>();
  }
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == dtype && residual->size(0) == rows &&
                residual->size(1) == n, "residual: (T, N) in the output dtype");
    res = residual->contiguous();
  }
  if (rows == 0) return out;
  const uint8_t* a = qx.data_ptr<uint8_t>();
  const bool native = g_native_bf16;
  BFloat16* res16 = res.defined() && bf16 ? res.data_ptr<BFloat16>() : nullptr;
  const float* res32 = res.defined() && !bf16 ? res.data_ptr<float>() : nullptr;
  if (bf16 && native) {
    gemm_typed<BFloat16, true>(a, qx.stride(0), scales, rows, w, b, res16,
                               out.data_ptr<BFloat16>());
  } else if (bf16) {
    gemm_typed<BFloat16, false>(a, qx.stride(0), scales, rows, w, b, res16,
                                out.data_ptr<BFloat16>());
  } else {
    gemm_typed<float, false>(a, qx.stride(0), scales, rows, w, b, res32, out.data_ptr<float>());
  }
  return out;
}


namespace {

// act(g) in float: 0 SiLU g / (1 + e^-g), 1 GELU with the tanh approximation, 2 the exact
// (erf) GELU of BERT-family encoders, with ATen's vectorized erf (as torch's own gelu).
inline Vec activate(Vec g, int64_t act) {
  if (act == 0) return g / (Vec(1.f) + g.neg().exp_u20());
  if (act == 2) return Vec(0.5f) * g * (Vec(1.f) + (g * Vec(0.7071067811865476f)).erf());
  const Vec inner = Vec(0.7978845608028654f) * (g + Vec(0.044715f) * g * g * g);
  return Vec(0.5f) * g * (Vec(1.f) + inner.tanh());
}

// Rows [m0, m0 + m) of h (float, ld = i_pad) quantized per row into fused uint8 rows.
void quantize_rows(const float* h, int64_t m, int64_t i, int64_t i_pad, uint8_t* out,
                   int64_t ldo) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = h + r * i_pad;
    Vec vmax(0.f);
    for (int64_t j = 0; j < i; j += 16) {
      const int64_t count = std::min<int64_t>(16, i - j);
      vmax = at::vec::maximum(vmax, load_masked(row + j, count).abs());
    }
    const float scale = std::max(_mm512_reduce_max_ps(vmax), 1e-12f) / 127.f;
    const Vec inv(1.f / scale);
    uint8_t* q = out + r * ldo;
    for (int64_t j = 0; j < i; j += 16) {
      const int64_t count = std::min<int64_t>(16, i - j);
      // round half to even (the default rounding mode), as torch.round
      const __m512i v = _mm512_add_epi32(
          _mm512_cvtps_epi32(load_masked(row + j, count) * inv), _mm512_set1_epi32(kZeroPoint));
      _mm_mask_storeu_epi8(q + j, (__mmask16)((1u << count) - 1), _mm512_cvtusepi32_epi8(v));
    }
    std::memset(q + i, kZeroPoint, i_pad - i);
    std::memcpy(q + i_pad, &scale, sizeof(float));
    std::memset(q + i_pad + kScaleBytes, 0, ldo - i_pad - kScaleBytes);
  }
}

// act(x Wg^T (+ bias)) (* (x Wu^T) where `wu` is given) for uint8 rows `qx`, quantized per
// row into fused rows (T, width): the gated MLP's product, or an activated linear's output
// (an encoder's GELU), written ready for the next `int8_gemm` without a pass over (T, I).
at::Tensor activated_rows(const at::Tensor& qx, const c10::optional<at::Tensor>& sx,
                          const Weight& wg, const float* gate_bias, const Weight* wu,
                          int64_t i, int64_t act, int64_t width) {
  TORCH_CHECK(act >= 0 && act <= 2, "activation: 0 silu, 1 gelu_tanh, 2 gelu");
  const RowScales scales = row_scales(qx, sx, wg.k_pad);
  const int64_t rows = qx.size(0), i_pad = round_up(i, 4), lda = qx.stride(0);
  const int64_t ldo = fused_width(i_pad);
  TORCH_CHECK(width == ldo, "fused row width ", width, " != ", ldo);
  at::Tensor out = at::empty({rows, ldo}, qx.options());
  if (rows == 0) return out;
  const uint8_t* a = qx.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t panels = (i + kPanel - 1) / kPanel;
  const int64_t call = kCallRows;
  const int64_t group = group_rows(rows, kGatedRows);
  const int64_t groups = (rows + group - 1) / group;
  struct Scratch {
    std::vector<int32_t> acc_g, acc_u;
    std::vector<float> h;  // the group's activated (gated) rows, all columns
    std::vector<float> xs;
  };
  run_tasks<Scratch>(
      groups,
      [&] {
        return Scratch{std::vector<int32_t>(call * kPanel),
                       std::vector<int32_t>(wu ? call * kPanel : 0),
                       std::vector<float>(group * i_pad), std::vector<float>(group)};
      },
      [&](int64_t gi, Scratch& sc) {
        const int64_t g0 = gi * group, g1 = std::min(rows, g0 + group);
        for (int64_t r = g0; r < g1; ++r) sc.xs[r - g0] = scales(r);
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t n0 = p * kPanel, cols = std::min(kPanel, i - n0);
          for (int64_t m0 = g0; m0 < g1; m0 += call) {
            const int64_t m = std::min(call, g1 - m0);
            panel_gemm(a + m0 * lda, lda, m, wg, p, sc.acc_g.data());
            if (wu) panel_gemm(a + m0 * lda, lda, m, *wu, p, sc.acc_u.data());
            for (int64_t r = 0; r < m; ++r) {
              const float x_scale = sc.xs[m0 - g0 + r];
              float* hr = sc.h.data() + (m0 - g0 + r) * i_pad + n0;
              for (int64_t j = 0; j < cols; j += 16) {
                const int64_t count = std::min<int64_t>(16, cols - j);
                Vec gv = dequant(sc.acc_g.data() + r * kPanel + j, wg, n0 + j, x_scale);
                if (gate_bias) gv = gv + load_masked(gate_bias + n0 + j, count);
                Vec hv = activate(gv, act);
                if (wu) hv = hv * dequant(sc.acc_u.data() + r * kPanel + j, *wu, n0 + j, x_scale);
                store_masked<false>(hr + j, hv, count);
              }
            }
          }
        }
        quantize_rows(sc.h.data(), g1 - g0, i, i_pad, o + g0 * ldo, ldo);
      });
  return out;
}

}  // namespace

// act(x Wg^T) * (x Wu^T) for uint8 rows `qx` (scales `sx`, or fused rows), quantized per row:
// (T, width) uint8, each row I_pad columns (padding: the zero point), its float32 scale, then
// zeros to `fused_width` (`width`, checked), ready for `int8_gemm` without `sx`. `act`: 0 SiLU,
// 1 GELU (tanh), 2 GELU (erf).
at::Tensor int8_gated(const at::Tensor& qx, const c10::optional<at::Tensor>& sx,
                      const at::Tensor& gate, const at::Tensor& gate_correction,
                      const at::Tensor& gate_scale, const at::Tensor& up,
                      const at::Tensor& up_correction, const at::Tensor& up_scale, int64_t i,
                      int64_t act, int64_t width) {
  const Weight wg = view(gate, gate_correction, gate_scale, i);
  const Weight wu = view(up, up_correction, up_scale, i);
  TORCH_CHECK(wg.k_pad == wu.k_pad && gate.sizes() == up.sizes(), "gate/up shapes differ");
  return activated_rows(qx, sx, wg, nullptr, &wu, i, act, width);
}

// act(x W^T + bias) for uint8 rows `qx`, quantized per row into fused rows as `int8_gated`
// writes them (an encoder's GELU feeding its down projection).
at::Tensor int8_activated(const at::Tensor& qx, const c10::optional<at::Tensor>& sx,
                          const at::Tensor& packed, const at::Tensor& correction,
                          const at::Tensor& w_scale, int64_t n,
                          const c10::optional<at::Tensor>& bias, int64_t act, int64_t width) {
  const Weight w = view(packed, correction, w_scale, n);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n);
    b = bias->data_ptr<float>();
  }
  return activated_rows(qx, sx, w, b, nullptr, n, act, width);
}

// Whether the int8 brgemm ukernels run here (ATen: oneDNN's effective ISA >= AVX512-VNNI;
// otherwise its brgemm raises): one 1x4x64 product.
bool available() {
  try {
    const uint8_t a[4] = {129, 130, 131, 132};
    std::vector<int8_t> b(4 * kPanel, 1);
    std::vector<int32_t> c(kPanel);
    at::native::cpublas::brgemm(1, kPanel, 4, 4, kPanel, kPanel, false, a, b.data(), c.data());
    at::native::cpublas::brgemm_release();
    return c[0] == 1 + 2 + 3 + 4 + 4 * kZeroPoint;
  } catch (const c10::Error&) {
    return false;
  }
}

// The ISA oneDNN's ukernels JIT for here (its effective ISA, which ONEDNN_MAX_CPU_ISA caps),
// named as its matmul implementations are: ATen packs int8 only from AMX on, and its int8
// brgemm runs from AVX512-VNNI on (`available`).
std::string implementation() {
  return at::native::cpublas::could_pack(at::kChar) ? "brgemm:avx512_core_amx"
                                                     : "brgemm:avx512_core_vnni";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_native_bf16", [](bool on) { g_native_bf16 = on; },
        "convert to bf16 with vcvtneps2bf16 (CPUs with AVX512-BF16)");
  m.def("native_bf16", [] { return g_native_bf16; }, "whether bf16 outputs use vcvtneps2bf16");
  m.def("implementation", &implementation, "the ISA of oneDNN's brgemm ukernels here");
  m.def("pack_weight", &pack_weight, "int8 (N, K) weight -> VNNI panels, zero-point correction");
  m.def("int8_gemm", &int8_gemm, "uint8 x int8 GEMM with per-row/per-column scales");
  m.def("int8_gated", &int8_gated, "act(x Wg) * (x Wu), quantized per row (fused rows)");
  m.def("int8_activated", &int8_activated, "act(x W + b), quantized per row (fused rows)");
  m.def("pack_reference", &pack_reference, "the same panels by cpublas::pack (AMX only)");
  m.def("available", &available, "whether the int8 brgemm ukernels run on this CPU");
}
