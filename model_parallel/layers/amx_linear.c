/* bf16 linears on AMX tiles (Sapphire Rapids and later Xeons), over the same [n/64][k/2][64] pair
 * panels as cpu_linear.c: a B tile is 16 input pairs x 16 features of a panel, read with the
 * panel's 256-byte row stride. Per 16 rows of x and 64 features: four 16x16 fp32 accumulator
 * tiles, then for every 32 inputs one A tile and four tdpbf16ps. A row's result is the same
 * sequence of tile instructions whatever the other rows (a partial block of rows is padded with
 * zeros to 16), so it does not depend on the batch; accumulation is fp32, the output rounded once
 * to bf16. Block-quantized weights (cpu_linear.c's panel_linear_bf16) are expanded into the same
 * B tiles, 32 inputs at a time, where one row tile holds the batch. */
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define COLS 64 /* features a panel tile */
#define ROWS 16 /* rows a tile */

struct tile_config {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* Linux hands AMX's tile state to a process only when it asks, once */
static int amx_allowed(void) {
  static int allowed = -1;
  if (allowed < 0) allowed = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return allowed;
}

static void configure_tiles(void) {
  struct tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) cfg.rows[t] = ROWS, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

void expand_bf16_block(uint32_t *out, const uint8_t *blocks, int t, int k, int kb, int bits);

/* 16 rows (a: row stride k) times 64-feature tile t into c [16][64] fp32, its weights from the
 * panel, or from the blocks through buf [16][64]. Tiles 0-3 accumulate, 4 holds A, 5 and 6 take
 * turns at B. */
static void block_times_tile(const uint16_t *a, int k, const uint32_t *w, int t,
                             const uint8_t *blocks, int bits, uint32_t *buf, float *c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int kk = 0; kk < k / 32; kk++) {
    const uint32_t *b = w + ((long)t * (k / 2) + kk * 16) * COLS;
    if (blocks) {
      expand_bf16_block(buf, blocks, t, k, kk, bits);
      b = buf;
    }
    _tile_loadd(4, a + kk * 32, k * 2);
    _tile_loadd(5, b, COLS * 4);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 16, COLS * 4);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, b + 32, COLS * 4);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, b + 48, COLS * 4);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, c, COLS * 4);
  _tile_stored(1, c + 16, COLS * 4);
  _tile_stored(2, c + 32, COLS * 4);
  _tile_stored(3, c + 48, COLS * 4);
}

int amx_linear_bf16(uint16_t *y, const uint16_t *x, int m, int k, const uint32_t *w, int n,
                    const uint16_t *bias, int num_threads, const uint8_t *blocks, int bits) {
  if (!amx_allowed()) return 0;
  if (m > ROWS) blocks = NULL; /* re-expanding them per row tile would cost more than the panel */
  const int row_tiles = (m + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(num_threads)
  {
    configure_tiles();
    float *c = aligned_alloc(64, sizeof(float) * ROWS * COLS);
    uint32_t *buf = blocks ? aligned_alloc(64, sizeof(uint32_t) * 16 * COLS) : NULL;
    uint16_t *pad = NULL;
#pragma omp for collapse(2) schedule(guided)
    for (int t = 0; t < n / COLS; t++)
      for (int blk = 0; blk < row_tiles; blk++) {
        const int rows = m - blk * ROWS < ROWS ? m - blk * ROWS : ROWS;
        const uint16_t *a = x + (long)blk * ROWS * k;
        if (rows < ROWS) { /* the last rows, with zeros below them */
          if (!pad) pad = aligned_alloc(64, sizeof(uint16_t) * ROWS * k);
          memset(pad, 0, sizeof(uint16_t) * ROWS * k);
          memcpy(pad, a, sizeof(uint16_t) * rows * k);
          a = pad;
        }
        block_times_tile(a, k, w, t, blocks, bits, buf, c);
        for (int r = 0; r < rows; r++)
          for (int q = 0; q < COLS; q += 16) {
            __m512 v = _mm512_loadu_ps(c + r * COLS + q);
            if (bias)
              v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                                       _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                           (const __m256i *)(bias + t * COLS + q))),
                                       16)));
            _mm256_storeu_si256((__m256i *)(y + (long)(blk * ROWS + r) * n + t * COLS + q),
                                (__m256i)_mm512_cvtneps_pbh(v));
          }
      }
    free(pad);
    free(buf);
    free(c);
    _tile_release();
  }
  return 1;
}
#endif
