/* Every code path of models/q4a8.c computes the same bits: a standalone check, for a CPU you do not have.
 *
 * tests/model/test_q4a8.py checks this through Python on the machine that runs the suite; this program
 * checks it without Python or torch, so that the aarch64 NEON paths can be run under an emulator
 * (tools/issue11/check_aarch64.sh: cross-compiled, then run by qemu-aarch64) from an x86-64 machine,
 * and the x86 paths natively:
 *
 *     cc -O3 -march=native -fopenmp -ffp-contract=off tools/issue11/paths_agree.c models/q4a8.c \
 *         models/q4a8_layers.c -Imodels -lm -o paths_agree && ./paths_agree
 *
 * For random packed weights and activations (fp32 and bf16), several widths and row counts: the
 * build's vector path equals the plain C path bit for bit, and every row equals that row computed alone
 * (the oracle's premise); the same for the int8 vocabulary product. Exits 1 on the first difference.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "q4a8.h"

int q4a8_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, const uint8_t *w, int64_t n_blocks,
                int64_t n_out, void *y, int y_bf16, int path, const void *norm, float eps);
int q8a8_matmul(const void *x, int bf16, int64_t rows, int64_t k, const int8_t *w, const void *scale, int64_t n,
                float *y, int path);
int q4a8_has_vnni(void);
int q4a8_has_avx2(void);
int q4a8_has_neon(void);
void q4a8_set_threads(int n);

static uint64_t state = 0x9e3779b97f4a7c15u;

static uint32_t next(void) { /* xorshift64*: the same numbers on every machine */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (uint32_t)((state * 0x2545f4914f6cdd1du) >> 32);
}

static float uniform(void) { return (float)(next() >> 8) / 16777216.0f * 2.0f - 1.0f; }

static uint16_t random_half(void) { /* a normal fp16 between 2^-9 and 2^3, either sign, or zero */
    if (next() % 16 == 0) return 0;
    return (uint16_t)(((next() & 1u) << 15) | ((6u + next() % 12u) << 10) | (next() & 0x3ffu));
}

static void put(void *x, int bf16, int64_t i, float v) { /* element i of an fp32 or bf16 array */
    if (bf16)
        ((uint16_t *)x)[i] = float_to_bf16(v);
    else
        ((float *)x)[i] = v;
}

static int failures = 0;

static void same(const void *got, const void *want, size_t bytes, const char *what, int64_t k, int64_t rows) {
    if (memcmp(got, want, bytes) != 0 && failures++ < 8)
        fprintf(stderr, "DIFFERENT: %s (k %lld, rows %lld)\n", what, (long long)k, (long long)rows);
}

static void check_q4(int64_t k, int64_t n_out, int64_t rows, int bf16) {
    int64_t blocks = (n_out + 15) / 16, groups = k / 32, size = bf16 ? 2 : 4;
    uint8_t *w = malloc((size_t)(blocks * groups * 320));
    for (int64_t b = 0; b < blocks * groups; b++) {
        uint8_t *p = w + b * 320;
        for (int i = 0; i < 256; i++) p[i] = (uint8_t)next();
        for (int i = 0; i < 32; i++) ((uint16_t *)(p + 256))[i] = random_half();
    }
    void *x = malloc((size_t)(rows * k * size));
    for (int64_t i = 0; i < rows * k; i++) put(x, bf16, i, uniform() * (i % 7 == 0 ? 8.0f : 1.0f));
    size_t out_bytes = (size_t)(rows * n_out * size);
    void *c = malloc(out_bytes), *simd = malloc(out_bytes), *best = malloc(out_bytes), *one = malloc(out_bytes);
    q4a8_matmul(x, bf16, rows, k, w, blocks, n_out, c, bf16, 1, NULL, 0.0f);
    q4a8_matmul(x, bf16, rows, k, w, blocks, n_out, simd, bf16, 2, NULL, 0.0f);
    q4a8_matmul(x, bf16, rows, k, w, blocks, n_out, best, bf16, 0, NULL, 0.0f);
    same(simd, c, out_bytes, bf16 ? "q4a8 vector path against C, bf16" : "q4a8 vector path against C, fp32", k, rows);
    same(best, c, out_bytes, "q4a8 fastest path against C", k, rows);
    for (int64_t r = 0; r < rows; r++) /* each row alone */
        q4a8_matmul((const char *)x + r * k * size, bf16, 1, k, w, blocks, n_out, (char *)one + r * n_out * size, bf16,
                    0, NULL, 0.0f);
    same(one, best, out_bytes, "q4a8 rows alone against the batch", k, rows);
    free(w), free(x), free(c), free(simd), free(best), free(one);
}

static void check_q8(int64_t k, int64_t n, int64_t rows, int bf16) {
    int64_t size = bf16 ? 2 : 4;
    int8_t *w = malloc((size_t)(n * k));
    for (int64_t i = 0; i < n * k; i++) w[i] = (int8_t)next();
    void *scale = malloc((size_t)(n * size)), *x = malloc((size_t)(rows * k * size));
    for (int64_t i = 0; i < n; i++) put(scale, bf16, i, 0.001f + 0.02f * (uniform() + 1.0f));
    for (int64_t i = 0; i < rows * k; i++) put(x, bf16, i, uniform() * 3.0f);
    size_t bytes = (size_t)(rows * n) * sizeof(float);
    float *c = malloc(bytes), *best = malloc(bytes), *one = malloc(bytes);
    q8a8_matmul(x, bf16, rows, k, w, scale, n, c, 1);
    q8a8_matmul(x, bf16, rows, k, w, scale, n, best, 0);
    same(best, c, bytes, "q8a8 vector path against C", k, rows);
    for (int64_t r = 0; r < rows; r++)
        q8a8_matmul((const char *)x + r * k * size, bf16, 1, k, w, scale, n, one + r * n, 0);
    same(one, best, bytes, "q8a8 rows alone against the batch", k, rows);
    free(w), free(scale), free(x), free(c), free(best), free(one);
}

int main(void) {
    const char *path = q4a8_has_vnni()   ? "AVX512-VNNI"
                       : q4a8_has_avx2() ? "AVX2"
                       : q4a8_has_neon() ? (q4a8_has_neon() == 2 ? "NEON with the dot product" : "NEON")
                                         : "none (plain C only: nothing to compare)";
    printf("vector path of this build: %s\n", path);
    const int64_t widths[] = {96, 160, 576}, row_counts[] = {1, 2, 3, 4, 5, 7, 9, 37};
    int checks = 0;
    for (int threads = 1; threads <= 2; threads++) {
        q4a8_set_threads(threads);
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 8; j++)
                for (int bf16 = 0; bf16 < 2; bf16++) {
                    check_q4(widths[i], 72, row_counts[j], bf16);
                    check_q8(widths[i], 203, row_counts[j], bf16);
                    checks += 2;
                }
    }
    if (failures) {
        printf("%d of %d checks found different bits\n", failures, checks);
        return 1;
    }
    printf("%d checks: every path and batch gave the same bits\n", checks);
    return 0;
}
