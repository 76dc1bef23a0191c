/* A Llama model's decoder stack in one call (cpu_forward.py), on one rank: the same kernels, in
 * the same order, as the layers' Python forward calls them one by one, so the same bits. From
 * Python a step is ~300 module calls and ctypes calls that cost 4.5 ms on a fast core and 13 on a
 * slow one, against 13-16 ms of linears at one stream.
 *
 * x [tokens, hidden] holds the embeddings on entry and the final norm's output on return;
 * residual, qkv, attn, gate_up and act are scratch of [tokens, hidden / qkv / q / 2 I / I]. */
#if defined(__AVX2__) && defined(__FMA__)
#include <stdint.h>
#include <string.h>

enum { BLOCK_QUANT = 0, PANEL = 1, W4A8 = 2 }; /* the packed forms of linear.py */
typedef struct {
  int kind, bits, in_features, out_features;
  const void *weight, *bias, *blocks; /* blocks: a bf16 panel's block-quantized twin, or NULL */
} Linear;
typedef struct {
  Linear qkv, o, gate_up, down;
  const void *input_norm, *post_norm;
  void *k_cache, *v_cache;
} Layer;
typedef struct {
  int num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
  float eps, scale;
  const Layer *layers;
  const void *final_norm, *cos, *sin;
} Model;
/* rows [start, start + rows) of the step attend through their own block tables and lengths */
typedef struct {
  int64_t start, rows, width;
  const int64_t *tables, *lens;
} AttentionRows;

void block_quant_linear_f32(float *, const float *, int, int, const uint8_t *, int, int,
                            const float *, int);
void w4a8_linear_f32(float *, const float *, int, int, const uint8_t *, int, int, const float *,
                     int);
void panel_linear_f32(float *, const float *, int, int, const float *, int, const float *, int);
void panel_linear_bf16(uint16_t *, const uint16_t *, int, int, const uint32_t *, int,
                       const uint16_t *, int, const uint8_t *, int);
void w4a8_linear_bf16(uint16_t *, const uint16_t *, int, int, const uint8_t *, int, int,
                      const uint16_t *, int);

static void linear_f32(const Linear *l, float *y, const float *x, int m, int threads) {
  const int k = l->in_features, n = l->out_features;
  if (l->kind == PANEL)
    panel_linear_f32(y, x, m, k, l->weight, n, l->bias, threads);
  else
    (l->kind == W4A8 ? w4a8_linear_f32 : block_quant_linear_f32)(y, x, m, k, l->weight, n, l->bits,
                                                                   l->bias, threads);
}
static void linear_bf16(const Linear *l, uint16_t *y, const uint16_t *x, int m, int threads) {
  const int k = l->in_features, n = l->out_features;
  if (l->kind == W4A8)
    w4a8_linear_bf16(y, x, m, k, l->weight, n, l->bits, l->bias, threads);
  else
    panel_linear_bf16(y, x, m, k, l->weight, n, l->bias, threads, l->blocks, l->bits);
}

#define DEFINE_MODEL(S, T)                                                                        \
  void decode_attention_##S(T *, const T *, int64_t, const T *, const T *, const int64_t *,      \
                            const int64_t *, int, int, int, int, int, int, float, int);           \
  void write_kv_##S(T *, T *, const T *, const T *, int64_t, const int64_t *, int, int);         \
  void rotary_##S(T *, int64_t, int, int, int, const int64_t *, const T *, const T *, int);      \
  void add_rms_norm_##S(T *, T *, T *, const T *, int, int, float, int);                         \
  void silu_and_mul_##S(T *, const T *, int, int, int);                                          \
                                                                                                  \
  void llama_forward_##S(const Model *m, T *x, T *residual, int tokens, const int64_t *positions, \
                         const int64_t *slots, const AttentionRows *groups, int num_groups,      \
                         T *qkv, T *attn, T *gate_up, T *act, int threads) {                     \
    const int d = m->head_dim, q_size = m->num_heads * d, kv_size = m->num_kv_heads * d;          \
    const int qkv_size = q_size + 2 * kv_size;                                                    \
    memcpy(residual, x, sizeof(T) * tokens * m->hidden);                                          \
    for (int i = 0; i < m->num_layers; i++) {                                                     \
      const Layer *l = m->layers + i;                                                             \
      add_rms_norm_##S(x, x, i ? residual : NULL, l->input_norm, tokens, m->hidden, m->eps,      \
                       threads);                                                                  \
      linear_##S(&l->qkv, qkv, x, tokens, threads);                                               \
      /* q's heads and k's are adjacent in a QKV row: one rotary call rotates both */             \
      rotary_##S(qkv, qkv_size, tokens, m->num_heads + m->num_kv_heads, d, positions, m->cos,    \
                 m->sin, threads);                                                                \
      write_kv_##S(l->k_cache, l->v_cache, qkv + q_size, qkv + q_size + kv_size, qkv_size, slots, \
                   tokens, kv_size);                                                              \
      for (int g = 0; g < num_groups; g++) {                                                      \
        const AttentionRows *r = groups + g;                                                      \
        decode_attention_##S(attn + r->start * q_size, qkv + r->start * qkv_size, qkv_size,       \
                             l->k_cache, l->v_cache, r->tables, r->lens, (int)r->rows,            \
                             (int)r->width, m->num_heads, m->num_kv_heads, d, m->block_size,      \
                             m->scale, threads);                                                  \
      }                                                                                           \
      linear_##S(&l->o, x, attn, tokens, threads);                                                \
      add_rms_norm_##S(x, x, residual, l->post_norm, tokens, m->hidden, m->eps, threads);         \
      linear_##S(&l->gate_up, gate_up, x, tokens, threads);                                       \
      silu_and_mul_##S(act, gate_up, tokens, m->intermediate, threads);                           \
      linear_##S(&l->down, x, act, tokens, threads);                                              \
    }                                                                                             \
    add_rms_norm_##S(x, x, residual, m->final_norm, tokens, m->hidden, m->eps, threads);          \
  }

DEFINE_MODEL(f32, float)
DEFINE_MODEL(bf16, uint16_t)
#endif
