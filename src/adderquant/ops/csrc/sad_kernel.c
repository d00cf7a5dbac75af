/* The SAD convolution over uint8 codes, int32 results:
 *
 *   out[n, oc(t), i, j] = sum_{c,u,v} |x[n, c, i*sh+u-ph, j*sw+v-pw] - w[t, c, u, v]|
 *
 * where positions outside the input take `pad_code` and oc(t) = out_index[t] (identity if
 * NULL). The input is packed as sad_layout.h describes; one SAD instruction (vpsadbw) then
 * computes, in each 64-bit lane, the 8-channel partial SAD of one output column against one
 * broadcast 8-byte weight cell: 8 (AVX-512BW) or 4 (AVX2) output columns per instruction,
 * accumulated in 64-bit lanes, with no horizontal reduction; the portable path does the same
 * on 8 columns in plain C. Packed weights: [T][K8][8] with the taps k = (c8, u, v) in the order
 * of the offset table.
 *
 * Instruction sets. The register tile under SAD_TILE_BODY is written once over a few vector
 * operations and compiled per instruction set: this file includes itself with SAD_ISA set. The
 * path is an argument of every call (kernel_common.h: < 0 picks the best this CPU runs).
 */
#ifndef SAD_TILE_BODY

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_common.h"
#include "sad_layout.h"

static inline int64_t out_channel(const Geometry *g, int64_t t) {
    return g->out_index ? g->out_index[t] : t;
}

/* The output plane of filter t for image n. */
static inline int32_t *out_plane(const Geometry *g, int64_t n, int64_t t) {
    return g->out + (n * g->out_channels + out_channel(g, t)) * g->ho * g->wo;
}

/* Byte offset of the cell of output (i, j) for tap (0, 0, 0) inside a packed image. */
static inline int64_t cell_base(const Geometry *g, int64_t i, int64_t j) {
    return (i * g->ws + j) * 8;
}

void sad_interleave_rows(const uint8_t *rows, int64_t stride, int64_t count, uint8_t *dst) {
    int64_t j = 0;
#if KERNEL_X86 && defined(__SSE2__)
    for (; j + 16 <= count; j += 16, dst += 128) {
        __m128i r[8], t[8], u[8];
        for (int e = 0; e < 8; e++) r[e] = _mm_loadu_si128((const __m128i *)(rows + e * stride + j));
        for (int e = 0; e < 4; e++) {
            t[2 * e] = _mm_unpacklo_epi8(r[2 * e], r[2 * e + 1]);
            t[2 * e + 1] = _mm_unpackhi_epi8(r[2 * e], r[2 * e + 1]);
        }
        for (int h = 0; h < 2; h++) { /* rows 0-3 (h = 0) and 4-7 (h = 1) */
            u[4 * h + 0] = _mm_unpacklo_epi16(t[4 * h], t[4 * h + 2]);
            u[4 * h + 1] = _mm_unpackhi_epi16(t[4 * h], t[4 * h + 2]);
            u[4 * h + 2] = _mm_unpacklo_epi16(t[4 * h + 1], t[4 * h + 3]);
            u[4 * h + 3] = _mm_unpackhi_epi16(t[4 * h + 1], t[4 * h + 3]);
        }
        for (int q = 0; q < 4; q++) {
            _mm_storeu_si128((__m128i *)(dst + 32 * q), _mm_unpacklo_epi32(u[q], u[q + 4]));
            _mm_storeu_si128((__m128i *)(dst + 32 * q + 16), _mm_unpackhi_epi32(u[q], u[q + 4]));
        }
    }
    for (; j + 8 <= count; j += 8, dst += 64) {
        __m128i t[4], u[2];
        for (int e = 0; e < 4; e++)
            t[e] = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(rows + 2 * e * stride + j)),
                                     _mm_loadl_epi64((const __m128i *)(rows + (2 * e + 1) * stride + j)));
        for (int h = 0; h < 2; h++) {
            u[0] = _mm_unpacklo_epi16(t[0], t[1]);
            u[1] = _mm_unpacklo_epi16(t[2], t[3]);
            if (h) {
                u[0] = _mm_unpackhi_epi16(t[0], t[1]);
                u[1] = _mm_unpackhi_epi16(t[2], t[3]);
            }
            _mm_storeu_si128((__m128i *)(dst + 32 * h), _mm_unpacklo_epi32(u[0], u[1]));
            _mm_storeu_si128((__m128i *)(dst + 32 * h + 16), _mm_unpackhi_epi32(u[0], u[1]));
        }
    }
#endif
    for (; j < count; j++, dst += 8)
        for (int e = 0; e < 8; e++) dst[e] = rows[e * stride + j];
}

/* Pack image n of x into dst (one packed image: [C8][ah][aw][Hs][Ws][8]); rows is scratch
 * space of 8 * Ws bytes. */
static void pack_image(const Geometry *g, const uint8_t *x, int64_t n, uint8_t pad_code,
                       uint8_t *dst, uint8_t *rows) {
    const int64_t hw = g->h * g->w, ws = g->ws;
    for (int64_t c8 = 0; c8 < g->c8; c8++) {
        const int64_t real = g->cin - c8 * 8 < 8 ? g->cin - c8 * 8 : 8;
        const uint8_t *src = x + (n * g->cin + c8 * 8) * hw;
        for (int64_t a = 0; a < g->ah; a++) {
            for (int64_t b = 0; b < g->aw; b++) {
                int64_t c_lo, c_hi;
                phase_columns(g, b, &c_lo, &c_hi);
                for (int64_t r = 0; r < g->hs; r++, dst += ws * 8) {
                    const int64_t hi = r * g->sh + a - g->ph;
                    const int inside = hi >= 0 && hi < g->h;
                    if (inside && real == 8 && g->sw == 1) { /* straight from the 8 planes */
                        memset(dst, pad_code, (size_t)(c_lo * 8));
                        sad_interleave_rows(src + hi * g->w + c_lo + b - g->pw, hw, c_hi - c_lo,
                                        dst + c_lo * 8);
                        memset(dst + c_hi * 8, pad_code, (size_t)((ws - c_hi) * 8));
                        continue;
                    }
                    for (int64_t e = 0; e < 8; e++) {
                        uint8_t *row = rows + e * ws;
                        if (e >= real || !inside) {
                            memset(row, pad_code, (size_t)ws);
                            continue;
                        }
                        const uint8_t *s = src + e * hw + hi * g->w + c_lo * g->sw + b - g->pw;
                        memset(row, pad_code, (size_t)c_lo);
                        if (g->sw == 1) {
                            memcpy(row + c_lo, s, (size_t)(c_hi - c_lo));
                        } else {
                            for (int64_t c = c_lo; c < c_hi; c++, s += g->sw) row[c] = *s;
                        }
                        memset(row + c_hi, pad_code, (size_t)(ws - c_hi));
                    }
                    sad_interleave_rows(rows, ws, ws, dst);
                }
            }
        }
    }
}

static void pack_weights(const Geometry *g, const uint8_t *w, uint8_t pad_code, uint8_t *wp) {
    const int64_t kk = g->kh * g->kw;
    for (int64_t t = 0; t < g->cout; t++) {
        for (int64_t c8 = 0; c8 < g->c8; c8++) {
            for (int64_t uv = 0; uv < kk; uv++) {
                uint8_t *dst = wp + ((t * g->c8 + c8) * kk + uv) * 8;
                for (int64_t e = 0; e < 8; e++) {
                    const int64_t c = c8 * 8 + e;
                    dst[e] = c < g->cin ? w[(t * g->cin + c) * kk + uv] : pad_code;
                }
            }
        }
    }
}

static void tap_offsets(const Geometry *g, int64_t *off) {
    int64_t k = 0;
    for (int64_t c8 = 0; c8 < g->c8; c8++)
        for (int64_t u = 0; u < g->kh; u++)
            for (int64_t v = 0; v < g->kw; v++, k++)
                off[k] = (c8 * g->ah * g->aw + (u % g->sh) * g->aw + v % g->sw) * g->plane +
                         cell_base(g, u / g->sh, v / g->sw);
}

static inline uint64_t load_cell(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

typedef void (*TileFn)(const Geometry *, const uint8_t *, int64_t, const int64_t *,
                       const int64_t *, int);

typedef struct {
    TileFn fn;
    int vw, q, r; /* output columns per vector, vectors and filters per register tile */
} Path;

#define SAD_PASTE_(a, b) a##_##b
#define SAD_PASTE(a, b) SAD_PASTE_(a, b)
#define SAD_ISA_PORTABLE 0
#define SAD_ISA_AVX2 1
#define SAD_ISA_AVX512 2

#define SAD_TILE_BODY
#define SAD_ISA SAD_ISA_PORTABLE
#include "sad_kernel.c"
#undef SAD_ISA
#if KERNEL_X86
#define SAD_ISA SAD_ISA_AVX2
#include "sad_kernel.c"
#undef SAD_ISA
#define SAD_ISA SAD_ISA_AVX512
#include "sad_kernel.c"
#undef SAD_ISA
#endif
#undef SAD_TILE_BODY

/* By path (kernel_common.h). */
static const Path *const PATHS[KERNEL_PATHS] = {
    &path_portable,
#if KERNEL_X86
    &path_avx2,
    &path_avx512,
#else
    NULL,
    NULL,
#endif
};

int sad_init_geometry(Geometry *g, int64_t n_img, int64_t cin, int64_t h, int64_t w,
                      int64_t cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw) {
    if (n_img < 0 || cin < 1 || h < 1 || w < 1 || cout < 0 || kh < 1 || kw < 1 || sh < 1 ||
        sw < 1 || ph < 0 || pw < 0 || h + 2 * ph < kh || w + 2 * pw < kw)
        return KERNEL_ERR_GEOMETRY;
    memset(g, 0, sizeof *g);
    g->n_img = n_img, g->cin = cin, g->h = h, g->w = w, g->cout = cout;
    g->kh = kh, g->kw = kw, g->sh = sh, g->sw = sw, g->ph = ph, g->pw = pw;
    g->ho = (h + 2 * ph - kh) / sh + 1;
    g->wo = (w + 2 * pw - kw) / sw + 1;
    g->c8 = (cin + 7) / 8;
    g->k8 = g->c8 * kh * kw;
    g->ah = sh < kh ? sh : kh;
    g->aw = sw < kw ? sw : kw;
    g->hs = g->ho + (kh - 1) / sh;
    g->ws = (g->wo + 7) / 8 * 8 + (kw - 1) / sw;
    g->plane = g->hs * g->ws * 8;
    g->image = g->c8 * g->ah * g->aw * g->plane;
    return KERNEL_OK;
}

/* Bytes of one packed image for this input and convolution geometry (< 0: invalid). */
int64_t sad_packed_bytes(int64_t cin, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t sh,
                         int64_t sw, int64_t ph, int64_t pw) {
    Geometry g;
    const int status = sad_init_geometry(&g, 1, cin, h, w, 0, kh, kw, sh, sw, ph, pw);
    return status == KERNEL_OK ? g.image : status;
}

/* All filters over tile `tl` (q vectors of vw output columns) of packed image n; vi/vj hold
 * the output row and first column of every vector. */
static inline void run_tile(const Geometry *g, const Path *p, const uint8_t *img, int64_t n,
                            int64_t tl, int64_t vectors, const int64_t *vi, const int64_t *vj) {
    const int64_t v0 = tl * p->q;
    p->fn(g, img, n, vi + v0, vj + v0, (int)(vectors - v0 < p->q ? vectors - v0 : p->q));
}

/* The SAD of every image: from packed images `xp` ([n][image]) if given, else packing the
 * NCHW codes `x` on the way. */
static int sad_run(Geometry *g, const uint8_t *x, const uint8_t *xp, int pad_code,
                   const uint8_t *weight, int path, int threads) {
    path = kernel_resolve_path(path);
    if (path < 0 || !PATHS[path]) return KERNEL_ERR_PATH;
    if (pad_code < 0 || pad_code > 255) return KERNEL_ERR_GEOMETRY;
    if (g->n_img == 0 || g->cout == 0) return KERNEL_OK;
    if (threads <= 0) threads = omp_get_max_threads();
    const Path p = *PATHS[path];
    const int64_t row_vectors = (g->wo + p.vw - 1) / p.vw, vectors = g->ho * row_vectors;
    const int64_t tiles = (vectors + p.q - 1) / p.q, n_img = g->n_img;

    uint8_t *wp = malloc((size_t)(g->cout * g->k8 * 8));
    int64_t *off = malloc((size_t)g->k8 * sizeof(int64_t));
    int64_t *vi = malloc((size_t)(2 * vectors) * sizeof(int64_t)), *vj = vi ? vi + vectors : NULL;
    /* NCHW input and enough images for every thread: each thread packs its images one at a
     * time into a private buffer that stays in cache. Otherwise: pack all, split the tiles. */
    const int per_image = xp == NULL && n_img >= threads;
    uint8_t *packed = xp == NULL && !per_image
                          ? malloc((size_t)(n_img * g->image + threads * 8 * g->ws))
                          : NULL;
    int status = wp && off && vi && (xp || per_image || packed) ? KERNEL_OK : KERNEL_ERR_MEMORY;
    if (status == KERNEL_OK) {
        for (int64_t v = 0; v < vectors; v++)
            vi[v] = v / row_vectors, vj[v] = v % row_vectors * p.vw;
        tap_offsets(g, off);
        pack_weights(g, weight, (uint8_t)pad_code, wp);
        g->wp = wp, g->off = off;
    }
    if (status == KERNEL_OK && per_image) {
#pragma omp parallel num_threads(threads)
        {
            uint8_t *img = malloc((size_t)(g->image + 8 * g->ws));
            if (!img) {
#pragma omp atomic write
                status = KERNEL_ERR_MEMORY;
            }
#pragma omp for schedule(static)
            for (int64_t n = 0; n < n_img; n++) {
                if (!img) continue;
                pack_image(g, x, n, (uint8_t)pad_code, img, img + g->image);
                for (int64_t tl = 0; tl < tiles; tl++) run_tile(g, &p, img, n, tl, vectors, vi, vj);
            }
            free(img);
        }
    } else if (status == KERNEL_OK) {
        if (packed) {
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t n = 0; n < n_img; n++)
                pack_image(g, x, n, (uint8_t)pad_code, packed + n * g->image,
                           packed + n_img * g->image + omp_get_thread_num() * 8 * g->ws);
            xp = packed;
        }
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
        for (int64_t n = 0; n < n_img; n++)
            for (int64_t tl = 0; tl < tiles; tl++)
                run_tile(g, &p, xp + n * g->image, n, tl, vectors, vi, vj);
    }
    free(packed), free(wp), free(off), free(vi);
    return status;
}

/* x: [n_img, cin, h, w] uint8 codes; w: [cout, cin, kh, kw] uint8; out: [n_img, out_channels,
 * ho, wo] int32 with channel out_index[t] (or t) written for filter t. path < 0 picks the best
 * path; threads <= 0 uses the OpenMP default. Returns KERNEL_OK or a negative KERNEL_ERR_* code. */
int sad_conv2d(const uint8_t *x, int64_t n_img, int64_t cin, int64_t h, int64_t w,
               const uint8_t *weight, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
               int64_t sw, int64_t ph, int64_t pw, int pad_code, const int32_t *out_index,
               int64_t out_channels, int32_t *out, int path, int threads) {
    Geometry g;
    int status = sad_init_geometry(&g, n_img, cin, h, w, cout, kh, kw, sh, sw, ph, pw);
    if (status != KERNEL_OK) return status;
    g.out_channels = out_channels, g.out_index = out_index, g.out = out;
    return sad_run(&g, x, NULL, pad_code, weight, path, threads);
}

/* As sad_conv2d, from images already packed for this geometry: xp is [n_img][image] bytes,
 * with pad_code in every padding position. */
int sad_conv2d_packed(const uint8_t *xp, int64_t n_img, int64_t cin, int64_t h, int64_t w,
                      const uint8_t *weight, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
                      int64_t sw, int64_t ph, int64_t pw, int pad_code,
                      const int32_t *out_index, int64_t out_channels, int32_t *out, int path,
                      int threads) {
    Geometry g;
    int status = sad_init_geometry(&g, n_img, cin, h, w, cout, kh, kw, sh, sw, ph, pw);
    if (status != KERNEL_OK) return status;
    g.out_channels = out_channels, g.out_index = out_index, g.out = out;
    return sad_run(&g, NULL, xp, pad_code, weight, path, threads);
}

/* sad_conv2d_packed for the G grids of one layer in one call: xp is [grids][n_img][image] (grid
 * g packed with pad_codes[g]), weight [T][cin][kh][kw] holds the filters of grid 0, then of
 * grid 1, ... (filters[g] of them), and out_index [T] places filter t's output channel. */
int sad_conv2d_packed_grids(const uint8_t *xp, int64_t grids, int64_t n_img, int64_t cin,
                            int64_t h, int64_t w, const uint8_t *weight, const int64_t *filters,
                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw, const int32_t *pad_codes, const int32_t *out_index,
                            int64_t out_channels, int32_t *out, int path, int threads) {
    int64_t first = 0;
    for (int64_t gi = 0; gi < grids; gi++) {
        Geometry g;
        int status = sad_init_geometry(&g, n_img, cin, h, w, filters[gi], kh, kw, sh, sw, ph, pw);
        if (status != KERNEL_OK || filters[gi] < 0) return KERNEL_ERR_GEOMETRY;
        g.out_channels = out_channels, g.out_index = out_index + first, g.out = out;
        status = sad_run(&g, NULL, xp + gi * n_img * g.image, pad_codes[gi],
                         weight + first * cin * kh * kw, path, threads);
        if (status != KERNEL_OK) return status;
        first += filters[gi];
    }
    return KERNEL_OK;
}

/* Pack NCHW codes x ([n_img, cin, h, w]) for a convolution geometry into out ([n_img][image]). */
int sad_pack(const uint8_t *x, int64_t n_img, int64_t cin, int64_t h, int64_t w, int64_t kh,
             int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int pad_code,
             uint8_t *out, int threads) {
    Geometry g;
    int status = sad_init_geometry(&g, n_img, cin, h, w, 0, kh, kw, sh, sw, ph, pw);
    if (status != KERNEL_OK) return status;
    if (pad_code < 0 || pad_code > 255) return KERNEL_ERR_GEOMETRY;
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
        uint8_t *rows = malloc((size_t)(8 * g.ws));
        if (!rows) {
#pragma omp atomic write
            status = KERNEL_ERR_MEMORY;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < n_img; n++)
            if (rows) pack_image(&g, x, n, (uint8_t)pad_code, out + n * g.image, rows);
        free(rows);
    }
    return status;
}

#else /* SAD_TILE_BODY: the register tile for one instruction set ----------------------- */

/* Per instruction set: CELLS holds VW output columns of 8-byte cells, ACC their VW 64-bit sums;
 * LOAD reads VW consecutive cells, BCAST makes the operand of one weight cell, ZERO is an empty
 * sum, ACCUMULATE(acc, cells, weight) adds the 8-byte SAD of each column to its lane and
 * STORE(dst, acc, left) writes the first min(left, VW) sums as int32. */
#if SAD_ISA == SAD_ISA_AVX512
#define ISA avx512
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define VW 8
#define Q 4
#define R 4
#define CELLS __m512i
#define ACC __m512i
#define WEIGHT __m512i
#define LOAD(p) _mm512_loadu_si512((const void *)(p))
#define BCAST(p) _mm512_set1_epi64((long long)load_cell(p))
#define ZERO() _mm512_setzero_si512()
#define ACCUMULATE(acc, a, b) ((acc) = _mm512_add_epi64((acc), _mm512_sad_epu8((a), (b))))
TARGET static inline void store_avx512(int32_t *dst, __m512i acc, int64_t left) {
    const __mmask8 m = left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1u);
    _mm256_mask_storeu_epi32(dst, m, _mm512_cvtepi64_epi32(acc));
}
#elif SAD_ISA == SAD_ISA_AVX2
#define ISA avx2
#define TARGET __attribute__((target("avx2")))
#define VW 4
#define Q 2
#define R 4
#define CELLS __m256i
#define ACC __m256i
#define WEIGHT __m256i
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define BCAST(p) _mm256_set1_epi64x((long long)load_cell(p))
#define ZERO() _mm256_setzero_si256()
#define ACCUMULATE(acc, a, b) ((acc) = _mm256_add_epi64((acc), _mm256_sad_epu8((a), (b))))
/* The 8 sums of two vectors of adjacent columns, in one store. */
#define STORE_PAIR(dst, acc) store_pair_avx2((dst), (acc)[0], (acc)[1])
TARGET static inline void store_pair_avx2(int32_t *dst, __m256i lo, __m256i hi) {
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i both = _mm256_blend_epi32(lo, _mm256_slli_epi64(hi, 32), 0xAA);
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(both, order));
}
TARGET static inline void store_avx2(int32_t *dst, __m256i acc, int64_t left) {
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i v = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc, low_dwords));
    if (left >= 4) {
        _mm_storeu_si128((__m128i *)dst, v);
    } else {
        const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32((int)left), _mm_setr_epi32(0, 1, 2, 3));
        _mm_maskstore_epi32(dst, m, v);
    }
}
#else
#define ISA portable
#define TARGET
#define VW 8
#define Q 1
#define R 4
typedef struct { uint8_t b[64]; } sad_cells_portable;
typedef struct { int32_t s[8]; } sad_acc_portable;
#define CELLS sad_cells_portable
#define ACC sad_acc_portable
#define WEIGHT const uint8_t *
#define LOAD(p) load_portable(p)
#define BCAST(p) (p)
#define ZERO() ((sad_acc_portable){{0}})
#define ACCUMULATE(acc, a, b) accumulate_portable(&(acc), &(a), (b))
static inline sad_cells_portable load_portable(const uint8_t *p) {
    sad_cells_portable c;
    memcpy(c.b, p, sizeof c.b);
    return c;
}
static inline void accumulate_portable(sad_acc_portable *acc, const sad_cells_portable *a,
                                       const uint8_t *b) {
    for (int j = 0; j < 8; j++) {
        int32_t s = 0;
        for (int e = 0; e < 8; e++) s += abs((int)a->b[j * 8 + e] - (int)b[e]);
        acc->s[j] += s;
    }
}
static inline void store_portable(int32_t *dst, sad_acc_portable acc, int64_t left) {
    for (int64_t j = 0; j < (left < 8 ? left : 8); j++) dst[j] = acc.s[j];
}
#endif

#define FN(name) SAD_PASTE(name, ISA)

/* All output columns of vectors vi/vj (nq <= Q of them) of packed image n against every
 * filter, R filters at a time. Short tiles repeat their last vector and filter. */
TARGET static void FN(tile)(const Geometry *g, const uint8_t *img, int64_t n, const int64_t *vi,
                            const int64_t *vj, int nq) {
    const uint8_t *xa[Q];
    int64_t at[Q]; /* offset of each vector's first output in a plane */
    const int64_t k8 = g->k8, *off = g->off;
#pragma GCC unroll 8
    for (int q = 0; q < Q; q++) {
        const int qq = q < nq ? q : nq - 1;
        xa[q] = img + cell_base(g, vi[qq], vj[qq]);
        at[q] = vi[qq] * g->wo + vj[qq];
    }
    for (int64_t t0 = 0; t0 < g->cout; t0 += R) {
        const int nr = (int)(g->cout - t0 < R ? g->cout - t0 : R);
        const uint8_t *wr[R];
        ACC acc[R][Q];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            wr[r] = g->wp + (t0 + (r < nr ? r : nr - 1)) * k8 * 8;
#pragma GCC unroll 8
            for (int q = 0; q < Q; q++) acc[r][q] = ZERO();
        }
        for (int64_t k = 0; k < k8; k++) {
            const int64_t o = off[k];
            CELLS a[Q];
#pragma GCC unroll 8
            for (int q = 0; q < Q; q++) a[q] = LOAD(xa[q] + o);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                WEIGHT b = BCAST(wr[r] + k * 8);
#pragma GCC unroll 8
                for (int q = 0; q < Q; q++) ACCUMULATE(acc[r][q], a[q], b);
            }
        }
#ifdef STORE_PAIR
        if (nq == 2 && at[1] == at[0] + VW && g->wo - vj[0] >= 2 * VW) {
            for (int r = 0; r < nr; r++) STORE_PAIR(out_plane(g, n, t0 + r) + at[0], acc[r]);
            continue;
        }
#endif
        for (int r = 0; r < nr; r++) {
            int32_t *plane = out_plane(g, n, t0 + r);
            for (int q = 0; q < nq; q++)
                FN(store)(plane + at[q], acc[r][q], g->wo - vj[q]);
        }
    }
}

static const Path FN(path) = {FN(tile), VW, Q, R};

#undef ISA
#undef FN
#undef TARGET
#undef VW
#undef Q
#undef R
#undef CELLS
#undef ACC
#undef WEIGHT
#undef STORE_PAIR
#undef LOAD
#undef BCAST
#undef ZERO
#undef ACCUMULATE

#endif /* SAD_TILE_BODY */
