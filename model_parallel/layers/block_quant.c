/* fp32 matmul against block-quantized weights (block_quant.py gives the layout): y = x W^T + b.
 *
 * Each thread takes tiles of 16 output features, expands a tile's blocks over all of K into an
 * fp32 panel (exactly the loader's dequantized values: the products are exact and the one add
 * rounds as numpy's does), then runs every row of x against it, six rows at a time with the 12
 * accumulators in registers; up to six rows in all skip the panel and expand in registers. Each
 * output is one FMA chain over k in order, whatever the number of rows and threads: a row's
 * result does not depend on the batch around it. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define COLUMNS 16
#define BLOCK 32

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
      _mm256_store_ps(panel, w0);
      _mm256_store_ps(panel + 8, w1);
    }
}

/* R rows of x (row stride k) times the tile's weights into y (row stride n), the weights read
 * from the expanded panel [k][16] (source 0), or expanded in registers as they are needed
 * (source = bits: a few rows, where the panel's stores and loads would cost more than the
 * multiplies). Same values, same order of each FMA chain either way. R and source are constants
 * in every copy, so the loop holds no branch. */
static inline __attribute__((always_inline)) void rows_times_tile(
    int r_rows, int source, const float *restrict x, const float *restrict panel,
    const uint8_t *restrict tile, int k, float *restrict y, long n, const float *restrict bias) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int kb = 0; kb < k / BLOCK; kb++) {
    const uint8_t *block = source ? tile + kb * tile_bytes(source) : NULL;
    const float *rows = panel + (long)kb * BLOCK * COLUMNS, *xb = x + kb * BLOCK;
#pragma GCC unroll 4 /* ~10-20% over the plain loop, measured; the order within a chain stays */
    for (int i = 0; i < BLOCK; i++) {
      __m256 w0, w1;
      if (source == 0) {
        w0 = _mm256_load_ps(rows + i * COLUMNS);
        w1 = _mm256_load_ps(rows + i * COLUMNS + 8);
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

/* one register-resident copy per row count and source */
#define ROWS_TIMES(NAME, SOURCE)                                                                  \
  static void NAME(int r_rows, const float *x, const float *panel, const uint8_t *tile, int k,   \
                   float *y, long n, const float *bias) {                                        \
    switch (r_rows) {                                                                            \
      case 1: rows_times_tile(1, SOURCE, x, panel, tile, k, y, n, bias); break;                  \
      case 2: rows_times_tile(2, SOURCE, x, panel, tile, k, y, n, bias); break;                  \
      case 3: rows_times_tile(3, SOURCE, x, panel, tile, k, y, n, bias); break;                  \
      case 4: rows_times_tile(4, SOURCE, x, panel, tile, k, y, n, bias); break;                  \
      case 5: rows_times_tile(5, SOURCE, x, panel, tile, k, y, n, bias); break;                  \
      default: rows_times_tile(6, SOURCE, x, panel, tile, k, y, n, bias); break;                 \
    }                                                                                            \
  }
ROWS_TIMES(rows_from_panel, 0)
ROWS_TIMES(rows_from_q4, 4)
ROWS_TIMES(rows_from_q8, 8)

void block_quant_linear_f32(float *y, const float *x, int m, int k, const uint8_t *w, int n,
                            int bits, const float *bias, int num_threads) {
  const long per_tile = tile_bytes(bits) * (k / BLOCK);
  if (m == 0) return; /* a chunked-prefill step may ask the LM head for no rows */
#pragma omp parallel num_threads(num_threads)
  {
    float *panel = m > 6 ? aligned_alloc(64, (size_t)k * COLUMNS * sizeof(float)) : NULL;
#pragma omp for schedule(static)
    for (int t = 0; t < n / COLUMNS; t++) {
      const uint8_t *tile = w + t * per_tile;
      const float *b = bias ? bias + t * COLUMNS : NULL;
      if (!panel) {
        (bits == 4 ? rows_from_q4 : rows_from_q8)(m, x, NULL, tile, k, y + t * COLUMNS, n, b);
        continue;
      }
      expand_tile(panel, tile, k, bits);
      for (int row = 0; row < m;) {
        /* six rows at a time; a tail of 7-9 goes as 4 + the rest (two short chains are slow) */
        const int left = m - row;
        const int r_rows = left >= 10 || left == 6 ? 6 : left > 6 ? left - 4 : left;
        rows_from_panel(r_rows, x + (long)row * k, panel, NULL, k, y + (long)row * n + t * COLUMNS,
                        n, b);
        row += r_rows;
      }
    }
    free(panel);
  }
}
#endif
