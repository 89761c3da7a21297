// Decode-step CPU kernels: linears, the fused routed-expert FFN and decode attention, at memory bandwidth.
//
// A decode step reads every weight it touches once and multiplies it by a handful of token rows. torch's
// general GEMMs reach a third to a half of the memory bandwidth at such shapes (docs/kernels.md), so the
// matmuls are written here as three backends chosen per CPU when this file is built:
//   amx   bf16 on AMX: weights prepacked once into VNNI tiles (kernels.pack_amx), any number of rows;
//   fma   fp32 on AVX-512 or AVX2+FMA: weights prepacked once into panels of 16 output features
//         (kernels.pack_panels), multiplied as outer products of broadcast token elements, any number of rows;
//   dot   register-tiled dot products of token rows with unpacked weight rows, fp32 accumulation:
//         bf16 x bf16 with AVX512-BF16 (vdpbf16ps), and fp32 weights that do not fit panels. Compute-bound
//         past a few rows, so the Python side uses it for small batches only.
// Threads split output columns through torch's intra-op pool (at::parallel_for): no second runtime.
//
// Built on first use for the CPU it runs on (-march=native); expert_workers/kernels.py decides when each
// op is used and falls back to plain torch where none applies.
//
// Shape legend: M token rows, N output features, K input features; P (token, expert) pairs,
// n hosted expert rows, H hidden, I expert width; B sequences, Q query heads, N kv heads, D head dim.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int MT = 6;        // token rows per register tile
constexpr int NR = 4;        // weight rows per register tile (NR * MT accumulators)
constexpr int64_t PF = 16;   // AMX: weight tiles prefetched ahead, per stream
constexpr int64_t NB = 32;   // output features per parallel work item (two AMX column blocks)
// dot: weight tiles fetched ahead into L2, besides the next tile into L1. L1's fill buffers alone hold too few
// lines in flight to stream at DRAM speed; on 2 cores of an AMD EPYC (Zen 4) fetching 8 tiles ahead took the
// fused MoE layer of deepseek-moe-mini at 32 sequences from 14 to 22 GB/s in bf16, and AVX2 fp32 by a fifth.
constexpr int64_t DOT_PF = 8;

// A bf16 (its bits, as uint16_t) or fp32 element as fp32.
template <typename T>
inline float as_float(T v) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return v;
  }
}

#if defined(__AVX512BF16__)
constexpr bool kHasBf16 = true;
// out[m * ld + r] = x_m . w_r for r < nr weight rows (w: row stride K), m < mt token rows.
template <int nr, int mt>
inline void dot_tile_bf16(const uint16_t* const* x, const uint16_t* w, int64_t K, float* out, int64_t ld) {
  __m512 acc[nr][mt];
  _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r)
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[mt];
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x[m] + k);
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (nr + r) * K + k), _MM_HINT_T0);  // the next tile's rows
      _mm_prefetch(reinterpret_cast<const char*>(w + (DOT_PF * nr + r) * K + k), _MM_HINT_T1);  // far ahead, into L2
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], wv);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r)
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += as_float(x[m][j]) * as_float(w[r * K + j]);
      out[m * ld + r] = s;
    }
}
#else
constexpr bool kHasBf16 = false;
// Never called (kHasBf16 guards every call); declared so that the dispatch below compiles on every ISA.
template <int nr, int mt>
inline void dot_tile_bf16(const uint16_t* const*, const uint16_t*, int64_t, float*, int64_t) {}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kHasF32 = true;
#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t W = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const uint16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#else
using vec = __m256;
constexpr int64_t W = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const uint16_t* p) {  // 8 bf16 -> fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif
template <int nr, int mt>
inline void dot_tile_f32(const float* const* x, const float* w, int64_t K, float* out, int64_t ld) {
  vec acc[nr][mt];
  _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r)
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) acc[r][m] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vec xv[mt];
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) xv[m] = vload(x[m] + k);
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (nr + r) * K + k), _MM_HINT_T0);  // the next tile's rows
      _mm_prefetch(reinterpret_cast<const char*>(w + (DOT_PF * nr + r) * K + k), _MM_HINT_T1);  // far ahead, into L2
      vec wv = vload(w + r * K + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) acc[r][m] = vfma(xv[m], wv, acc[r][m]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < nr; ++r)
    _Pragma("GCC unroll 8") for (int m = 0; m < mt; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += x[m][j] * w[r * K + j];
      out[m * ld + r] = s;
    }
}
#else
constexpr bool kHasF32 = false;
template <int nr, int mt>  // never called (kHasF32 guards every call)
inline void dot_tile_f32(const float* const*, const float*, int64_t, float*, int64_t) {}
#endif

// One register tile: nr weight rows against mt (runtime, <= MT) token rows.
template <typename T, int nr>
inline void tile(const T* const* x, int64_t mt, const T* w, int64_t K, float* out, int64_t ld) {
#define TILE(k)                                                        \
  case k:                                                              \
    if constexpr (std::is_same_v<T, uint16_t>) {                       \
      if constexpr (kHasBf16) dot_tile_bf16<nr, k>(x, w, K, out, ld);  \
    } else {                                                           \
      if constexpr (kHasF32) dot_tile_f32<nr, k>(x, w, K, out, ld);    \
    }                                                                  \
    break;
  switch (mt) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) }
#undef TILE
}

// out[m * ld + j] = x_m . w_j for rows j in [n0, n1) of w [N, K], every m < M (x: M row pointers).
template <typename T>
void dot_rows(const T* const* x, int64_t M, const T* w, int64_t K, int64_t n0, int64_t n1, float* out, int64_t ld) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    const T* const* xr = x + m0;
    int64_t j = n0;
    for (; j + NR <= n1; j += NR) tile<T, NR>(xr, mt, w + j * K, K, out + m0 * ld + j, ld);
    for (; j < n1; ++j) tile<T, 1>(xr, mt, w + j * K, K, out + m0 * ld + j, ld);
  }
}



// ---- fma (fp32 panels) --------------------------------------------------------------------------------
//
// Weights are prepacked once (kernels.pack_panels) from W [N, K] into panels [N/16, K, 16]: line k of panel nb
// holds W[16 nb + c][k] for c < 16, one cache line. Each element x[m][k] of a token row is broadcast and
// multiplied into a whole line: an outer product, so the accumulators are outputs (no horizontal sums at the
// end), a panel is one sequential stream, and FR token rows share each loaded line. The register block is
// FR rows x 16 outputs (12 accumulators, plus the line and a broadcast: 15 of 16 ymm registers on AVX2), the
// shape a BLAS uses for its own fp32 GEMM on these ISAs, so many rows (prefill) run near the FMA peak too.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int PV = 16 / W;         // vectors per panel line: 2 on AVX2, 1 on AVX-512
constexpr int FR = 12 / PV;        // token rows per register block: 6 on AVX2, 12 on AVX-512
constexpr int64_t PANEL_PF = 32;   // one row block: panel lines fetched ahead into L2 (2 KB), more than L1 asks for
// Several row blocks go over a panel in chunks of PANEL_KC lines (8 KB, in L1 beside the rows' inputs), every
// block per chunk, each asking for the next chunk's line as it reads its own: the panel's stream from DRAM
// then overlaps all the blocks' FMAs instead of preceding them (one pass per block left each line a DRAM wait
// and then L2 reads), and the requests spread over the chunk's whole compute time (the first block alone
// issuing them measured slower: 8 and 12 rows at 16-18 against 20-21 GB/s). Each output still sums k in order
// in one lane, so the bits do not depend on the blocking.
constexpr int64_t PANEL_KC = 128;

// out[m * ld + c] (+)= sum over k in [k0, k1) of x_m[k] W[16 nb + c][k] for m < mr, c < 16; p: panel nb.
// first: start from zero (else from out); ahead: lines fetched ahead into L2 (0: none).
template <int mr>
inline void panel_block(const float* const* x, const float* p, int64_t k0, int64_t k1, bool first, int64_t ahead,
                        float* out, int64_t ld) {
  vec acc[mr][PV];
  _Pragma("GCC unroll 12") for (int m = 0; m < mr; ++m)
    _Pragma("GCC unroll 2") for (int v = 0; v < PV; ++v) acc[m][v] = first ? vzero() : vload(out + m * ld + v * W);
  const float* xr[mr];
  _Pragma("GCC unroll 12") for (int m = 0; m < mr; ++m) xr[m] = x[m];
  for (int64_t k = k0; k < k1; ++k) {
    const float* line = p + k * 16;
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(line + ahead * 16), _MM_HINT_T1);
    vec wv[PV];
    _Pragma("GCC unroll 2") for (int v = 0; v < PV; ++v) wv[v] = vload(line + v * W);
    _Pragma("GCC unroll 12") for (int m = 0; m < mr; ++m) {
      const vec xb = vset1(xr[m][k]);
      _Pragma("GCC unroll 2") for (int v = 0; v < PV; ++v) acc[m][v] = vfma(xb, wv[v], acc[m][v]);
    }
  }
  _Pragma("GCC unroll 12") for (int m = 0; m < mr; ++m)
    _Pragma("GCC unroll 2") for (int v = 0; v < PV; ++v) vstore(out + m * ld + v * W, acc[m][v]);
}

// out[m * ld + j] for m < M and the output features j of panels [nb0, nb1); w packed [N/16, K, 16].
void panel_columns(const float* const* x, int64_t M, const float* w, int64_t K, int64_t nb0, int64_t nb1, float* out,
                   int64_t ld) {
  auto block = [&](int64_t m0, const float* p, int64_t k0, int64_t k1, bool first, int64_t ahead, float* o) {
    switch (std::min<int64_t>(FR, M - m0)) {
#define BLOCK(k) \
  case k:        \
    if constexpr (k <= FR) panel_block<k>(x + m0, p, k0, k1, first, ahead, o, ld); \
    break;
      BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7) BLOCK(8) BLOCK(9) BLOCK(10) BLOCK(11) BLOCK(12)
#undef BLOCK
    }
  };
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* p = w + nb * K * 16;
    float* o = out + nb * 16;
    if (M <= FR) {
      block(0, p, 0, K, true, PANEL_PF, o);
      continue;
    }
    const int64_t chunks = std::max<int64_t>(1, (K + PANEL_KC - 1) / PANEL_KC);  // one even for K = 0: zeros
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t m0 = 0; m0 < M; m0 += FR)
        block(m0, p, c * PANEL_KC, std::min(K, (c + 1) * PANEL_KC), c == 0, PANEL_KC, o + m0 * ld);
  }
}
#else
void panel_columns(const float* const*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t) {}
#endif


template <typename T>
const T* data(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

// ---- AMX (bf16 tiles) --------------------------------------------------------------------------------
//
// Weights are prepacked once (cpu_kernels.py, `pack_amx`) from W [N, K] into tiles [N/16, K/32, 16, 32]:
// row kp of tile (nb, kb) holds, for n = 0..15, the pair W[16 nb + n][32 kb + 2 kp + {0, 1}], the VNNI
// layout TDPBF16PS reads as its B operand. Activations come as a zero-padded [16 * ceil(M / 16), K] block,
// so every A tile has 16 rows. A work item is a pair of 16-column output blocks: for each block of 16
// token rows it accumulates C0, C1 over the K/32 tiles, so each weight tile is read once per 16 rows.
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
constexpr bool kHasAmx = true;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0, 1, 5, 6: C (16 x 16 fp32) for two row blocks x two column blocks; 2, 7: A (16 rows x 32 bf16) of
// the two row blocks; 3, 4: B (16 k-pairs x 16 columns x 2 bf16). Each loaded tile feeds two TDPBF16PS.
// Set on every thread that runs tiles, at the start of each work chunk (oneDNN may have set its own).
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

bool amx_permitted() {
  // Linux grants the AMX tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// out[m * ld + j] for m < M and columns j of 16-column blocks [nb0, nb1): a [16 * ceil(M / 16), K] bf16,
// w packed [N/16, K/32, 16, 32].
void amx_columns(const uint16_t* a, int64_t M, const uint16_t* w, int64_t K, int64_t nb0, int64_t nb1, float* out,
                 int64_t ld) {
  const int64_t KB = K / 32;
  alignas(64) float c[4][16][16];
  for (int64_t nb = nb0; nb < nb1; nb += 2) {
    const bool two = nb + 1 < nb1;
    const uint16_t* b0 = w + nb * KB * 512;
    const uint16_t* b1 = b0 + KB * 512;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const bool second = m0 + 16 < M;  // a second row block shares each weight tile
      const uint16_t* a0 = a + m0 * K;  // row block m0 / 16: KB contiguous 16 x 32 tiles
      const uint16_t* a1 = a0 + 16 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(5);
      _tile_zero(6);
      for (int64_t kb = 0; kb < KB; ++kb) {
        // A tile load waits for its cache lines one by one, from L2 as from DRAM (about 100 ns a tile), so the
        // B tiles are fetched ahead twice: into L2 PF iterations ahead (more lines in flight than L1's fill
        // buffers allow) and into L1 one iteration ahead.
        if (m0 == 0) {
          const char* far0 = reinterpret_cast<const char*>(b0 + (kb + PF) * 512);
          const char* far1 = reinterpret_cast<const char*>(b1 + (kb + PF) * 512);
          const char* near0 = reinterpret_cast<const char*>(b0 + (kb + 1) * 512);
          const char* near1 = reinterpret_cast<const char*>(b1 + (kb + 1) * 512);
          for (int line = 0; line < 1024; line += 64) {
            _mm_prefetch(far0 + line, _MM_HINT_T1);
            _mm_prefetch(near0 + line, _MM_HINT_T0);
            if (two) {
              _mm_prefetch(far1 + line, _MM_HINT_T1);
              _mm_prefetch(near1 + line, _MM_HINT_T0);
            }
          }
        }
        _tile_loadd(2, a0 + kb * 512, 64);
        _tile_loadd(3, b0 + kb * 512, 64);
        _tile_dpbf16ps(0, 2, 3);
        if (two) {
          _tile_loadd(4, b1 + kb * 512, 64);
          _tile_dpbf16ps(1, 2, 4);
        }
        if (second) {
          _tile_loadd(7, a1 + kb * 512, 64);
          _tile_dpbf16ps(5, 7, 3);
          if (two) _tile_dpbf16ps(6, 7, 4);
        }
      }
      _tile_stored(0, c[0], 64);
      if (two) _tile_stored(1, c[1], 64);
      if (second) {
        _tile_stored(5, c[2], 64);
        if (two) _tile_stored(6, c[3], 64);
      }
      for (int blk = 0; blk < (second ? 2 : 1); ++blk) {
        const int64_t r0 = m0 + 16 * blk, rows = std::min<int64_t>(16, M - r0);
        for (int t = 0; t < (two ? 2 : 1); ++t)
          for (int64_t m = 0; m < rows; ++m) std::memcpy(out + (r0 + m) * ld + (nb + t) * 16, c[2 * blk + t][m], 64);
      }
    }
  }
}
#else
constexpr bool kHasAmx = false;
bool amx_permitted() { return false; }
#endif

// The three backends behind one call: out[m * ld + j] = x_m . w_j for m < M and output features j in
// [j0, j1) (multiples of 16 on amx and fma). x: M row pointers (dot, fma), or a padded block at x[0] (amx).
enum class Backend { amx, fma, dot };

template <typename T>
void matmul_columns(Backend b, const T* const* x, int64_t M, const T* w, int64_t K, int64_t j0, int64_t j1,
                    float* out, int64_t ld) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (b == Backend::amx) return amx_columns(x[0], M, w, K, j0 / 16, (j1 + 15) / 16, out, ld);
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    if (b == Backend::fma) return panel_columns(x, M, w, K, j0 / 16, (j1 + 15) / 16, out, ld);
  }
  dot_rows<T>(x, M, w, K, j0, j1, out, ld);
}

inline int64_t padded(int64_t m) { return (m + 15) / 16 * 16; }

// Input rows for one matmul: row pointers for dot and fma; for amx one zero-padded contiguous block (its first row).
template <typename T>
struct Rows {
  std::vector<T> block;
  std::vector<const T*> ptrs;
  Rows(Backend b, const T* const* src, int64_t M, int64_t K) {
    if (b == Backend::amx) {
      // Tiled as the A operand wants it: [ceil(M / 16)][K / 32][16 rows][32], each tile 1 KB contiguous, so a
      // tile load reads 16 consecutive lines (rows K apart would be 16 separate streams).
      block.assign(padded(M) * K, T(0));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < K / 32; ++kb)
          std::memcpy(block.data() + ((m / 16) * (K / 32) + kb) * 512 + (m % 16) * 32, src[m] + kb * 32, 64);
      ptrs.assign(1, block.data());
    } else {
      ptrs.assign(src, src + M);
    }
  }
};

bool dot_supports(at::ScalarType t) { return t == at::kBFloat16 ? kHasBf16 : t == at::kFloat ? kHasF32 : false; }

Backend parse_backend(const std::string& name, at::ScalarType dtype) {
  if (name == "amx") {
    TORCH_CHECK(kHasAmx && amx_permitted(), "backend amx: this build or this process has no AMX");
    TORCH_CHECK(dtype == at::kBFloat16, "backend amx computes bf16 only, got ", dtype);
    return Backend::amx;
  }
  if (name == "fma") {
    TORCH_CHECK(kHasF32, "backend fma: this build has no AVX2 or AVX-512 kernels");
    TORCH_CHECK(dtype == at::kFloat, "backend fma computes fp32 only, got ", dtype);
    return Backend::fma;
  }
  TORCH_CHECK(name == "dot", "unknown backend '", name, "' (amx, fma or dot)");
  TORCH_CHECK(dot_supports(dtype), "backend dot: no kernel for ", dtype, " on this CPU");
  return Backend::dot;
}

// Logical [N, K] of a weight: packed amx tiles [N/16, K/32, 16, 32], fma panels [N/16, K, 16] (leading dims: a
// stack), else [N, K].
std::pair<int64_t, int64_t> features(Backend b, const at::Tensor& w) {
  if (b == Backend::fma) {
    TORCH_CHECK(w.dim() >= 3 && w.size(-1) == 16, "fma weight must be packed [.., N/16, K, 16]");
    return {w.size(-3) * 16, w.size(-2)};
  }
  if (b == Backend::amx) {
    TORCH_CHECK(w.dim() >= 4 && w.size(-2) == 16 && w.size(-1) == 32, "amx weight must be packed [.., N/16, K/32, 16, 32]");
    return {w.size(-4) * 16, w.size(-3) * 32};
  }
  return {w.size(-2), w.size(-1)};
}

// y [M, N] = x [M, K] @ w^T, in x's dtype (fp32 accumulation).
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w, const std::string& backend) {
  const Backend b = parse_backend(backend, x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == (b == Backend::amx ? 4 : b == Backend::fma ? 3 : 2),
              "linear: x [M, K] and one weight");
  TORCH_CHECK(w.scalar_type() == x_in.scalar_type() && w.is_contiguous(), "linear: w must be contiguous ", x_in.scalar_type());
  const auto [N, K] = features(b, w);
  TORCH_CHECK(x_in.size(1) == K, "linear: x has ", x_in.size(1), " features, w expects ", K);
  at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> src(M);
    for (int64_t m = 0; m < M; ++m) src[m] = data<T>(x) + m * K;
    Rows<T> rows(b, src.data(), M, K);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t i0, int64_t i1) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
      if (b == Backend::amx) amx_configure();
#endif
      for (int64_t i = i0; i < i1; ++i)
        matmul_columns<T>(b, rows.ptrs.data(), M, data<T>(w), K, i * NB, std::min(N, (i + 1) * NB), yp, N);
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
      if (b == Backend::amx) _tile_release();
#endif
    });
  };
  if (x.scalar_type() == at::kBFloat16) run(uint16_t{});
  else run(float{});
  return y.to(x.scalar_type());
}

// The routed-expert FFN of one layer, fused:
//   out[t] = sum over pairs p with token[p] = t of  weight[p] * down_r(silu(gate_r x_t) * up_r x_t),  r = row[p]
// hidden [T, H]; gate_up [n, 2I, H] (gate features first, then up), down [n, H, I], each a stack of hosted
// rows (packed per row on amx and fma); row, token [P] int64; weight [P] fp32. Returns [T, H] in hidden's dtype.
template <typename T>
void moe_impl(Backend b, const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
              const int64_t* row, const int64_t* token, const float* weight, int64_t P, float* out) {
  const int64_t n = gate_up.size(0);
  const auto [I2, H] = features(b, gate_up);
  const int64_t I = I2 / 2;
  // Pairs grouped by hosted row; a counting sort keeps each row's pairs in pair order.
  std::vector<int64_t> start(n + 1, 0), order(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(row[p] >= 0 && row[p] < n, "moe: pair ", p, " names hosted row ", row[p], " of ", n);
    ++start[row[p] + 1];
  }
  for (int64_t r = 0; r < n; ++r) start[r + 1] += start[r];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p) order[fill[row[p]]++] = p;
  }
  struct Hit {
    int64_t row, first, count;  // hosted row, its first pair (sorted order), its pair count
    Rows<T> x;                  // its tokens' hidden rows
  };
  std::vector<Hit> hits;
  const T* xp = data<T>(hidden);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t q0 = start[r], m = start[r + 1] - q0;
    if (m == 0) continue;
    std::vector<const T*> src(m);
    for (int64_t q = 0; q < m; ++q) src[q] = xp + token[order[q0 + q]] * H;
    hits.push_back({r, q0, m, Rows<T>(b, src.data(), m, H)});
  }
  const int64_t gu_items = (I2 + NB - 1) / NB, dn_items = (H + NB - 1) / NB;
  const int64_t gu_stride = I2 * H, dn_stride = H * I;  // elements per hosted row (packing keeps the count)
  // Work items are (hit row, block of NB output features); each thread configures its tiles once per chunk.
  auto for_items = [&](int64_t per_hit, auto&& body) {
    at::parallel_for(0, int64_t(hits.size()) * per_hit, 1, [&](int64_t i0, int64_t i1) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
      if (b == Backend::amx) amx_configure();
#endif
      for (int64_t i = i0; i < i1; ++i) body(hits[i / per_hit], i % per_hit);
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
      if (b == Backend::amx) _tile_release();
#endif
    });
  };
  // Gate and up projections of every pair: gu [P, 2I] fp32, rows in sorted pair order.
  at::Tensor gu = at::empty({P, I2}, hidden.options().dtype(at::kFloat));
  float* gup = gu.data_ptr<float>();
  for_items(gu_items, [&](const Hit& h, int64_t j) {
    matmul_columns<T>(b, h.x.ptrs.data(), h.count, data<T>(gate_up) + h.row * gu_stride, H, j * NB,
                      std::min(I2, (j + 1) * NB), gup + h.first * I2, I2);
  });
  // silu(gate) * up, rounded to the compute dtype as the down projection's input: [P, I]. ATen's
  // vectorised silu (a scalar exp per element cost as much as the projections at batch 32).
  const at::Tensor act = (at::silu(gu.narrow(1, 0, I)) * gu.narrow(1, I, I)).to(hidden.scalar_type()).contiguous();
  for (Hit& h : hits) {
    std::vector<const T*> src(h.count);
    for (int64_t q = 0; q < h.count; ++q) src[q] = data<T>(act) + (h.first + q) * I;
    h.x = Rows<T>(b, src.data(), h.count, I);
  }
  // Down projection: y [P, H] fp32.
  at::Tensor y = at::empty({P, H}, hidden.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  for_items(dn_items, [&](const Hit& h, int64_t j) {
    matmul_columns<T>(b, h.x.ptrs.data(), h.count, data<T>(down) + h.row * dn_stride, I, j * NB,
                      std::min(H, (j + 1) * NB), yp + h.first * H, H);
  });
  // Weighted sum into each pair's token, in pair order: a token's sum then does not depend on where its
  // experts sit among the hosted rows (a replica set loaded in another order gives identical bits).
  // Threads split the hidden features, so none shares a row's bytes.
  std::vector<int64_t> sorted_at(P);  // pair -> its row in y
  for (int64_t q = 0; q < P; ++q) sorted_at[order[q]] = q;
  at::parallel_for(0, H, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t p = 0; p < P; ++p) {
      const float wgt = weight[p];
      float* dst = out + token[p] * H;
      const float* src = yp + sorted_at[p] * H;
      for (int64_t c = c0; c < c1; ++c) dst[c] += wgt * src[c];
    }
  });
}

at::Tensor moe(const at::Tensor& hidden_in, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& row_in,
               const at::Tensor& token_in, const at::Tensor& weight_in, const std::string& backend) {
  const Backend b = parse_backend(backend, hidden_in.scalar_type());
  const int64_t wdim = b == Backend::amx ? 5 : b == Backend::fma ? 4 : 3;
  TORCH_CHECK(hidden_in.dim() == 2 && gate_up.dim() == wdim && down.dim() == wdim,
              "moe: hidden [T, H] and stacked gate_up, down of ", wdim, " dims");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "moe: stacked weights must be contiguous");
  TORCH_CHECK(gate_up.scalar_type() == hidden_in.scalar_type() && down.scalar_type() == hidden_in.scalar_type(),
              "moe: weights must be ", hidden_in.scalar_type());
  const auto [I2, H] = features(b, gate_up);
  const auto [Hd, I] = features(b, down);
  TORCH_CHECK(H == hidden_in.size(1) && Hd == H && I2 == 2 * I && down.size(0) == gate_up.size(0),
              "moe: weight shapes do not match hidden [T, ", hidden_in.size(1), "]");
  at::Tensor hidden = hidden_in.contiguous();
  at::Tensor row = row_in.to(at::kLong).contiguous(), token = token_in.to(at::kLong).contiguous();
  at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const int64_t P = row.numel();
  TORCH_CHECK(token.numel() == P && weight.numel() == P, "moe: row, token and weight need one entry per pair");
  at::Tensor out = at::zeros({hidden.size(0), H}, hidden.options().dtype(at::kFloat));
  if (P > 0) {
    const int64_t T = hidden.size(0);
    for (int64_t p = 0; p < P; ++p)
      TORCH_CHECK(token.data_ptr<int64_t>()[p] >= 0 && token.data_ptr<int64_t>()[p] < T, "moe: pair ", p, " names token ",
                  token.data_ptr<int64_t>()[p], " of ", T);
    auto args = std::make_tuple(row.data_ptr<int64_t>(), token.data_ptr<int64_t>(), weight.data_ptr<float>());
    if (hidden.scalar_type() == at::kBFloat16)
      moe_impl<uint16_t>(b, hidden, gate_up, down, std::get<0>(args), std::get<1>(args), std::get<2>(args), P,
                         out.data_ptr<float>());
    else
      moe_impl<float>(b, hidden, gate_up, down, std::get<0>(args), std::get<1>(args), std::get<2>(args), P,
                      out.data_ptr<float>());
  }
  return out.to(hidden.scalar_type());
}

// Decode attention straight from the KV cache, one query row per sequence:
//   out[b, h] = sum over l < lens[b] of softmax_l(scale * q[b, h] . k[slots[b], h / G, l]) v[slots[b], h / G, l]
// q [B, Q, D]; k [S, N, M, D], v [S, N, M, Dv] (one layer of the cache); slots, lens [B] int64; G = Q / N.
// fp32 scores, softmax and sums; out [B, Q, Dv] in q's dtype. A step's attention reads only the cache, and
// torch's SDPA costs about 1 ms a layer per call at batch 64 in dispatch and layout work alone.

// x . y for fp32 x and T y; acc += a * y.
template <typename T>
inline float dot(const float* x, const T* y, int64_t n) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  vec acc = vzero();
  for (; d + W <= n; d += W) acc = vfma(vload(x + d), vload(y + d), acc);
  s = vsum(acc);
#endif
  for (; d < n; ++d) s += x[d] * as_float(y[d]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* y, float* acc, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  const vec av = vset1(a);
  for (; d + W <= n; d += W) vstore(acc + d, vfma(av, vload(y + d), vload(acc + d)));
#endif
  for (; d < n; ++d) acc[d] += a * as_float(y[d]);
}

template <typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* slots,
                    const int64_t* lens, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Q = q.size(1), D = q.size(2), N = k.size(1), M = k.size(2), Dv = v.size(3);
  const int64_t G = Q / N;
  const T* qp = data<T>(q);
  const T* kp = data<T>(k);
  const T* vp = data<T>(v);
  T* op = reinterpret_cast<T*>(out.data_ptr());
  at::parallel_for(0, B * Q, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> score(M), acc(Dv), qf(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Q, h = i % Q, len = lens[b];
      const T* keys = kp + (slots[b] * N + h / G) * M * D;
      const T* values = vp + (slots[b] * N + h / G) * M * Dv;
      for (int64_t d = 0; d < D; ++d) qf[d] = as_float(qp[i * D + d]);
      float best = -INFINITY;
      for (int64_t l = 0; l < len; ++l) {
        score[l] = dot(qf.data(), keys + l * D, D) * scale;
        best = std::max(best, score[l]);
      }
      float total = 0.f;
      for (int64_t l = 0; l < len; ++l) total += (score[l] = std::exp(score[l] - best));
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < len; ++l) axpy(score[l], values + l * Dv, acc.data(), Dv);
      for (int64_t d = 0; d < Dv; ++d) {
        const float o = acc[d] / total;
        if constexpr (std::is_same_v<T, uint16_t>) op[i * Dv + d] = c10::BFloat16(o).x;
        else op[i * Dv + d] = o;
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots_in,
                            const at::Tensor& lens_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k.dim() == 4 && v.dim() == 4, "decode_attention: q [B, Q, D], k and v [S, N, M, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "decode_attention: the cache layer must be contiguous");
  TORCH_CHECK(q_in.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: q, k, v must share a dtype, fp32 or bf16");
  const int64_t B = q_in.size(0), Q = q_in.size(1), N = k.size(1);
  TORCH_CHECK(q_in.size(2) == k.size(3) && Q % N == 0 && v.size(0) == k.size(0) && v.size(1) == N && v.size(2) == k.size(2),
              "decode_attention: shapes do not match");
  at::Tensor q = q_in.contiguous();
  at::Tensor slots = slots_in.to(at::kLong).contiguous(), lens = lens_in.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == B && lens.numel() == B, "decode_attention: one slot and one length per sequence");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = slots.data_ptr<int64_t>()[b], len = lens.data_ptr<int64_t>()[b];
    TORCH_CHECK(slot >= 0 && slot < k.size(0) && len >= 1 && len <= k.size(2), "decode_attention: sequence ", b,
                " has slot ", slot, " and length ", len, " outside the cache");
  }
  at::Tensor out = at::empty({B, Q, v.size(3)}, q.options());
  if (q.scalar_type() == at::kBFloat16)
    attention_impl<uint16_t>(q, k, v, slots.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), float(scale), out);
  else
    attention_impl<float>(q, k, v, slots.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), float(scale), out);
  return out;
}

// What this build can run here: "amx" (bf16), "fma" (fp32), "dot:bfloat16", "dot:float32".
std::vector<std::string> backends() {
  std::vector<std::string> out;
  if (kHasAmx && amx_permitted()) out.push_back("amx");
  if (kHasF32) out.push_back("fma");
  if (kHasBf16) out.push_back("dot:bfloat16");
  if (kHasF32) out.push_back("dot:float32");
  return out;
}

}  // namespace

TORCH_LIBRARY(moe_serve_cpu, m) {
  m.def("linear(Tensor x, Tensor w, str backend) -> Tensor", &linear);
  m.def("moe(Tensor hidden, Tensor gate_up, Tensor down, Tensor row, Tensor token, Tensor weight, str backend) -> Tensor",
        &moe);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lens, float scale) -> Tensor",
        &decode_attention);
  m.def("backends() -> str[]", &backends);
}
