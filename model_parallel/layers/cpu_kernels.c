/* CPU kernels for the decode step, loaded through ctypes by cpu_kernels.py.
 *
 * Decode attention reads K and V straight from the cache blocks: the torch path first gathers
 * every sequence's blocks (padded to the longest) into a new tensor. Rotary and add + RMSNorm
 * replace ten-odd small torch ops per call each. Every kernel exists for fp32 and bf16 (held in
 * uint16_t, computed in fp32). The elementwise ones round after each operation exactly as the
 * torch ops they replace do (no FMA contraction), so rotary is bit-identical to the torch path;
 * RMSNorm's sum of squares may differ from torch's in its last bit (another summation order), and
 * attention's softmax uses the polynomial exp below where SDPA uses its own.
 *
 * Attention is written in GCC's vector extension, in vectors as wide as the instruction set's
 * registers (16 floats with AVX512, 8 with AVX2, 4 on the baseline), so one source serves each;
 * every reduction in it has an order fixed by the row's own length and positions. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float ld_f32(const float *p) { return *p; }
static inline float st_f32(float x) { return x; }
static inline float ld_bf16(const uint16_t *p) {
  uint32_t u = (uint32_t)*p << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t st_bf16(float f) { /* round to nearest even, NaN kept, as torch */
  uint32_t u;
  memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float rnd_f32(float x) { return x; }
static inline float rnd_bf16(float x) { /* what a torch op in bf16 yields */
  const uint16_t h = st_bf16(x);
  return ld_bf16(&h);
}

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef float vf_unaligned __attribute__((vector_size(4 * LANES), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(2 * LANES), aligned(2)));

/* n <= LANES elements from p, the rest zero (n is LANES but for a head_dim's tail) */
static inline vf vload_f32(const float *p, int n) {
  if (n == LANES) return *(const vf_unaligned *)p;
  vf v = {0};
  for (int i = 0; i < n; i++) v[i] = p[i];
  return v;
}
static inline vf vload_bf16(const uint16_t *p, int n) {
  vh h = {0};
  if (n == LANES) {
#if LANES == 16 /* GCC widens a whole vector in halves, with three more instructions */
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16);
#elif LANES == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16);
#endif
    h = *(const vh_unaligned *)p;
  } else
    for (int i = 0; i < n; i++) h[i] = p[i];
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* rnd_bf16 and the stores of n <= LANES elements, a vector at a time */
static inline vf vrnd_f32(vf v) { return v; }
static inline vf vrnd_bf16(vf v) {
  const vu u = (vu)v;
  return vsel(v != v, (vf)((vu){0} + 0x7FC00000u), (vf)((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u));
}
static inline void vstore_f32(float *p, vf v, int n) {
  if (n == LANES) *(vf_unaligned *)p = v;
  else
    for (int i = 0; i < n; i++) p[i] = v[i];
}
static inline void vstore_bf16(uint16_t *p, vf v, int n) {
  const vh h = __builtin_convertvector((vu)vrnd_bf16(v) >> 16, vh);
  if (n == LANES) *(vh_unaligned *)p = h;
  else
    for (int i = 0; i < n; i++) p[i] = h[i];
}

static inline vi lane_index(void) {
  vi v;
  for (int i = 0; i < LANES; i++) v[i] = i;
  return v;
}

/* e^x for x <= 0: Cephes' expf polynomial after a two-constant ln 2 reduction; within 1.02 ulp of
 * exp() over every float in [-87, 0]. floor() is truncation, less one where it rounded up. */
static inline vf vexp_nonpositive(vf x) {
  x = vsel(x < -87.f, x - x - 87.f, x);
  const vf y = x * 1.44269504f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(y, vi), vf);
  n += __builtin_convertvector(n > y, vf); /* a true lane is -1 */
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = r - r + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

/* In place over x's n scores (x vector-aligned with room for whole vectors): lane-wise max and
 * sums over the vectors, then across the lanes in order */
static void softmax(float *x, int n) {
  const vi lane = lane_index();
  vf mv = (vf){0} - INFINITY, sv = {0};
  for (int t = 0; t < n; t += LANES) {
    const vf v = vsel(lane + t < n, *(vf *)(x + t), mv);
    mv = vsel(v > mv, v, mv);
  }
  float m = mv[0], sum = 0.f;
  for (int i = 1; i < LANES; i++) m = mv[i] > m ? mv[i] : m;
  for (int t = 0; t < n; t += LANES) {
    const vf e = vsel(lane + t < n, vexp_nonpositive(*(vf *)(x + t) - m), sv - sv);
    *(vf *)(x + t) = e;
    sv += e;
  }
  for (int i = 0; i < LANES; i++) sum += sv[i];
  const float inv = 1.f / sum;
  for (int t = 0; t < n; t += LANES) *(vf *)(x + t) *= inv;
}

/* The lane sums of LANES vectors in one vector, by halving: each step adds the even blocks of a
 * pair of vectors to their odd blocks, interleaved. Lane j ends up with the sum of x[BITREV[j]]. */
#define FOLD(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
#if LANES == 16
static const int BITREV[LANES] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
static inline vf lane_sums(const vf *x) {
  vf y[8], z[4], w[2];
  for (int i = 0; i < 8; i++)
    y[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           FOLD(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                31);
  for (int i = 0; i < 4; i++)
    z[i] = FOLD(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           FOLD(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30,
                31);
  for (int i = 0; i < 2; i++)
    w[i] = FOLD(z[2 * i], z[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           FOLD(z[2 * i], z[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30,
                31);
  return FOLD(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         FOLD(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
#elif LANES == 8
static const int BITREV[LANES] = {0, 4, 2, 6, 1, 5, 3, 7};
static inline vf lane_sums(const vf *x) {
  vf y[4], z[2];
  for (int i = 0; i < 4; i++)
    y[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           FOLD(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; i++)
    z[i] = FOLD(y[2 * i], y[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           FOLD(y[2 * i], y[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return FOLD(z[0], z[1], 0, 8, 2, 10, 4, 12, 6, 14) + FOLD(z[0], z[1], 1, 9, 3, 11, 5, 13, 7, 15);
}
#else
static const int BITREV[LANES] = {0, 2, 1, 3};
static inline vf lane_sums(const vf *x) {
  const vf y0 = FOLD(x[0], x[1], 0, 1, 4, 5) + FOLD(x[0], x[1], 2, 3, 6, 7);
  const vf y1 = FOLD(x[2], x[3], 0, 1, 4, 5) + FOLD(x[2], x[3], 2, 3, 6, 7);
  return FOLD(y0, y1, 0, 4, 2, 6) + FOLD(y0, y1, 1, 5, 3, 7);
}
#endif

/* Element offset of token t's row in a cache of [blocks, block_size, kv_heads, head_dim], through
 * a block table (block_size is a power of two: 1 << shift) */
static inline int64_t token_row(const int64_t *table, int t, int shift, int64_t token_stride) {
  return ((table[t >> shift] << shift) + (t & ((1 << shift) - 1))) * token_stride;
}

/* The K pass fetches K rows this many tokens ahead and each token's V row (read after the whole K
 * pass and softmax), into L2 (prefetcht1; with T0, whose misses queue for L1's few fill buffers,
 * and V fetched in its own pass, 32 rows of 30 layers' caches took 275-400 us a layer on a Zen 4
 * against 212-233, two threads; one layer's caches, kept in cache, 130-160 either way). */
#define PREFETCH_TOKENS 16
static inline void prefetch_row(const void *row, int bytes) {
  for (int i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)row + i, 0, 2);
}

/* One query row's heads over its ctx tokens, KV groups of G heads (head_dim in NC vectors, the
 * last one tail wide), a tile at a time through every group, so that a tile's K rows, then its V
 * rows, are read once and in the cache's order: scores a LANES-token tile at a time, softmax, then
 * the V rows weighted into accumulators that the TILE-token tiles carry through `accs`. GD x ND bound the arrays:
 * constants in a copy for one shape, so that they stay in registers (a variable-length array
 * lives in memory even where its bounds are constants). */
#define TILE 16
#define DEFINE_ATTEND(NAME, S, T, GD, ND)                                                         \
  static inline __attribute__((always_inline)) void NAME(                                         \
      T *out, const T *q, const T *k_cache, const T *v_cache, const int64_t *table, int ctx,      \
      int shift, int64_t token_stride, int KV, int G, int NC, int tail, float scale,              \
      float *scores, vf *accs) {                                                                  \
    const int head_dim = (NC - 1) * LANES + tail, pad = (ctx + TILE - 1) / TILE * TILE;           \
    const int row_bytes = head_dim * (int)sizeof(T);                                              \
    vf qv[GD][ND], acc[GD][ND], part[GD][LANES];                                                  \
    for (int t0 = 0; t0 < ctx; t0 += LANES)                                                       \
      for (int g = 0; g < KV; g++) {                                                              \
        const T *qg = q + g * G * head_dim, *kc = k_cache + g * head_dim;                         \
        for (int h = 0; h < G; h++)                                                               \
          for (int c = 0; c < NC; c++)                                                            \
            qv[h][c] = vload_##S(qg + h * head_dim + c * LANES, c == NC - 1 ? tail : LANES);      \
        for (int j = 0; j < LANES; j++) {                                                         \
          const int t = t0 + j;                                                                   \
          if (t == ctx) { /* the tile's last scores are zero, and masked off by softmax */        \
            for (int h = 0; h < G; h++)                                                           \
              for (int r = j; r < LANES; r++) part[h][BITREV[r]] = (vf){0};                       \
            break;                                                                                \
          }                                                                                       \
          const int64_t row = token_row(table, t, shift, token_stride);                           \
          if (t + PREFETCH_TOKENS < ctx)                                                          \
            prefetch_row(kc + token_row(table, t + PREFETCH_TOKENS, shift, token_stride),         \
                         row_bytes);                                                              \
          prefetch_row(v_cache + g * head_dim + row, row_bytes);                                  \
          const T *k = kc + row;                                                                  \
          vf kv[ND];                                                                              \
          for (int c = 0; c < NC; c++) kv[c] = vload_##S(k + c * LANES, c == NC - 1 ? tail : LANES); \
          for (int h = 0; h < G; h++) {                                                           \
            vf s = qv[h][0] * kv[0];                                                              \
            for (int c = 1; c < NC; c++) s += qv[h][c] * kv[c];                                   \
            part[h][BITREV[j]] = s;                                                               \
          }                                                                                       \
        }                                                                                         \
        for (int h = 0; h < G; h++)                                                               \
          *(vf *)(scores + (g * G + h) * pad + t0) = lane_sums(part[h]) * scale;                  \
      }                                                                                           \
    for (int h = 0; h < KV * G; h++) softmax(scores + h * pad, ctx);                              \
    for (int t0 = 0; t0 < ctx; t0 += TILE) {                                                      \
      const int t1 = t0 + TILE < ctx ? t0 + TILE : ctx;                                           \
      for (int g = 0; g < KV; g++) {                                                              \
        const T *vc = v_cache + g * head_dim;                                                     \
        const float *sg = scores + g * G * pad;                                                   \
        vf *ag = accs + g * GD * ND;                                                              \
        for (int h = 0; h < G; h++)                                                               \
          for (int c = 0; c < NC; c++) acc[h][c] = t0 ? ag[h * ND + c] : (vf){0};                 \
        for (int t = t0; t < t1; t++) {                                                           \
          const T *v = vc + token_row(table, t, shift, token_stride);                             \
          for (int c = 0; c < NC; c++) {                                                          \
            const vf vv = vload_##S(v + c * LANES, c == NC - 1 ? tail : LANES);                   \
            for (int h = 0; h < G; h++) acc[h][c] += sg[h * pad + t] * vv;                        \
          }                                                                                       \
        }                                                                                         \
        if (t1 < ctx)                                                                             \
          for (int h = 0; h < G; h++)                                                             \
            for (int c = 0; c < NC; c++) ag[h * ND + c] = acc[h][c];                              \
        else                                                                                      \
          for (int h = 0; h < G; h++)                                                             \
            for (int c = 0; c < NC; c++)                                                          \
              vstore_##S(out + (g * G + h) * head_dim + c * LANES, acc[h][c],                     \
                         c == NC - 1 ? tail : LANES);                                             \
      }                                                                                           \
    }                                                                                             \
  }

DEFINE_ATTEND(attend_f32, f32, float, G, NC)
DEFINE_ATTEND(attend_bf16, bf16, uint16_t, G, NC)
DEFINE_ATTEND(attend_3x64_f32, f32, float, 3, 64 / LANES)
DEFINE_ATTEND(attend_3x64_bf16, bf16, uint16_t, 3, 64 / LANES)

/* aligned_alloc in whole 64-byte lines, as C11 asks */
static void *alloc_lines(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

#define DEFINE_KERNELS(S, T)                                                                      \
  /* out[b] = softmax(q[b] . K^T * scale) V over the context_lens[b] tokens of sequence b, each   \
   * query head reading its KV group's head. A task is one sequence, all its KV groups a tile at  \
   * a time, so its K rows, then its V rows, are read once and in order (a task a KV group, the   \
   * threads interleaving a row's heads, ran 5-8% slower over a step's cold caches); batches      \
   * under two sequences a thread split each one's groups. q's rows are q_stride apart. */        \
  void decode_attention_##S(T *out, const T *q, int64_t q_stride, const T *k_cache,               \
                            const T *v_cache, const int64_t *block_tables,                        \
                            const int64_t *context_lens, int num_seqs, int max_blocks,            \
                            int num_heads, int num_kv_heads, int head_dim, int block_size,        \
                            float scale, int num_threads) {                                       \
    const int G = num_heads / num_kv_heads, NC = (head_dim + LANES - 1) / LANES;                  \
    const int tail = head_dim - (NC - 1) * LANES, shift = __builtin_ctz(block_size);              \
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;                                \
    /* a task is a sequence, its KV groups in turn, but for batches too small to share out */    \
    const int split = num_seqs < 2 * num_threads ? num_kv_heads : 1;                              \
    const int groups = num_kv_heads / split;                                                      \
    int max_context = 1;                                                                          \
    for (int b = 0; b < num_seqs; b++)                                                            \
      if (context_lens[b] > max_context) max_context = (int)context_lens[b];                      \
    /* tasks are taken one ahead (not `omp for`), so that a thread can prefetch its next */      \
    int next_task = 0;                                                                            \
    const int task_bytes = groups * head_dim * (int)sizeof(T);                                    \
    _Pragma("omp parallel num_threads(num_threads)") {                                            \
      /* each head's scores padded to whole tiles, and each head's V accumulators */             \
      const size_t padded = (size_t)(max_context + TILE - 1) / TILE * TILE;                       \
      float *scores = alloc_lines(sizeof(float) * num_heads * padded);                            \
      vf *accs = alloc_lines(sizeof(vf) * num_heads * NC);                                        \
      const int tasks = num_seqs * split;                                                         \
      int task = __atomic_fetch_add(&next_task, 1, __ATOMIC_RELAXED);                             \
      for (int after; task < tasks; task = after) {                                               \
        after = __atomic_fetch_add(&next_task, 1, __ATOMIC_RELAXED);                              \
        if (after < tasks) { /* the next task's first K tile, a whole task ahead */              \
          const int nb = after / split, ctx_next = (int)context_lens[nb];                        \
          const int first = ctx_next < TILE ? ctx_next : TILE;                                    \
          const int64_t *nt = block_tables + (int64_t)nb * max_blocks;                            \
          const T *nk = k_cache + after % split * groups * head_dim;                              \
          for (int t = 0; t < first; t++)                                                         \
            prefetch_row(nk + token_row(nt, t, shift, token_stride), task_bytes);                 \
        }                                                                                         \
        const int b = task / split, g0 = task % split * groups, ctx = (int)context_lens[b];       \
        T *o = out + (int64_t)b * num_heads * head_dim + g0 * G * head_dim;                       \
        const T *qb = q + b * q_stride + g0 * G * head_dim;                                       \
        const T *kc = k_cache + g0 * head_dim, *vc = v_cache + g0 * head_dim;                     \
        const int64_t *table = block_tables + (int64_t)b * max_blocks;                            \
        if (G == 3 && head_dim == 64) /* SmolLM2's: the unrolled copy */                          \
          attend_3x64_##S(o, qb, kc, vc, table, ctx, shift, token_stride, groups, 3, 64 / LANES,  \
                          LANES, scale, scores, accs);                                            \
        else                                                                                      \
          attend_##S(o, qb, kc, vc, table, ctx, shift, token_stride, groups, G, NC, tail, scale,  \
                     scores, accs);                                                               \
      }                                                                                           \
      free(accs);                                                                                 \
      free(scores);                                                                               \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  /* Each token's new K and V rows (row elements, token rows `stride` apart: views into the QKV   \
   * output) into its slot of the caches [slots, row]: both in one call, where two index_copy_    \
   * calls cost ~20 us a layer */                                                                 \
  void write_kv_##S(T *k_cache, T *v_cache, const T *k, const T *v, int64_t stride,               \
                    const int64_t *slots, int num_tokens, int row) {                              \
    for (int t = 0; t < num_tokens; t++) {                                                        \
      memcpy(k_cache + slots[t] * row, k + t * stride, sizeof(T) * row);                          \
      memcpy(v_cache + slots[t] * row, v + t * stride, sizeof(T) * row);                          \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  /* In place on x [tokens, heads, head_dim] (rows row_stride apart): neox-style rotary, as       \
   * x * cos + rotate_half(x) * sin with cos/sin rows picked by position */                       \
  __attribute__((optimize("fp-contract=off"))) void rotary_##S(                                   \
      T *x, int64_t row_stride, int num_tokens, int num_heads, int head_dim,                      \
      const int64_t *positions, const T *cos, const T *sin, int num_threads) {                    \
    const int half = head_dim / 2;                                                                \
    _Pragma("omp parallel for num_threads(num_threads) if (num_tokens >= 64)") for (int t = 0;    \
                                                                                  t < num_tokens; \
                                                                                  t++) {          \
      const T *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;             \
      for (int h = 0; h < num_heads; h++) {                                                       \
        T *y = x + (int64_t)t * row_stride + h * head_dim;                                        \
        for (int i = 0; i < half; i++) {                                                          \
          const float a = ld_##S(y + i), b = ld_##S(y + i + half);                                \
          const float lo = rnd_##S(a * ld_##S(c + i)) + rnd_##S(-b * ld_##S(s + i));              \
          const float hi = rnd_##S(b * ld_##S(c + i + half)) + rnd_##S(a * ld_##S(s + i + half)); \
          y[i] = st_##S(lo);                                                                      \
          y[i + half] = st_##S(hi);                                                               \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  /* With a residual: residual += x, then out = weight * rmsnorm(residual); else out = weight *   \
   * rmsnorm(x). The norm in fp32, as HF Llama. out may be x. */                                  \
  __attribute__((optimize("fp-contract=off"))) void add_rms_norm_##S(                             \
      T *out, T *x, T *residual, const T *weight, int num_tokens, int hidden, float eps,          \
      int num_threads) {                                                                          \
    _Pragma("omp parallel for num_threads(num_threads) if (num_tokens >= 64)") for (int t = 0;    \
                                                                                  t < num_tokens; \
                                                                                  t++) {          \
      T *xr = x + (int64_t)t * hidden, *src = xr;                                                 \
      if (residual) {                                                                             \
        src = residual + (int64_t)t * hidden;                                                     \
        for (int i = 0; i < hidden; i++) src[i] = st_##S(ld_##S(xr + i) + ld_##S(src + i));       \
      }                                                                                           \
      float ss = 0.f;                                                                             \
      _Pragma("omp simd reduction(+ : ss)") for (int i = 0; i < hidden; i++) ss +=                \
          ld_##S(src + i) * ld_##S(src + i);                                                      \
      const float inv = 1.f / sqrtf(ss / hidden + eps);                                           \
      T *o = out + (int64_t)t * hidden;                                                           \
      for (int i = 0; i < hidden; i++)                                                            \
        o[i] = st_##S(ld_##S(weight + i) * rnd_##S(ld_##S(src + i) * inv));                       \
    }                                                                                             \
  }

#define DEFINE_SILU_AND_MUL(S, T)                                                                 \
  /* out [tokens, n] = silu(x[:, :n]) * x[:, n:] for x [tokens, 2n]: SwiGLU, rounded as torch's   \
   * two ops are (silu's result, then the product); silu from e = exp(-|g|), the polynomial above \
   * (torch's differs in its last bits), so it never overflows */                                 \
  void silu_and_mul_##S(T *out, const T *x, int num_tokens, int n, int num_threads) {             \
    _Pragma("omp parallel for num_threads(num_threads) if (num_tokens >= 16)") for (int t = 0;    \
                                                                                  t < num_tokens; \
                                                                                  t++) {          \
      const T *g = x + (int64_t)t * 2 * n, *u = g + n;                                            \
      T *o = out + (int64_t)t * n;                                                                \
      for (int i = 0; i < n; i += LANES) {                                                        \
        const int w = n - i < LANES ? n - i : LANES;                                              \
        const vf a = vload_##S(g + i, w);                                                         \
        const vf e = vexp_nonpositive((vf)((vi)a | INT32_MIN)); /* -|g| */                        \
        const vf s = vsel(a >= 0.f, a, a * e) / (1.f + e); /* a / (1 + e), or a e / (1 + e) */    \
        vstore_##S(o + i, vrnd_##S(s) * vload_##S(u + i, w), w);                                  \
      }                                                                                           \
    }                                                                                             \
  }

/* One vector of a row into argmax's lane-wise maxima: strictly greater, so a lane keeps its first */
static inline void argmax_step(vf v, int t, vi lane, vf *best, vi *at, vi *nan) {
  const vi up = v > *best;
  *best = vsel(up, v, *best);
  *at = (*at & ~up) | ((lane + t) & up);
  *nan |= v != v;
}

#define DEFINE_ARGMAX(S, T)                                                                       \
  /* out[r] = the index of row r's largest of n values, as torch's max(-1).indices has it: the    \
   * first of equal maxima, the first NaN where the row has one. Greedy decoding takes it on the  \
   * LM head's own logits, which widening to fp32 would not reorder. Four vectors of maxima, so   \
   * that their compare-and-select chains overlap; the reduction breaks ties by index. */         \
  void argmax_##S(int64_t *out, const T *x, int rows, int n, int num_threads) {                   \
    const vi lane = lane_index();                                                                 \
    _Pragma("omp parallel for num_threads(num_threads) if (rows > 1)") for (int r = 0; r < rows;  \
                                                                           r++) {                 \
      const T *row = x + (int64_t)r * n;                                                          \
      vf best[4];                                                                                 \
      vi at[4], nan = {0};                                                                        \
      for (int j = 0; j < 4; j++) best[j] = (vf){0} - INFINITY, at[j] = lane;                     \
      int t = 0;                                                                                  \
      for (; t + 4 * LANES <= n; t += 4 * LANES)                                                  \
        for (int j = 0; j < 4; j++)                                                               \
          argmax_step(vload_##S(row + t + j * LANES, LANES), t + j * LANES, lane, best + j,      \
                      at + j, &nan);                                                              \
      for (; t < n; t += LANES) {                                                                 \
        const int w = n - t < LANES ? n - t : LANES;                                              \
        argmax_step(vsel(lane < w, vload_##S(row + t, w), (vf){0} - INFINITY), t, lane, best,    \
                    at, &nan);                                                                    \
      }                                                                                           \
      int64_t found = at[0][0];                                                                   \
      float m = best[0][0];                                                                       \
      for (int j = 0; j < 4; j++)                                                                 \
        for (int i = 0; i < LANES; i++)                                                           \
          if (best[j][i] > m || (best[j][i] == m && at[j][i] < found))                            \
            m = best[j][i], found = at[j][i];                                                     \
      for (int i = 0; i < LANES; i++)                                                             \
        if (nan[i]) { /* rare: find the first NaN */                                              \
          for (found = 0; ld_##S(row + found) == ld_##S(row + found); found++) {                  \
          }                                                                                       \
          break;                                                                                  \
        }                                                                                         \
      out[r] = found;                                                                             \
    }                                                                                             \
  }

DEFINE_ARGMAX(f32, float)
DEFINE_ARGMAX(bf16, uint16_t)
DEFINE_SILU_AND_MUL(f32, float)
DEFINE_SILU_AND_MUL(bf16, uint16_t)
DEFINE_KERNELS(f32, float)
DEFINE_KERNELS(bf16, uint16_t)
