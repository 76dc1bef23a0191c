/* 4-bit weights times 8-bit activations (`--quantization w4a8`, llama.cpp's Q4_1 x Q8 scheme):
 * y = x W^T + b where W is a GGUF Q4_1 weight (w = d q + m per 32 inputs, q in 0..15) and each
 * 32 inputs of a row of x are rounded to dx qx (qx in -127..127, dx = max |x| / 127). Per output
 * and block the product is then d dx (sum q qx) + m dx (sum qx): the sums are exact integers
 * (vpdpbusd with AVX512-VNNI; vpmaddubsw + vpmaddwd on AVX2, the same integers), the rest one
 * fixed chain of fp32 operations per output, so the result is the same bits whatever the batch,
 * the thread count or the instruction set. The activations' rounding is the price: see the README.
 *
 * Layout (w4a8.py): per tile of 16 features and block of 32 inputs, 16 fp32 d, 16 fp32 m, then
 * four groups of 64 bytes; byte 4j + b of group g holds feature j's q of input 4g + b in its low
 * nibble and of input 16 + 4g + b in its high one. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define W4A8_COLUMNS 16
#define W4A8_BLOCK 32
#define W4A8_TILE_BYTES (2 * 64 + 4 * 64)
#define W4A8_ROWS 6

/* One row's 32 inputs: qx (into q) and dx, dx * sum qx (into scale[0], scale[1]) */
static void quantize_block(const float *x, int8_t *q, float *scale) {
  float amax = 0.f;
  for (int i = 0; i < W4A8_BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
  const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int i = 0; i < W4A8_BLOCK; i++) {
    q[i] = (int8_t)nearbyintf(x[i] * inv);
    sum += q[i];
  }
  scale[0] = d;
  scale[1] = d * (float)sum;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
typedef __m512 fvec;
typedef __m512i ivec;
#define FSET1 _mm512_set1_ps
#define FZERO _mm512_setzero_ps
#define FLOAD _mm512_loadu_ps
#define FSTORE _mm512_storeu_ps
#define FADD _mm512_add_ps
#define FMUL _mm512_mul_ps
#define FMA _mm512_fmadd_ps
#define ITOF _mm512_cvtepi32_ps
#define IZERO _mm512_setzero_si512
#define HALVES 1 /* registers a tile row of 16 features takes */
static inline ivec nibbles(const uint8_t *p, int high) {
  const __m512i v = _mm512_loadu_si512(p);
  return _mm512_and_si512(high ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(15));
}
/* sum += four u8 x s8 products per 32-bit lane */
static inline ivec dot4(ivec sum, ivec w, int32_t x4) {
  return _mm512_dpbusd_epi32(sum, w, _mm512_set1_epi32(x4));
}
#define IADD _mm512_add_epi32
#else
typedef __m256 fvec;
typedef __m256i ivec;
#define FSET1 _mm256_set1_ps
#define FZERO _mm256_setzero_ps
#define FLOAD _mm256_loadu_ps
#define FSTORE _mm256_storeu_ps
#define FADD _mm256_add_ps
#define FMUL _mm256_mul_ps
#define FMA _mm256_fmadd_ps
#define ITOF _mm256_cvtepi32_ps
#define IZERO _mm256_setzero_si256
#define HALVES 2
static inline ivec nibbles(const uint8_t *p, int high) {
  const __m256i v = _mm256_loadu_si256((const __m256i *)p);
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
}
static inline ivec dot4(ivec sum, ivec w, int32_t x4) {
  const __m256i pairs = _mm256_maddubs_epi16(w, _mm256_set1_epi32(x4)); /* |pair| <= 3810 */
  return _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#define IADD _mm256_add_epi32
#endif
#define LANES (W4A8_COLUMNS / HALVES)

/* R rows of quantized x times one tile, all of k; h: which register-wide part of the tile */
static inline __attribute__((always_inline)) void w4a8_rows(
    int r_rows, int h, const int8_t *restrict qx, const float *restrict scales,
    const uint8_t *restrict tile, int k, float *restrict y, long n, const float *restrict bias) {
  fvec acc[W4A8_ROWS];
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) acc[r] = FZERO();
  for (int kb = 0; kb < k / W4A8_BLOCK; kb++, tile += W4A8_TILE_BYTES) {
    const float *d = (const float *)tile + h * LANES, *m = d + W4A8_COLUMNS;
    ivec lo[4], hi[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
      lo[g] = nibbles(tile + 128 + 64 * g + 32 * h, 0);
      hi[g] = nibbles(tile + 128 + 64 * g + 32 * h, 1);
    }
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++) {
      const int32_t *x4 = (const int32_t *)(qx + (long)r * k + kb * W4A8_BLOCK);
      ivec s0 = IZERO(), s1 = IZERO();
#pragma GCC unroll 4
      for (int g = 0; g < 4; g++) {
        s0 = dot4(s0, lo[g], x4[g]);
        s1 = dot4(s1, hi[g], x4[4 + g]);
      }
      const float *sc = scales + ((long)r * (k / W4A8_BLOCK) + kb) * 2;
      acc[r] = FMA(ITOF(IADD(s0, s1)), FMUL(FLOAD(d), FSET1(sc[0])), acc[r]);
      acc[r] = FMA(FLOAD(m), FSET1(sc[1]), acc[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++)
    FSTORE(y + r * n + h * LANES, bias ? FADD(acc[r], FLOAD(bias + h * LANES)) : acc[r]);
}

static void w4a8_tile(int r_rows, const int8_t *qx, const float *scales, const uint8_t *tile,
                      int k, float *y, long n, const float *bias) {
  for (int h = 0; h < HALVES; h++) switch (r_rows) {
      case 1: w4a8_rows(1, h, qx, scales, tile, k, y, n, bias); break;
      case 2: w4a8_rows(2, h, qx, scales, tile, k, y, n, bias); break;
      case 3: w4a8_rows(3, h, qx, scales, tile, k, y, n, bias); break;
      case 4: w4a8_rows(4, h, qx, scales, tile, k, y, n, bias); break;
      case 5: w4a8_rows(5, h, qx, scales, tile, k, y, n, bias); break;
      default: w4a8_rows(6, h, qx, scales, tile, k, y, n, bias); break;
    }
}

void w4a8_linear_f32(float *y, const float *x, int m, int k, const uint8_t *w, int n,
                     const float *bias, int num_threads) {
  const int blocks = k / W4A8_BLOCK;
  int8_t *qx = malloc((size_t)m * k + 1);
  float *scales = malloc(sizeof(float) * 2 * ((size_t)m * blocks + 1));
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (long rb = 0; rb < (long)m * blocks; rb++)
      quantize_block(x + rb * W4A8_BLOCK, qx + rb * W4A8_BLOCK, scales + 2 * rb);
#pragma omp for schedule(static)
    for (int t = 0; t < n / W4A8_COLUMNS; t++)
      for (int row = 0; row < m; row += W4A8_ROWS)
        w4a8_tile(m - row < W4A8_ROWS ? m - row : W4A8_ROWS, qx + (long)row * k,
                  scales + (long)row * blocks * 2, w + (long)t * blocks * W4A8_TILE_BYTES, k,
                  y + (long)row * n + t * W4A8_COLUMNS, n, bias ? bias + t * W4A8_COLUMNS : NULL);
  }
  free(qx);
  free(scales);
}
#endif
