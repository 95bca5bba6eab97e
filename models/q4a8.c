/* 4-bit weights times 8-bit activations, the way llama.cpp multiplies Q4 by Q8, for rows of a tree.
 *
 * Why it exists: torch's int4 CPU kernel computes one activation row at a time, so a forward over a
 * tree of 16 rows costs ~7x a one-row forward, and speculation cannot pay on this CPU. Here a block
 * of 16 output columns is unpacked once per group of 32 inputs and multiplied with up to 4 activation
 * rows while it sits in registers; the weights stream from memory once however many rows there are.
 *
 * Numerics (the oracle needs them): activations are rounded to int8 per row and group of 32
 * (s = max|x| / 127, a = nearest-even(x / s)); the group's dot product with the 4-bit values is an
 * exact int32; each output then adds, group by group in ascending order,
 *     acc = fma(float(isum), d * s, acc);  acc = fma(m, s * sum(a), acc)
 * with w = d * q + m (GGUF's Q4_1; Q4_0 is m = -8d). Every output element goes through these very
 * operations whatever the number of rows, their position in a tile, the thread split or the code
 * path (AVX512-VNNI, AMX, AVX2, NEON or plain C), so a row's result is bitwise the same in any batch.
 *
 * Weight layout, per block of 16 output columns and group of 32 inputs (320 bytes, 20 per 32
 * weights, as in the file): 256 bytes of nibbles, then 16 fp16 scales d, then 16 fp16 offsets m.
 * Nibble byte p (p = 64 * j + 4 * c + t, j < 4, column c < 16, t < 4) holds input 4j + t of column
 * c in its low nibble and input 16 + 4j + t in its high nibble: the order vpdpbusd wants.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "q4a8.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define Q4A8_VNNI 1
#else
#define Q4A8_VNNI 0
#endif
#if !Q4A8_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q4A8_AVX2 1
#else
#define Q4A8_AVX2 0
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define Q4A8_NEON 1
#else
#define Q4A8_NEON 0
#endif
#if Q4A8_NEON && defined(__ARM_FEATURE_DOTPROD)
#define Q4A8_DOTPROD 1
#else
#define Q4A8_DOTPROD 0
#endif
#define Q4A8_VECTOR (Q4A8_VNNI || Q4A8_AVX2 || Q4A8_NEON)
#if Q4A8_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define Q4A8_AMX 1
#else
#define Q4A8_AMX 0
#endif

#define GROUP 32
#define COLS 16
#if Q4A8_VNNI
#define TILE 8 /* rows a block's unpacked weights meet: 32 vector registers hold 8 rows' sums beside them */
#else
#define TILE 4 /* AVX2 and NEON: 16 and 32 registers, with wider unpacking */
#endif
#define GROUP_BYTES 320
#define AMX_ROWS 16    /* rows per AMX tile */
#define AMX_MIN_ROWS 6 /* from this many rows on AMX beat VNNI (measured with its tiles of 4; tools/issue11/q4a8_rows.py) */

int q4a8_has_vnni(void) { return Q4A8_VNNI; }
int q4a8_has_avx2(void) { return Q4A8_AVX2; }
int q4a8_has_neon(void) { return Q4A8_NEON ? 1 + Q4A8_DOTPROD : 0; } /* 2: with the dot product (ARMv8.2) */

/* The team size of every parallel region here, as the caller's torch says (q4a8_set_threads before
 * each call). OpenMP's own count cannot be relied on: torch.set_num_threads sets it in the calling
 * thread, and another thread (a daemon's forwards run in one) has it only once torch initialised that
 * thread on a parallel op of its own; before, OpenMP's default, every core, applies. */
static int team = 0;

void q4a8_set_threads(int n) { team = n; }

int q4a8_team(void) { return team > 0 ? team : omp_get_max_threads(); }

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float load(const void *x, int bf16, int64_t at) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
}

/* The RMS norm of one row as models.layers.rms_norm computes it: fp32 statistics, the normalised
 * row rounded to the activations' dtype, then times the weight in that dtype. `x` is stored as bf16
 * (x_bf16) or fp32; `act_bf16` says whether the activations' dtype is bf16 (then `w` is bf16 too and
 * the results are rounded to it). `out` holds k floats (values of the activations' dtype). */
static void rms_norm_row(const void *x, int x_bf16, int act_bf16, int64_t k, const void *w, float eps, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float v = load(x, x_bf16, i);
        ss = fmaf(v, v, ss);
    }
    float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (int64_t i = 0; i < k; i++) {
        float t = load(x, x_bf16, i) * r;
        if (act_bf16) t = bf16_to_float(float_to_bf16(t));
        float h = load(w, act_bf16, i) * t;
        out[i] = act_bf16 ? bf16_to_float(float_to_bf16(h)) : h;
    }
}

/* One row's groups of 32 as int8 with a scale each; sa = scale * sum of the int8 values. `x` is the
 * row in the activations' dtype, or with `normed` already floats from rms_norm_row. */
static void quantize_row(const void *x, int bf16, int normed, int64_t k, int8_t *a, float *s, float *sa) {
    float v[GROUP];
    for (int64_t g = 0; g < k / GROUP; g++) {
        float amax = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            int64_t at = g * GROUP + i;
            v[i] = normed ? ((const float *)x)[at] : load(x, bf16, at);
            float m = fabsf(v[i]);
            amax = m > amax ? m : amax;
        }
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < GROUP; i++) {
            float r = (v[i] * id + 12582912.0f) - 12582912.0f; /* nearbyintf (|v * id| <= 127), vectorises */
            int q = (int)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
            a[g * GROUP + i] = (int8_t)q;
            sum += q;
        }
        s[g] = d;
        sa[g] = d * (float)sum;
    }
}

/* Columns [16 * blk, 16 * blk + 16) for TILE rows (some may repeat row 0); out[r][c] in fp32. */
static void block_generic(const uint8_t *wb, int64_t groups, const int8_t *const *a, const float *const *s,
                          const float *const *sa, float out[][COLS]) {
    for (int r = 0; r < TILE; r++)
        for (int c = 0; c < COLS; c++) out[r][c] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = wb + g * GROUP_BYTES;
        float d[COLS], m[COLS];
        for (int c = 0; c < COLS; c++) {
            d[c] = half_to_float((uint16_t)(p[256 + 2 * c] | (p[257 + 2 * c] << 8)));
            m[c] = half_to_float((uint16_t)(p[288 + 2 * c] | (p[289 + 2 * c] << 8)));
        }
        for (int r = 0; r < TILE; r++) {
            const int8_t *ar = a[r] + g * GROUP;
            for (int c = 0; c < COLS; c++) {
                int32_t isum = 0;
                for (int j = 0; j < 4; j++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t byte = p[64 * j + 4 * c + t];
                        isum += (int32_t)(byte & 0x0f) * ar[4 * j + t] + (int32_t)(byte >> 4) * ar[16 + 4 * j + t];
                    }
                float scale = d[c] * s[r][g];
                out[r][c] = fmaf((float)isum, scale, out[r][c]);
                out[r][c] = fmaf(m[c], sa[r][g], out[r][c]);
            }
        }
    }
}

/* The weights stream from memory once per forward (a stage's are far larger than the caches), in
 * layout order: ask for the group PREFETCH bytes ahead while this one is multiplied, so the loads of
 * the next blocks overlap the arithmetic. On a Zen 3 core (AVX2, one thread, the embedded model's
 * 120 matrices one after the other, as tools/issue11/q4a8_rows.py times them) 16 KiB ahead took 1 row
 * from 7.8 to 7.1 ms, 2 rows 9.0 -> 7.7, 4 rows 11.7 -> 10.3. A prefetch never faults, also past the end. */
#define PREFETCH 16384
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *p) {
    for (int l = 0; l < GROUP_BYTES; l += 64) __builtin_prefetch(p + PREFETCH + l, 0, 3);
}

#if Q4A8_VNNI
/* `rows` (1..TILE) is a constant in each caller below, so the row loops unroll and a one-row
 * product does one row's work, not a tile's. Each of a row's 8 products takes its 4 activations as an
 * embedded broadcast from memory (gcc 12 emits a separate broadcast per product from the intrinsics),
 * and a tile is 8 rows, not 4: the 8 unpacked weight vectors serve twice the rows. The embedded model's
 * 120 layer matrices, 1 thread, Zen 4, three alternations (tools/issue11/q4a8_rows.py's `auto`): 8 rows
 * 9.35-9.55 -> 8.15-8.33 ms, 16 rows 16.5-16.6 -> 15.0-16.0, 64 rows 57.2-57.4 -> 54.5-55.0. */
static inline __attribute__((always_inline)) void block_vnni(const uint8_t *wb, int64_t groups,
                                                             const int8_t *const *a, const float *const *s,
                                                             const float *const *sa, float out[][COLS],
                                                             const int rows) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = wb + g * GROUP_BYTES;
        prefetch_ahead(p);
        __m512i w[8];
        for (int j = 0; j < 4; j++) {
            __m512i raw = _mm512_loadu_si512((const void *)(p + 64 * j));
            w[j] = _mm512_and_si512(raw, low);
            w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 256)));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 288)));
        for (int r = 0; r < rows; r++) {
            const int32_t *ar = (const int32_t *)(a[r] + g * GROUP);
            __m512i isum = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++)
                __asm__("vpdpbusd %[b]%{1to16%}, %[w], %[acc]" : [acc] "+v"(isum) : [w] "v"(w[j]), [b] "m"(ar[j]));
            __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(s[r][g]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sa[r][g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out[r], acc[r]);
}

#define block_simd block_vnni
#endif

#if Q4A8_AVX2
/* AVX2 without VNNI (AMD Zen 1-3, older Intel): the same products with maddubs (u8 x s8 -> pairs of
 * int16, at most 2 * 15 * 127), a group's 8 such vectors added in int16 (at most 16 * 15 * 127 = 30480:
 * never saturating; one madd per group instead of 8, 15 % faster at 16-32 rows on Zen 3), then madd
 * (pairs -> int32): the group sums are the same exact int32, and the epilogue the same two fused
 * multiply-adds per group, so every output is bitwise what the plain C path gives. 256-bit registers
 * hold 8 columns: the block is done in two halves. */
/* One half (8 of the 16 columns) of group g of a block, added to each row's accumulator: a nibble
 * vector at a time, each feeding every row (rather than all 8 unpacked first: 4 rows' int16 sums, 4
 * accumulators and 2 weight vectors fit the 16 registers), then acc = fma(isum, d * s, acc) and
 * acc = fma(m, sa, acc). */
static inline __attribute__((always_inline)) void half_avx2(const uint8_t *p, int h, int64_t g,
                                                            const int8_t *const *a, const float *const *s,
                                                            const float *const *sa, __m256 *acc, int stride,
                                                            const int rows) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i pairs[TILE];
    for (int jj = 0; jj < 4; jj++) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 64 * jj + 32 * h));
        __m256i wl = _mm256_and_si256(raw, low), wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        for (int r = 0; r < rows; r++) {
            const int32_t *ar = (const int32_t *)(a[r] + g * GROUP);
            __m256i both = _mm256_add_epi16(_mm256_maddubs_epi16(wl, _mm256_set1_epi32(ar[jj])),
                                            _mm256_maddubs_epi16(wh, _mm256_set1_epi32(ar[jj + 4])));
            pairs[r] = jj == 0 ? both : _mm256_add_epi16(pairs[r], both);
        }
    }
    __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 256 + 16 * h)));
    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 288 + 16 * h)));
    for (int r = 0; r < rows; r++) {
        __m256i isum = _mm256_madd_epi16(pairs[r], ones);
        __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(s[r][g]));
        acc[r * stride] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r * stride]);
        acc[r * stride] = _mm256_fmadd_ps(m, _mm256_set1_ps(sa[r][g]), acc[r * stride]);
    }
}

/* With one or two rows both halves go in one pass over the block's groups (its bytes read once, in
 * order, two independent chains a row: the 30-layer forward at 1 row 8.4-8.7 -> 7.3-8.2 ms on Zen 2);
 * with more, the registers only hold one half's accumulators, so two passes. Every column's sum is the
 * same either way. */
static inline __attribute__((always_inline)) void block_avx2(const uint8_t *wb, int64_t groups,
                                                             const int8_t *const *a, const float *const *s,
                                                             const float *const *sa, float out[][COLS],
                                                             const int rows) {
    if (rows <= 2) {
        __m256 acc[2 * 2]; /* row r, half h at 2 * r + h */
        for (int i = 0; i < 2 * rows; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = wb + g * GROUP_BYTES;
            prefetch_ahead(p);
            half_avx2(p, 0, g, a, s, sa, acc, 2, rows);
            half_avx2(p, 1, g, a, s, sa, acc + 1, 2, rows);
        }
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++) _mm256_storeu_ps(out[r] + 8 * h, acc[2 * r + h]);
        return;
    }
    for (int h = 0; h < 2; h++) {
        __m256 acc[TILE];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = wb + g * GROUP_BYTES;
            if (h == 0) prefetch_ahead(p);
            half_avx2(p, h, g, a, s, sa, acc, 1, rows);
        }
        for (int r = 0; r < rows; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
    }
}

#define block_simd block_avx2
#endif

#if Q4A8_NEON
/* aarch64 (Raspberry Pi, Jetson, Apple): the same products with NEON. A 16-byte nibble vector holds
 * inputs 4j..4j+3 (low nibbles; 16+4j.. in the high ones) of 4 columns; each is multiplied with those 4
 * activations, broadcast from memory, and summed per column: one sdot with the dot product (ARMv8.2:
 * Cortex-A76 / Pi 5, A78 / Jetson Orin), else widening multiply-adds into int16 (at most 8 * 15 * 127
 * per lane: never saturating) folded to int32 once per group (ARMv8.0: Cortex-A72 / Pi 4). The group
 * sums are the same exact int32, and the epilogue the same operations in the same order (fused
 * multiply-adds are one rounding, as fmaf), so every output is bitwise what the plain C path gives.
 * A block's group goes 4 columns at a time, their nibbles unpacked once for every row of the tile;
 * the accumulators stay in `out` (a load and a store per row next to its 8 dot products). */
/* Row `ar`'s sums for the 4 columns whose unpacked nibbles are lo[j] / hi[j] (inputs 4j.. / 16+4j..). */
static inline __attribute__((always_inline)) int32x4_t column_sums_neon(const int8x16_t *lo, const int8x16_t *hi,
                                                                        const int8_t *ar) {
#if Q4A8_DOTPROD
    int32x4_t isum = vdupq_n_s32(0);
    for (int j = 0; j < 4; j++) {
        isum = vdotq_s32(isum, lo[j], vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(ar + 4 * j))));
        isum = vdotq_s32(isum, hi[j], vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(ar + 16 + 4 * j))));
    }
    return isum;
#else
    int16x8_t first = vdupq_n_s16(0), second = vdupq_n_s16(0); /* columns 0-1 and 2-3 of the four */
    for (int j = 0; j < 4; j++) {
        int8x16_t al = vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(ar + 4 * j)));
        int8x16_t ah = vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t *)(ar + 16 + 4 * j)));
        first = vmlal_s8(vmlal_s8(first, vget_low_s8(lo[j]), vget_low_s8(al)), vget_low_s8(hi[j]), vget_low_s8(ah));
        second = vmlal_high_s8(vmlal_high_s8(second, lo[j], al), hi[j], ah);
    }
    return vpaddq_s32(vpaddlq_s16(first), vpaddlq_s16(second));
#endif
}

static inline __attribute__((always_inline)) void block_neon(const uint8_t *wb, int64_t groups,
                                                             const int8_t *const *a, const float *const *s,
                                                             const float *const *sa, float out[][COLS],
                                                             const int rows) {
    const uint8x16_t low = vdupq_n_u8(0x0f);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLS; c++) out[r][c] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = wb + g * GROUP_BYTES;
        prefetch_ahead(p);
        for (int q = 0; q < 4; q++) { /* columns 4q..4q+3: their nibbles unpacked once for every row */
            int8x16_t lo[4], hi[4];
            for (int j = 0; j < 4; j++) {
                uint8x16_t raw = vld1q_u8(p + 64 * j + 16 * q);
                lo[j] = vreinterpretq_s8_u8(vandq_u8(raw, low));
                hi[j] = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
            }
            float32x4_t d = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p + 256 + 8 * q)));
            float32x4_t m = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p + 288 + 8 * q)));
            for (int r = 0; r < rows; r++) {
                int32x4_t isum = column_sums_neon(lo, hi, a[r] + g * GROUP);
                float32x4_t scale = vmulq_f32(d, vdupq_n_f32(s[r][g]));
                float32x4_t acc = vld1q_f32(out[r] + 4 * q);
                acc = vfmaq_f32(acc, vcvtq_f32_s32(isum), scale);
                acc = vfmaq_f32(acc, m, vdupq_n_f32(sa[r][g]));
                vst1q_f32(out[r] + 4 * q, acc);
            }
        }
    }
}

#define block_simd block_neon
#endif

#if Q4A8_VECTOR
/* The build's vector path for a tile of `rows`: one case per count, so each unrolls to its own rows. */
static void block_simd_rows(const uint8_t *wb, int64_t groups, const int8_t *const *a, const float *const *s,
                            const float *const *sa, float out[][COLS], int rows) {
    switch (rows) {
    case 1: block_simd(wb, groups, a, s, sa, out, 1); break;
    case 2: block_simd(wb, groups, a, s, sa, out, 2); break;
    case 3: block_simd(wb, groups, a, s, sa, out, 3); break;
#if TILE > 4
    case 4: block_simd(wb, groups, a, s, sa, out, 4); break;
    case 5: block_simd(wb, groups, a, s, sa, out, 5); break;
    case 6: block_simd(wb, groups, a, s, sa, out, 6); break;
    case 7: block_simd(wb, groups, a, s, sa, out, 7); break;
#endif
    default: block_simd(wb, groups, a, s, sa, out, TILE); break;
    }
}
#endif

#if Q4A8_AMX
/* AMX: the int32 group sums of 16 rows at once (one tile product per block and group), then the
 * very epilogue block_vnni applies, row by row: the same floats in the same order. */
static int amx_state = -1; /* -1: not asked yet, 0: refused by the kernel, 1: granted */

int q4a8_amx(void) {
    if (amx_state < 0) amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_state;
}

static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed, aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = COLS * 4; /* sums: 16 x 16 int32 */
    for (int t = 4; t < 6; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = GROUP;    /* activations: one group */
    for (int t = 6; t < 8; t++) cfg.rows[t] = GROUP / 4, cfg.colsb[t] = COLS * 4; /* weights: 8 x (16 x 4) */
    _tile_loadconfig(&cfg);
}

/* Rows [r0, r0 + rows) of the padded activations a (AMX_ROWS rows readable from r0). Groups go
 * four at a time through four sum tiles, so the tile products of one batch overlap instead of each
 * waiting for the last one's store; the epilogue then takes the groups in ascending order. */
static void block_amx(const uint8_t *wb, int64_t groups, const int8_t *a, int64_t k, const float *s,
                      const float *sa, int rows, float out[AMX_ROWS][COLS]) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    int32_t sums[4][AMX_ROWS][COLS] __attribute__((aligned(64)));
    uint8_t b[4][GROUP / 4][COLS * 4] __attribute__((aligned(64)));
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out[r], _mm512_setzero_ps());
    for (int64_t g0 = 0; g0 < groups; g0 += 4) {
        int batch = groups - g0 < 4 ? (int)(groups - g0) : 4;
        for (int i = 0; i < batch; i++) {
            const uint8_t *p = wb + (g0 + i) * GROUP_BYTES;
            for (int j = 0; j < 4; j++) {
                __m512i raw = _mm512_loadu_si512((const void *)(p + 64 * j));
                _mm512_store_si512((void *)b[i][j], _mm512_and_si512(raw, low));
                _mm512_store_si512((void *)b[i][j + 4], _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
            }
        }
        const int8_t *ag = a + g0 * GROUP;
        /* tile numbers are immediates: the four products spelled out (a short batch stops early) */
        _tile_zero(0);
        _tile_loadd(4, ag, k);
        _tile_loadd(6, b[0], COLS * 4);
        _tile_dpbsud(0, 4, 6);
        if (batch > 1) {
            _tile_zero(1);
            _tile_loadd(5, ag + GROUP, k);
            _tile_loadd(7, b[1], COLS * 4);
            _tile_dpbsud(1, 5, 7);
        }
        if (batch > 2) {
            _tile_zero(2);
            _tile_loadd(4, ag + 2 * GROUP, k);
            _tile_loadd(6, b[2], COLS * 4);
            _tile_dpbsud(2, 4, 6);
        }
        if (batch > 3) {
            _tile_zero(3);
            _tile_loadd(5, ag + 3 * GROUP, k);
            _tile_loadd(7, b[3], COLS * 4);
            _tile_dpbsud(3, 5, 7);
        }
        _tile_stored(0, sums[0], COLS * 4);
        if (batch > 1) _tile_stored(1, sums[1], COLS * 4);
        if (batch > 2) _tile_stored(2, sums[2], COLS * 4);
        if (batch > 3) _tile_stored(3, sums[3], COLS * 4);
        __m512 d[4], m[4];
        for (int i = 0; i < batch; i++) {
            const uint8_t *p = wb + (g0 + i) * GROUP_BYTES;
            d[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 256)));
            m[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 288)));
        }
        for (int r = 0; r < rows; r++) {
            __m512 acc = _mm512_loadu_ps(out[r]);
            for (int i = 0; i < batch; i++) {
                int64_t g = g0 + i;
                __m512 scale = _mm512_mul_ps(d[i], _mm512_set1_ps(s[r * groups + g]));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)sums[i][r])), scale, acc);
                acc = _mm512_fmadd_ps(m[i], _mm512_set1_ps(sa[r * groups + g]), acc);
            }
            _mm512_storeu_ps(out[r], acc);
        }
    }
}
#else
int q4a8_amx(void) { return 0; }
#endif

static void store_rows(float out[][COLS], int rows, int64_t r0, int64_t c0, int64_t n_out, void *y, int y_bf16) {
    int64_t cols = n_out - c0 < COLS ? n_out - c0 : COLS;
    for (int r = 0; r < rows; r++) {
        size_t at = (size_t)((r0 + r) * n_out + c0);
        if (y_bf16)
            for (int64_t c = 0; c < cols; c++) ((uint16_t *)y)[at + c] = float_to_bf16(out[r][c]);
        else
            for (int64_t c = 0; c < cols; c++) ((float *)y)[at + c] = out[r][c];
    }
}

int64_t q4a8_act_bytes(int64_t rows, int64_t k) {
    /* AMX reads whole 16-row tiles of activations: room for the zero rows past the last */
    return (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS * k;
}

void q4a8_quantize(const void *x, int x_bf16, int act_bf16, int64_t rows, int64_t k, const void *norm, float eps,
                   int8_t *a, float *s, float *sa, float *normed) {
    int64_t groups = k / GROUP;
    size_t x_el = x_bf16 ? 2 : 4;
    /* a prefill's or a tree's rows in parallel: serial, they were ~5 % of a 1,024-row prefill at 2 threads */
#pragma omp parallel for if (rows >= 8) num_threads(q4a8_team()) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)x + (size_t)(r * k) * x_el;
        float *mine = norm ? normed + (size_t)omp_get_thread_num() * (size_t)k : NULL;
        if (norm) rms_norm_row(row, x_bf16, act_bf16, k, norm, eps, mine);
        quantize_row(norm ? mine : row, x_bf16, norm != NULL, k, a + r * k, s + r * groups, sa + r * groups);
    }
}

void q4a8_product(const int8_t *a, const float *s, const float *sa, int64_t rows, int64_t k, const uint8_t *w,
                  int64_t n_blocks, int64_t n_out, void *y, int y_bf16, int path) {
    int64_t groups = k / GROUP;
    int amx = (path == 3 || (path == 0 && rows >= AMX_MIN_ROWS)) && q4a8_amx();
    int vector = Q4A8_VECTOR && !amx && path != 1; /* path 2: the build's vector path */
    (void)vector;                                   /* read only where the build has a vector path */
    int64_t th = amx ? AMX_ROWS : TILE, tiles = (rows + th - 1) / th;
    int64_t work = n_blocks * tiles;
    int serial = rows * k * n_blocks * COLS < (int64_t)1 << 18;
#pragma omp parallel if (!serial) num_threads(q4a8_team())
    {
#if Q4A8_AMX
        if (amx) amx_configure(); /* tile state is per thread */
#endif
#pragma omp for schedule(static)
        for (int64_t item = 0; item < work; item++) {
            /* blocks outermost within a thread's run: a block's weights stay in cache over its tiles */
            int64_t blk = item / tiles, r0 = (item % tiles) * th;
            int n = rows - r0 < th ? (int)(rows - r0) : (int)th;
            const uint8_t *wb = w + (size_t)(blk * groups) * GROUP_BYTES;
            float out[AMX_ROWS][COLS];
#if Q4A8_AMX
            if (amx) {
                block_amx(wb, groups, a + r0 * k, k, s + r0 * groups, sa + r0 * groups, n, out);
                store_rows(out, n, r0, blk * COLS, n_out, y, y_bf16);
                continue;
            }
#endif
            const int8_t *ap[TILE];
            const float *sp[TILE], *sap[TILE];
            for (int r = 0; r < TILE; r++) {
                int64_t row = r0 + r < rows ? r0 + r : r0; /* a short last tile repeats its first row */
                ap[r] = a + row * k;
                sp[r] = s + row * groups;
                sap[r] = sa + row * groups;
            }
#if Q4A8_VECTOR
            if (vector)
                block_simd_rows(wb, groups, ap, sp, sap, out, n);
            else
#endif
                block_generic(wb, groups, ap, sp, sap, out);
            store_rows(out, n, r0, blk * COLS, n_out, y, y_bf16);
        }
#if Q4A8_AMX
        if (amx) _tile_release();
#endif
    }
}

/* y[M, n_out] = x[M, K] @ W.T, W packed as described above with n_blocks * 16 >= n_out columns,
 * or rms_norm(x) @ W.T where `norm` (the norm's weight, in x's dtype) is given: the norm fused
 * into the quantization of the activations, which reads each row anyway (two torch calls of ~15 us
 * fewer per layer and row count). x and y are bf16 (flag set) or fp32; K is a multiple of 32.
 * path: 0 the fastest this build and CPU have for the number of rows, 1 plain C, 2 the vector path
 * (VNNI in tiles of 8 rows, AVX2 or NEON in tiles of 4), 3 AMX tiles of 16 (the tests compare them; an unavailable
 * one falls back). Returns 0, or -1 when scratch memory could not be had. */
int q4a8_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, const uint8_t *w, int64_t n_blocks,
                int64_t n_out, void *y, int y_bf16, int path, const void *norm, float eps) {
    int64_t groups = k / GROUP;
    int8_t *a = calloc((size_t)q4a8_act_bytes(rows, k), 1);
    float *s = malloc((size_t)(rows * groups) * sizeof(float) * 2);
    float *normed = norm ? malloc((size_t)(k * q4a8_team()) * sizeof(float)) : NULL;
    if (!a || !s || (norm && !normed)) {
        free(a);
        free(s);
        free(normed);
        return -1;
    }
    q4a8_quantize(x, x_bf16, x_bf16, rows, k, norm, eps, a, s, s + rows * groups, normed);
    q4a8_product(a, s, s + rows * groups, rows, k, w, n_blocks, n_out, y, y_bf16, path);
    free(a);
    free(s);
    free(normed);
    return 0;
}

/* ---- int8 rows times int8 activations: the vocabulary matrix of an int4a8 stage ---------------
 *
 * The LM head of the embedded model (49,152 x 576, Q8_0 in the file, held as int8 rows with one
 * scale each) took a third of a token on torch's kernel once the layers ran in C. Here it goes the
 * way q4a8_matmul goes: activations rounded to int8 per row and group of 32 (q4a8_quantize), each
 * group's dot product with the weights an exact int32 in 8 lanes of 4 products, each lane added as
 * acc[l] = fma(float(isum[l]), s, acc[l]) into one of two chains, the even groups' and the odd
 * groups', in ascending order, the chains added lane by lane, the lanes summed by a fixed tree and the
 * sum times the row's scale. Same bits on every code path, row count and thread split.
 *
 * The vocabulary is read one row after the other, so the weights stream in order (at one activation
 * row the product is bound by that stream: 28 MB a token); the two chains are what keeps one row's
 * fused multiply-adds from waiting on each other. 2-core AMD EPYC (Zen 2), one thread, one activation
 * row: 3.2-3.5 ms with four rows' chains interleaved (four streams 576 bytes apart), 2.7-2.9 ms read
 * in order, 2.4 ms with each row asked for 2 KiB ahead (Q8_PREFETCH; 8 and 32 KiB about the same). Up
 * to four activation rows take each weight vector from one load: 8 rows 10.0-10.5 -> 8.2-8.6 ms. */
#define Q8_PREFETCH 2048
static inline float q8_lanes_sum(const float acc[8]) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* one vocabulary row against ``nr`` (1..4) activation rows ``a + j * k`` */
static void q8_dot_generic(const int8_t *w, const int8_t *a, int64_t k, const float *s, int64_t groups, int nr,
                           float *dot) {
    for (int j = 0; j < nr; j++) {
        float acc[2][8] = {{0}};
        for (int64_t g = 0; g < groups; g++)
            for (int l = 0; l < 8; l++) {
                int32_t isum = 0;
                for (int t = 0; t < 4; t++) isum += (int32_t)w[g * GROUP + 4 * l + t] * a[j * k + g * GROUP + 4 * l + t];
                acc[g & 1][l] = fmaf((float)isum, s[j * groups + g], acc[g & 1][l]);
            }
        float lanes[8];
        for (int l = 0; l < 8; l++) lanes[l] = acc[0][l] + acc[1][l];
        dot[j] = q8_lanes_sum(lanes);
    }
}

#if Q4A8_AVX2
/* q8_dot_generic's arithmetic in AVX2: |w| (unsigned) times a with w's sign through maddubs (u8 x s8,
 * pairs at most 2 * 128 * 127), the pairs summed to int32 lanes. ``nr`` is a constant at each call
 * (always inlined), so the loops over activation rows unroll into independent chains. */
static inline __attribute__((always_inline)) void q8_dot_avx2(const int8_t *w, const int8_t *a, int64_t k,
                                                               const float *s, int64_t groups, int nr, float *dot) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 even[4], odd[4]; /* named per chain, not indexed by the group's parity: kept in registers */
    for (int j = 0; j < nr; j++) even[j] = odd[j] = _mm256_setzero_ps();
#define Q8_GROUP_STEP(acc, g)                                                                             \
    do {                                                                                                  \
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (g) * GROUP));                              \
        __m256i aw = _mm256_sign_epi8(wv, wv);                                                            \
        for (int j = 0; j < nr; j++) {                                                                    \
            __m256i av = _mm256_loadu_si256((const __m256i *)(a + j * k + (g) * GROUP));                  \
            __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, wv));                           \
            __m256 part = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));                             \
            acc[j] = _mm256_fmadd_ps(part, _mm256_set1_ps(s[j * groups + (g)]), acc[j]);                  \
        }                                                                                                 \
    } while (0)
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
        Q8_GROUP_STEP(even, g);
        Q8_GROUP_STEP(odd, g + 1);
    }
    if (g < groups) Q8_GROUP_STEP(even, g);
#undef Q8_GROUP_STEP
    float lanes[8];
    for (int j = 0; j < nr; j++) {
        _mm256_storeu_ps(lanes, _mm256_add_ps(even[j], odd[j]));
        dot[j] = q8_lanes_sum(lanes);
    }
}
#define q8_dot_simd q8_dot_avx2
#endif

#if Q4A8_VNNI
/* q8_dot_generic's arithmetic in AVX512-VNNI, two groups a step: lanes 0-7 of a 512-bit vector hold an
 * even group's 8 lane sums, lanes 8-15 the next odd group's, so one fused multiply-add (with each
 * group's scale in its half, from `sv`: 8 copies per row and group) advances both chains exactly as
 * the plain C path does. vpdpbusd multiplies unsigned by signed bytes: the activations go in offset by
 * 128 (`au` = a ^ 0x80, 1..255) and each lane starts from -128 * (the sum of its 4 weights), so the
 * lane's int32 is the exact signed sum. A lone last group (an odd count) is the even chain's, in lanes
 * 0-7 only. Against the AVX2 path on a Zen 4 core (the embedded model's LM head, 49,152 x 576, 1 thread,
 * tools/issue11/lm_head_rows.py, three alternations): 1 row 1.17-1.28 -> 1.05-1.31 ms, 4 rows
 * 2.86-2.93 -> 2.06-2.23, 16 rows 11.3-11.5 -> 8.9-9.1. */
static inline __attribute__((always_inline)) void q8_dot_vnni(const int8_t *w, const uint8_t *au, int64_t k,
                                                               const float *sv, int64_t groups, int nr, float *dot) {
    const __m512i bias = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 acc[4]; /* row j: lanes 0-7 the even groups' chain, 8-15 the odd groups' */
    for (int j = 0; j < nr; j++) acc[j] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + g * GROUP));
        __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv));
        for (int j = 0; j < nr; j++) {
            __m512i isum = _mm512_dpbusd_epi32(start, _mm512_loadu_si512((const void *)(au + j * k + g * GROUP)), wv);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_loadu_ps(sv + (j * groups + g) * 8), acc[j]);
        }
    }
    if (g < groups) {
        const __mmask64 half = 0xffffffffull;
        __m512i wv = _mm512_maskz_loadu_epi8(half, (const void *)(w + g * GROUP));
        __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv));
        for (int j = 0; j < nr; j++) {
            __m512i av = _mm512_maskz_loadu_epi8(half, (const void *)(au + j * k + g * GROUP));
            __m512 sg = _mm512_maskz_loadu_ps(0x00ff, sv + (j * groups + g) * 8);
            acc[j] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, av, wv)), sg, acc[j], 0x00ff);
        }
    }
    float lanes[8];
    for (int j = 0; j < nr; j++) {
        __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1));
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm512_castps512_ps256(acc[j]), odd));
        dot[j] = q8_lanes_sum(lanes);
    }
}
#endif

#if Q4A8_NEON
/* q8_dot_generic's arithmetic in NEON: a group's 32 products summed 4 at a time into 8 int32 lanes
 * (sdot, or widening multiplies folded pairwise: each product at most 128 * 127 in int16), the lanes
 * added into the even or odd chain with one fused multiply-add each, as the plain C path does. */
static inline __attribute__((always_inline)) int32x4_t q8_sums_neon(const int8_t *w, const int8_t *a) {
    int8x16_t wv = vld1q_s8(w), av = vld1q_s8(a);
#if Q4A8_DOTPROD
    return vdotq_s32(vdupq_n_s32(0), wv, av);
#else
    int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(wv), vget_low_s8(av)));
    int32x4_t hi = vpaddlq_s16(vmull_high_s8(wv, av));
    return vpaddq_s32(lo, hi);
#endif
}

static inline __attribute__((always_inline)) void q8_dot_neon(const int8_t *w, const int8_t *a, int64_t k,
                                                               const float *s, int64_t groups, int nr, float *dot) {
    float32x4_t chain[2][4][2]; /* [group parity][row][lanes 0-3, 4-7] */
    for (int e = 0; e < 2; e++)
        for (int j = 0; j < nr; j++) chain[e][j][0] = chain[e][j][1] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < groups; g++)
        for (int j = 0; j < nr; j++) {
            const int8_t *ag = a + j * k + g * GROUP;
            float32x4_t sg = vdupq_n_f32(s[j * groups + g]);
            for (int h = 0; h < 2; h++) {
                int32x4_t isum = q8_sums_neon(w + g * GROUP + 16 * h, ag + 16 * h);
                chain[g & 1][j][h] = vfmaq_f32(chain[g & 1][j][h], vcvtq_f32_s32(isum), sg);
            }
        }
    float lanes[8];
    for (int j = 0; j < nr; j++) {
        vst1q_f32(lanes, vaddq_f32(chain[0][j][0], chain[1][j][0]));
        vst1q_f32(lanes + 4, vaddq_f32(chain[0][j][1], chain[1][j][1]));
        dot[j] = q8_lanes_sum(lanes);
    }
}
#define q8_dot_simd q8_dot_neon
#endif

/* y[M, n] = x[M, k] @ (w * scale[:, None]).T with w int8 (n, k), scale (n,) in the activations'
 * dtype; x bf16 (flag set) or fp32, y fp32 (logits: kept at full precision). path: q4a8_matmul's (1: plain C). Returns 0, or -1 when
 * scratch memory could not be had. */
int q8a8_matmul(const void *x, int bf16, int64_t rows, int64_t k, const int8_t *w, const void *scale, int64_t n,
                float *y, int path) {
    int64_t groups = k / GROUP;
    int8_t *a = malloc((size_t)(rows * k));
    float *s = malloc((size_t)(rows * groups) * sizeof(float) * 2);
    if (!a || !s) {
        free(a);
        free(s);
        return -1;
    }
    q4a8_quantize(x, bf16, bf16, rows, k, NULL, 0.0f, a, s, s + rows * groups, NULL);
    int vector = Q4A8_VECTOR && path != 1;
    (void)vector; /* read only where the build has a vector path */
#if Q4A8_VNNI
    /* q8_dot_vnni's operands: the activations offset to unsigned bytes, each scale 8 times */
    uint8_t *au = vector ? malloc((size_t)(rows * k)) : NULL;
    float *sv = vector ? malloc((size_t)(rows * groups) * 8 * sizeof(float)) : NULL;
    if (vector && (!au || !sv)) {
        free(a);
        free(s);
        free(au);
        free(sv);
        return -1;
    }
    if (vector) {
        for (int64_t i = 0; i < rows * k; i++) au[i] = (uint8_t)a[i] ^ 0x80u;
        for (int64_t i = 0; i < rows * groups; i++)
            for (int l = 0; l < 8; l++) sv[8 * i + l] = s[i];
    }
#endif
#pragma omp parallel for schedule(static) if (n * k * rows > (1 << 18)) num_threads(q4a8_team())
    for (int64_t o = 0; o < n; o++) {
        const int8_t *wo = w + o * k;
        for (int64_t l = 0; l < k; l += 64) __builtin_prefetch(wo + Q8_PREFETCH + l, 0, 3);
        float ws = load(scale, bf16, o);
        for (int64_t r = 0; r < rows; r += 4) {
            int nr = rows - r < 4 ? (int)(rows - r) : 4;
            const int8_t *ar = a + r * k;
            const float *sr = s + r * groups;
            float dot[4];
#if Q4A8_VNNI
            if (vector) {
                const uint8_t *aur = au + r * k;
                const float *svr = sv + r * groups * 8;
                switch (nr) { /* constant row counts: each call unrolls */
                case 4: q8_dot_vnni(wo, aur, k, svr, groups, 4, dot); break;
                case 3: q8_dot_vnni(wo, aur, k, svr, groups, 3, dot); break;
                case 2: q8_dot_vnni(wo, aur, k, svr, groups, 2, dot); break;
                default: q8_dot_vnni(wo, aur, k, svr, groups, 1, dot);
                }
            } else
#elif Q4A8_VECTOR
            if (vector) {
                switch (nr) { /* constant row counts: each call unrolls (q8_dot_simd) */
                case 4: q8_dot_simd(wo, ar, k, sr, groups, 4, dot); break;
                case 3: q8_dot_simd(wo, ar, k, sr, groups, 3, dot); break;
                case 2: q8_dot_simd(wo, ar, k, sr, groups, 2, dot); break;
                default: q8_dot_simd(wo, ar, k, sr, groups, 1, dot);
                }
            } else
#endif
                q8_dot_generic(wo, ar, k, sr, groups, nr, dot);
            for (int j = 0; j < nr; j++) y[(r + j) * n + o] = dot[j] * ws;
        }
    }
#if Q4A8_VNNI
    free(au);
    free(sv);
#endif
    free(a);
    free(s);
    return 0;
}
