/* A stage's decoder layers in one call, for weights held as int4a8 (q4a8.c's kernel).
 *
 * Why it exists: with the layers' matrices on q4a8.c's kernel, a one-row forward of the embedded
 * model spent about two thirds of its time outside them: ~1,000 small torch ops per token (norms,
 * RoPE, attention, views, casts, residuals), each costing microseconds of dispatch whatever its size.
 * Here the whole stack runs in C: per layer four calls of the kernel and a few plain loops.
 *
 * It is models.layers.decoder_layer for this format, computed the same way step by step: the same
 * rounding points to the activations' dtype (bf16 or fp32) as the torch ops (every matrix product,
 * RoPE's two steps, the attention output, each residual sum, SiLU and its product), fp32 inside
 * the attention. The attention itself differs from SDPA's in its order of sums, so results match
 * the torch path within a few steps of the dtype, not bitwise.
 *
 * What the oracle needs, and has here: every row's result is bitwise the same in any batch. A row's
 * matrix products are (q4a8.c); a row's attention sums over exactly the cache entries its mask allows,
 * in ascending order, each key's score a fixed-shape sum wherever the key falls (in a block of 8 or
 * alone), whatever the other rows; a row of a verified tree and the same token decoded alone after a
 * prune see the same keys in the same order.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4a8.h"

typedef struct {
    const uint8_t *w; /* q4a8.c's packed layout */
    int64_t blocks, out;
} q4a8_matrix;

typedef struct {
    q4a8_matrix qkv, o, gate_up, down; /* gate_up: the gate's rows, then the up projection's */
    const void *bqkv;                  /* the q/k/v bias in the activations' dtype, or NULL */
    const void *attn_norm, *ffn_norm;  /* RMS norm weights in the activations' dtype */
} q4a8_layer;

typedef struct {
    int64_t rows;        /* this request's rows, consecutive in x */
    void *k, *v;         /* its cache: (layers, kv heads, cap, head dim) in the activations' dtype */
    int64_t cap, past;   /* capacity and live entries before this forward */
    const uint8_t *mask; /* rows x (past + rows), nonzero where a row may attend; NULL: all entries */
} q4a8_item;

/* n values rounded to bf16 in place (none with fp32 activations); branch-free, so it vectorises.
 * (A NaN may come out as an infinity, where torch keeps it a NaN: either way the row is lost.) */
static void round_all(float *v, int64_t n, int bf16) {
    if (!bf16) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, v + i, 4);
        b += 0x7fffu + ((b >> 16) & 1u);
        b &= 0xffff0000u;
        memcpy(v + i, &b, 4);
    }
}

static inline float get(const void *p, int bf16, int64_t at) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[at]) : ((const float *)p)[at];
}

static inline void put(void *p, int bf16, int64_t at, float v) {
    if (bf16)
        ((uint16_t *)p)[at] = float_to_bf16(v);
    else
        ((float *)p)[at] = v;
}

/* 8 floats as one vector (GCC's vector extension: AVX on x86-64, NEON pairs on aarch64), and the
 * same loaded from an address aligned only to a float. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) for x <= 0 (softmax after subtracting the maximum; SiLU through exp(-|x|)), within a few
 * ulp of expf: Cody-Waite range reduction and a degree-6 polynomial. exp8 does 8 at once (the C
 * library's expf is a call per element, and at a tree's many rows the softmaxes and SiLUs took
 * longer than the matrices); exp1, for the tails, is exp8 on one value, so an element's result does
 * not depend on where it falls in a vector. Plain multiplies and adds, no
 * fused ones, in both. Rounding to an integer by the 1.5 * 2^23 trick (|x| / ln 2 < 2^22) is what
 * nearbyintf gives. */
#define EXP_LOW -87.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_MAGIC 12582912.0f
#define EXP_C1 0.693359375f
#define EXP_C2 -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

static inline v8 exp8(v8 x) {
    const v8 low = {EXP_LOW, EXP_LOW, EXP_LOW, EXP_LOW, EXP_LOW, EXP_LOW, EXP_LOW, EXP_LOW};
    v8i under = x < low;
    x = (v8)(((v8i)x & ~under) | ((v8i)low & under));
    v8 n = (x * EXP_LOG2E + EXP_MAGIC) - EXP_MAGIC;
    v8 r = x - n * EXP_C1;
    r = r - n * EXP_C2;
    v8 p = EXP_P0 * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = (p * r) * r + r + 1.0f;
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)e;
}

static inline float exp1(float x) {
    v8 v = {x, x, x, x, x, x, x, x};
    return exp8(v)[0];
}

/* v[i] = exp(v[i] - shift) for n values, in place. */
static void exp_all(float *v, int64_t n, float shift) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) *(v8u *)(v + i) = exp8(*(const v8u *)(v + i) - shift);
    for (; i < n; i++) v[i] = exp1(v[i] - shift);
}

/* The largest of n values, NaNs ignored (a maximum is exact in any order, so 8 lanes at a time). */
static float largest(const float *v, int64_t n) {
    const v8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8 mx = none;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8 x = *(const v8u *)(v + i);
        v8i more = x > mx;
        mx = (v8)(((v8i)x & more) | ((v8i)mx & ~more));
    }
    float r = -INFINITY;
    for (int l = 0; l < 8; l++) r = mx[l] > r ? mx[l] : r;
    for (; i < n; i++) r = v[i] > r ? v[i] : r;
    return r;
}

/* Keys and values are read where the cache holds them, bf16 or fp32: 8 floats of a row at element
 * `at` (bf16 widens exactly, so both give the same floats and the same sums). */
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8w __attribute__((vector_size(32)));

static inline v8 load8(const void *p, int bf16, int64_t at) {
    if (bf16) return (v8)(__builtin_convertvector(*(const v8h *)((const uint16_t *)p + at), v8w) << 16);
    return *(const v8u *)((const float *)p + at);
}

/* The fixed tree that sums a dot product's 8 lanes: ((0+1)+(2+3))+((4+5)+(6+7)). */
static inline float lanes1(v8 a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

/* [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] */
static inline v8 pair_sums(v8 a, v8 b) {
    const v8i even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

/* lanes1 of 8 vectors at once, lane t of the result from a[t]: the same additions in the same tree,
 * done 8 keys wide by shuffles (a key's score is then the same bits in a block or alone). */
static inline v8 lanes8(const v8 *a) {
    const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 q0 = pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3])); /* keys 0-3: (01+23), then (45+67) */
    v8 q1 = pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
    return __builtin_shuffle(q0, q1, lo) + __builtin_shuffle(q0, q1, hi);
}

/* Query heads of one kv group attended together: each key and value vector loaded once serves QB heads
 * (3 x 8 sums and the key fit AVX-512's 32 vector registers; with 16, one head at a time). */
#if defined(__AVX512VL__)
#define QB 3
#else
#define QB 1
#endif

/* s[g * n + j] = scale * (q_g . k_j) for the keys j of [0, n) and the gb (1..QB) query heads at q: per key,
 * 8 lanes of products summed over the head dimension in order, then the lanes by lanes1's tree; keys 8 at
 * a time while 8 remain, then one by one (the same sums: a key's score never depends on its neighbours). */
static inline __attribute__((always_inline)) void scores(const float *q, const void *k, int bf16, int64_t n, int hd,
                                                         float scale, float *s, const int gb) {
    int64_t j = 0;
    if (hd % 8 == 0)
        for (; j + 8 <= n; j += 8) {
            v8 acc[QB][8];
            for (int g = 0; g < gb; g++)
                for (int t = 0; t < 8; t++) acc[g][t] = (v8){0};
            for (int d = 0; d < hd; d += 8) {
                v8 qd[QB];
                for (int g = 0; g < gb; g++) qd[g] = *(const v8u *)(q + g * hd + d);
                for (int t = 0; t < 8; t++) {
                    v8 kt = load8(k, bf16, (j + t) * hd + d);
                    for (int g = 0; g < gb; g++) acc[g][t] += qd[g] * kt;
                }
            }
            for (int g = 0; g < gb; g++) *(v8u *)(s + g * n + j) = lanes8(acc[g]) * scale;
        }
    for (; j < n; j++)
        for (int g = 0; g < gb; g++) {
            v8 acc = {0};
            int d = 0;
            for (; d + 8 <= hd; d += 8) acc += *(const v8u *)(q + g * hd + d) * load8(k, bf16, j * hd + d);
            float r = lanes1(acc);
            for (; d < hd; d++) r += q[g * hd + d] * get(k, bf16, j * hd + d);
            s[g * n + j] = r * scale;
        }
}

/* o[g * hd + d] = sum over the allowed keys j of p[g * n + j] * v_j[d] for the gb (1..QB) heads: 64 outputs
 * of each head at a time held in vectors while the values stream past (each value vector serves every
 * head), then any rest 8 and 1 at a time. Each output's sum runs over j in ascending order whatever the
 * blocking. */
static inline __attribute__((always_inline)) void values(float *o, const float *p, const void *v, int bf16, int64_t n,
                                                         const uint8_t *m, int hd, const int gb) {
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        v8 r[QB][8];
        for (int g = 0; g < gb; g++)
            for (int c = 0; c < 8; c++) r[g][c] = (v8){0};
        for (int64_t j = 0; j < n; j++) {
            if (m && !m[j]) continue;
            for (int c = 0; c < 8; c++) {
                v8 vc = load8(v, bf16, j * hd + d0 + 8 * c);
                for (int g = 0; g < gb; g++) r[g][c] += p[g * n + j] * vc;
            }
        }
        for (int g = 0; g < gb; g++)
            for (int c = 0; c < 8; c++) *(v8u *)(o + g * hd + d0 + 8 * c) = r[g][c];
    }
    for (; d0 + 8 <= hd; d0 += 8)
        for (int g = 0; g < gb; g++) {
            v8 r = {0};
            for (int64_t j = 0; j < n; j++)
                if (!m || m[j]) r += p[g * n + j] * load8(v, bf16, j * hd + d0);
            *(v8u *)(o + g * hd + d0) = r;
        }
    for (; d0 < hd; d0++)
        for (int g = 0; g < gb; g++) {
            float r = 0.0f;
            for (int64_t j = 0; j < n; j++)
                if (!m || m[j]) r += p[g * n + j] * get(v, bf16, j * hd + d0);
            o[g * hd + d0] = r;
        }
}

/* One row's attention for gb (1..QB) query heads of a kv head over the keys [0, n) it may see (mask m, or
 * all): scores, softmax (exp of the masked-out keys computed, never used), then values; o holds each head's
 * unnormalised output (hd floats), sums its softmax sum, in ascending order of the keys. */
static inline __attribute__((always_inline)) void heads(const float *q, const void *k, const void *v, int bf16, int64_t n,
                                                        const uint8_t *m, int hd, float scale, float *sc, float *o,
                                                        float *sums, const int gb) {
    scores(q, k, bf16, n, hd, scale, sc, gb);
    for (int g = 0; g < gb; g++) {
        float *s = sc + g * n;
        if (m)
            for (int64_t j = 0; j < n; j++)
                if (!m[j]) s[j] = -INFINITY;
        exp_all(s, n, largest(s, n));
        sums[g] = 0.0f;
    }
    /* each head's sum in ascending order, the heads side by side (independent chains) */
    for (int64_t j = 0; j < n; j++)
        if (!m || m[j])
            for (int g = 0; g < gb; g++) sums[g] += sc[g * n + j];
    values(o, sc, v, bf16, n, m, hd, gb);
}

/* Rows of a forward from which a bf16 cache is widened into floats once per layer rather than as it is
 * read: then each entry serves every row for one conversion. The floats go to scratch the calling
 * thread keeps until it ends (not a fresh allocation of that size per layer: 1.5 MB after 1,024 tokens,
 * which malloc may serve with new pages each time), up to WIDEN_BYTES; a longer cache is read as it is. */
#define WIDEN_ROWS 3
#define WIDEN_BYTES ((size_t)8 << 20)

typedef struct {
    size_t bytes;
    float data[];
} scratch;

static pthread_key_t widen_key;
static pthread_once_t widen_once = PTHREAD_ONCE_INIT;

static void widen_key_make(void) { pthread_key_create(&widen_key, free); } /* freed as the thread ends */

static float *widen_scratch(size_t bytes) {
    pthread_once(&widen_once, widen_key_make);
    scratch *s = pthread_getspecific(widen_key);
    if (!s || s->bytes < bytes) {
        free(s);
        s = malloc(sizeof(scratch) + bytes);
        if (s) s->bytes = bytes;
        pthread_setspecific(widen_key, s);
    }
    return s ? s->data : NULL;
}

/* Attention of one request's rows over its cache (new keys already written), one layer. Work is split
 * by (row, kv head), or for a few rows by runs of query heads (below); within a kv head its query heads
 * go QB at a time, each key and value read once for them (softmax in between, exp of the masked-out keys
 * never used). */
static int attend(const float *qkv, int64_t qkv_out, int64_t row0, const q4a8_item *it, int layer, int nq, int nkv,
                  int hd, int bf16, float *att) {
    if (it->rows <= 0) return 0; /* a request with no rows in this forward */
    int group = nq / nkv;
    int64_t n = it->past + it->rows, pairs = it->rows * nkv;
    float scale = 1.0f / sqrtf((float)hd);
    int64_t stride = it->cap * hd; /* elements between kv heads */
    int64_t at = (int64_t)layer * nkv * stride;
    const void *keys = bf16 ? (const void *)((const uint16_t *)it->k + at) : (const void *)((const float *)it->k + at);
    const void *vals = bf16 ? (const void *)((const uint16_t *)it->v + at) : (const void *)((const float *)it->v + at);
    int kbf16 = bf16;
    const void *src_k = keys, *src_v = vals;
    int64_t src_stride = stride, per = n * hd, parts = (per + 4095) / 4096;
    size_t wide = sizeof(float) * (size_t)(2 * nkv * per);
    float *kv = NULL;
    if (bf16 && it->rows >= WIDEN_ROWS && wide <= WIDEN_BYTES) {
        kv = widen_scratch(wide); /* kv heads' keys, then their values, each n x hd */
        if (!kv) return -1;
        keys = kv, vals = kv + (int64_t)nkv * per, stride = per, kbf16 = 0;
    }
    size_t el = kbf16 ? 2 : 4;
    int failed = 0;
    int parallel = pairs * n * hd * group > (1 << 15), team = parallel ? q4a8_team() : 1;
#pragma omp parallel if (parallel) num_threads(team)
    {
        if (kv) {
#pragma omp for schedule(static)
            for (int64_t c = 0; c < 2 * nkv * parts; c++) {
                int64_t which = c / parts, lo = (c % parts) * 4096, hi = lo + 4096 < per ? lo + 4096 : per;
                const uint16_t *src = (const uint16_t *)(which < nkv ? src_k : src_v) + (which % nkv) * src_stride;
                float *dst = kv + which * per;
                for (int64_t i = lo; i < hi; i++) dst[i] = bf16_to_float(src[i]);
            }
        }
        float *buf = malloc(sizeof(float) * (size_t)(QB * n + QB * hd));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        /* Work is dealt out in spans of query heads, numbered row by row and within a row kv head by kv
         * head. With many (row, kv head) pairs, one pair's heads at a time, round-robin: a causal prefill's
         * later rows attend to more keys, and halves of the rows in turn left one thread with three times
         * the other's work. With fewer pairs than four per thread (a decode's row: 3 kv heads on 2 threads
         * went 2:1), each thread takes an equal run of query heads, cut inside a kv head where it must: its
         * keys are then read by both threads, each for its own heads (a head's result is the same bits in
         * any group of heads). */
        int64_t spans = pairs >= 4 * team ? pairs : team;
#pragma omp for schedule(static, 1)
        for (int64_t span = 0; span < spans; span++) {
            if (!buf) continue;
            int64_t h0 = span * group, h1 = h0 + group; /* query heads [h0, h1) of the request's rows */
            if (spans != pairs) {
                int64_t total = pairs * group;
                h0 = total * span / team, h1 = total * (span + 1) / team;
            }
            for (int64_t hq = h0; hq < h1;) {
                int64_t i = hq / ((int64_t)nkv * group);
                int kvh = (int)(hq / group % nkv), g0 = (int)(hq % group);
                int64_t end = hq - g0 + group < h1 ? hq - g0 + group : h1; /* this kv head's heads in the span */
                const char *kh = (const char *)keys + (size_t)(kvh * stride) * el;
                const char *vh = (const char *)vals + (size_t)(kvh * stride) * el;
                const uint8_t *m = it->mask ? it->mask + i * n : NULL;
                int64_t live = n; /* keys up to the row's last allowed one: a causal prefill's rows skip the rest */
                while (m && live > 0 && !m[live - 1]) live--;
                for (; hq < end; hq += QB, g0 += QB) {
                    int gb = end - hq < QB ? (int)(end - hq) : QB;
                    const float *q = qkv + (row0 + i) * qkv_out + ((int64_t)kvh * group + g0) * hd;
                    float *sc = buf, *o = buf + QB * n, sums[QB];
                    switch (gb) { /* a constant count each, so that each unrolls to its own registers */
#if QB >= 3
                    case 3: heads(q, kh, vh, kbf16, live, m, hd, scale, sc, o, sums, 3); break;
                    case 2: heads(q, kh, vh, kbf16, live, m, hd, scale, sc, o, sums, 2); break;
#endif
                    default: heads(q, kh, vh, kbf16, live, m, hd, scale, sc, o, sums, 1); break;
                    }
                    for (int g = 0; g < gb; g++) {
                        float *out = att + (row0 + i) * (int64_t)nq * hd + ((int64_t)kvh * group + g0 + g) * hd;
                        for (int d = 0; d < hd; d++) out[d] = o[g * hd + d] / sums[g];
                        round_all(out, hd, bf16);
                    }
                }
                hq = end;
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* RoPE (HF's rotate-half layout, `sin` signed as models.layers.Rope gives it) on one head in place:
 * x * cos + roll(x, hd / 2) * sin, rounded after each of torch's two ops; c and s are the row's
 * cos and sin as floats. */
static void rope_head(float *x, const float *c, const float *s, int hd, int bf16) {
    float t[512], a[512];
    int half = hd / 2;
    for (int d = 0; d < hd; d++) t[d] = x[d], a[d] = x[d] * c[d];
    round_all(a, hd, bf16);
    for (int d = 0; d < half; d++) x[d] = a[d] + t[d + half] * s[d];
    for (int d = half; d < hd; d++) x[d] = a[d] + t[d - half] * s[d];
    round_all(x, hd, bf16);
}

/* h = round(round(y) + h): a projection's output rounded, then the residual sum rounded (torch's
 * `y.add_(x)` on the projection's output in the activations' dtype). */
static void residual(float *h, float *y, int64_t n, int bf16) {
    round_all(y, n, bf16);
    for (int64_t i = 0; i < n; i++) h[i] += y[i];
    round_all(h, n, bf16);
}

/* out = round(round(silu(gate)) * up) for one row of gate/up (already rounded), silu(g) = g / (1 +
 * exp(-g)) in fp32 as torch computes it for bf16, with exp(-g) = e = exp(-|g|) for g >= 0 and
 * g * e / (1 + e) for g < 0 (no overflow). */
static void swiglu(const float *gu, int64_t inter, float *out, int bf16) {
    for (int64_t c = 0; c < inter; c++) out[c] = gu[c] < 0.0f ? gu[c] : -gu[c];
    exp_all(out, inter, 0.0f);
    for (int64_t c = 0; c < inter; c++) {
        float g = gu[c], e = out[c];
        out[c] = (g >= 0.0f ? g : g * e) / (1.0f + e);
    }
    round_all(out, inter, bf16);
    for (int64_t c = 0; c < inter; c++) out[c] *= gu[inter + c];
    round_all(out, inter, bf16);
}

/* x (rows x hidden, bf16 when `bf16`, else fp32) through `n_layers` decoder layers, in place; the
 * rows belong to `n_items` requests in order, each with its own cache, positions (the rows of
 * cos/sin, rows x head dim) and mask. Each layer's new keys and values are written at entries
 * [past, past + rows) of its request's cache; the caller commits them. `path` is q4a8_matmul's.
 * Rows before `out_from` are wanted for their keys and values only: the last layer computes theirs and
 * skips their attention, output projection and MLP (an EAGLE head catching up on positions decoded
 * without it wants only the last row's output; with one layer, ~3.5x fewer multiply-adds a row), and their rows
 * of x come back as they were. The other rows' results are bitwise those of a whole forward (see the
 * top: a row's products and attention do not depend on the other rows).
 * Returns 0, -1 when memory could not be had, -2 for shapes it does not take. */
int q4a8_layers(void *x, int bf16, int64_t rows, int64_t hidden, int n_layers, const q4a8_layer *layers, int nq,
                int nkv, int hd, float eps, const void *cos, const void *sin, int n_items, const q4a8_item *items,
                int path, int64_t out_from) {
    if (n_layers <= 0 || rows <= 0) return 0;
    if (out_from < 0 || out_from >= rows) return -2;
    if (nkv <= 0 || nq % nkv || nq / nkv > 64 || hd > 512 || hidden % 32 || ((int64_t)nq * hd) % 32) return -2;
    int64_t qkv_out = (int64_t)(nq + 2 * nkv) * hd, inter = layers[0].gate_up.out / 2, att_k = (int64_t)nq * hd;
    if (inter % 32 || layers[0].qkv.out != qkv_out) return -2;
    int64_t kmax = hidden > inter ? hidden : inter;
    kmax = kmax > att_k ? kmax : att_k;
    float *h = malloc(sizeof(float) * (size_t)(rows * hidden));
    float *qkv = malloc(sizeof(float) * (size_t)(rows * qkv_out));
    float *att = malloc(sizeof(float) * (size_t)(rows * att_k));
    float *y = malloc(sizeof(float) * (size_t)(rows * (2 * inter > hidden ? 2 * inter : hidden)));
    float *act = malloc(sizeof(float) * (size_t)(rows * inter));
    float *s = malloc(sizeof(float) * (size_t)(2 * rows * (kmax / 32)));
    float *normed = malloc(sizeof(float) * (size_t)(kmax * q4a8_team()));
    int8_t *a = calloc((size_t)q4a8_act_bytes(rows, kmax), 1);
    int rc = 0;
    if (!h || !qkv || !att || !y || !act || !s || !normed || !a) {
        rc = -1;
        goto done;
    }
    float *sa = s + rows * (kmax / 32);
    for (int64_t i = 0; i < rows * hidden; i++) h[i] = get(x, bf16, i);
    for (int li = 0; li < n_layers; li++) {
        const q4a8_layer *L = layers + li;
        int64_t skip = li == n_layers - 1 ? out_from : 0; /* rows wanted for keys and values only */
        int64_t live = rows - skip;
        /* attention: norm + q/k/v, RoPE on q and k, the new keys/values into the caches, attend */
        q4a8_quantize(h, 0, bf16, rows, hidden, L->attn_norm, eps, a, s, sa, normed);
        q4a8_product(a, s, sa, rows, hidden, L->qkv.w, L->qkv.blocks, L->qkv.out, qkv, 0, path);
        round_all(qkv, rows * qkv_out, bf16);
        for (int64_t r = 0; r < rows; r++) {
            float *row = qkv + r * qkv_out;
            if (L->bqkv) {
                for (int64_t c = 0; c < qkv_out; c++) row[c] += get(L->bqkv, bf16, c);
                round_all(row, qkv_out, bf16);
            }
            float c[512], sn[512];
            for (int d = 0; d < hd; d++) c[d] = get(cos, bf16, r * hd + d), sn[d] = get(sin, bf16, r * hd + d);
            for (int j = 0; j < nq + nkv; j++) rope_head(row + (int64_t)j * hd, c, sn, hd, bf16);
        }
        int64_t row0 = 0;
        for (int t = 0; t < n_items; t++) {
            const q4a8_item *it = items + t;
            for (int64_t i = 0; i < it->rows; i++) {
                const float *row = qkv + (row0 + i) * qkv_out;
                for (int kvh = 0; kvh < nkv; kvh++) {
                    int64_t at = (((int64_t)li * nkv + kvh) * it->cap + it->past + i) * hd;
                    for (int d = 0; d < hd; d++) {
                        put(it->k, bf16, at + d, row[att_k + (int64_t)kvh * hd + d]);
                        put(it->v, bf16, at + d, row[att_k + (int64_t)(nkv + kvh) * hd + d]);
                    }
                }
            }
            /* the item's rows from `skip` on attend (mask rows keep their stride, past + rows) */
            int64_t from = skip > row0 ? (skip < row0 + it->rows ? skip - row0 : it->rows) : 0;
            q4a8_item sub = *it;
            sub.rows -= from, sub.past += from;
            if (sub.mask) sub.mask += from * (it->past + it->rows);
            if (attend(qkv, qkv_out, row0 + from, &sub, li, nq, nkv, hd, bf16, att)) {
                rc = -1;
                goto done;
            }
            row0 += it->rows;
        }
        /* output projection and residual */
        float *hl = h + skip * hidden, *al = att + skip * att_k;
        q4a8_quantize(al, 0, bf16, live, att_k, NULL, 0.0f, a, s, sa, normed);
        q4a8_product(a, s, sa, live, att_k, L->o.w, L->o.blocks, L->o.out, y, 0, path);
        residual(hl, y, live * hidden, bf16);
        /* MLP: norm + gate/up, SiLU(gate) * up, down, residual */
        q4a8_quantize(hl, 0, bf16, live, hidden, L->ffn_norm, eps, a, s, sa, normed);
        q4a8_product(a, s, sa, live, hidden, L->gate_up.w, L->gate_up.blocks, L->gate_up.out, y, 0, path);
#pragma omp parallel for if (live >= 8) num_threads(q4a8_team()) schedule(static)
        for (int64_t r = 0; r < live; r++) {
            round_all(y + r * 2 * inter, 2 * inter, bf16);
            swiglu(y + r * 2 * inter, inter, act + r * inter, bf16);
        }
        q4a8_quantize(act, 0, bf16, live, inter, NULL, 0.0f, a, s, sa, normed);
        q4a8_product(a, s, sa, live, inter, L->down.w, L->down.blocks, L->down.out, y, 0, path);
        residual(hl, y, live * hidden, bf16);
    }
    for (int64_t i = out_from * hidden; i < rows * hidden; i++) put(x, bf16, i, h[i]);
done:
    free(h);
    free(qkv);
    free(att);
    free(y);
    free(act);
    free(s);
    free(normed);
    free(a);
    return rc;
}
