/* The packed input layout of the SAD convolution, shared by the convolution (sad_kernel.c) and
 * the code producers that write codes straight into it (requant.c).
 *
 * Packed input, per image: [C8][ah][aw][Hs][Ws][8] bytes. Channels are grouped by 8 (channels
 * past C take the padding code in both x and w, so they add 0); the padded input is split into
 * phase planes (plane (a, b) holds padded rows a, a+sh, ... and columns b, b+sw, ...; only the
 * ah = min(sh, kh) x aw = min(sw, kw) planes some tap reads are stored), so that for every tap
 * (u, v) the inputs of consecutive output columns are consecutive 8-byte cells.
 */
#ifndef ADDERQUANT_SAD_LAYOUT_H
#define ADDERQUANT_SAD_LAYOUT_H

#include <stdint.h>

#include "kernel_common.h"

typedef struct {
    int64_t n_img, cin, h, w, cout, kh, kw, sh, sw, ph, pw, ho, wo;
    int64_t c8, k8;        /* channel groups of 8; taps per output (c8 * kh * kw) */
    int64_t ah, aw;        /* phase planes used: min(sh, kh) x min(sw, kw) */
    int64_t hs, ws;        /* phase-plane height and width (cells of 8 bytes) */
    int64_t plane, image;  /* bytes of one phase plane / one packed image */
    int64_t out_channels;  /* channels of the output tensor */
    const int64_t *off;    /* [k8] byte offset of tap k from an output cell's base */
    const uint8_t *wp;     /* packed weights [cout][k8][8] */
    const int32_t *out_index;
    int32_t *out;
} Geometry;

/* Fill g for this input and convolution geometry (KERNEL_OK or KERNEL_ERR_GEOMETRY). */
int sad_init_geometry(Geometry *g, int64_t n_img, int64_t cin, int64_t h, int64_t w,
                      int64_t cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw);

/* The packed columns [lo, hi) of phase b whose input column col * sw + b - pw lies inside
 * [0, w); the others hold the padding code. */
static inline void phase_columns(const Geometry *g, int64_t b, int64_t *lo, int64_t *hi) {
    const int64_t first = (g->pw - b + g->sw - 1) / g->sw, last = g->w - 1 + g->pw - b;
    *lo = first < 0 ? 0 : first;
    *hi = (last >= 0 ? last / g->sw : -((-last + g->sw - 1) / g->sw)) + 1;
    if (*hi > g->ws) *hi = g->ws;
    if (*hi < *lo) *hi = *lo;
}

/* Interleave 8 rows of `count` bytes into `count` cells of 8 bytes: dst[j*8 + e] = row e[j]. */
void sad_interleave_rows(const uint8_t *rows, int64_t stride, int64_t count, uint8_t *dst);

#endif
