/* Darknet's NMS for darknet_cfg/infer.py (nms_matrix) when many boxes take part, in C:
 *   iou_over:   over[i][j] = box_iou(i, j) > thresh for every pair, with box.c's float32
 *               expressions in their order (build with -ffp-contract=off: no fused
 *               multiply-adds), so every flag equals numpy's; finite boxes only (the caller
 *               checks). The IoU is symmetric bit for bit, so each pair is computed once.
 *   greedy:     every class's greedy pass (Darknet's do_nms_sort loop): table[k][t] is the box at
 *               place t of class k's pass (-1: none); a box still alive suppresses the later
 *               boxes of that pass it overlaps. alive[k][t] in: 1 for candidates; out: survivors.
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

int greedy(const uint8_t *over, long n, const int64_t *table, long classes, long length,
           uint8_t *alive) {
    long *start = malloc((n + 1) * sizeof(long)), total = 0;
    if (!start) return -1;
    for (long i = 0; i < n; i++) {  /* neighbour lists (CSR) of the overlap graph */
        start[i] = total;
        for (long j = 0; j < n; j++) total += over[i * n + j] && j != i;
    }
    start[n] = total;
    long *nbr = malloc((total + 1) * sizeof(long));
    int32_t *place = malloc((size_t)n * sizeof(int32_t) * 1);
    if (!nbr || !place) { free(start); free(nbr); free(place); return -1; }
    for (long i = 0, m = 0; i < n; i++)
        for (long j = 0; j < n; j++)
            if (over[i * n + j] && j != i) nbr[m++] = j;
    for (long j = 0; j < n; j++) place[j] = -1;
    for (long k = 0; k < classes; k++) {
        const int64_t *row = table + k * length;
        uint8_t *live = alive + k * length;
        for (long t = 0; t < length; t++) if (row[t] >= 0) place[row[t]] = (int32_t)t;
        for (long t = 0; t < length; t++) {
            if (row[t] < 0 || !live[t]) continue;
            for (long m = start[row[t]]; m < start[row[t] + 1]; m++) {
                int32_t u = place[nbr[m]];
                if (u > t) live[u] = 0;
            }
        }
        for (long t = 0; t < length; t++) if (row[t] >= 0) place[row[t]] = -1;
    }
    free(start); free(nbr); free(place);
    return 0;
}
