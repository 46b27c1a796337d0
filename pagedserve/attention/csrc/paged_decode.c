/* Paged attention for decode on CPU: one query token per request, K/V read once
 * straight from the block pool (no gather copy), GQA heads of one KV head share each K/V row.
 * Layout: q/out [R, H, D]; k_cache/v_cache [num_blocks, block_size, KVH, D];
 * block_tables [R, max_blocks] int32; seq_lens [R] int32. Parallel over (request, kv head).
 * window > 0: only the last `window` keys are seen (sliding window); window < 0: only those of the
 * query's chunk of -window positions (chunked local attention, Llama 4); softcap > 0: scores become
 * softcap * tanh(score / softcap) before the softmax (Gemma 2); sinks (NULL: none) [H]: one more
 * logit per head in the softmax's denominator, with no value (GPT-OSS's attention sinks); alibi (NULL:
 * none) [H]: each score gains alibi[h] * (key position - query position) after the softcap (BLOOM, MPT).
 * Two variants: float32 K/V, and bfloat16 K/V (bf16 is the top half of a float32, so a load
 * is a 16-bit shift); q and out are float32 in both. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float f32_load(float x) { return x; }

static inline float bf16_load(uint16_t h) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

#define DEFINE_PAGED_DECODE(NAME, KV_T, LOAD) \
void NAME(float *out, const float *q, const KV_T *k_cache, const KV_T *v_cache, \
                      const int32_t *block_tables, const int32_t *seq_lens, const float *sinks, \
                      const float *alibi, \
                      int num_reqs, int num_heads, \
                      int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale, \
                      int window, float softcap, int num_threads) { \
    const int group = num_heads / num_kv_heads; \
    const long row = (long)num_kv_heads * head_dim;           /* elements per token in the cache */ \
    const long block = (long)block_size * row;                /* elements per block */ \
_Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)") \
    for (int r = 0; r < num_reqs; r++) { \
        for (int kvh = 0; kvh < num_kv_heads; kvh++) { \
            const int last = seq_lens[r] - 1; /* the query's position */ \
            const int first = window > 0 ? (last + 1 > window ? last + 1 - window : 0) \
                              : window < 0 && last > 0 ? last - last % -window : 0; \
            const int len = seq_lens[r] - first; /* keys [first, seq_len) */ \
            const int32_t *table = block_tables + (long)r * max_blocks; \
            float *scores = (float *)malloc(sizeof(float) * (size_t)group * (size_t)len); \
            float *acc = (float *)calloc((size_t)group * (size_t)head_dim, sizeof(float)); \
            const float *qh = q + ((long)r * num_heads + (long)kvh * group) * head_dim; \
            float maxs[64]; \
            float sums[64]; \
            for (int g = 0; g < group; g++) \
                maxs[g] = sinks ? sinks[kvh * group + g] : -INFINITY, sums[g] = 0.f; \
            /* scores = q . k, one pass over K */ \
            for (int t = 0; t < len; t++) { \
                const int pos = first + t; \
                const KV_T *k = k_cache + (long)table[pos / block_size] * block + (long)(pos % block_size) * row \
                                 + (long)kvh * head_dim; \
                for (int g = 0; g < group; g++) { \
                    const float *qg = qh + (long)g * head_dim; \
                    float s = 0.f; \
_Pragma("omp simd reduction(+ : s)") \
                    for (int d = 0; d < head_dim; d++) s += qg[d] * LOAD(k[d]); \
                    s *= scale; \
                    if (softcap > 0.f) s = softcap * tanhf(s / softcap); \
                    if (alibi) s += alibi[kvh * group + g] * (float)(pos - last); \
                    scores[(long)g * len + t] = s; \
                    if (s > maxs[g]) maxs[g] = s; \
                } \
            } \
            for (int g = 0; g < group; g++) { \
                float *sg = scores + (long)g * len; \
                float sum = sinks ? expf(sinks[kvh * group + g] - maxs[g]) : 0.f; \
                for (int t = 0; t < len; t++) { \
                    sg[t] = expf(sg[t] - maxs[g]); \
                    sum += sg[t]; \
                } \
                sums[g] = sum; \
            } \
            /* out = softmax . v, one pass over V */ \
            for (int t = 0; t < len; t++) { \
                const int pos = first + t; \
                const KV_T *v = v_cache + (long)table[pos / block_size] * block + (long)(pos % block_size) * row \
                                 + (long)kvh * head_dim; \
                for (int g = 0; g < group; g++) { \
                    const float p = scores[(long)g * len + t]; \
                    float *a = acc + (long)g * head_dim; \
_Pragma("omp simd") \
                    for (int d = 0; d < head_dim; d++) a[d] += p * LOAD(v[d]); \
                } \
            } \
            for (int g = 0; g < group; g++) { \
                float *o = out + ((long)r * num_heads + (long)kvh * group + g) * head_dim; \
                const float inv = 1.f / sums[g]; \
                for (int d = 0; d < head_dim; d++) o[d] = acc[(long)g * head_dim + d] * inv; \
            } \
            free(scores); \
            free(acc); \
        } \
    } \
}

DEFINE_PAGED_DECODE(paged_decode_f32, float, f32_load)
DEFINE_PAGED_DECODE(paged_decode_bf16kv, uint16_t, bf16_load)
