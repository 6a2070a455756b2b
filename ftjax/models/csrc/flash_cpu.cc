// Causal GQA flash attention for x86-64 CPUs (AVX2 + FMA), forward and backward, float32.
//
// Why a kernel: on CPU, XLA runs the attention core at ~35% of the matmul peak. Its products have
// a 64-wide contraction or a 64-wide output, half of them contract both operands over their major
// axis (which the fast dot path does not take), and every query block needs slice / transpose
// copies. Here one (batch, kv-head) pair is one task: its K and V are packed once into 16-column
// panels, each query tile meets only the keys it can see, the [tile, keys] scores stay in L2, and
// one register-tiled 6x16 FMA micro-kernel serves all seven products (S = QK^T, O = PV in the
// forward; S, dP = dO V^T, dQ = dS K, dK += dS^T Q, dV += P^T dO in the backward, which recomputes
// P from the saved log-sum-exp instead of storing it).
//
// Layouts are the model's own (no transposes around the call):
//   q, o, dq, do   [B, T, N, H]      k, v, dk, dv   [B, T, K, H]      lse   [B, K, T * G]
// with N = K * G and query heads grouped kv-head-major (HF repeat_kv), H % 16 == 0.
// Rows of a (batch, kv-head) task are (query, group) pairs, r = t * G + g.
// Masking: key j is visible from query t when j <= t, and, when given, segment[j] == segment[t]
// and (use_window == 0 or t - j < window). Segment 0 (padding) meets only padding, so no row is
// ever empty.
//
// Built on first use by ftjax/models/flash_cpu.py (g++ -O3 -mavx2 -mfma -shared); registered
// with XLA through the FFI as ftjax_flash_fwd / ftjax_flash_bwd.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNr = 16;  // micro-kernel columns (two AVX registers)
constexpr int kMr = 6;   // micro-kernel rows: 12 accumulators + 2 B + 1 broadcast <= 16 ymm

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR x 16] (+)= sum_k A(i, k) * B[k][0:16], A(i, k) = a[i * ars + k * acs], B[k] at bp + k * ldb.
// Accumulators are named variables, not an array: GCC spilled the array form to the stack.
#define FTJAX_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR>
inline void Micro(int64_t kc, const float* a, int64_t ars, int64_t acs, const float* bp,
                  int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#define FTJAX_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps(); \
  const float* a##i = a + (i < MR ? i : 0) * ars;
  FTJAX_ROWS(FTJAX_DECL)
#undef FTJAX_DECL
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(bp + k * ldb + 8);
    const int64_t ko = k * acs;
#define FTJAX_FMA(i)                                           \
    if constexpr (i < MR) {                                    \
      const __m256 x = _mm256_broadcast_ss(a##i + ko);         \
      c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0);               \
      c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);               \
    }
    FTJAX_ROWS(FTJAX_FMA)
#undef FTJAX_FMA
  }
#define FTJAX_STORE(i)                                                          \
  if constexpr (i < MR) {                                                       \
    float* ci = c + i * ldc;                                                    \
    if (accumulate) {                                                           \
      c##i##0 = _mm256_add_ps(c##i##0, _mm256_loadu_ps(ci));                    \
      c##i##1 = _mm256_add_ps(c##i##1, _mm256_loadu_ps(ci + 8));                \
    }                                                                           \
    _mm256_storeu_ps(ci, c##i##0);                                              \
    _mm256_storeu_ps(ci + 8, c##i##1);                                          \
  }
  FTJAX_ROWS(FTJAX_STORE)
#undef FTJAX_STORE
}
#undef FTJAX_ROWS

// Which parts of a product the causal mask lets us skip (all bounds exact: the skipped entries
// are masked scores, or products with probabilities that are exactly 0).
struct NoTrim {
  int64_t RowStart(int64_t) const { return 0; }                    // first row of column panel p
  int64_t KEnd(int64_t, int64_t, int64_t kc) const { return kc; }  // contraction end, rows [i, i+mr)
  int64_t KStart(int64_t) const { return 0; }                      // contraction start, panel p
};

// A query tile: rows r = (t - t0) * g + group, keys from k0 (16-aligned).
struct Tile {
  int64_t t0, k0, g, m;
  int64_t FirstRowSeeing(int64_t key) const {  // rows whose query t >= key
    return std::min(m, std::max<int64_t>(0, (key - t0) * g));
  }
};

struct ScoreTrim : NoTrim {  // S, dP [rows x keys]: a key panel only for rows that can see it
  Tile tile;
  int64_t RowStart(int64_t p) const { return tile.FirstRowSeeing(tile.k0 + p * 16); }
};

struct KeyReduceTrim : NoTrim {  // O = P V, dQ = dS K: contract only over keys <= the rows' query
  Tile tile;
  int64_t KEnd(int64_t i, int64_t mr, int64_t kc) const {
    return std::min(kc, tile.t0 + (i + mr - 1) / tile.g - tile.k0 + 1);
  }
};

struct RowReduceTrim : NoTrim {  // dK^T, dV^T [H x keys]: contract only over rows seeing the panel
  Tile tile;
  int64_t KStart(int64_t p) const { return tile.FirstRowSeeing(tile.k0 + p * 16); }
};

// C[M x N] (+)= A[M x K] B. B is N / 16 column panels: panel p starts at bp + p * bps and its
// row k at + k * ldb (packed panels: ldb = 16, bps = K * 16; a row-major matrix: ldb = ld, bps = 16).
template <typename Trim = NoTrim>
void Gemm(int64_t m, int64_t n, int64_t kc, const float* a, int64_t ars, int64_t acs,
          const float* bp, int64_t ldb, int64_t bps, float* c, int64_t ldc, bool accumulate,
          const Trim& trim = Trim()) {
  for (int64_t p = 0; p < n / kNr; ++p) {  // panel-outer: the [K x 16] panel stays in L1
    const int64_t ks = trim.KStart(p);
    const float* b = bp + p * bps + ks * ldb;
    float* cp = c + p * kNr;
    int64_t i = trim.RowStart(p);
    auto run = [&](auto mr_tag, int64_t i) {
      constexpr int kMrNow = decltype(mr_tag)::value;
      const int64_t ke = trim.KEnd(i, kMrNow, kc);
      Micro<kMrNow>(std::max<int64_t>(0, ke - ks), a + i * ars + ks * acs, ars, acs, b, ldb,
                    cp + i * ldc, ldc, accumulate);
    };
    for (; i + kMr <= m; i += kMr) run(std::integral_constant<int, kMr>(), i);
    switch (m - i) {
      case 5: run(std::integral_constant<int, 5>(), i); break;
      case 4: run(std::integral_constant<int, 4>(), i); break;
      case 3: run(std::integral_constant<int, 3>(), i); break;
      case 2: run(std::integral_constant<int, 2>(), i); break;
      case 1: run(std::integral_constant<int, 1>(), i); break;
      default: break;
    }
  }
}

// Packed-panel B (the common case).
template <typename Trim = NoTrim>
inline void GemmP(int64_t m, int64_t n, int64_t kc, const float* a, int64_t ars, int64_t acs,
                  const float* bp, int64_t panel_rows, float* c, int64_t ldc, bool accumulate,
                  const Trim& trim = Trim()) {
  Gemm(m, n, kc, a, ars, acs, bp, kNr, panel_rows * kNr, c, ldc, accumulate, trim);
}

// Panels of src^T: rows j of src (n of them, stride ld, h wide) become columns.
// out[p][k][jj] = src[16p + jj][k], zero for 16p + jj >= n. Size RoundUp(n, 16) * h.
void PackTransposed(const float* src, int64_t ld, int64_t n, int64_t h, float* out) {
  const int64_t np = RoundUp(n, kNr) / kNr;
  for (int64_t p = 0; p < np; ++p) {
    float* o = out + p * h * kNr;
    for (int64_t jj = 0; jj < kNr; ++jj) {
      const int64_t j = p * kNr + jj;
      if (j < n) {
        const float* s = src + j * ld;
        for (int64_t k = 0; k < h; ++k) o[k * kNr + jj] = s[k];
      } else {
        for (int64_t k = 0; k < h; ++k) o[k * kNr + jj] = 0.f;
      }
    }
  }
}

// Panels of src [n x h] itself (h % 16 == 0): out[p][k][jj] = src[k][16p + jj], rows k >= n zero
// up to n_pad. Size n_pad * h.
void PackRows(const float* src, int64_t ld, int64_t n, int64_t n_pad, int64_t h, float* out) {
  for (int64_t p = 0; p < h / kNr; ++p) {
    float* o = out + p * n_pad * kNr;
    for (int64_t k = 0; k < n; ++k) std::memcpy(o + k * kNr, src + k * ld + p * kNr, sizeof(float) * kNr);
    std::memset(o + n * kNr, 0, sizeof(float) * kNr * (n_pad - n));
  }
}

// exp for x <= 0 (softmax arguments), AVX2: 2^(x log2 e) as 2^n * p(f), relative error ~2e-7.
inline __m256 Exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  x = _mm256_max_ps(x, lo);
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 in two steps (Cody-Waite) for accuracy.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct Problem {
  int64_t b, t, n, kv, h, g;
  float scale;
  const int32_t* seg;   // [B, T] or null
  int64_t window;       // <= 0: none
  bool use_window;
  int64_t tq;           // queries per tile
};

// Number of keys tile [t0, t1) can see: all keys before t1 (causal); the window trims the start.
inline int64_t KeyStart(const Problem& P, int64_t t0) {
  if (P.window > 0 && P.use_window) return std::max<int64_t>(0, t0 - P.window + 1);
  return 0;
}

inline bool Visible(const Problem& P, const int32_t* seg_b, int64_t t, int64_t j) {
  if (j > t) return false;
  if (seg_b != nullptr && seg_b[j] != seg_b[t]) return false;
  if (P.window > 0 && P.use_window && t - j >= P.window) return false;
  return true;
}

// Per-task scratch, reused across tasks of one thread.
struct Scratch {
  std::vector<float> buf;
  float* Get(size_t n) {
    if (buf.size() < n + 16) buf.resize(n + 16);
    auto addr = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((addr + 31) & ~uintptr_t(31));
  }
};

// Masks and exponentiates one score row in place over keys [0, n) (relative to k0).
// Forward (lse == nullptr): p = softmax; writes log-sum-exp to *lse_out. Backward: p = exp(s - lse).
inline void SoftmaxRow(const Problem& P, const int32_t* seg_b, int64_t t, int64_t k0, int64_t n,
                       int64_t n_pad, float* s, const float* lse_in, float* lse_out) {
  // Visible keys of a causal row without segments/window: [k0, t]; zero the rest.
  const bool simple = seg_b == nullptr && !(P.window > 0 && P.use_window);
  int64_t valid_end = std::min<int64_t>(n, t - k0 + 1);  // exclusive, relative
  if (!simple) {
    for (int64_t j = 0; j < n; ++j)
      if (!Visible(P, seg_b, t, k0 + j)) s[j] = -INFINITY;
  }
  for (int64_t j = std::max<int64_t>(valid_end, 0); j < n_pad; ++j) s[j] = -INFINITY;
  const int64_t m8 = RoundUp(std::max<int64_t>(valid_end, 1), 8);
  float mx;
  if (lse_in == nullptr) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < m8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, vm);
    mx = tmp[0];
    for (int i = 1; i < 8; ++i) mx = std::max(mx, tmp[i]);
  } else {
    mx = *lse_in;
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (int64_t j = 0; j < m8; j += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
    // -inf - mx -> clamp -> exp ~ 1e-38 * ...: zero masked entries exactly.
    const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m256 ez = _mm256_and_ps(e, keep);
    _mm256_storeu_ps(s + j, ez);
    vs = _mm256_add_ps(vs, ez);
  }
  for (int64_t j = m8; j < n_pad; ++j) s[j] = 0.f;
  if (lse_in == nullptr) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, vs);
    float sum = 0.f;
    for (int i = 0; i < 8; ++i) sum += tmp[i];
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int64_t j = 0; j < m8; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
    *lse_out = mx + std::log(sum);
  }
}

// Copies the tile's rows (t0..t1) x (groups of kv head) of x [B, T, N, H] into dst [m x H],
// scaled by `scale`.
inline void GatherRows(const Problem& P, const float* x, int64_t bi, int64_t ki, int64_t t0,
                       int64_t t1, float scale, float* dst) {
  const int64_t h = P.h;
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + ((bi * P.t + t) * P.n + ki * P.g) * h;
    float* d = dst + (t - t0) * P.g * h;
    if (scale == 1.f) {
      std::memcpy(d, src, sizeof(float) * P.g * h);
    } else {
      for (int64_t i = 0; i < P.g * h; ++i) d[i] = src[i] * scale;
    }
  }
}

inline void ScatterRows(const Problem& P, const float* src, int64_t bi, int64_t ki, int64_t t0,
                        int64_t t1, float scale, float* x) {
  const int64_t h = P.h;
  for (int64_t t = t0; t < t1; ++t) {
    float* d = x + ((bi * P.t + t) * P.n + ki * P.g) * h;
    const float* s = src + (t - t0) * P.g * h;
    for (int64_t i = 0; i < P.g * h; ++i) d[i] = s[i] * scale;
  }
}

// Sizes and offsets of one (batch bi, kv head ki) task.
struct TaskDims {
  int64_t t_pad, kv_stride, m_max, kv_offset, lse_offset;
  TaskDims(const Problem& P, int64_t bi, int64_t ki)
      : t_pad(RoundUp(P.t, kNr)), kv_stride(P.kv * P.h), m_max(P.tq * P.g),
        kv_offset((bi * P.t * P.kv + ki) * P.h), lse_offset((bi * P.kv + ki) * P.t * P.g) {}
};

void ForwardTask(const Problem& P, const float* q, const float* k, const float* v, float* o,
                 float* lse, int64_t bi, int64_t ki, Scratch& scratch) {
  const TaskDims d(P, bi, ki);
  const int64_t h = P.h, g = P.g, tq = P.tq, t_pad = d.t_pad, kv_stride = d.kv_stride;
  const int64_t m_max = d.m_max;
  const float* kb = k + d.kv_offset;
  const float* vb = v + d.kv_offset;
  const int64_t ls_max = t_pad + 8;  // score rows padded off a power-of-two stride
  float* kt = scratch.Get(t_pad * h * 2 + m_max * h * 2 + m_max * ls_max);
  float* vp = kt + t_pad * h;
  float* qt = vp + t_pad * h;
  float* ot = qt + m_max * h;
  float* s = ot + m_max * h;
  PackTransposed(kb, kv_stride, P.t, h, kt);
  PackRows(vb, kv_stride, P.t, t_pad, h, vp);
  const int32_t* seg_b = P.seg ? P.seg + bi * P.t : nullptr;
  float* lse_b = lse + d.lse_offset;
  for (int64_t t0 = 0; t0 < P.t; t0 += tq) {
    const int64_t t1 = std::min(P.t, t0 + tq), m = (t1 - t0) * g;
    const int64_t k0 = KeyStart(P, t0) / kNr * kNr;  // panel-aligned
    const int64_t kn = t1 - k0, kn_pad = RoundUp(kn, kNr), ls = kn_pad + 8;
    GatherRows(P, q, bi, ki, t0, t1, P.scale, qt);
    // S = (scale Q) K^T over keys [k0, k0 + kn_pad): K^T panels from k0 / 16 on.
    const Tile tile{t0, k0, g, m};
    GemmP(m, kn_pad, h, qt, h, 1, kt + (k0 / kNr) * h * kNr, h, s, ls, false, ScoreTrim{{}, tile});
    for (int64_t r = 0; r < m; ++r) {
      const int64_t t = t0 + r / g;
      SoftmaxRow(P, seg_b, t, k0, kn, kn_pad, s + r * ls, nullptr, lse_b + t0 * g + r);
    }
    // O = P V: V's row panels hold all t_pad rows; start at row k0.
    GemmP(m, h, kn_pad, s, ls, 1, vp + k0 * kNr, t_pad, ot, h, false, KeyReduceTrim{{}, tile});
    ScatterRows(P, ot, bi, ki, t0, t1, 1.f, o);
  }
}

void BackwardTask(const Problem& P, const float* q, const float* k, const float* v, const float* o,
                  const float* lse, const float* dout, float* dq, float* dk, float* dv,
                  int64_t bi, int64_t ki, Scratch& scratch) {
  const TaskDims d(P, bi, ki);
  const int64_t h = P.h, g = P.g, tq = P.tq, t_pad = d.t_pad, kv_stride = d.kv_stride;
  const int64_t m_max = d.m_max;
  const float* kb = k + d.kv_offset;
  const float* vb = v + d.kv_offset;
  // kt, vt: K^T / V^T panels (S, dP); kp: K row panels (dQ); dk_acc / dv_acc: dK^T, dV^T
  // [H x t_pad]; qt, dot, ot: tiles [m x H]; s, dp: [m x keys] (row stride ls).
  const int64_t ls_max = t_pad + 8;
  float* kt = scratch.Get(t_pad * h * 5 + m_max * h * 4 + m_max * ls_max * 2 + m_max);
  float* vt = kt + t_pad * h;
  float* kp = vt + t_pad * h;
  float* dk_acc = kp + t_pad * h;
  float* dv_acc = dk_acc + t_pad * h;
  float* qt = dv_acc + t_pad * h;
  float* dot = qt + m_max * h;
  float* ot = dot + m_max * h;
  float* dqt = ot + m_max * h;
  float* s = dqt + m_max * h;
  float* dp = s + m_max * ls_max;
  float* di = dp + m_max * ls_max;
  PackTransposed(kb, kv_stride, P.t, h, kt);
  PackTransposed(vb, kv_stride, P.t, h, vt);
  PackRows(kb, kv_stride, P.t, t_pad, h, kp);
  std::memset(dk_acc, 0, sizeof(float) * t_pad * h);
  std::memset(dv_acc, 0, sizeof(float) * t_pad * h);
  const int32_t* seg_b = P.seg ? P.seg + bi * P.t : nullptr;
  const float* lse_b = lse + d.lse_offset;
  for (int64_t t0 = 0; t0 < P.t; t0 += tq) {
    const int64_t t1 = std::min(P.t, t0 + tq), m = (t1 - t0) * g;
    const int64_t k0 = KeyStart(P, t0) / kNr * kNr;  // panel-aligned
    const int64_t kn = t1 - k0, kn_pad = RoundUp(kn, kNr), ls = kn_pad + 8;
    GatherRows(P, q, bi, ki, t0, t1, P.scale, qt);
    GatherRows(P, dout, bi, ki, t0, t1, 1.f, dot);
    GatherRows(P, o, bi, ki, t0, t1, 1.f, ot);
    for (int64_t r = 0; r < m; ++r) {  // D_r = do_r . o_r (softmax backward row term)
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < h; c += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(dot + r * h + c), _mm256_loadu_ps(ot + r * h + c), acc);
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc);
      di[r] = tmp[0] + tmp[1] + tmp[2] + tmp[3] + tmp[4] + tmp[5] + tmp[6] + tmp[7];
    }
    const Tile tile{t0, k0, g, m};
    GemmP(m, kn_pad, h, qt, h, 1, kt + (k0 / kNr) * h * kNr, h, s, ls, false, ScoreTrim{{}, tile});
    for (int64_t r = 0; r < m; ++r) {
      const int64_t t = t0 + r / g;
      SoftmaxRow(P, seg_b, t, k0, kn, kn_pad, s + r * ls, lse_b + t0 * g + r, nullptr);
    }
    GemmP(m, kn_pad, h, dot, h, 1, vt + (k0 / kNr) * h * kNr, h, dp, ls, false,
          ScoreTrim{{}, tile});
    for (int64_t r = 0; r < m; ++r) {  // dS = P * (dP - D), in place of dP
      const __m256 d = _mm256_set1_ps(di[r]);
      float* dpr = dp + r * ls;
      const float* pr = s + r * ls;
      // dP exists only on the key panels this row sees (ScoreTrim); the rest of dS is 0.
      const int64_t seen = std::min(kn_pad, RoundUp(t0 + r / g - k0 + 1, kNr));
      for (int64_t j = 0; j < seen; j += 8)
        _mm256_storeu_ps(dpr + j, _mm256_mul_ps(_mm256_loadu_ps(pr + j),
                                                _mm256_sub_ps(_mm256_loadu_ps(dpr + j), d)));
      for (int64_t j = seen; j < kn_pad; j += 8) _mm256_storeu_ps(dpr + j, _mm256_setzero_ps());
    }
    // dQ = dS K (times scale, since S = (scale q) k).
    GemmP(m, h, kn_pad, dp, ls, 1, kp + k0 * kNr, t_pad, dqt, h, false, KeyReduceTrim{{}, tile});
    ScatterRows(P, dqt, bi, ki, t0, t1, P.scale, dq);
    // Transposed, so the long key axis is the output's columns and the small tile is read as A:
    // dK^T[:, k0:] += (scale Q)^T dS;  dV^T[:, k0:] += dO^T P.  A(i, k) = tile[k][i].
    Gemm(h, kn_pad, m, qt, 1, h, dp, ls, kNr, dk_acc + k0, t_pad, true, RowReduceTrim{{}, tile});
    Gemm(h, kn_pad, m, dot, 1, h, s, ls, kNr, dv_acc + k0, t_pad, true, RowReduceTrim{{}, tile});
  }
  float* dkb = dk + d.kv_offset;
  float* dvb = dv + d.kv_offset;
  for (int64_t t = 0; t < P.t; ++t) {  // dk_acc / dv_acc are [H x t_pad]
    for (int64_t c = 0; c < h; ++c) {
      dkb[t * kv_stride + c] = dk_acc[c * t_pad + t];
      dvb[t * kv_stride + c] = dv_acc[c * t_pad + t];
    }
  }
}

// Runs fn(task) for task in [0, n) on the caller plus up to `workers` pool threads; tasks are
// claimed from a shared counter, so a late-starting worker finds nothing left and only touches
// the shared state it co-owns.
template <typename Fn>
void ParallelFor(ffi::ThreadPool* pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, fn]() {
    thread_local Scratch scratch;  // grows once per thread; no page faults on later calls
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      fn(i, scratch);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t workers = pool ? std::min<int64_t>(pool->num_threads(), n) - 1 : 0;
  for (int64_t w = 0; w < workers; ++w) pool->Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

Problem MakeProblem(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd, float scale,
                    int64_t window, int64_t tq) {
  Problem P;
  P.b = qd[0]; P.t = qd[1]; P.n = qd[2]; P.h = qd[3]; P.kv = kd[2];
  P.g = P.n / P.kv;
  P.scale = scale;
  P.seg = nullptr;
  P.window = window;
  P.use_window = false;
  P.tq = tq > 0 ? tq : std::max<int64_t>(1, 64 / P.g);
  return P;
}

// Problem of one call from its operands and attributes (shared by both handlers).
ffi::Error Setup(Problem& P, const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                 const ffi::Buffer<ffi::S32>& seg, const ffi::Buffer<ffi::S32>& flags, float scale,
                 int64_t window, int64_t has_seg, int64_t tq) {
  P = MakeProblem(q.dimensions(), k.dimensions(), scale, window, tq);
  if (P.h % kNr != 0) return ffi::Error::InvalidArgument("ftjax flash_cpu: head dim % 16 != 0");
  if (P.n % P.kv != 0) return ffi::Error::InvalidArgument("ftjax flash_cpu: heads % kv heads != 0");
  if (has_seg) P.seg = seg.typed_data();
  P.use_window = flags.typed_data()[0] != 0;
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> flags,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale,
                   int64_t window, int64_t has_seg, int64_t tq) {
  Problem P;
  if (auto e = Setup(P, q, k, seg, flags, scale, window, has_seg, tq); e.failure()) return e;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = o->typed_data();
  float* lp = lse->typed_data();
  ParallelFor(&pool, P.b * P.kv, [&](int64_t task, Scratch& scratch) {
    ForwardTask(P, qp, kp, vp, op, lp, task / P.kv, task % P.kv, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> flags,
                   ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                   ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t window, int64_t has_seg,
                   int64_t tq) {
  Problem P;
  if (auto e = Setup(P, q, k, seg, flags, scale, window, has_seg, tq); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(&pool, P.b * P.kv, [&](int64_t task, Scratch& scratch) {
    BackwardTask(P, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, task / P.kv, task % P.kv, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

namespace {
// Both bindings: pool, then q, k, v, segment ids, window flag; their own buffers; the same attrs.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

template <typename Binding>
auto BindAttrs(Binding b) {
  return std::move(b)
      .template Attr<float>("scale")
      .template Attr<int64_t>("window")
      .template Attr<int64_t>("has_seg")
      .template Attr<int64_t>("tq");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxFlashFwd, FwdImpl,
                              BindAttrs(BindInputs()
                                            .Ret<ffi::Buffer<ffi::F32>>()     // o
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxFlashBwd, BwdImpl,
                              BindAttrs(BindInputs()
                                            .Arg<ffi::Buffer<ffi::F32>>()     // o
                                            .Arg<ffi::Buffer<ffi::F32>>()     // lse
                                            .Arg<ffi::Buffer<ffi::F32>>()     // do
                                            .Ret<ffi::Buffer<ffi::F32>>()     // dq
                                            .Ret<ffi::Buffer<ffi::F32>>()     // dk
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // dv

// 1 when this CPU runs the kernel (AVX2 + FMA); the Python side checks before registering.
extern "C" int ftjax_flash_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
