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

void iou_over(const float *b, long n, float thresh, uint8_t *over) {
#pragma omp parallel for schedule(dynamic, 16)
    for (long i = 0; i < n; i++) {
        const float ax = b[4 * i], ay = b[4 * i + 1], aw = b[4 * i + 2], ah = b[4 * i + 3];
        const float al = ax - aw / 2.f, ar = ax + aw / 2.f, at = ay - ah / 2.f, ab = ay + ah / 2.f;
        const float aa = aw * ah;
        for (long j = i; j < n; j++) {
            const float bx = b[4 * j], by = b[4 * j + 1], bw = b[4 * j + 2], bh = b[4 * j + 3];
            const float bl = bx - bw / 2.f, br = bx + bw / 2.f, bt = by - bh / 2.f, bb = by + bh / 2.f;
            const float ow = fmin2(ar, br) - fmax2(al, bl), oh = fmin2(ab, bb) - fmax2(at, bt);
            const float inter = (ow < 0 || oh < 0) ? 0.f : ow * oh;
            const float uni = (aa + bw * bh) - inter;
            const float iou = (inter == 0 || uni == 0) ? 0.f : inter / uni;
            over[i * n + j] = over[j * n + i] = iou > thresh;
        }
    }
}

long iou_pairs(const float *b, long n, float thresh, int32_t *pi, int32_t *pj, long cap) {
    long m = 0;  /* the pairs i < j with box_iou > thresh, row by row; -1 past cap */
    for (long i = 0; i < n; i++) {
        const float ax = b[4 * i], ay = b[4 * i + 1], aw = b[4 * i + 2], ah = b[4 * i + 3];
        const float al = ax - aw / 2.f, ar = ax + aw / 2.f, at = ay - ah / 2.f, ab = ay + ah / 2.f;
        const float aa = aw * ah;
        for (long j = i + 1; j < n; j++) {
            const float bx = b[4 * j], by = b[4 * j + 1], bw = b[4 * j + 2], bh = b[4 * j + 3];
            const float bl = bx - bw / 2.f, br = bx + bw / 2.f, bt = by - bh / 2.f, bb = by + bh / 2.f;
            const float ow = fmin2(ar, br) - fmax2(al, bl), oh = fmin2(ab, bb) - fmax2(at, bt);
            const float inter = (ow < 0 || oh < 0) ? 0.f : ow * oh;
            const float uni = (aa + bw * bh) - inter;
            const float iou = (inter == 0 || uni == 0) ? 0.f : inter / uni;
            if (iou > thresh) {
                if (m >= cap) return -1;
                pi[m] = (int32_t)i;
                pj[m++] = (int32_t)j;
            }
        }
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
