// Attention over packed bf16 sequences with AMX: rerankd's CPU attention kernel.
//
// Why our own: PyTorch's CPU flash attention takes its AMX (brgemm) path only for fp16; for
// bf16 it issues one small oneDNN GEMM per block (~0.3 TFLOP/s on a 2-core Xeon). Here every
// (sequence, kv head) packs its keys and values once into VNNI panels, and the G query heads
// that share the kv head run Q.K^T and P.V together as AMX brgemm calls (ATen's cpublas,
// oneDNN ukernels). A reranking pair has at most a few thousand keys, so each row's softmax
// is exact in two passes over the whole row (no online rescaling).
//
// Contract (same as rerankd.ops.attention.sdpa_attention): q (T, H, D), k/v (T, KVH, D),
// optional prefix keys/values pk/pv (P, KVH, D), all bf16 with unit stride over D and head
// stride D; rows may be strided. `seqs` (S, 4) int64 holds each sequence's start and length in
// the stream and its prefix's start and length in pk/pv (length 0: no prefix). Causal masks
// are lower-right aligned: the prefix is in every token's past.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/native/cpu/utils.h>
#include <immintrin.h>

#include "softmax_exp.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kQueryBlock = 32;  // query rows per head in one GEMM (measured: 64 slower)
constexpr int64_t kKeyPanel = 64;    // keys per packed K^T panel (oneDNN's widest ldb)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// oneDNN JIT-compiles one brgemm kernel per (M, N, K, lda, ldb, ldc): shapes that followed
// every sequence's length made each new length pay for fresh kernels (a 2-layer test model's
// 1 x 16 request: 25 ms the first time, 6 ms once cached). Row strides are therefore rounded
// to powers of two and query blocks to 8, 16 or 32 rows (padded rows are zero, never written
// out), so a server sees a few dozen shapes instead of thousands.
int64_t stride_bucket(int64_t width) {
  int64_t ld = kKeyPanel;
  while (ld < width) ld *= 2;
  return ld;
}

int64_t query_bucket(int64_t m) { return m <= 8 ? 8 : m <= 16 ? 16 : kQueryBlock; }

__mmask16 lanes(int64_t n) {  // the first min(n, 16) lanes (none for n <= 0)
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

float row_max(const float* row, int64_t n) {
  __m512 acc = _mm512_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(row + i));
  if (i < n) {
    const __mmask16 tail = lanes(n - i);
    acc = _mm512_mask_max_ps(acc, tail, acc, _mm512_maskz_loadu_ps(tail, row + i));
  }
  return _mm512_reduce_max_ps(acc);
}

// probs[0:valid] = bf16(exp(row * scale - max)), zeros up to `width` (a multiple of 32).
// Returns the sum of the rounded values, so normalizing matches what P.V multiplies. AVX512-BF16
// (every AMX CPU has it) rounds two float vectors to bf16 in one instruction and sums the
// rounded pairs into float lanes in another (a dot product with ones).
float exp_to_bf16(const float* row, BFloat16* probs, int64_t valid, int64_t width, float scale,
                  float max) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(max);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i < valid; i += 32) {
    const __mmask16 lo = lanes(valid - i), hi = lanes(valid - i - 16);
    const __m512 x0 = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(lo, row + i), vs, vm);
    const __m512 x1 = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(hi, row + i + 16), vs, vm);
    const __m512 e0 = _mm512_maskz_mov_ps(lo, exp_nonpositive(x0));
    const __m512 e1 = _mm512_maskz_mov_ps(hi, exp_nonpositive(x1));
    const __m512bh b = _mm512_cvtne2ps_pbh(e1, e0);  // e0 in the low half
    _mm512_storeu_si512(probs + i, (__m512i)b);
    acc = _mm512_dpbf16_ps(acc, b, ones);
  }
  for (; i < width; i += 32) _mm512_storeu_si512(probs + i, _mm512_setzero_si512());
  return _mm512_reduce_add_ps(acc);
}

// into L2: `n` bf16 values from `row`
void prefetch_row(const BFloat16* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * 2; b += 64) _mm_prefetch(bytes + b, _MM_HINT_T1);
}

// dst[0:D] = bf16(src * factor), D a multiple of 16
void scale_to_bf16(const float* src, BFloat16* dst, int64_t D, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t d = 0; d < D; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), f)));
}

struct Layout {
  int64_t heads, kv_heads, dim, ld_q, ld_k, ld_v, ld_pk, ld_pv, ld_out;
};

// One (sequence, kv head): pack its keys/values, then every block of queries of its G heads.
struct Worker {
  const Layout& L;
  int64_t value_panel;
  std::vector<BFloat16> keys_t, values, queries, probs;
  std::vector<float> scores, acc, inv_sum;

  Worker(const Layout& layout, int64_t max_keys, int64_t value_panel)
      : L(layout), value_panel(value_panel) {
    const int64_t rows = L.heads / L.kv_heads * kQueryBlock, max_ld = stride_bucket(max_keys);
    keys_t.resize(max_keys * L.dim);
    values.resize(max_keys * L.dim);
    queries.resize(rows * L.dim);
    probs.resize(rows * max_ld);
    scores.resize(rows * max_ld);
    acc.resize(rows * L.dim);
    inv_sum.resize(rows);
  }

  void run(const BFloat16* q, const BFloat16* k, const BFloat16* v, const BFloat16* pk,
           const BFloat16* pv, BFloat16* out, const int64_t* seq, int64_t kv_head, bool causal,
           float scale) {
    const int64_t D = L.dim, G = L.heads / L.kv_heads;
    const int64_t start = seq[0], len = seq[1], p_start = seq[2], p_len = pk ? seq[3] : 0;
    const int64_t n_keys = p_len + len, width = round_up(n_keys, kKeyPanel);
    const int64_t ld = stride_bucket(width);  // row stride of K^T staging, scores and probs
    for (int64_t i = 0; i < std::min(len, kQueryBlock); ++i)  // see the query blocks below
      prefetch_row(q + (start + i) * L.ld_q + kv_head * G * D, G * D);
    pack_keys(k + start * L.ld_k + kv_head * D, pk ? pk + p_start * L.ld_pk + kv_head * D : nullptr,
              len, p_len, width);
    pack_values(v + start * L.ld_v + kv_head * D, pv ? pv + p_start * L.ld_pv + kv_head * D : nullptr,
                len, p_len, width);
    for (int64_t q0 = 0; q0 < len; q0 += kQueryBlock) {
      const int64_t m = std::min(kQueryBlock, len - q0), mb = query_bucket(m), rows = G * mb;
      const int64_t visible = causal ? p_len + q0 + m : n_keys;
      const int64_t n = round_up(visible, kKeyPanel);
      // rows lie ld_q / ld_out elements apart (a page or more): no hardware prefetcher follows
      // them. Fetch this block's output rows and the next block's queries ahead of use.
      for (int64_t i = 0; i < m; ++i)
        prefetch_row(out + (start + q0 + i) * L.ld_out + kv_head * G * D, G * D);
      for (int64_t i = q0 + kQueryBlock; i < std::min(len, q0 + 2 * kQueryBlock); ++i)
        prefetch_row(q + (start + i) * L.ld_q + kv_head * G * D, G * D);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < m; ++i)
          std::memcpy(queries.data() + (g * mb + i) * D,
                      q + (start + q0 + i) * L.ld_q + (kv_head * G + g) * D, D * sizeof(BFloat16));
        std::fill(queries.data() + (g * mb + m) * D, queries.data() + (g + 1) * mb * D,
                  BFloat16(0.f));
      }
      for (int64_t b = 0; b < n; b += kKeyPanel)
        at::native::cpublas::brgemm(rows, kKeyPanel, D, D, kKeyPanel, ld, false, queries.data(),
                                    keys_t.data() + b * D, scores.data() + b);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r % mb;
        BFloat16* prow = probs.data() + r * ld;
        if (i >= m) {  // a padded query row: zero probabilities, its output is never written
          std::fill(prow, prow + n, BFloat16(0.f));
          continue;
        }
        const float* row = scores.data() + r * ld;
        const int64_t valid = causal ? p_len + q0 + i + 1 : n_keys;
        const float max = row_max(row, valid) * scale;
        inv_sum[r] = 1.f / exp_to_bf16(row, prow, valid, n, scale, max);
      }
      for (int64_t c = 0; c < D; c += value_panel)
        at::native::cpublas::brgemm(rows, value_panel, n, ld, value_panel, D, false, probs.data(),
                                    values.data() + c * width, acc.data() + c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / mb, i = r % mb;
        if (i >= m) continue;
        scale_to_bf16(acc.data() + r * D, out + (start + q0 + i) * L.ld_out + (kv_head * G + g) * D,
                      D, inv_sum[r]);
      }
    }
  }

  // K^T (D x width) in VNNI panels of kKeyPanel keys, as `cpublas::pack` lays them out
  // ([D/2][kKeyPanel][2]: the two bf16 of a key's dimension pair side by side): one 32-bit
  // transpose per panel segment straight from the rows, prefix keys then own keys, zeros
  // after the last key (one pass instead of a 16-bit transpose and a pack).
  void pack_keys(const BFloat16* own, const BFloat16* prefix, int64_t len, int64_t p_len,
                 int64_t width) {
    const int64_t words = L.dim / 2, n_keys = p_len + len;
    auto* panels = reinterpret_cast<float*>(keys_t.data());
    for (int64_t b = 0; b < width; b += kKeyPanel) {
      float* panel = panels + b * words;
      const int64_t end = std::min(b + kKeyPanel, n_keys);
      for (int64_t j = b; j < end;) {  // runs of keys from one source
        const bool from_prefix = j < p_len;
        const int64_t stop = from_prefix ? std::min(end, p_len) : end;
        const BFloat16* row = from_prefix ? prefix + j * L.ld_pk : own + (j - p_len) * L.ld_k;
        const int64_t ld = (from_prefix ? L.ld_pk : L.ld_k) / 2;
        at::native::utils::transpose<float>(stop - j, words, reinterpret_cast<const float*>(row),
                                            ld, panel + (j - b), kKeyPanel);
        j = stop;
      }
      if (end < b + kKeyPanel)
        for (int64_t w = 0; w < words; ++w)
          std::fill(panel + w * kKeyPanel + std::max<int64_t>(end - b, 0),
                    panel + (w + 1) * kKeyPanel, 0.f);
    }
  }

  // V (width x D) in VNNI column panels of `value_panel`, as `cpublas::pack` lays them out
  // ([width/2][value_panel][2]: two consecutive keys' values side by side), interleaved
  // straight from the rows, zeros after the last key.
  void pack_values(const BFloat16* own, const BFloat16* prefix, int64_t len, int64_t p_len,
                   int64_t width) {
    const int64_t D = L.dim, n_keys = p_len + len;
    auto value_row = [&](int64_t j) -> const BFloat16* {
      if (j >= n_keys) return nullptr;
      return j < p_len ? prefix + j * L.ld_pv : own + (j - p_len) * L.ld_v;
    };
    // 16-bit lanes of the output: even ones from the first row, odd ones from the second
    alignas(64) int16_t pairs[32];
    for (int k = 0; k < 32; ++k) pairs[k] = static_cast<int16_t>((k % 2 ? 32 : 0) + k / 2);
    const __m512i interleave = _mm512_load_si512(pairs);
    for (int64_t j = 0; j < width; j += 2) {
      const BFloat16 *a = value_row(j), *b = value_row(j + 1);
      for (int64_t c = 0; c < D; c += 16) {  // 16 columns of two keys: one output vector
        const __m512i va = a ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(a + c)))
                             : _mm512_setzero_si512();
        const __m512i vb = b ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(b + c)))
                             : _mm512_setzero_si512();
        BFloat16* dst = values.data() + (c / value_panel) * value_panel * width +
                        j * value_panel + 2 * (c % value_panel);
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, interleave, vb));
      }
    }
  }
};

void check_rows(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.dim() == 3 && t.size(2) == dim && t.stride(2) == 1 && t.stride(1) == dim,
              name, " must be (rows, heads, ", dim, ") with contiguous heads");
}

}  // namespace

void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& seqs, bool causal,
               double scale, at::Tensor& out) {
  const int64_t D = q.size(2);
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}})
    check_rows(*t, name, D);
  const bool has_prefix = pk.numel() > 0;
  if (has_prefix) {
    check_rows(pk, "prefix keys", D);
    check_rows(pv, "prefix values", D);
  }
  TORCH_CHECK(D % 16 == 0, "head dim must be a multiple of 16");
  TORCH_CHECK(k.stride(0) % 2 == 0 && (!has_prefix || pk.stride(0) % 2 == 0),
              "key rows must lie an even number of elements apart (keys are packed as pairs)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(v.size(1) == k.size(1) && out.size(1) == q.size(1) &&
                  (!has_prefix || (pk.size(1) == k.size(1) && pv.size(1) == k.size(1))),
              "head counts of q/out and of k/v/prefix keys/values must agree");
  TORCH_CHECK(seqs.scalar_type() == at::kLong && seqs.is_contiguous() && seqs.dim() == 2 &&
                  seqs.size(1) == 4, "seqs must be a contiguous (S, 4) int64 table");
  const Layout layout{q.size(1), k.size(1), D, q.stride(0), k.stride(0), v.stride(0),
                      has_prefix ? pk.stride(0) : 0, has_prefix ? pv.stride(0) : 0, out.stride(0)};
  const int64_t S = seqs.size(0);
  const int64_t* table = seqs.data_ptr<int64_t>();
  int64_t max_keys = 1;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* seq = table + 4 * s;
    TORCH_CHECK(seq[0] >= 0 && seq[1] >= 0 && seq[0] + seq[1] <= q.size(0) &&
                    seq[0] + seq[1] <= k.size(0) && seq[0] + seq[1] <= v.size(0) &&
                    seq[0] + seq[1] <= out.size(0),
                "sequence ", s, " lies outside the q/k/v/out rows");
    TORCH_CHECK(!has_prefix || (seq[2] >= 0 && seq[3] >= 0 && seq[2] + seq[3] <= pk.size(0) &&
                                seq[2] + seq[3] <= pv.size(0)),
                "the prefix of sequence ", s, " lies outside the prefix keys/values");
    max_keys = std::max(max_keys, seq[1] + (has_prefix ? seq[3] : 0));
  }
  max_keys = round_up(max_keys, kKeyPanel);
  const int64_t value_panel = D % 64 == 0 ? 64 : D % 32 == 0 ? 32 : 16;
  const auto* qp = q.data_ptr<BFloat16>();
  const auto* kp = k.data_ptr<BFloat16>();
  const auto* vp = v.data_ptr<BFloat16>();
  const BFloat16* pkp = has_prefix ? pk.data_ptr<BFloat16>() : nullptr;
  const BFloat16* pvp = has_prefix ? pv.data_ptr<BFloat16>() : nullptr;
  auto* op = out.data_ptr<BFloat16>();
  const int64_t KVH = layout.kv_heads, units = S * KVH;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    Worker worker(layout, max_keys, value_panel);
    for (int64_t i = begin; i < end; ++i) {
      // each thread gets a contiguous range of i; the scheduler's batches come longest
      // first, so map i to units from both ends of the batch: long and short sequences in
      // every thread's share (a plain split gave one thread all the long ones)
      const int64_t unit = i % 2 == 0 ? i / 2 : units - 1 - i / 2;
      worker.run(qp, kp, vp, pkp, pvp, op, table + 4 * (unit / KVH), unit % KVH, causal,
                 static_cast<float>(scale));
    }
    at::native::cpublas::brgemm_release();
  });
}

// Whether ATen can pack bf16 for brgemm here (oneDNN ukernels with AMX-BF16)
bool available() { return at::native::cpublas::could_pack(at::kBFloat16); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "AMX attention over packed bf16 sequences");
  m.def("available", &available, "whether bf16 brgemm packing is supported on this CPU");
}
