/* CPU linears y = x W^T + b on weights laid out once at load (block_quant.py and panel.py give the
 * layouts). Each output is one chain of multiply-adds over k in order, whatever the number of rows
 * and threads, so a row's result does not depend on the batch around it: batch-invariant decoding
 * rests on that, and oneDNN gives no such promise (it picks kernels, and so reduction orders, by
 * the number of rows and by the CPU).
 *
 * fp32 (AVX2 + FMA: every x86 we meet): a tile of 16 output features is a panel [k][16]. Dense
 * weights are stored as panels; block-quantized ones (a GGUF's Q4_1 / Q8_0) are expanded tile by
 * tile into one, to exactly the loader's fp32 values (the products are exact and the one add
 * rounds as numpy's does). Every row of x then runs against the panel six rows at a time, the 12
 * accumulators in registers; up to six rows in all skip the panel and expand in registers.
 *
 * bf16: a tile is [k/2][16] pairs of bf16 (inputs 2p, 2p+1 of one feature in one dword). With
 * AVX512-BF16 each pair is one vdpbf16ps lane; elsewhere both halves widen to fp32 and go through
 * FMAs, even input first. Products of bf16 values are exact in fp32, accumulation is fp32, and
 * the output is rounded to bf16 once, as torch's bf16 matmul does. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define COLUMNS 16
#define BLOCK 32
#define MAX_ROWS 6
#define BF16_COLUMNS 64 /* features a bf16 tile */
#define ROW_CHUNK 12 /* rows a task of the dense kernels: tiles x chunks share the threads */

static inline long tile_bytes(int bits) { return bits == 4 ? 2 * 64 + BLOCK * 8 : 64 + BLOCK * 16; }

/* The 16 weights of input i of a 32-input block: one panel row */
static inline __attribute__((always_inline)) void expand_row(const uint8_t *restrict block, int i,
                                                             int bits, __m256 *w0, __m256 *w1) {
  const float *scale = (const float *)block;
  if (bits == 4) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(block + 128 + 8 * i)));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    *w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(scale), lo), _mm256_loadu_ps(scale + 16));
    *w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + 8), hi), _mm256_loadu_ps(scale + 24));
  } else {
    const __m128i b = _mm_loadu_si128((const __m128i *)(block + 64 + 16 * i));
    *w0 = _mm256_mul_ps(_mm256_loadu_ps(scale), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
    *w1 = _mm256_mul_ps(_mm256_loadu_ps(scale + 8),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
  }
}

static void expand_tile(float *restrict panel, const uint8_t *restrict tile, int k, int bits) {
  for (int kb = 0; kb < k / BLOCK; kb++, tile += tile_bytes(bits))
    for (int i = 0; i < BLOCK; i++, panel += COLUMNS) {
      __m256 w0, w1;
      expand_row(tile, i, bits, &w0, &w1);
      _mm256_storeu_ps(panel, w0);
      _mm256_storeu_ps(panel + 8, w1);
    }
}

/* R rows of x (row stride k) times one tile's weights into y (row stride n), the weights read
 * from a panel [k][16] (source 0), or expanded in registers as they are needed (source = bits: a
 * few rows, where the panel's stores and loads would cost more than the multiplies). Same values,
 * same order of each FMA chain either way. R and source are constants in every copy, so the loop
 * holds no branch. */
static inline __attribute__((always_inline)) void rows_times_tile(
    int r_rows, int source, const float *restrict x, const float *restrict panel,
    const uint8_t *restrict tile, int k, float *restrict y, long n, const float *restrict bias) {
  __m256 acc[MAX_ROWS][2];
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int kb = 0; kb < k / BLOCK; kb++) {
    const uint8_t *block = source ? tile + kb * tile_bytes(source) : NULL;
    const float *rows = panel + (long)kb * BLOCK * COLUMNS, *xb = x + kb * BLOCK;
#pragma GCC unroll 4 /* ~10-20% over the plain loop, measured; the order within a chain stays */
    for (int i = 0; i < BLOCK; i++) {
      __m256 w0, w1;
      if (source == 0) {
        w0 = _mm256_loadu_ps(rows + i * COLUMNS);
        w1 = _mm256_loadu_ps(rows + i * COLUMNS + 8);
      } else {
        expand_row(block, i, source, &w0, &w1);
      }
#pragma GCC unroll 6
      for (int r = 0; r < r_rows; r++) {
        const __m256 a = _mm256_broadcast_ss(xb + (long)r * k + i);
        acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
      }
    }
  }
  const __m256 c0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 c1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) {
    _mm256_storeu_ps(y + r * n, bias ? _mm256_add_ps(acc[r][0], c0) : acc[r][0]);
    _mm256_storeu_ps(y + r * n + 8, bias ? _mm256_add_ps(acc[r][1], c1) : acc[r][1]);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* What expand_pair needs of a block's scales, once per block: the Q8_0 scales as they are; the
 * Q4_1 scales and minimums of features 0-7 and of 8-15, each twice (a pair's two inputs side by
 * side) */
static inline __attribute__((always_inline)) void pair_scales(const uint8_t *restrict block,
                                                              int bits, __m512 sc[4]) {
  const __m512 s = _mm512_loadu_ps((const float *)block);
  if (bits == 8) {
    sc[0] = s;
    return;
  }
  const __m512 m = _mm512_loadu_ps((const float *)block + 16);
  sc[0] = _mm512_shuffle_f32x4(s, s, 0x44);
  sc[1] = _mm512_shuffle_f32x4(s, s, 0xEE);
  sc[2] = _mm512_shuffle_f32x4(m, m, 0x44);
  sc[3] = _mm512_shuffle_f32x4(m, m, 0xEE);
}

/* Inputs i and i + 1 (i even) of a block as one register of a bf16 panel: the loader's fp32
 * values (the product is exact, so one FMA rounds as its multiply and add do), rounded to bf16 as
 * torch's .to(torch.bfloat16) rounds (to nearest even), then paired feature by feature. A Q4_1
 * pair's 16 bytes expand at once: their low nibbles are features 0-7 of both inputs, the high
 * ones 8-15 (10 operations a pair register, where one input at a time took 16). */
static inline __attribute__((always_inline)) __m512i expand_pair(const uint8_t *restrict block,
                                                                 int i, int bits,
                                                                 const __m512 sc[4]) {
  if (bits == 8) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                                9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                                17, 1, 16, 0);
    const __m128i *q = (const __m128i *)(block + 64 + 16 * i);
    const __m512bh both = _mm512_cvtne2ps_pbh(
        _mm512_mul_ps(sc[0], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)))),
        _mm512_mul_ps(sc[0], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)))));
    return _mm512_permutexvar_epi16(interleave, (__m512i)both);
  }
  const __m512i interleave = _mm512_set_epi16(31, 23, 30, 22, 29, 21, 28, 20, 27, 19, 26, 18, 25,
                                              17, 24, 16, 15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2,
                                              9, 1, 8, 0);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + 128 + 8 * i)));
  const __m512 lo = _mm512_fmadd_ps(
      sc[0], _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), sc[2]);
  const __m512 hi = _mm512_fmadd_ps(sc[1], _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sc[3]);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* R rows of bf16 x times one 64-feature bf16 pair tile: four vdpbf16ps per row and input pair,
 * 4R accumulators (enough in flight to cover the instruction's latency). The tile is read from a
 * panel (source 0) or built in registers from four 16-feature block-quantized tiles (source =
 * bits), to the panel's very values: a few rows then stream 0.56 or 1.06 bytes a weight, not 2. */
static inline __attribute__((always_inline)) void rows_times_bf16_tile(
    int r_rows, int source, const uint16_t *restrict x, const uint32_t *restrict panel,
    const uint8_t *restrict tile, int k, uint16_t *restrict y, long n,
    const uint16_t *restrict bias) {
  const long per_tile = source ? tile_bytes(source) * (k / BLOCK) : 0;
  __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
  for (int kb = 0; kb < k / BLOCK; kb++) {
    const uint8_t *block = source ? tile + kb * tile_bytes(source) : NULL;
    __m512 sc[4][4];
    if (source)
#pragma GCC unroll 4
      for (int c = 0; c < 4; c++) pair_scales(block + c * per_tile, source, sc[c]);
#pragma GCC unroll 2
    for (int i = 0; i < BLOCK; i += 2) {
      const int p = kb * BLOCK / 2 + i / 2;
      __m512i w[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; c++)
        w[c] = source ? expand_pair(block + c * per_tile, i, source, sc[c])
                      : _mm512_loadu_si512(panel + (long)p * BF16_COLUMNS + 16 * c);
#pragma GCC unroll 6
      for (int r = 0; r < r_rows; r++) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + (long)r * k + 2 * p));
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, (__m512bh)w[c]);
      }
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) {
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + 16 * c))), 16))
                          : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++)
      _mm256_storeu_si256((__m256i *)(y + r * n + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(bias ? _mm512_add_ps(acc[r][c], b) : acc[r][c]));
  }
}
#define FROM_BF16(R) rows_times_bf16_tile(R, 0, x, panel, tile, k, y, n, bias)
#define FROM_BF16_Q4(R) rows_times_bf16_tile(R, 4, x, panel, tile, k, y, n, bias)
#define FROM_BF16_Q8(R) rows_times_bf16_tile(R, 8, x, panel, tile, k, y, n, bias)
#else
/* 8 floats -> 8 bf16 in the low halves of 8 dwords, rounded to nearest even */
static inline __m256i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

static inline __m256 widen_bf16(const uint16_t *p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* The same tile 16 features at a time, both halves of each pair widened to fp32 */
static inline __attribute__((always_inline)) void rows_times_bf16_tile(
    int r_rows, const uint16_t *restrict x, const uint32_t *restrict panel, int k,
    uint16_t *restrict y, long n, const uint16_t *restrict bias) {
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int c = 0; c < BF16_COLUMNS; c += 16) {
    __m256 acc[MAX_ROWS][2];
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int p = 0; p < k / 2; p++) {
      const uint32_t *wp = panel + (long)p * BF16_COLUMNS + c;
      const __m256i w0 = _mm256_loadu_si256((const __m256i *)wp);
      const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wp + 8));
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
#pragma GCC unroll 6
      for (int r = 0; r < r_rows; r++) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t *)(x + (long)r * k + 2 * p));
        const __m256 ae = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
        const __m256 ao = _mm256_castsi256_ps(_mm256_and_si256(a, high));
        acc[r][0] = _mm256_fmadd_ps(ao, o0, _mm256_fmadd_ps(ae, e0, acc[r][0]));
        acc[r][1] = _mm256_fmadd_ps(ao, o1, _mm256_fmadd_ps(ae, e1, acc[r][1]));
      }
    }
    const __m256 c0 = bias ? widen_bf16(bias + c) : _mm256_setzero_ps();
    const __m256 c1 = bias ? widen_bf16(bias + c + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++) {
      const __m256i lo = round_bf16(bias ? _mm256_add_ps(acc[r][0], c0) : acc[r][0]);
      const __m256i hi = round_bf16(bias ? _mm256_add_ps(acc[r][1], c1) : acc[r][1]);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
      _mm256_storeu_si256((__m256i *)(y + r * n + c), packed);
    }
  }
}
#define FROM_BF16(R) rows_times_bf16_tile(R, x, panel, k, y, n, bias)
#endif

/* One copy per row count, each with R a constant: its accumulators stay in registers */
#define ROWS_TIMES(NAME, CALL)                                                                    \
  static void NAME(int r_rows, const void *x, const void *panel, const uint8_t *tile, int k,     \
                   void *y, long n, const void *bias) {                                          \
    switch (r_rows) {                                                                            \
      case 1: CALL(1); break;                                                                    \
      case 2: CALL(2); break;                                                                    \
      case 3: CALL(3); break;                                                                    \
      case 4: CALL(4); break;                                                                    \
      case 5: CALL(5); break;                                                                    \
      default: CALL(6); break;                                                                   \
    }                                                                                            \
  }
#define FROM_PANEL(R) rows_times_tile(R, 0, x, panel, tile, k, y, n, bias)
#define FROM_Q4(R) rows_times_tile(R, 4, x, panel, tile, k, y, n, bias)
#define FROM_Q8(R) rows_times_tile(R, 8, x, panel, tile, k, y, n, bias)
ROWS_TIMES(rows_from_panel, FROM_PANEL)
ROWS_TIMES(rows_from_q4, FROM_Q4)
ROWS_TIMES(rows_from_q8, FROM_Q8)
ROWS_TIMES(rows_from_bf16, FROM_BF16)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
ROWS_TIMES(rows_from_bf16_q4, FROM_BF16_Q4)
ROWS_TIMES(rows_from_bf16_q8, FROM_BF16_Q8)
#endif

typedef void (*rows_fn)(int, const void *, const void *, const uint8_t *, int, void *, long,
                        const void *);

/* The rows of `left` that a linear's next group of at most `most` takes: a tail of most + 1 to
 * most + 3 goes as 4 + the rest (two short chains are slow). w4a8.c's groups too. */
int row_group(int left, int most) {
  return left >= most + 4 || left == most ? most : left > most ? left - 4 : left;
}

/* All m rows against one tile, six at a time. esize: bytes of an element of x and y. */
static void all_rows(rows_fn fn, int m, const char *x, const void *panel, const uint8_t *tile,
                     int k, char *y, long n, const void *bias, int esize) {
  for (int row = 0, r_rows; row < m; row += r_rows) {
    r_rows = row_group(m - row, MAX_ROWS);
    fn(r_rows, x + (long)row * k * esize, panel, tile, k, y + (long)row * n * esize, n, bias);
  }
}

void block_quant_linear_f32(float *y, const float *x, int m, int k, const uint8_t *w, int n,
                            int bits, const float *bias, int num_threads) {
  const long per_tile = tile_bytes(bits) * (k / BLOCK);
  if (m == 0) return; /* a chunked-prefill step may ask the LM head for no rows */
#pragma omp parallel num_threads(num_threads)
  {
    float *panel = m > MAX_ROWS ? aligned_alloc(64, (size_t)k * COLUMNS * sizeof(float)) : NULL;
#pragma omp for schedule(guided)
    for (int t = 0; t < n / COLUMNS; t++) {
      const uint8_t *tile = w + t * per_tile;
      const float *b = bias ? bias + t * COLUMNS : NULL;
      if (!panel) {
        (bits == 4 ? rows_from_q4 : rows_from_q8)(m, x, NULL, tile, k, y + t * COLUMNS, n, b);
        continue;
      }
      expand_tile(panel, tile, k, bits);
      all_rows(rows_from_panel, m, (const char *)x, panel, NULL, k, (char *)(y + t * COLUMNS), n, b,
               4);
    }
    free(panel);
  }
}

/* Dense weights, already in panels: fp32 [n/16][k][16], bf16 [n/64][k/2][64] pairs. The threads
 * share (tile, chunk of rows) tasks: a layer of 576 features has only nine bf16 tiles. */
#define DENSE_LINEAR(S, T, W, COLS, FN, ESIZE)                                                    \
  void panel_linear_##S(T *y, const T *x, int m, int k, const W *w, int n, const T *bias,        \
                        int num_threads) {                                                       \
    const int chunks = (m + ROW_CHUNK - 1) / ROW_CHUNK;                                          \
    _Pragma("omp parallel for num_threads(num_threads) schedule(guided) collapse(2)")            \
    for (int t = 0; t < n / COLS; t++)                                                           \
      for (int c = 0; c < chunks; c++) {                                                         \
        const int rows = m - c * ROW_CHUNK < ROW_CHUNK ? m - c * ROW_CHUNK : ROW_CHUNK;          \
        all_rows(FN, rows, (const char *)(x + (long)c * ROW_CHUNK * k),                          \
                 w + (long)t * k * COLS / (ESIZE == 2 ? 2 : 1), NULL, k,                          \
                 (char *)(y + (long)c * ROW_CHUNK * n + t * COLS), n,                            \
                 bias ? bias + t * COLS : NULL, ESIZE);                                          \
      }                                                                                          \
  }
DENSE_LINEAR(f32, float, float, COLUMNS, rows_from_panel, 4)
#define panel_linear_bf16 vector_linear_bf16
DENSE_LINEAR(bf16, uint16_t, uint32_t, BF16_COLUMNS, rows_from_bf16, 2)
#undef panel_linear_bf16

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* Inputs 32 kb .. 32 kb + 31 of 64-feature tile t of block-quantized weights as that tile's
 * [16 pairs][64] panel rows (the AMX kernel's B tiles) */
void expand_bf16_block(uint32_t *restrict out, const uint8_t *restrict blocks, int t, int k, int kb,
                       int bits) {
  const long per_tile = tile_bytes(bits) * (k / BLOCK);
  const uint8_t *block = blocks + 4 * t * per_tile + kb * tile_bytes(bits);
  __m512 sc[4][4];
  for (int c = 0; c < 4; c++) pair_scales(block + c * per_tile, bits, sc[c]);
  for (int i = 0; i < BLOCK; i += 2)
    for (int c = 0; c < 4; c++)
      _mm512_storeu_si512(out + i / 2 * BF16_COLUMNS + 16 * c,
                          expand_pair(block + c * per_tile, i, bits, sc[c]));
}
#endif
#if defined(__AMX_BF16__)
/* amx_linear.c: the same panels on AMX tiles; 0 where the kernel refuses AMX to the process */
int amx_linear_bf16(uint16_t *y, const uint16_t *x, int m, int k, const uint32_t *w, int n,
                    const uint16_t *bias, int num_threads, const uint8_t *blocks, int bits);
#endif

/* bf16 panels. blocks, where not NULL, are the same weights as a GGUF's Q4_1 / Q8_0 tiles
 * (block_quant.py's layout) that round to the panel's bf16 values: up to a row tile (six rows
 * here, 16 on AMX) the kernels expand them in registers instead of reading the panel, the same
 * bits from 0.56 or 1.06 bytes a weight instead of 2 (one decode stream streams every weight
 * once a step; a 4-bit step's linears took 9.7 ms against 12.2 from panels on the AMX Xeon). */
void panel_linear_bf16(uint16_t *y, const uint16_t *x, int m, int k, const uint32_t *w, int n,
                       const uint16_t *bias, int num_threads, const uint8_t *blocks, int bits) {
  if (m == 0) return; /* a chunked-prefill step may ask the LM head for no rows */
#if defined(__AMX_BF16__)
  if (amx_linear_bf16(y, x, m, k, w, n, bias, num_threads, blocks, bits)) return;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (blocks && m <= MAX_ROWS) {
    const long per_tile = tile_bytes(bits) * (k / BLOCK);
#pragma omp parallel for num_threads(num_threads) schedule(guided)
    for (int t = 0; t < n / BF16_COLUMNS; t++)
      (bits == 4 ? rows_from_bf16_q4 : rows_from_bf16_q8)(
          m, x, NULL, blocks + 4 * t * per_tile, k, y + t * BF16_COLUMNS, n,
          bias ? bias + t * BF16_COLUMNS : NULL);
    return;
  }
#endif
  vector_linear_bf16(y, x, m, k, w, n, bias, num_threads);
}
#endif
