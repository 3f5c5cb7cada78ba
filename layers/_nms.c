/* Darknet's NMS for darknet_cfg/infer.py (nms_matrix) when many boxes take part, in C:
 *   iou_over:   over[i][j] = box_iou(i, j) > thresh for every pair, with box.c's float32
 *               expressions in their order (build with -ffp-contract=off: no fused
 *               multiply-adds), so every flag equals numpy's; finite boxes only (the caller
 *               checks). The IoU is symmetric bit for bit, so each pair is computed once.
 *   iou_pairs:  the same test for the pairs i < j only, listed (thousands of boxes: the list is
 *               short where the matrix is not).
 *   greedy:     every class's greedy pass (Darknet's do_nms_sort loop): table[k][t] is the box at
 *               place t of class k's pass (-1: none); a box still alive suppresses the later
 *               boxes of that pass it overlaps (its list in start/dst). alive[k][t] in: 1 for
 *               candidates; out: survivors. Returns -1 when its scratch allocation fails.
 * Loaded with ctypes; no Python API. */
#include <stdint.h>
#include <stdlib.h>

static inline float fmin2(float a, float b) { return a < b ? a : b; }
static inline float fmax2(float a, float b) { return a > b ? a : b; }

/* box.c's box_iou of two (x, y, w, h) boxes, its float32 steps in its order */
static inline float box_iou(const float *a, const float *b) {
    const float al = a[0] - a[2] / 2.f, ar = a[0] + a[2] / 2.f;
    const float at = a[1] - a[3] / 2.f, ab = a[1] + a[3] / 2.f;
    const float bl = b[0] - b[2] / 2.f, br = b[0] + b[2] / 2.f;
    const float bt = b[1] - b[3] / 2.f, bb = b[1] + b[3] / 2.f;
    const float ow = fmin2(ar, br) - fmax2(al, bl), oh = fmin2(ab, bb) - fmax2(at, bt);
    const float inter = (ow < 0 || oh < 0) ? 0.f : ow * oh;
    const float uni = (a[2] * a[3] + b[2] * b[3]) - inter;
    return (inter == 0 || uni == 0) ? 0.f : inter / uni;
}

void iou_over(const float *b, long n, float thresh, uint8_t *over) {
#pragma omp parallel for schedule(dynamic, 16)
    for (long i = 0; i < n; i++)
        for (long j = i; j < n; j++)
            over[i * n + j] = over[j * n + i] = box_iou(b + 4 * i, b + 4 * j) > thresh;
}

long iou_pairs(const float *b, long n, float thresh, int32_t *pi, int32_t *pj, long cap) {
    long m = 0;  /* the pairs i < j with box_iou > thresh, row by row; -1 past cap */
    for (long i = 0; i < n; i++)
        for (long j = i + 1; j < n; j++)
            if (box_iou(b + 4 * i, b + 4 * j) > thresh) {
                if (m >= cap) return -1;
                pi[m] = (int32_t)i;
                pj[m++] = (int32_t)j;
            }
    return m;
}

int greedy(const int64_t *start, const int32_t *dst, long n, const int64_t *table,
           long classes, long length, uint8_t *alive) {
    /* start[i]..start[i+1]: the boxes box i suppresses (dst), for every box i < n */
    int32_t *place = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    if (!place) return -1;
    for (long j = 0; j < n; j++) place[j] = -1;
    for (long k = 0; k < classes; k++) {
        const int64_t *row = table + k * length;
        uint8_t *live = alive + k * length;
        for (long t = 0; t < length; t++) if (row[t] >= 0) place[row[t]] = (int32_t)t;
        for (long t = 0; t < length; t++) {
            if (row[t] < 0 || !live[t]) continue;
            for (int64_t m = start[row[t]]; m < start[row[t] + 1]; m++) {
                int32_t u = place[dst[m]];
                if (u > t) live[u] = 0;
            }
        }
        for (long t = 0; t < length; t++) if (row[t] >= 0) place[row[t]] = -1;
    }
    free(place);
    return 0;
}
