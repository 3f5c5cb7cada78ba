/* uint8 quantization of a convolution's input for layers/quantized.py (AVX2), in one pass:
 *   q = clamp(round_half_even(x * inv_scale) + zero_point, 0, 255), NaN -> 0
 * the same float32 steps as the torch expression it replaces (x.float() * inv, round, + zp,
 * clamp, to uint8), so the bytes are identical. x: n dense bfloat16 (stored as uint16) or
 * float32 values, in any dense layout (q gets the same one). Blocks of 32 run in parallel with
 * OpenMP (torch's own runtime when loaded after torch). Loaded with ctypes; no Python API. */
#include <immintrin.h>
#include <stdint.h>

static inline __m256 load8(const void *x, int bf16, long i) {
    if (bf16) {  /* bfloat16 -> float32: the 16 bits become the high half */
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)x + i);
}

static inline __m256i q8(__m256 v, __m256 inv, __m256 zp) {
    v = _mm256_round_ps(_mm256_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_max_ps(_mm256_add_ps(v, zp), _mm256_setzero_ps());  /* NaN -> 0 (2nd operand) */
    return _mm256_cvtps_epi32(_mm256_min_ps(v, _mm256_set1_ps(255.f)));
}

void quantize_u8(const void *x, int bf16, long n, float inv_scale, float zero_point,
                 uint8_t *q) {
    const __m256 inv = _mm256_set1_ps(inv_scale), zp = _mm256_set1_ps(zero_point);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    long blocks = n / 32;
#pragma omp parallel for schedule(static) if (blocks >= 2048)
    for (long b = 0; b < blocks; b++) {
        long i = b * 32;
        __m256i a = q8(load8(x, bf16, i), inv, zp), c = q8(load8(x, bf16, i + 8), inv, zp);
        __m256i d = q8(load8(x, bf16, i + 16), inv, zp), e = q8(load8(x, bf16, i + 24), inv, zp);
        /* 4 x 8 int32 -> 32 uint8 in order (the packs interleave 128-bit lanes) */
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, c), _mm256_packus_epi32(d, e));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    for (long i = blocks * 32; i < n; i++) {  /* the tail, one value at a time */
        float f;
        if (bf16) {
            uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
            __builtin_memcpy(&f, &u, 4);
        } else {
            f = ((const float *)x)[i];
        }
        __m128 v = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(f * inv_scale),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm_min_ss(_mm_max_ss(_mm_add_ss(v, _mm_set_ss(zero_point)), _mm_setzero_ps()),
                       _mm_set_ss(255.f));
        q[i] = (uint8_t)_mm_cvtss_si32(v);
    }
}
