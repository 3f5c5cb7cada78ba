/* Winograd F(m x m, 3x3) transforms for layers/winograd.py (AVX2 + FMA), m = 2 or 4.
 *
 * The channel mixing between them is torch's batched GEMM; these functions do the parts that
 * torch can only do in several passes over memory:
 *   wino_input:  NHWC input, ldx floats from a pixel to the next (>= C: a channel slice of a
 *                wider tensor), zero padding 1 implied -> V[p][tile][c] = (B^T d B)[p]
 *   wino_output: M[p][tile][k] -> NHWC output = A^T M A (+ bias, leaky), border tiles clipped
 *   wino_grad_tiles (training): NHWC output gradient -> its tiles' A dY A^T, D[p][tile][k]
 * for the tiles of tile rows [r0, r1) of every image. Channels are processed 8 at a time (one
 * ymm register), so C and K must be multiples of 8; tiles run in parallel with OpenMP (torch's
 * own runtime when loaded after torch). Loaded with ctypes; no Python API. */
#include <immintrin.h>
#include <stdlib.h>

typedef __m256 v8;

#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL(c, x) _mm256_mul_ps(_mm256_set1_ps(c), x)
#define FMA(c, x, y) _mm256_fmadd_ps(_mm256_set1_ps(c), x, y)   /* c*x + y */

/* B^T of F(4x4,3x3) (points 0, +-1, +-2, inf) on 6 values */
static inline void bt4(const v8 *d, v8 *t) {
    t[0] = ADD(FMA(-5.f, d[2], MUL(4.f, d[0])), d[4]);
    v8 a = FMA(-4.f, d[2], d[4]), b = FMA(-4.f, d[1], d[3]);
    t[1] = ADD(a, b);
    t[2] = SUB(a, b);
    v8 c = SUB(d[4], d[2]), e = MUL(2.f, SUB(d[3], d[1]));
    t[3] = ADD(c, e);
    t[4] = SUB(c, e);
    t[5] = ADD(FMA(-5.f, d[3], MUL(4.f, d[1])), d[5]);
}

/* B^T of F(2x2,3x3) on 4 values */
static inline void bt2(const v8 *d, v8 *t) {
    t[0] = SUB(d[0], d[2]);
    t[1] = ADD(d[1], d[2]);
    t[2] = SUB(d[2], d[1]);
    t[3] = SUB(d[1], d[3]);
}

/* A^T of F(4x4,3x3) on 6 values -> 4 */
static inline void at4(const v8 *s, v8 *o) {
    v8 a = ADD(s[1], s[2]), b = SUB(s[1], s[2]), c = ADD(s[3], s[4]), d = SUB(s[3], s[4]);
    o[0] = ADD(ADD(s[0], a), c);
    o[1] = FMA(2.f, d, b);
    o[2] = FMA(4.f, c, a);
    o[3] = ADD(FMA(8.f, d, b), s[5]);
}

/* A of F(4x4,3x3) (A^T's transpose) on 4 values -> 6: the output transform's adjoint */
static inline void a4(const v8 *y, v8 *z) {
    v8 e = ADD(y[0], y[2]), o = ADD(y[1], y[3]);
    v8 e4 = FMA(4.f, y[2], y[0]), o8 = FMA(8.f, y[3], MUL(2.f, y[1]));
    z[0] = y[0];
    z[1] = ADD(e, o);
    z[2] = SUB(e, o);
    z[3] = ADD(e4, o8);
    z[4] = SUB(e4, o8);
    z[5] = y[3];
}

/* A of F(2x2,3x3) on 2 values -> 4 */
static inline void a2(const v8 *y, v8 *z) {
    z[0] = y[0];
    z[1] = ADD(y[0], y[1]);
    z[2] = SUB(y[0], y[1]);
    z[3] = _mm256_sub_ps(_mm256_setzero_ps(), y[1]);
}

/* A^T of F(2x2,3x3) on 4 values -> 2 */
static inline void at2(const v8 *s, v8 *o) {
    o[0] = ADD(ADD(s[0], s[1]), s[2]);
    o[1] = SUB(SUB(s[1], s[2]), s[3]);
}

/* Pointers to the size x size pixels of image b from (y0, x0) of an NHWC map (ld floats from a
 * pixel to the next); pixels outside the map point to zero. */
static inline void patch(const float *x, long ld, int h, int w, int b, int y0, int x0, int size,
                         const float *zero, const float **src) {
    for (int i = 0; i < size; i++)
        for (int j = 0; j < size; j++) {
            const int y = y0 + i, xx = x0 + j;
            src[i * size + j] = (y < 0 || y >= h || xx < 0 || xx >= w)
                ? zero : x + (((long)b * h + y) * w + xx) * ld;
        }
}

int wino_input(const float *x, long ldx, int n, int h, int w, int c, int m, int r0, int r1,
               int tw, float *v, int threads) {
    const int a = m + 2, rows = r1 - r0;
    const long nt = (long)n * rows * tw, plane = nt * c;
    float *zero = calloc(c, sizeof(float));
    if (!zero)
        return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < nt; t++) {
        const int tx = t % tw, ty = r0 + (t / tw) % rows, b = t / ((long)tw * rows);
        const float *src[36];
        patch(x, ldx, h, w, b, ty * m - 1, tx * m - 1, a, zero, src);
        float *dst = v + t * c;
        for (int ch = 0; ch < c; ch += 8) {
            v8 d[36], r[36], col[6], tc[6];
            for (int k = 0; k < a * a; k++)
                d[k] = _mm256_loadu_ps(src[k] + ch);
            for (int i = 0; i < a; i++)          /* rows: r[i][*] = B^T d[i][*] */
                if (m == 4) bt4(d + i * a, r + i * a); else bt2(d + i * a, r + i * a);
            for (int j = 0; j < a; j++) {        /* columns */
                for (int i = 0; i < a; i++) col[i] = r[i * a + j];
                if (m == 4) bt4(col, tc); else bt2(col, tc);
                for (int i = 0; i < a; i++)
                    _mm256_storeu_ps(dst + (i * a + j) * plane + ch, tc[i]);
            }
        }
    }
    free(zero);
    return 0;
}

void wino_output(const float *mm, int n, int h, int w, int k, int m, int r0, int r1, int tw,
                 const float *bias, float slope, int leaky, float *y, int threads) {
    const int a = m + 2, rows = r1 - r0;
    const long nt = (long)n * rows * tw, plane = nt * k;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < nt; t++) {
        const int tx = t % tw, ty = r0 + (t / tw) % rows, b = t / ((long)tw * rows);
        const int ni = h - ty * m < m ? h - ty * m : m, nj = w - tx * m < m ? w - tx * m : m;
        const float *src = mm + t * k;
        float *dst = y + (((long)b * h + ty * m) * w + tx * m) * k;
        const v8 sl = _mm256_set1_ps(slope);
        for (int ch = 0; ch < k; ch += 8) {
            v8 s[36], r[24], col[6], o[4];
            for (int p = 0; p < a * a; p++)
                s[p] = _mm256_loadu_ps(src + p * plane + ch);
            for (int j = 0; j < a; j++) {        /* columns: r[*][j] = A^T s[*][j] */
                for (int i = 0; i < a; i++) col[i] = s[i * a + j];
                if (m == 4) at4(col, o); else at2(col, o);
                for (int i = 0; i < m; i++) r[i * a + j] = o[i];
            }
            const v8 bv = bias ? _mm256_loadu_ps(bias + ch) : _mm256_setzero_ps();
            for (int i = 0; i < ni; i++) {       /* rows */
                if (m == 4) at4(r + i * a, o); else at2(r + i * a, o);
                for (int j = 0; j < nj; j++) {
                    v8 z = ADD(o[j], bv);
                    if (leaky)   /* max(z, slope z) = leaky ReLU for 0 < slope < 1 */
                        z = _mm256_max_ps(z, _mm256_mul_ps(z, sl));
                    _mm256_storeu_ps(dst + ((long)i * w + j) * k + ch, z);
                }
            }
        }
    }
}

/* Training: A dY A^T of the m x m tiles of the output gradient dY (NHWC, ldy floats from a pixel
 * to the next; zero beyond the map) -> D[p][tile][k], the operand of the weight gradient. */
int wino_grad_tiles(const float *dy, long ldy, int n, int h, int w, int k, int m, int r0,
                    int r1, int tw, float *d, int threads) {
    const int a = m + 2, rows = r1 - r0;
    const long nt = (long)n * rows * tw, plane = nt * k;
    float *zero = calloc(k, sizeof(float));
    if (!zero)
        return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < nt; t++) {
        const int tx = t % tw, ty = r0 + (t / tw) % rows, b = t / ((long)tw * rows);
        const float *src[16];
        patch(dy, ldy, h, w, b, ty * m, tx * m, m, zero, src);
        float *dst = d + t * k;
        for (int ch = 0; ch < k; ch += 8) {
            v8 g[16], r[24], col[4], z[6];
            for (int p = 0; p < m * m; p++)
                g[p] = _mm256_loadu_ps(src[p] + ch);
            for (int i = 0; i < m; i++)          /* rows: r[i][*] = A g[i][*] */
                if (m == 4) a4(g + i * m, r + i * a); else a2(g + i * m, r + i * a);
            for (int j = 0; j < a; j++) {        /* columns */
                for (int i = 0; i < m; i++) col[i] = r[i * a + j];
                if (m == 4) a4(col, z); else a2(col, z);
                for (int i = 0; i < a; i++)
                    _mm256_storeu_ps(dst + (i * a + j) * plane + ch, z[i]);
            }
        }
    }
    free(zero);
    return 0;
}
