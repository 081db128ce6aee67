// Attention over packed bf16 sequences with AVX512-BF16: rerankd's CPU attention kernel for
// CPUs without AMX (AMD EPYC Zen 4/5, Intel Cooper Lake).
//
// Why our own: there PyTorch's CPU flash attention reaches ~0.1 TFLOP/s at head dim 128 (its
// bf16 path converts blocks to float and calls small GEMMs), and the AMX kernel
// (amx_attention.cpp) cannot run. Here Q.K^T and P.V are register-blocked micro-kernels of
// `vdpbf16ps` (16 float lanes, each += the dot product of a pair of bf16) over keys and
// values packed once per (sequence, kv head) in the pair-interleaved ("VNNI") layouts, with
// an online (flash-style) softmax in float over blocks of 64 keys.
//
// Contract (same as rerankd.ops.attention.sdpa_attention and amx_attention.cpp): q (T, H, D),
// k/v (T, KVH, D), optional prefix keys/values pk/pv (P, KVH, D), all bf16 with unit stride
// over D and head stride D; rows may be strided. `seqs` (S, 4) int64 holds each sequence's
// start and length in the stream and its prefix's start and length in pk/pv (length 0: no
// prefix). Causal masks are lower-right aligned: the prefix is in every token's past.
//
// Two parallel passes: (1) pack keys and values of every (sequence, kv head); (2) every
// (sequence, kv head, query block) task runs the G query heads sharing that kv head together
// (G x block rows), so each packed key/value vector loaded serves up to 6 rows.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/utils.h>
#include <immintrin.h>

#include "softmax_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kKeyBlock = 64;  // keys per packed K^T panel and per online-softmax step
constexpr int64_t kRows = 64;      // query rows (heads x queries) per task, G x kRows / G
constexpr int kTile = 6;           // rows per micro-kernel: 6 x 4 accumulators + 4 loads + 1
                                   // broadcast = 29 of the 32 vector registers
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

__mmask16 lanes(int64_t n) {  // the first min(n, 16) lanes (none for n <= 0)
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// the bf16 pair at `p` (two consecutive values) in every 32-bit lane
inline __m512bh pair(const BFloat16* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// --- micro-kernels ------------------------------------------------------------------------

// s[r][0:16 N] = q[r] . the first 16 N keys of one panel, for M rows: q rows D apart, panel
// [D/2][64][2] (N < 4: the keys past a causal limit are not computed)
template <int M, int N>
void qk_tile(const BFloat16* q, const BFloat16* panel, float* s, int64_t D) {
  __m512 acc[M][N];
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    const BFloat16* keys = panel + p * 2 * kKeyBlock;
    __m512bh b[N];
    for (int n = 0; n < N; ++n) b[n] = (__m512bh)_mm512_loadu_si512(keys + 32 * n);
    for (int r = 0; r < M; ++r) {
      const __m512bh a = pair(q + r * D + 2 * p);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], a, b[n]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(s + r * kKeyBlock + 16 * n, acc[r][n]);
}

// o[r][0:16 N] = o[r] * alpha[r] + probs[r][0:2 pairs] . values, for M rows: o rows D apart,
// probs rows kKeyBlock apart, values [pairs][D][2] from this column on (rows 2 D apart)
template <int M, int N>
void pv_tile(const BFloat16* probs, const BFloat16* values, float* o, const float* alpha,
             int64_t pairs, int64_t D) {
  __m512 acc[M][N];
  for (int r = 0; r < M; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * n), a);
  }
  for (int64_t j = 0; j < pairs; ++j) {
    const BFloat16* row = values + j * 2 * D;
    __m512bh b[N];
    for (int n = 0; n < N; ++n) b[n] = (__m512bh)_mm512_loadu_si512(row + 32 * n);
    for (int r = 0; r < M; ++r) {
      const __m512bh a = pair(probs + r * kKeyBlock + 2 * j);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], a, b[n]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(o + r * D + 16 * n, acc[r][n]);
}

// the tiles of 1..kTile rows (and 1..4 vectors of keys), looked up by row (vector) count
using QkTile = void (*)(const BFloat16*, const BFloat16*, float*, int64_t);
using PvTile = void (*)(const BFloat16*, const BFloat16*, float*, const float*, int64_t, int64_t);
template <int N>
constexpr QkTile kQkRows[kTile + 1] = {nullptr,       qk_tile<1, N>, qk_tile<2, N>, qk_tile<3, N>,
                                       qk_tile<4, N>, qk_tile<5, N>, qk_tile<6, N>};
constexpr const QkTile* kQk[5] = {nullptr, kQkRows<1>, kQkRows<2>, kQkRows<3>, kQkRows<4>};
template <int N>
constexpr PvTile kPv[kTile + 1] = {nullptr,      pv_tile<1, N>, pv_tile<2, N>, pv_tile<3, N>,
                                   pv_tile<4, N>, pv_tile<5, N>, pv_tile<6, N>};

// --- packing --------------------------------------------------------------------------------

struct Layout {
  int64_t heads, kv_heads, dim, ld_q, ld_k, ld_v, ld_pk, ld_pv, ld_out;
};

// Row j of a sequence's keys (or values): its prefix's rows, then its own; null past the end
struct KeyRows {
  const BFloat16 *own, *prefix;
  int64_t ld_own, ld_prefix, p_len, n_keys;
  const BFloat16* operator()(int64_t j) const {
    if (j >= n_keys) return nullptr;
    return j < p_len ? prefix + j * ld_prefix : own + (j - p_len) * ld_own;
  }
};

// 16-bit lane indices interleaving two vectors of 16 bf16 (a0 b0 a1 b1 ...) in one of 32
__m512i interleave_index() {
  alignas(64) int16_t index[32];
  for (int k = 0; k < 32; ++k) index[k] = static_cast<int16_t>((k % 2 ? 32 : 0) + k / 2);
  return _mm512_load_si512(index);
}

__m512i load16(const BFloat16* row, int64_t c) {  // 16 bf16 of `row` from column c, or zeros
  return row ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)))
             : _mm512_setzero_si512();
}

// K^T in panels of kKeyBlock keys, [width/64][D/2][64][2]: a key's dimension pair (2p, 2p+1)
// side by side, the panel's 64 keys in a row (the B operand of `qk_tile`), zero keys past the
// end: a 32-bit transpose (fbgemm's, as amx_attention.cpp) of each run of rows from one
// source (prefix or own).
void pack_keys(const KeyRows& keys, BFloat16* dst, int64_t width, int64_t D) {
  const int64_t words = D / 2;
  auto* panels = reinterpret_cast<float*>(dst);
  for (int64_t b = 0; b < width; b += kKeyBlock) {
    float* panel = panels + b * words;
    const int64_t end = std::min(b + kKeyBlock, keys.n_keys);
    for (int64_t j = b; j < end;) {
      const bool from_prefix = j < keys.p_len;
      const int64_t stop = from_prefix ? std::min(end, keys.p_len) : end;
      const int64_t ld = (from_prefix ? keys.ld_prefix : keys.ld_own) / 2;
      at::native::utils::transpose<float>(stop - j, words,
                                          reinterpret_cast<const float*>(keys(j)), ld,
                                          panel + (j - b), kKeyBlock);
      j = stop;
    }
    if (end < b + kKeyBlock)
      for (int64_t w = 0; w < words; ++w)
        std::fill(panel + w * kKeyBlock + std::max<int64_t>(end - b, 0),
                  panel + (w + 1) * kKeyBlock, 0.f);
  }
}

// V as [width/2][D][2]: the values of keys 2j and 2j+1 interleaved column by column (the B
// operand of `pv_tile`); zero keys past the end
void pack_values(const KeyRows& values, BFloat16* dst, int64_t width, int64_t D,
                 __m512i interleave) {
  for (int64_t j = 0; j < width; j += 2) {
    const BFloat16 *a = values(j), *b = values(j + 1);
    BFloat16* row = dst + j * D;
    for (int64_t c = 0; c < D; c += 16)
      _mm512_storeu_si512(row + 2 * c,
                          _mm512_permutex2var_epi16(load16(a, c), interleave, load16(b, c)));
  }
}

// --- online softmax -----------------------------------------------------------------------

// One row's step over a block of keys: scores s[0:n) (n <= 64 valid keys, the rest of the
// 64 ignored) update the running max m and sum l; probs[0:64) = bf16(exp(s scale - m)),
// zero past n. Returns the factor the row's accumulated output must be scaled by. The sum
// adds the rounded probabilities, so normalizing matches what P.V multiplies.
float softmax_step(const float* s, BFloat16* probs, int64_t n, float scale, float& m, float& l) {
  if (n <= 0) {  // no visible key in this block (causal): nothing changes
    std::memset(probs, 0, kKeyBlock * sizeof(BFloat16));
    return 1.f;
  }
  __m512 vmax = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < kKeyBlock; i += 16)
    vmax = _mm512_mask_max_ps(vmax, lanes(n - i), vmax, _mm512_loadu_ps(s + i));
  const float block_max = _mm512_reduce_max_ps(vmax) * scale;
  const float m_new = std::max(m, block_max);
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m_new);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < kKeyBlock; i += 32) {
    if (i >= n) {  // past the row's last key (its scores may not even be computed)
      _mm512_storeu_si512(probs + i, _mm512_setzero_si512());
      continue;
    }
    const __mmask16 lo = lanes(n - i), hi = lanes(n - i - 16);
    const __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(s + i), vs, vm);
    const __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(s + i + 16), vs, vm);
    const __m512 e0 = _mm512_maskz_mov_ps(lo, exp_nonpositive(x0));
    const __m512 e1 = _mm512_maskz_mov_ps(hi, exp_nonpositive(x1));
    const __m512bh b = _mm512_cvtne2ps_pbh(e1, e0);  // e0 in the low half
    _mm512_storeu_si512(probs + i, (__m512i)b);
    sum = _mm512_dpbf16_ps(sum, b, ones);  // the rounded pairs summed into float lanes
  }
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  return alpha;
}

// --- one task: G heads x a block of queries of one (sequence, kv head) ----------------------

struct Worker {
  const Layout& L;
  int64_t queries_per_task;
  std::vector<BFloat16> queries, probs;
  std::vector<float> scores, acc, max, sum, alpha;

  Worker(const Layout& layout, int64_t queries_per_task)
      : L(layout), queries_per_task(queries_per_task) {
    const int64_t rows = L.heads / L.kv_heads * queries_per_task;
    queries.resize(rows * L.dim);
    probs.resize(rows * kKeyBlock);
    scores.resize(rows * kKeyBlock);
    acc.resize(rows * L.dim);
    max.resize(rows);
    sum.resize(rows);
    alpha.resize(rows);
  }

  // keys/values: this (sequence, kv head)'s packed panels; q0: the block's first query
  void run(const BFloat16* q, BFloat16* out, const int64_t* seq, int64_t kv_head,
           const BFloat16* keys, const BFloat16* values, int64_t p_len, int64_t q0, bool causal,
           float scale) {
    const int64_t D = L.dim, G = L.heads / L.kv_heads;
    const int64_t start = seq[0], len = seq[1], n_keys = p_len + len;
    const int64_t m = std::min(queries_per_task, len - q0), rows = G * m;
    const int64_t visible = causal ? p_len + q0 + m : n_keys;  // keys any row of it sees
    for (int64_t g = 0; g < G; ++g)  // row g m + i: head kv_head G + g, query q0 + i
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(queries.data() + (g * m + i) * D,
                    q + (start + q0 + i) * L.ld_q + (kv_head * G + g) * D, D * sizeof(BFloat16));
    std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
    std::fill(max.begin(), max.begin() + rows, kNegInf);
    std::fill(sum.begin(), sum.begin() + rows, 0.f);
    const int64_t cols = D % 64 == 0 ? 64 : D % 32 == 0 ? 32 : 16;  // output columns per tile
    const PvTile* pv = cols == 64 ? kPv<4> : cols == 32 ? kPv<2> : kPv<1>;
    auto limit = [&](int64_t r) {  // keys row r sees
      return causal ? p_len + q0 + r % m + 1 : n_keys;
    };
    for (int64_t k0 = 0; k0 < visible; k0 += kKeyBlock) {
      const BFloat16* panel = keys + k0 * D;
      const BFloat16* value_rows = values + k0 * D;
      for (int64_t r = 0; r < rows; r += kTile) {
        const int64_t t = std::min<int64_t>(kTile, rows - r);
        // keys of this block that some row of the tile sees: causal rows skip the rest
        int64_t seen = 0;
        for (int64_t x = r; x < r + t; ++x) seen = std::max(seen, limit(x) - k0);
        seen = std::min(seen, kKeyBlock);
        if (seen > 0) kQk[(seen + 15) / 16][t](queries.data() + r * D, panel,
                                                scores.data() + r * kKeyBlock, D);
        for (int64_t x = r; x < r + t; ++x)
          alpha[x] = softmax_step(scores.data() + x * kKeyBlock, probs.data() + x * kKeyBlock,
                                  std::min(limit(x) - k0, kKeyBlock), scale, max[x], sum[x]);
        if (seen <= 0) continue;  // no row of the tile sees a key here: nothing to add
        for (int64_t c = 0; c < D; c += cols)  // pairs of keys past `seen` have probability 0
          pv[t](probs.data() + r * kKeyBlock, value_rows + 2 * c, acc.data() + r * D + c,
                alpha.data() + r, (seen + 1) / 2, D);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / m, i = r % m;
      const __m512 inv = _mm512_set1_ps(1.f / sum[r]);
      BFloat16* dst = out + (start + q0 + i) * L.ld_out + (kv_head * G + g) * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                            (__m256i)_mm512_cvtneps_pbh(
                                _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + d), inv)));
    }
  }
};

void check_rows(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.dim() == 3 && t.size(2) == dim && t.stride(2) == 1 && t.stride(1) == dim,
              name, " must be (rows, heads, ", dim, ") with contiguous heads");
}

// i-th of n work units, taken from both ends: at::parallel_for gives each thread a
// contiguous range, and batches come longest first; so every thread gets long and short ones
int64_t from_both_ends(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

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
  const Layout L{q.size(1), k.size(1), D, q.stride(0), k.stride(0), v.stride(0),
                 has_prefix ? pk.stride(0) : 0, has_prefix ? pv.stride(0) : 0, out.stride(0)};
  const int64_t S = seqs.size(0), KVH = L.kv_heads, G = L.heads / KVH;
  const int64_t* table = seqs.data_ptr<int64_t>();
  // queries per task: G of them make about kRows rows (whole 6-row tiles do not matter much)
  const int64_t block = std::max<int64_t>(1, kRows / G);
  // per sequence: where its packed keys/values start (elements, per kv head `width` D each)
  std::vector<int64_t> packed_at(S + 1, 0), first_task(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* seq = table + 4 * s;
    TORCH_CHECK(seq[0] >= 0 && seq[1] >= 0 && seq[0] + seq[1] <= q.size(0) &&
                    seq[0] + seq[1] <= k.size(0) && seq[0] + seq[1] <= v.size(0) &&
                    seq[0] + seq[1] <= out.size(0),
                "sequence ", s, " lies outside the q/k/v/out rows");
    TORCH_CHECK(!has_prefix || (seq[2] >= 0 && seq[3] >= 0 && seq[2] + seq[3] <= pk.size(0) &&
                                seq[2] + seq[3] <= pv.size(0)),
                "the prefix of sequence ", s, " lies outside the prefix keys/values");
    const int64_t n_keys = seq[1] + (has_prefix ? seq[3] : 0);
    packed_at[s + 1] = packed_at[s] + KVH * round_up(std::max<int64_t>(n_keys, 1), kKeyBlock) * D;
    first_task[s + 1] = first_task[s] + KVH * ((seq[1] + block - 1) / block);
  }
  const auto* qp = q.data_ptr<BFloat16>();
  const auto* kp = k.data_ptr<BFloat16>();
  const auto* vp = v.data_ptr<BFloat16>();
  const BFloat16* pkp = has_prefix ? pk.data_ptr<BFloat16>() : nullptr;
  const BFloat16* pvp = has_prefix ? pv.data_ptr<BFloat16>() : nullptr;
  auto* op = out.data_ptr<BFloat16>();
  // packed keys and values of every (sequence, kv head): 2 x (keys rounded to 64) x D x KVH
  std::vector<BFloat16> packed_keys(packed_at[S]), packed_values(packed_at[S]);
  auto rows_of = [&](int64_t s, int64_t h, bool values) {
    const int64_t* seq = table + 4 * s;
    const int64_t p_len = has_prefix ? seq[3] : 0;
    const BFloat16* own = (values ? vp : kp) + seq[0] * (values ? L.ld_v : L.ld_k) + h * D;
    const BFloat16* prefix =
        has_prefix ? (values ? pvp : pkp) + seq[2] * (values ? L.ld_pv : L.ld_pk) + h * D : nullptr;
    return KeyRows{own, prefix, values ? L.ld_v : L.ld_k, values ? L.ld_pv : L.ld_pk, p_len,
                   p_len + seq[1]};
  };
  const int64_t units = S * KVH;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const __m512i interleave = interleave_index();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t unit = from_both_ends(i, units), s = unit / KVH, h = unit % KVH;
      const int64_t width = (packed_at[s + 1] - packed_at[s]) / KVH / D;
      const int64_t at = packed_at[s] + h * width * D;
      pack_keys(rows_of(s, h, false), packed_keys.data() + at, width, D);
      pack_values(rows_of(s, h, true), packed_values.data() + at, width, D, interleave);
    }
  });
  const int64_t tasks = first_task[S];
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Worker worker(L, block);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t task = from_both_ends(i, tasks);
      const int64_t s = std::upper_bound(first_task.begin(), first_task.end(), task) -
                        first_task.begin() - 1;
      const int64_t* seq = table + 4 * s;
      const int64_t blocks = (first_task[s + 1] - first_task[s]) / KVH;
      const int64_t h = (task - first_task[s]) / blocks, b = (task - first_task[s]) % blocks;
      const int64_t width = (packed_at[s + 1] - packed_at[s]) / KVH / D;
      const int64_t at = packed_at[s] + h * width * D;
      worker.run(qp, op, seq, h, packed_keys.data() + at, packed_values.data() + at,
                 has_prefix ? seq[3] : 0, b * block, causal, static_cast<float>(scale));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "AVX512-BF16 attention over packed bf16 sequences");
}
