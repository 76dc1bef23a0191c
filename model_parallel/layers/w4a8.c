/* 4-bit weights times 8-bit activations (`--quantization w4a8`, llama.cpp's Q4_1 x Q8 scheme):
 * y = x W^T + b where W is a GGUF Q4_1 weight (w = d q + m per 32 inputs, q in 0..15) or Q8_0
 * (w = d q, q in -127..127: the LM head) and each 32 inputs of a row of x are rounded to dx qx
 * (qx in -127..127, dx = max |x| / 127). Per output and block the product is then
 * d dx (sum q qx) [+ m dx (sum qx)]: the sums are exact integers
 * (vpdpbusd with AVX512-VNNI; vpmaddubsw + vpmaddwd on AVX2, the same integers), the rest one
 * fixed chain of fp32 operations per output, so the result is the same bits whatever the batch,
 * the thread count or the instruction set. The activations' rounding is the price: see the README.
 * A bf16 model's rows take the same path: widened to fp32 exactly, the outputs rounded to bf16 once.
 *
 * Layout (w4a8.py): per tile of 16 features and block of 32 inputs, 16 fp32 d; for 4 bits 16
 * fp32 m, then four groups of 64 bytes, byte 4j + b of group g holding feature j's q of input
 * 4g + b in its low nibble and of input 16 + 4g + b in its high one; for 8 bits eight groups,
 * byte 4j + b of group g holding q + 128 of input 4g + b. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define W4A8_COLUMNS 16
#define W4A8_BLOCK 32
static inline long w4a8_tile_bytes(int bits) { return bits == 4 ? 2 * 64 + 4 * 64 : 64 + 8 * 64; }
#define W4A8_ROWS 6

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
/* 8-bit weights as stored (q + 128, unsigned): sum (q + 128) qx, the 128 sum qx taken off after */
static inline ivec load_q8(const uint8_t *p) { return _mm512_loadu_si512(p); }
#define dot4_q8 dot4
#define Q8_OFFSET 128
#define IADD _mm512_add_epi32
#define ISET1 _mm512_set1_epi32
static inline fvec load_bf16(const uint16_t *p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline float hmax(fvec v) { return _mm512_reduce_max_ps(v); }
static inline int hsum(ivec v) { return _mm512_reduce_add_epi32(v); }
static inline void store_q(int8_t *q, const ivec *v) { /* a block's two vectors of int32 */
  for (int i = 0; i < 2; i++) _mm_storeu_si128((__m128i *)(q + 16 * i), _mm512_cvtsepi32_epi8(v[i]));
}
#define FMAX _mm512_max_ps
#define FTOI _mm512_cvtps_epi32 /* rounds as MXCSR says: to nearest even */
#define FABS(v) _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), ISET1(0x7FFFFFFF)))
/* round to nearest even, NaN kept: cpu_kernels.c's st_bf16, as torch */
static inline void store_bf16(uint16_t *p, fvec v) {
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, ISET1(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), ISET1(0x7FC0));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
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
/* 8-bit weights back to signed q; |qx| times q with qx's sign keeps each pair <= 32258 */
static inline ivec load_q8(const uint8_t *p) {
  return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi8((char)0x80));
}
static inline ivec dot4_q8(ivec sum, ivec w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#define Q8_OFFSET 0
#define IADD _mm256_add_epi32
#define ISET1 _mm256_set1_epi32
static inline fvec load_bf16(const uint16_t *p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float hmax(fvec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline int hsum(ivec v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
static inline void store_q(int8_t *q, const ivec *v) { /* a block's four vectors of int32 */
  /* packs work per 128-bit half: bytes come out as v0 lo, v1 lo, v2 lo, v3 lo | v0 hi, ... */
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                       _mm256_packs_epi32(v[2], v[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, order));
}
#define FMAX _mm256_max_ps
#define FTOI _mm256_cvtps_epi32
#define FABS(v) _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(v), ISET1(0x7FFFFFFF)))
static inline void store_bf16(uint16_t *p, fvec v) {
  const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, ISET1(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, ISET1(0x7FC0), nan);
  /* 32-bit lanes (each <= 0xFFFF) to 16: packus works per 128-bit half, the permute joins them */
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}
#endif
#define LANES (W4A8_COLUMNS / HALVES)
#define VECS (W4A8_BLOCK / LANES) /* registers a block of inputs takes */

/* One row's 32 inputs: qx (into q) and dx, dx * sum qx, sum qx (into scale[0..2]). The max
 * ignores NaN (max_ps returns its second operand then); the rest is exact, order aside. */
static inline void quantize_block(const fvec *x, int8_t *q, float *scale) {
  fvec amax = FZERO();
  for (int i = 0; i < VECS; i++) amax = FMAX(FABS(x[i]), amax);
  const float d = hmax(amax) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  ivec qi[VECS], sum = IZERO();
  for (int i = 0; i < VECS; i++) sum = IADD(sum, qi[i] = FTOI(FMUL(x[i], FSET1(inv))));
  store_q(q, qi);
  const int total = hsum(sum);
  scale[0] = d;
  scale[1] = d * (float)total;
  scale[2] = (float)total; /* |sum| <= 4064: exact */
}
static void quantize_row_block(const void *x, int bf16, int8_t *q, float *scale) {
  fvec v[VECS];
  for (int i = 0; i < VECS; i++)
    v[i] = bf16 ? load_bf16((const uint16_t *)x + i * LANES) : FLOAD((const float *)x + i * LANES);
  quantize_block(v, q, scale);
}

/* R rows of quantized x times one tile, all of k; h: which register-wide part of the tile; y and
 * bias are bf16 where bf16 is set, else fp32. R, h, bits and bf16 are constants in every copy. */
static inline __attribute__((always_inline)) void w4a8_rows(
    int r_rows, int h, int bits, int bf16, const int8_t *restrict qx, const float *restrict scales,
    const uint8_t *restrict tile, int k, void *restrict y, long n, const void *restrict bias) {
  fvec acc[W4A8_ROWS];
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) acc[r] = FZERO();
  for (int kb = 0; kb < k / W4A8_BLOCK; kb++, tile += w4a8_tile_bytes(bits)) {
    const float *d = (const float *)tile + h * LANES, *m = d + W4A8_COLUMNS;
    const uint8_t *q = tile + (bits == 4 ? 128 : 64) + 32 * h;
    ivec w[8];
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++)
      w[g] = bits == 4 ? nibbles(q + 64 * (g % 4), g / 4) : load_q8(q + 64 * g);
    /* Two sums a row, over weight groups 0-3 and 4-7, and a row's block into its accumulator
     * after its group 7. AVX512's 32 registers hold every row's sums: a group at a time over the
     * rows, so that a chain's next vpdpbusd comes R instructions on, past its latency (the Q8_0
     * LM head 14% faster); AVX2's 16 take a row at a time, its two chains in turn. */
    ivec sum[W4A8_ROWS][2];
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++) sum[r][0] = sum[r][1] = IZERO();
#pragma GCC unroll 48
    for (int i = 0; i < 8 * r_rows; i++) {
      const int g = HALVES == 1 ? i / r_rows : i % 2 * 4 + i % 8 / 2; /* AVX2: 0, 4, 1, 5, .. */
      const int r = HALVES == 1 ? i % r_rows : i / 8;
      const int32_t x4 = *(const int32_t *)(qx + (long)r * k + kb * W4A8_BLOCK + 4 * g);
      ivec *s = &sum[r][g / 4];
      *s = bits == 4 ? dot4(*s, w[g], x4) : dot4_q8(*s, w[g], x4);
      if (g == 7) {
        const float *sc = scales + ((long)r * (k / W4A8_BLOCK) + kb) * 3;
        ivec total = IADD(sum[r][0], sum[r][1]);
        if (bits == 8) total = IADD(total, ISET1(-Q8_OFFSET * (int)sc[2]));
        acc[r] = FMA(ITOF(total), FMUL(FLOAD(d), FSET1(sc[0])), acc[r]);
        if (bits == 4) acc[r] = FMA(FLOAD(m), FSET1(sc[1]), acc[r]);
      }
    }
  }
  if (bias) {
    const fvec b = bf16 ? load_bf16((const uint16_t *)bias + h * LANES)
                        : FLOAD((const float *)bias + h * LANES);
#pragma GCC unroll 6
    for (int r = 0; r < r_rows; r++) acc[r] = FADD(acc[r], b);
  }
#pragma GCC unroll 6
  for (int r = 0; r < r_rows; r++) {
    if (bf16)
      store_bf16((uint16_t *)y + r * n + h * LANES, acc[r]);
    else
      FSTORE((float *)y + r * n + h * LANES, acc[r]);
  }
}

#define W4A8_TILE(NAME, BITS, BF16)                                                               \
  static void NAME(int r_rows, const int8_t *qx, const float *scales, const uint8_t *tile, int k, \
                   void *y, long n, const void *bias) {                                           \
    for (int h = 0; h < HALVES; h++) switch (r_rows) {                                           \
        case 1: w4a8_rows(1, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;              \
        case 2: w4a8_rows(2, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;              \
        case 3: w4a8_rows(3, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;              \
        case 4: w4a8_rows(4, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;              \
        case 5: w4a8_rows(5, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;              \
        default: w4a8_rows(6, h, BITS, BF16, qx, scales, tile, k, y, n, bias); break;             \
      }                                                                                           \
  }
W4A8_TILE(w4a8_tile_q4, 4, 0)
W4A8_TILE(w4a8_tile_q8, 8, 0)
W4A8_TILE(w4a8_tile_q4_bf16, 4, 1)
W4A8_TILE(w4a8_tile_q8_bf16, 8, 1)
typedef void (*w4a8_tile)(int, const int8_t *, const float *, const uint8_t *, int, void *, long,
                          const void *);

int row_group(int left, int most); /* cpu_linear.c */

/* y = x W^T + b with x, y and b all fp32 or all bf16 (bf16: x widened exactly, y rounded once) */
static void w4a8_linear(void *y, const void *x, int bf16, int m, int k, const uint8_t *w, int n,
                        int bits, const void *bias, int num_threads) {
  const int blocks = k / W4A8_BLOCK, size = bf16 ? 2 : 4;
  const long per_tile = blocks * w4a8_tile_bytes(bits);
  const w4a8_tile tile = bits == 4 ? (bf16 ? w4a8_tile_q4_bf16 : w4a8_tile_q4)
                                   : (bf16 ? w4a8_tile_q8_bf16 : w4a8_tile_q8);
  int8_t *qx = malloc((size_t)m * k + 1);
  float *scales = malloc(sizeof(float) * 3 * ((size_t)m * blocks + 1));
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(dynamic, 16)
    for (long rb = 0; rb < (long)m * blocks; rb++)
      quantize_row_block((const char *)x + rb * W4A8_BLOCK * size, bf16, qx + rb * W4A8_BLOCK,
                         scales + 3 * rb);
#pragma omp for schedule(guided)
    for (int t = 0; t < n / W4A8_COLUMNS; t++)
      for (int row = 0, r_rows; row < m; row += r_rows) {
        r_rows = row_group(m - row, W4A8_ROWS);
        tile(r_rows, qx + (long)row * k, scales + (long)row * blocks * 3, w + t * per_tile, k,
             (char *)y + ((long)row * n + t * W4A8_COLUMNS) * size, n,
             bias ? (const char *)bias + t * W4A8_COLUMNS * size : NULL);
      }
  }
  free(qx);
  free(scales);
}

void w4a8_linear_f32(float *y, const float *x, int m, int k, const uint8_t *w, int n, int bits,
                     const float *bias, int num_threads) {
  w4a8_linear(y, x, 0, m, k, w, n, bits, bias, num_threads);
}
void w4a8_linear_bf16(uint16_t *y, const uint16_t *x, int m, int k, const uint8_t *w, int n,
                      int bits, const uint16_t *bias, int num_threads) {
  w4a8_linear(y, x, 1, m, k, w, n, bits, bias, num_threads);
}
#endif
