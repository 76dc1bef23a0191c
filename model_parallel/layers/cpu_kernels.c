/* CPU kernels for the decode step, loaded through ctypes by cpu_kernels.py.
 *
 * Decode attention reads K and V straight from the cache blocks: the torch path first gathers
 * every sequence's blocks (padded to the longest) into a new tensor. Rotary and add + RMSNorm
 * replace ten-odd small torch ops per call each. Every kernel exists for fp32 and bf16 (held in
 * uint16_t, computed in fp32). The elementwise ones round after each operation exactly as the
 * torch ops they replace do (no FMA contraction), so rotary is bit-identical to the torch path;
 * RMSNorm's sum of squares may differ from torch's in its last bit (another summation order), and
 * attention's softmax uses the polynomial exp below where SDPA uses its own. */
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

/* e^x for x <= 0 in a form the compiler vectorizes: Cephes' expf polynomial after a two-constant
 * ln 2 reduction; within 1.02 ulp of exp() over every float in [-87, 0] */
static inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = floorf(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

/* Offset of token t's row in a cache of [blocks, block_size, kv_heads, head_dim], through a block
 * table */
static inline int64_t token_row(const int64_t *table, int t, int block_size, int64_t token_stride) {
  return (table[t / block_size] * block_size + t % block_size) * token_stride;
}

static void softmax(float *x, int n) {
  float m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; i++) {
    x[i] = exp_nonpositive(x[i] - m);
    sum += x[i];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int i = 0; i < n; i++) x[i] *= inv;
}

#define DEFINE_KERNELS(S, T)                                                                      \
  /* out[b] = softmax(q[b] . K^T * scale) V over the context_lens[b] tokens of sequence b, each    \
   * query head reading its KV group's head. One sequence a task: its K rows, then its V rows,    \
   * are read once, block by block. q's rows are q_stride apart (a view into the QKV output). */  \
  void decode_attention_##S(T *out, const T *q, int64_t q_stride, const T *k_cache,              \
                            const T *v_cache, const int64_t *block_tables,                        \
                            const int64_t *context_lens, int num_seqs, int max_blocks,            \
                            int num_heads, int num_kv_heads, int head_dim, int block_size,        \
                            float scale, int num_threads) {                                       \
    const int group = num_heads / num_kv_heads, row = num_heads * head_dim;                       \
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;                               \
    int max_context = 1;                                                                          \
    for (int b = 0; b < num_seqs; b++)                                                            \
      if (context_lens[b] > max_context) max_context = (int)context_lens[b];                      \
    _Pragma("omp parallel num_threads(num_threads)") {                                            \
      float *scores = malloc(sizeof(float) * num_heads * max_context);                            \
      float *acc = malloc(sizeof(float) * row), *qf = malloc(sizeof(float) * row);                \
      float *kv = malloc(sizeof(float) * head_dim);                                               \
      _Pragma("omp for schedule(dynamic, 1)") for (int b = 0; b < num_seqs; b++) {                \
        const int ctx = (int)context_lens[b];                                                     \
        const int64_t *table = block_tables + (int64_t)b * max_blocks;                            \
        for (int i = 0; i < row; i++) qf[i] = ld_##S(q + b * q_stride + i);                       \
        for (int t = 0; t < ctx; t++) {                                                           \
          const T *k = k_cache + token_row(table, t, block_size, token_stride);                   \
          for (int g = 0; g < num_kv_heads; g++) { /* widened once for the group's heads */       \
            for (int i = 0; i < head_dim; i++) kv[i] = ld_##S(k + g * head_dim + i);              \
            for (int h = g * group; h < (g + 1) * group; h++) {                                   \
              const float *qh = qf + h * head_dim;                                                \
              float s = 0.f;                                                                      \
              _Pragma("omp simd reduction(+ : s)") for (int i = 0; i < head_dim; i++) s +=        \
                  qh[i] * kv[i];                                                                  \
              scores[h * ctx + t] = s * scale;                                                    \
            }                                                                                     \
          }                                                                                       \
        }                                                                                         \
        for (int h = 0; h < num_heads; h++) softmax(scores + h * ctx, ctx);                       \
        memset(acc, 0, sizeof(float) * row);                                                      \
        for (int t = 0; t < ctx; t++) {                                                           \
          const T *v = v_cache + token_row(table, t, block_size, token_stride);                   \
          for (int g = 0; g < num_kv_heads; g++) {                                                \
            for (int i = 0; i < head_dim; i++) kv[i] = ld_##S(v + g * head_dim + i);              \
            for (int h = g * group; h < (g + 1) * group; h++) {                                   \
              const float p = scores[h * ctx + t];                                                \
              float *a = acc + h * head_dim;                                                      \
              _Pragma("omp simd") for (int i = 0; i < head_dim; i++) a[i] += p * kv[i];           \
            }                                                                                     \
          }                                                                                       \
        }                                                                                         \
        for (int i = 0; i < row; i++) out[(int64_t)b * row + i] = st_##S(acc[i]);                 \
      }                                                                                           \
      free(scores);                                                                               \
      free(acc);                                                                                  \
      free(qf);                                                                                   \
      free(kv);                                                                                   \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  /* In place on x [tokens, heads, head_dim] (rows row_stride apart): neox-style rotary, as       \
   * x * cos + rotate_half(x) * sin with cos/sin rows picked by position */                      \
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
        for (int i = 0; i < hidden; i++) src[i] = st_##S(ld_##S(xr + i) + ld_##S(src + i));      \
      }                                                                                           \
      float ss = 0.f;                                                                             \
      _Pragma("omp simd reduction(+ : ss)") for (int i = 0; i < hidden; i++) ss +=                \
          ld_##S(src + i) * ld_##S(src + i);                                                      \
      const float inv = 1.f / sqrtf(ss / hidden + eps);                                           \
      T *o = out + (int64_t)t * hidden;                                                           \
      for (int i = 0; i < hidden; i++)                                                            \
        o[i] = st_##S(ld_##S(weight + i) * rnd_##S(ld_##S(src + i) * inv));                      \
    }                                                                                             \
  }

DEFINE_KERNELS(f32, float)
DEFINE_KERNELS(bf16, uint16_t)
