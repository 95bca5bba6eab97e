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
 * path (AVX512-VNNI or plain C), so a row's result is bitwise the same in any batch.
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define Q4A8_VNNI 1
#else
#define Q4A8_VNNI 0
#endif

#define GROUP 32
#define COLS 16
#define TILE 4
#define GROUP_BYTES 320

int q4a8_has_vnni(void) { return Q4A8_VNNI; }

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

static float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* One row's groups of 32 as int8 with a scale each; sa = scale * sum of the int8 values. */
static void quantize_row(const void *x, int bf16, int64_t k, int8_t *a, float *s, float *sa) {
    float v[GROUP];
    for (int64_t g = 0; g < k / GROUP; g++) {
        float amax = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            int64_t at = g * GROUP + i;
            v[i] = bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
            float m = fabsf(v[i]);
            amax = m > amax ? m : amax;
        }
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < GROUP; i++) {
            float r = nearbyintf(v[i] * id);
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
                          const float *const *sa, float out[TILE][COLS]) {
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

#if Q4A8_VNNI
/* `rows` (1..TILE) is a constant in each caller below, so the row loops unroll and a one-row
 * product does one row's work, not a tile's. */
static inline __attribute__((always_inline)) void block_vnni(const uint8_t *wb, int64_t groups,
                                                             const int8_t *const *a, const float *const *s,
                                                             const float *const *sa, float out[TILE][COLS],
                                                             const int rows) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = wb + g * GROUP_BYTES;
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
            for (int j = 0; j < 8; j++) isum = _mm512_dpbusd_epi32(isum, w[j], _mm512_set1_epi32(ar[j]));
            __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(s[r][g]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sa[r][g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out[r], acc[r]);
}

static void block_vnni_rows(const uint8_t *wb, int64_t groups, const int8_t *const *a, const float *const *s,
                            const float *const *sa, float out[TILE][COLS], int rows) {
    switch (rows) {
    case 1: block_vnni(wb, groups, a, s, sa, out, 1); break;
    case 2: block_vnni(wb, groups, a, s, sa, out, 2); break;
    case 3: block_vnni(wb, groups, a, s, sa, out, 3); break;
    default: block_vnni(wb, groups, a, s, sa, out, TILE); break;
    }
}
#endif

/* y[M, n_out] = x[M, K] @ W.T, W packed as described above with n_blocks * 16 >= n_out columns.
 * x and y are bf16 (flag set) or fp32; K is a multiple of 32. generic != 0 forces the plain C path
 * (the tests compare the two). Returns 0, or -1 when scratch memory could not be had. */
int q4a8_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, const uint8_t *w, int64_t n_blocks,
                int64_t n_out, void *y, int y_bf16, int generic) {
    int64_t groups = k / GROUP;
    int8_t *a = malloc((size_t)(rows * k));
    float *s = malloc((size_t)(rows * groups) * sizeof(float) * 2);
    if (!a || !s) {
        free(a);
        free(s);
        return -1;
    }
    float *sa = s + rows * groups;
    size_t x_el = x_bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++)
        quantize_row((const char *)x + (size_t)(r * k) * x_el, x_bf16, k, a + r * k, s + r * groups,
                     sa + r * groups);
    int64_t tiles = (rows + TILE - 1) / TILE, work = n_blocks * tiles;
    int serial = rows * k * n_blocks * COLS < (int64_t)1 << 18;
#pragma omp parallel for schedule(static) if (!serial)
    for (int64_t item = 0; item < work; item++) {
        /* blocks outermost within a thread's run: a block's weights stay in cache over its tiles */
        int64_t blk = item / tiles, r0 = (item % tiles) * TILE;
        const int8_t *ap[TILE];
        const float *sp[TILE], *sap[TILE];
        for (int r = 0; r < TILE; r++) {
            int64_t row = r0 + r < rows ? r0 + r : r0; /* a short last tile repeats its first row */
            ap[r] = a + row * k;
            sp[r] = s + row * groups;
            sap[r] = sa + row * groups;
        }
        float out[TILE][COLS];
        const uint8_t *wb = w + (size_t)(blk * groups) * GROUP_BYTES;
#if Q4A8_VNNI
        if (!generic)
            block_vnni_rows(wb, groups, ap, sp, sap, out, rows - r0 < TILE ? (int)(rows - r0) : TILE);
        else
#endif
            block_generic(wb, groups, ap, sp, sap, out);
        int64_t c0 = blk * COLS, cols = n_out - c0 < COLS ? n_out - c0 : COLS;
        for (int r = 0; r < TILE && r0 + r < rows; r++) {
            size_t at = (size_t)((r0 + r) * n_out + c0);
            if (y_bf16)
                for (int64_t c = 0; c < cols; c++) ((uint16_t *)y)[at + c] = float_to_bf16(out[r][c]);
            else
                for (int64_t c = 0; c < cols; c++) ((float *)y)[at + c] = out[r][c];
        }
    }
    free(a);
    free(s);
    return 0;
}
