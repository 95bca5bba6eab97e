/* What models/q4a8.c shares with models/q4a8_layers.c (one library, built from both). */
#ifndef MESHD_Q4A8_H
#define MESHD_Q4A8_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The team size of the library's parallel regions (see q4a8_set_threads). */
int q4a8_team(void);

/* Bytes of int8 activations q4a8_quantize writes for `rows` x `k` (AMX reads whole tiles of 16 rows:
 * the room past the last row must be zeros). */
int64_t q4a8_act_bytes(int64_t rows, int64_t k);

/* Rows of `x` (bf16 when x_bf16, else fp32; rms_norm'ed first with `norm` in the activations' dtype
 * when given, `normed` then k floats of scratch for each thread of q4a8_team()) rounded to int8 per
 * group of 32: `a` (rows x k), the groups' scales `s` and scale x sum `sa` (rows x k / 32 each). Many
 * rows are split between the team, each row computed alike. */
void q4a8_quantize(const void *x, int x_bf16, int act_bf16, int64_t rows, int64_t k, const void *norm, float eps,
                   int8_t *a, float *s, float *sa, float *normed);

/* y (rows x n_out, bf16 when y_bf16, else fp32) = the quantized rows times the packed weight `w`. */
void q4a8_product(const int8_t *a, const float *s, const float *sa, int64_t rows, int64_t k, const uint8_t *w,
                  int64_t n_blocks, int64_t n_out, void *y, int y_bf16, int path);

#endif
