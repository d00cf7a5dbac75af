/* Integer kernels of the adder-network engine: the SAD convolution over uint8 codes and the
 * fixed-point requantization that produces those codes.
 *
 * SAD convolution (int32 results):
 *
 *   out[n, oc(t), i, j] = sum_{c,u,v} |x[n, c, i*sh+u-ph, j*sw+v-pw] - w[t, c, u, v]|
 *
 * where positions outside the input take `pad_code` and oc(t) = out_index[t] (identity if
 * NULL). Three paths share one packed input layout and are chosen at run time from the CPU's
 * features: AVX-512BW (vpsadbw on 512 bits), AVX2 (vpsadbw on 256 bits) and portable C.
 *
 * Packed input, per image: [C8][ah][aw][Hs][Ws][8] bytes. Channels are grouped by 8 (channels
 * past C take the padding code in both x and w, so they add 0); the padded input is split into
 * phase planes (plane (a, b) holds padded rows a, a+sh, ... and columns b, b+sw, ...; only the
 * ah = min(sh, kh) x aw = min(sw, kw) planes some tap reads are stored), so that for every tap
 * (u, v) the inputs of consecutive output columns are consecutive 8-byte cells. One vpsadbw
 * then computes, in each 64-bit lane, the 8-channel partial SAD of one output column against
 * one broadcast 8-byte weight cell: 8 (AVX-512) or 4 (AVX2) output columns per instruction,
 * accumulated in 64-bit lanes, with no horizontal reduction.
 * Packed weights: [T][K8][8] with the taps k = (c8, u, v) in the order of the offset table.
 *
 * The code producers (pack_codes) quantize float32 values, requantize int32 sums or divide int64
 * stream values and write the codes straight into this packed layout for the consuming layer.
 */
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SAD_PORTABLE = 0, SAD_AVX2 = 1, SAD_AVX512 = 2 };
enum {
    SAD_OK = 0,
    SAD_ERR_PATH = -1,
    SAD_ERR_MEMORY = -2,
    SAD_ERR_GEOMETRY = -3,
    SAD_ERR_NONFINITE = -4
};

/* Register tile: R output channels x Q vectors of output columns. */
#define R512 4
#define Q512 4
#define R256 4
#define Q256 2
#define RPORT 4

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

static inline int64_t out_channel(const Geometry *g, int64_t t) {
    return g->out_index ? g->out_index[t] : t;
}

static inline int32_t *out_row(const Geometry *g, int64_t n, int64_t t, int64_t i) {
    return g->out + ((n * g->out_channels + out_channel(g, t)) * g->ho + i) * g->wo;
}

/* Byte offset of the cell of output (i, j) for tap (0, 0, 0) inside a packed image. */
static inline int64_t cell_base(const Geometry *g, int64_t i, int64_t j) {
    return (i * g->ws + j) * 8;
}

/* Interleave 8 rows of `count` bytes into `count` cells of 8 bytes: dst[j*8 + e] = row e[j]. */
static void interleave_rows(const uint8_t *rows, int64_t stride, int64_t count, uint8_t *dst) {
    int64_t j = 0;
#ifdef __SSE2__
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
                /* Packed columns c with input column c*sw + b - pw inside [0, w). */
                int64_t c_lo = (g->pw - b + g->sw - 1) / g->sw;
                if (c_lo < 0) c_lo = 0;
                const int64_t last = g->w - 1 + g->pw - b; /* may be negative: floor it */
                int64_t c_hi = (last >= 0 ? last / g->sw : -((-last + g->sw - 1) / g->sw)) + 1;
                if (c_hi > ws) c_hi = ws;
                if (c_hi < c_lo) c_hi = c_lo;
                for (int64_t r = 0; r < g->hs; r++, dst += ws * 8) {
                    const int64_t hi = r * g->sh + a - g->ph;
                    const int inside = hi >= 0 && hi < g->h;
                    if (inside && real == 8 && g->sw == 1) { /* straight from the 8 planes */
                        memset(dst, pad_code, (size_t)(c_lo * 8));
                        interleave_rows(src + hi * g->w + c_lo + b - g->pw, hw, c_hi - c_lo,
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
                    interleave_rows(rows, ws, ws, dst);
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

/* ---- AVX-512BW: vectors of 8 output columns ------------------------------------------- */

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
tile_avx512(const Geometry *g, const uint8_t *img, int64_t n, const int64_t *vi,
            const int64_t *vj, int nq, int64_t t0, int nr) {
    const uint8_t *xa[Q512];
    const uint8_t *wr[R512];
    __m512i acc[R512][Q512];
#pragma GCC unroll 8
    for (int q = 0; q < Q512; q++) {
        const int qq = q < nq ? q : nq - 1;
        xa[q] = img + cell_base(g, vi[qq], vj[qq]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R512; r++) {
        wr[r] = g->wp + (t0 + (r < nr ? r : nr - 1)) * g->k8 * 8;
#pragma GCC unroll 8
        for (int q = 0; q < Q512; q++) acc[r][q] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < g->k8; k++) {
        const int64_t o = g->off[k];
        __m512i a[Q512];
#pragma GCC unroll 8
        for (int q = 0; q < Q512; q++) a[q] = _mm512_loadu_si512((const void *)(xa[q] + o));
#pragma GCC unroll 8
        for (int r = 0; r < R512; r++) {
            const __m512i b = _mm512_set1_epi64((long long)load_cell(wr[r] + k * 8));
#pragma GCC unroll 8
            for (int q = 0; q < Q512; q++)
                acc[r][q] = _mm512_add_epi64(acc[r][q], _mm512_sad_epu8(a[q], b));
        }
    }
    for (int r = 0; r < nr; r++) {
        for (int q = 0; q < nq; q++) {
            int32_t *dst = out_row(g, n, t0 + r, vi[q]) + vj[q];
            const int64_t left = g->wo - vj[q];
            const __mmask8 m = left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1u);
            _mm256_mask_storeu_epi32(dst, m, _mm512_cvtepi64_epi32(acc[r][q]));
        }
    }
}

/* ---- AVX2: vectors of 4 output columns ------------------------------------------------ */

__attribute__((target("avx2"))) static void
tile_avx2(const Geometry *g, const uint8_t *img, int64_t n, const int64_t *vi, const int64_t *vj,
          int nq, int64_t t0, int nr) {
    const uint8_t *xa[Q256];
    const uint8_t *wr[R256];
    __m256i acc[R256][Q256];
#pragma GCC unroll 8
    for (int q = 0; q < Q256; q++) {
        const int qq = q < nq ? q : nq - 1;
        xa[q] = img + cell_base(g, vi[qq], vj[qq]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R256; r++) {
        wr[r] = g->wp + (t0 + (r < nr ? r : nr - 1)) * g->k8 * 8;
#pragma GCC unroll 8
        for (int q = 0; q < Q256; q++) acc[r][q] = _mm256_setzero_si256();
    }
    for (int64_t k = 0; k < g->k8; k++) {
        const int64_t o = g->off[k];
        __m256i a[Q256];
#pragma GCC unroll 8
        for (int q = 0; q < Q256; q++)
            a[q] = _mm256_loadu_si256((const __m256i *)(xa[q] + o));
#pragma GCC unroll 8
        for (int r = 0; r < R256; r++) {
            const __m256i b = _mm256_set1_epi64x((long long)load_cell(wr[r] + k * 8));
#pragma GCC unroll 8
            for (int q = 0; q < Q256; q++)
                acc[r][q] = _mm256_add_epi64(acc[r][q], _mm256_sad_epu8(a[q], b));
        }
    }
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (int r = 0; r < nr; r++) {
        for (int q = 0; q < nq; q++) {
            int32_t *dst = out_row(g, n, t0 + r, vi[q]) + vj[q];
            const int64_t left = g->wo - vj[q];
            const __m128i v =
                _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc[r][q], low_dwords));
            if (left >= 4) {
                _mm_storeu_si128((__m128i *)dst, v);
            } else {
                const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32((int)left),
                                                  _mm_setr_epi32(0, 1, 2, 3));
                _mm_maskstore_epi32(dst, m, v);
            }
        }
    }
}

/* ---- Portable C: one vector of 8 output columns at a time ------------------------------ */

static void tile_portable(const Geometry *g, const uint8_t *img, int64_t n, const int64_t *vi,
                          const int64_t *vj, int nq, int64_t t0, int nr) {
    for (int q = 0; q < nq; q++) {
        const uint8_t *xa = img + cell_base(g, vi[q], vj[q]);
        const int64_t cols = g->wo - vj[q] < 8 ? g->wo - vj[q] : 8;
        for (int r = 0; r < nr; r++) {
            const uint8_t *wr = g->wp + (t0 + r) * g->k8 * 8;
            int32_t acc[8] = {0};
            for (int64_t k = 0; k < g->k8; k++) {
                const uint8_t *a = xa + g->off[k];
                const uint8_t *b = wr + k * 8;
                for (int j = 0; j < 8; j++) {
                    int32_t s = 0;
                    for (int e = 0; e < 8; e++) s += abs((int)a[j * 8 + e] - (int)b[e]);
                    acc[j] += s;
                }
            }
            int32_t *dst = out_row(g, n, t0 + r, vi[q]) + vj[q];
            for (int64_t j = 0; j < cols; j++) dst[j] = acc[j];
        }
    }
}

/* ---- Geometry and dispatch -------------------------------------------------------------- */

static int init_geometry(Geometry *g, int64_t n_img, int64_t cin, int64_t h, int64_t w,
                         int64_t cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                         int64_t ph, int64_t pw) {
    if (n_img < 0 || cin < 1 || h < 1 || w < 1 || cout < 0 || kh < 1 || kw < 1 || sh < 1 ||
        sw < 1 || ph < 0 || pw < 0 || h + 2 * ph < kh || w + 2 * pw < kw)
        return SAD_ERR_GEOMETRY;
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
    return SAD_OK;
}

/* Bytes of one packed image for this input and convolution geometry (< 0: invalid). */
int64_t sad_packed_bytes(int64_t cin, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t sh,
                         int64_t sw, int64_t ph, int64_t pw) {
    Geometry g;
    const int status = init_geometry(&g, 1, cin, h, w, 0, kh, kw, sh, sw, ph, pw);
    return status == SAD_OK ? g.image : status;
}

/* Bit p set when path p can run on this CPU. */
int sad_available_paths(void) {
    __builtin_cpu_init();
    int mask = 1 << SAD_PORTABLE;
    if (__builtin_cpu_supports("avx2")) mask |= 1 << SAD_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        mask |= 1 << SAD_AVX512;
    return mask;
}

/* The path used when none is forced: the widest available. */
int sad_best_path(void) {
    const int mask = sad_available_paths();
    return (mask & (1 << SAD_AVX512)) ? SAD_AVX512 : (mask & (1 << SAD_AVX2)) ? SAD_AVX2
                                                                              : SAD_PORTABLE;
}

typedef void (*TileFn)(const Geometry *, const uint8_t *, int64_t, const int64_t *,
                       const int64_t *, int, int64_t, int);

typedef struct {
    TileFn fn;
    int vw, q, r; /* output columns per vector, vectors and filters per register tile */
} Path;

/* All filters over tile `tl` (q vectors of vw output columns) of packed image n. */
static void run_tile(const Geometry *g, const Path *p, const uint8_t *img, int64_t n,
                     int64_t tl) {
    const int64_t row_vectors = (g->wo + p->vw - 1) / p->vw;
    const int64_t vectors = g->ho * row_vectors;
    int64_t vi[8], vj[8];
    const int64_t v0 = tl * p->q;
    const int nq = (int)(vectors - v0 < p->q ? vectors - v0 : p->q);
    for (int q = 0; q < nq; q++) {
        vi[q] = (v0 + q) / row_vectors;
        vj[q] = (v0 + q) % row_vectors * p->vw;
    }
    for (int64_t t0 = 0; t0 < g->cout; t0 += p->r) {
        const int nr = (int)(g->cout - t0 < p->r ? g->cout - t0 : p->r);
        p->fn(g, img, n, vi, vj, nq, t0, nr);
    }
}

/* The SAD of every image: from packed images `xp` ([n][image]) if given, else packing the
 * NCHW codes `x` on the way. */
static int sad_run(Geometry *g, const uint8_t *x, const uint8_t *xp, int pad_code,
                   const uint8_t *weight, int path, int threads) {
    if (path < 0) path = sad_best_path();
    if (path > SAD_AVX512 || !(sad_available_paths() & (1 << path))) return SAD_ERR_PATH;
    if (pad_code < 0 || pad_code > 255) return SAD_ERR_GEOMETRY;
    if (g->n_img == 0 || g->cout == 0) return SAD_OK;
    if (threads <= 0) threads = omp_get_max_threads();
    const Path p = path == SAD_AVX512 ? (Path){tile_avx512, 8, Q512, R512}
                   : path == SAD_AVX2 ? (Path){tile_avx2, 4, Q256, R256}
                                      : (Path){tile_portable, 8, 1, RPORT};
    const int64_t vectors = g->ho * ((g->wo + p.vw - 1) / p.vw);
    const int64_t tiles = (vectors + p.q - 1) / p.q, n_img = g->n_img;

    uint8_t *wp = malloc((size_t)(g->cout * g->k8 * 8));
    int64_t *off = malloc((size_t)g->k8 * sizeof(int64_t));
    /* NCHW input and enough images for every thread: each thread packs its images one at a
     * time into a private buffer that stays in cache. Otherwise: pack all, split the tiles. */
    const int per_image = xp == NULL && n_img >= threads;
    uint8_t *packed = xp == NULL && !per_image
                          ? malloc((size_t)(n_img * g->image + threads * 8 * g->ws))
                          : NULL;
    int status = wp && off && (xp || per_image || packed) ? SAD_OK : SAD_ERR_MEMORY;
    if (status == SAD_OK) {
        tap_offsets(g, off);
        pack_weights(g, weight, (uint8_t)pad_code, wp);
        g->wp = wp, g->off = off;
    }
    if (status == SAD_OK && per_image) {
#pragma omp parallel num_threads(threads)
        {
            uint8_t *img = malloc((size_t)(g->image + 8 * g->ws));
            if (!img) {
#pragma omp atomic write
                status = SAD_ERR_MEMORY;
            }
#pragma omp for schedule(static)
            for (int64_t n = 0; n < n_img; n++) {
                if (!img) continue;
                pack_image(g, x, n, (uint8_t)pad_code, img, img + g->image);
                for (int64_t tl = 0; tl < tiles; tl++) run_tile(g, &p, img, n, tl);
            }
            free(img);
        }
    } else if (status == SAD_OK) {
        if (packed) {
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t n = 0; n < n_img; n++)
                pack_image(g, x, n, (uint8_t)pad_code, packed + n * g->image,
                           packed + n_img * g->image + omp_get_thread_num() * 8 * g->ws);
            xp = packed;
        }
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
        for (int64_t n = 0; n < n_img; n++)
            for (int64_t tl = 0; tl < tiles; tl++) run_tile(g, &p, xp + n * g->image, n, tl);
    }
    free(packed), free(wp), free(off);
    return status;
}

/* x: [n_img, cin, h, w] uint8 codes; w: [cout, cin, kh, kw] uint8; out: [n_img, out_channels,
 * ho, wo] int32 with channel out_index[t] (or t) written for filter t. path < 0 picks the best
 * path; threads <= 0 uses the OpenMP default. Returns SAD_OK or a negative SAD_ERR_* code. */
int sad_conv2d(const uint8_t *x, int64_t n_img, int64_t cin, int64_t h, int64_t w,
               const uint8_t *weight, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
               int64_t sw, int64_t ph, int64_t pw, int pad_code, const int32_t *out_index,
               int64_t out_channels, int32_t *out, int path, int threads) {
    Geometry g;
    int status = init_geometry(&g, n_img, cin, h, w, cout, kh, kw, sh, sw, ph, pw);
    if (status != SAD_OK) return status;
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
    int status = init_geometry(&g, n_img, cin, h, w, cout, kh, kw, sh, sw, ph, pw);
    if (status != SAD_OK) return status;
    g.out_channels = out_channels, g.out_index = out_index, g.out = out;
    return sad_run(&g, NULL, xp, pad_code, weight, path, threads);
}

/* Pack NCHW codes x ([n_img, cin, h, w]) for a convolution geometry into out ([n_img][image]). */
int sad_pack(const uint8_t *x, int64_t n_img, int64_t cin, int64_t h, int64_t w, int64_t kh,
             int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int pad_code,
             uint8_t *out, int threads) {
    Geometry g;
    int status = init_geometry(&g, n_img, cin, h, w, 0, kh, kw, sh, sw, ph, pw);
    if (status != SAD_OK) return status;
    if (pad_code < 0 || pad_code > 255) return SAD_ERR_GEOMETRY;
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
        uint8_t *rows = malloc((size_t)(8 * g.ws));
        if (!rows) {
#pragma omp atomic write
            status = SAD_ERR_MEMORY;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < n_img; n++)
            if (rows) pack_image(&g, x, n, (uint8_t)pad_code, out + n * g.image, rows);
        free(rows);
    }
    return status;
}

/* ---- Row loops of the requantization ----------------------------------------------------
 * u = round(m * s + o) for an int32 s, with m = M * 2^-k and o = O * 2^-k, is computed as
 * (M * s + O + 2^(k-1)) >> k in int64: rounding half up (the shift is arithmetic, i.e. floor).
 * The exporter bounds |M| < 2^(62 - b) where |s| < 2^b is known, and |O| < 2^62, so nothing
 * overflows. Each loop is compiled for AVX-512 and for the baseline and picked at run time. */

#define CODES_ROW                                                                           \
    for (int64_t p = 0; p < pixels; p++) {                                                  \
        int64_t u = ((int64_t)src[p] * m + o) >> k;                                         \
        if (relu) u = u < 0 ? 0 : u;                                                        \
        u += z;                                                                             \
        dst[p] = (uint8_t)(u < 0 ? 0 : u > qmax ? qmax : u);                                \
    }

#define FIXED_ROW                                                                           \
    for (int64_t p = 0; p < pixels; p++) {                                                  \
        int64_t u = (((int64_t)src[p] * m + o) >> k) + (res ? res[p] : 0);                  \
        dst[p] = relu && u < 0 ? 0 : u;                                                     \
    }

/* Also tells whether some value is NaN or infinite (x - x is then NaN, else 0). */
#define FLOAT_ROW                                                                           \
    int bad = 0;                                                                            \
    for (int64_t p = 0; p < pixels; p++) {                                                  \
        const float v = src[p], q = rintf(v / sc) + zf;                                     \
        bad |= v - v != 0.0f;                                                               \
        dst[p] = (uint8_t)(q < 0.0f ? 0.0f : q > qf ? qf : q);                              \
    }                                                                                       \
    return bad;

#define DEFINE_ROWS(SUFFIX, ATTR)                                                            \
    ATTR static void fixed_row_##SUFFIX(const int32_t *restrict src, int64_t pixels,        \
                                        int64_t m, int64_t o, int k,                         \
                                        const int64_t *restrict res, int relu,               \
                                        int64_t *restrict dst) {                             \
        FIXED_ROW                                                                           \
    }                                                                                       \
    ATTR static int float_row_##SUFFIX(const float *restrict src, int64_t pixels, float sc,  \
                                        float zf, float qf, uint8_t *restrict dst) {         \
        FLOAT_ROW                                                                           \
    }

DEFINE_ROWS(base, )
DEFINE_ROWS(avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))))

static inline int64_t clamp_code(int64_t q, int qmax) { return q < 0 ? 0 : q > qmax ? qmax : q; }

static void codes_row_base(const int32_t *src, int64_t pixels, int64_t m, int64_t o, int k,
                           int64_t z, int qmax, int relu, uint8_t *dst) {
    CODES_ROW
}

/* clamp(relu?(u) + z, 0, qmax) = clamp(u, lo, qmax - z) + z with lo = relu ? 0 : -z. */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void
codes_row_avx512(const int32_t *src, int64_t pixels, int64_t m, int64_t o, int k, int64_t z,
                 int qmax, int relu, uint8_t *dst) {
    const __m512i vm = _mm512_set1_epi64(m), vo = _mm512_set1_epi64(o), vz = _mm512_set1_epi64(z);
    const __m512i lo = _mm512_set1_epi64(relu ? 0 : -z), hi = _mm512_set1_epi64(qmax - z);
    const __m128i count = _mm_cvtsi32_si128(k);
    int64_t p = 0;
    for (; p + 8 <= pixels; p += 8) {
        const __m512i v = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(src + p)));
        __m512i u = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mullo_epi64(v, vm), vo), count);
        u = _mm512_add_epi64(_mm512_min_epi64(_mm512_max_epi64(u, lo), hi), vz);
        _mm_storel_epi64((__m128i *)(dst + p), _mm512_cvtepi64_epi8(u));
    }
    codes_row_base(src + p, pixels - p, m, o, k, z, qmax, relu, dst + p);
}

/* Stream rows: q = round_half_up(x / d) = floor((2x + d) / 2d), exactly. The baseline divides
 * in int64; the AVX-512 version estimates the quotient in double precision (|2x + d| < 2^53,
 * quotient below 2^12: the estimate is off by at most one) and corrects it with an exact
 * integer remainder test. */
static void stream_row_base(const int64_t *src, int64_t pixels, int64_t d, int64_t z, int qmax,
                            uint8_t *dst) {
    const int64_t d2 = 2 * d;
    for (int64_t p = 0; p < pixels; p++) {
        const int64_t num = 2 * src[p] + d;
        const int64_t q = num / d2 - (num % d2 != 0 && num < 0);
        dst[p] = (uint8_t)clamp_code(q + z, qmax);
    }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void
stream_row_avx512(const int64_t *src, int64_t pixels, int64_t d, int64_t z, int qmax,
                  uint8_t *dst) {
    const __m512i vd = _mm512_set1_epi64(d), vd2 = _mm512_set1_epi64(2 * d);
    const __m512i vz = _mm512_set1_epi64(z), vmax = _mm512_set1_epi64(qmax);
    const __m512i one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
    const __m512d inv = _mm512_set1_pd(1.0 / (double)(2 * d));
    int64_t p = 0;
    for (; p + 8 <= pixels; p += 8) {
        const __m512i x = _mm512_loadu_si512((const void *)(src + p));
        const __m512i num = _mm512_add_epi64(_mm512_add_epi64(x, x), vd);
        const __m512d est = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(num), inv),
                                                 _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512i q = _mm512_cvttpd_epi64(est);
        const __m512i r = _mm512_sub_epi64(num, _mm512_mullo_epi64(q, vd2));
        q = _mm512_mask_add_epi64(q, _mm512_cmpge_epi64_mask(r, vd2), q, one);
        q = _mm512_mask_sub_epi64(q, _mm512_cmplt_epi64_mask(r, zero), q, one);
        q = _mm512_min_epi64(_mm512_max_epi64(_mm512_add_epi64(q, vz), zero), vmax);
        _mm_storel_epi64((__m128i *)(dst + p), _mm512_cvtepi64_epi8(q));
    }
    stream_row_base(src + p, pixels - p, d, z, qmax, dst + p);
}

static int wide_rows(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

static inline int64_t with_half(int64_t o, int32_t k) {
    return o + (k > 0 ? (int64_t)1 << (k - 1) : 0);
}

/* ---- Code producers: values -> codes on G grids, written packed for the consuming layer ---- */

enum { FROM_FLOAT = 0, FROM_SUMS = 1, FROM_STREAM = 2 };

typedef struct {
    int kind, wide, qmax, relu;
    const void *values;                 /* float32 / int32 / int64 [n][c][h][w] */
    const float *scale;                 /* FROM_FLOAT: [g] */
    const int64_t *mult, *offset;       /* FROM_SUMS: [g][c] */
    const int32_t *shift;               /* FROM_SUMS: [g][c] */
    const int64_t *divisor;             /* FROM_STREAM: [g] */
    const int32_t *zero;                /* [g] */
} Source;

/* Codes [first, first + count) of the h * w plane of channel c of image n on grid g; returns
 * nonzero when a float value among them is NaN or infinite. */
static int source_span(const Source *s, const Geometry *geo, int64_t g, int64_t n, int64_t c,
                       int64_t first, int64_t count, uint8_t *dst) {
    const int64_t base = (n * geo->cin + c) * geo->h * geo->w + first, z = s->zero[g];
    if (s->kind == FROM_FLOAT) {
        return (s->wide ? float_row_avx512 : float_row_base)(
            (const float *)s->values + base, count, s->scale[g], (float)z, (float)s->qmax, dst);
    } else if (s->kind == FROM_SUMS) {
        const int64_t i = g * geo->cin + c;
        (s->wide ? codes_row_avx512 : codes_row_base)(
            (const int32_t *)s->values + base, count, s->mult[i],
            with_half(s->offset[i], s->shift[i]), s->shift[i], z, s->qmax, s->relu, dst);
    } else {
        (s->wide ? stream_row_avx512 : stream_row_base)((const int64_t *)s->values + base,
                                                        count, s->divisor[g], z, s->qmax, dst);
    }
    return 0;
}

/* Whether input row h is read by some tap (strided 1x1 layers skip rows). */
static inline int row_used(const Geometry *geo, int64_t h) {
    const int64_t hp = h + geo->ph;
    return hp % geo->sh < geo->ah && hp / geo->sh < geo->hs;
}

/* Codes of every image on every grid, packed: out[g][n][image]; padding cells hold zero[g]. */
static int produce(const Source *s, const Geometry *geo, int64_t groups, uint8_t *out,
                   int threads) {
    int status = SAD_OK;
    const int64_t n_img = geo->n_img, w = geo->w, pixels = geo->h * geo->w;
    const int skips_rows = geo->ah < geo->sh;
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
        uint8_t *planes = malloc((size_t)(8 * pixels + 8 * w));
        int bad = 0;
        if (!planes) {
#pragma omp atomic write
            status = SAD_ERR_MEMORY;
        }
        /* Per image, every grid in turn reads the same channel planes while they are in cache. */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < n_img; n++) {
            if (!planes) continue;
            uint8_t *cells = planes + 8 * pixels;
            for (int64_t g = 0; g < groups; g++)
                memset(out + (g * n_img + n) * geo->image, (int)s->zero[g], (size_t)geo->image);
            for (int64_t c8 = 0; c8 < geo->c8; c8++) {
                const int64_t real = geo->cin - c8 * 8 < 8 ? geo->cin - c8 * 8 : 8;
                for (int64_t g = 0; g < groups; g++) {
                    for (int64_t e = 0; e < 8; e++) {
                        uint8_t *plane = planes + e * pixels;
                        if (e >= real) {
                            memset(plane, (int)s->zero[g], (size_t)pixels);
                        } else if (skips_rows) {
                            for (int64_t h = 0; h < geo->h; h++)
                                if (row_used(geo, h))
                                    bad |= source_span(s, geo, g, n, c8 * 8 + e, h * w, w,
                                                       plane + h * w);
                        } else {
                            bad |= source_span(s, geo, g, n, c8 * 8 + e, 0, pixels, plane);
                        }
                    }
                    uint8_t *chunk = out + (g * n_img + n) * geo->image +
                                     c8 * geo->ah * geo->aw * geo->plane;
                    for (int64_t h = 0; h < geo->h; h++) {
                        if (!row_used(geo, h)) continue;
                        const int64_t hp = h + geo->ph, a = hp % geo->sh, r = hp / geo->sh;
                        uint8_t *row = chunk + a * geo->aw * geo->plane + r * geo->ws * 8;
                        if (geo->sw == 1) {
                            interleave_rows(planes + h * w, pixels, w, row + geo->pw * 8);
                            continue;
                        }
                        interleave_rows(planes + h * w, pixels, w, cells);
                        for (int64_t x = 0; x < w; x++) {
                            const int64_t wp = x + geo->pw, b = wp % geo->sw, col = wp / geo->sw;
                            if (b < geo->aw && col < geo->ws)
                                memcpy(row + b * geo->plane + col * 8, cells + x * 8, 8);
                        }
                    }
                }
            }
        }
        free(planes);
        if (bad && planes) {
#pragma omp atomic write
            status = SAD_ERR_NONFINITE;
        }
    }
    return status;
}

/* values: [n_img, c, h, w] float32 (kind 0), int32 SAD sums (kind 1) or int64 stream values
 * (kind 2). Codes q = clamp(t + zero[g], 0, qmax) with
 *   kind 0: t = rint(x / scale[g])                      (as torch.round(x / scale))
 *   kind 1: t = (M x + O + 2^(k-1)) >> k, then max(t, 0) if relu   (M, O, k: [g][c])
 *   kind 2: t = round_half_up(x / divisor[g])            (exact)
 * are written to out[g][n] packed for the convolution geometry (kh, kw, sh, sw, ph, pw). */
int pack_codes(int kind, const void *values, int64_t n_img, int64_t c, int64_t h, int64_t w,
               int64_t groups, const float *scale, const int64_t *mult, const int64_t *offset,
               const int32_t *shift, const int64_t *divisor, const int32_t *zero, int qmax,
               int relu, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
               uint8_t *out, int threads) {
    Geometry geo;
    const int status = init_geometry(&geo, n_img, c, h, w, 0, kh, kw, sh, sw, ph, pw);
    if (status != SAD_OK || kind < FROM_FLOAT || kind > FROM_STREAM || qmax < 1 || qmax > 255)
        return SAD_ERR_GEOMETRY;
    const Source s = {kind, wide_rows(), qmax, relu, values, scale, mult, offset, shift,
                      divisor, zero};
    return produce(&s, &geo, groups, out, threads);
}

/* Stream values: out[n][c][p] = relu?(u + residual[n][c][p]) in int64, with u from the int32
 * in[n][c][p] and the parameters [c]; residual may be NULL. */
void requant_fixed(const int32_t *in, int64_t n_img, int64_t channels, int64_t pixels,
                   const int64_t *mult, const int64_t *offset, const int32_t *shift,
                   const int64_t *residual, int relu, int64_t *out, int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    void (*row)(const int32_t *, int64_t, int64_t, int64_t, int, const int64_t *, int,
                int64_t *) = wide_rows() ? fixed_row_avx512 : fixed_row_base;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_img; n++) {
        for (int64_t c = 0; c < channels; c++) {
            const int64_t base = (n * channels + c) * pixels;
            row(in + base, pixels, mult[c], with_half(offset[c], shift[c]), shift[c],
                residual ? residual + base : NULL, relu, out + base);
        }
    }
}

/* Stream values of float32 x: out[i] = rint(x[i] * 2^frac_bits) (half to even), in int64. */
void float_to_stream(const float *x, int64_t count, int frac_bits, int64_t *out, int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    const double unit = ldexp(1.0, frac_bits);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) out[i] = (int64_t)rint((double)x[i] * unit);
}

/* Float outputs of SAD sums: out[n][c][p] = (float)(in[n][c][p] + excess[c]) * step[c] + bias[c]
 * in float32, the product rounded before the sum (no fused multiply-add), exactly as PyTorch
 * computes `(sums + excess).float() * step + bias`. */
#define AFFINE_ROW                                                                          \
    for (int64_t p = 0; p < pixels; p++) dst[p] = (float)(src[p] + e) * st + b;

__attribute__((optimize("fp-contract=off"))) static void
affine_row_base(const int32_t *restrict src, int64_t pixels, int32_t e, float st, float b,
                float *restrict dst) {
    AFFINE_ROW
}

__attribute__((optimize("fp-contract=off"), target("avx512f,avx512bw,avx512dq,avx512vl")))
static void affine_row_avx512(const int32_t *restrict src, int64_t pixels, int32_t e, float st,
                              float b, float *restrict dst) {
    AFFINE_ROW
}

void sums_to_float(const int32_t *in, int64_t n_img, int64_t channels, int64_t pixels,
                   const int32_t *excess, const float *step, const float *bias, float *out,
                   int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    void (*row)(const int32_t *, int64_t, int32_t, float, float, float *) =
        wide_rows() ? affine_row_avx512 : affine_row_base;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_img; n++) {
        for (int64_t c = 0; c < channels; c++) {
            const int64_t base = (n * channels + c) * pixels;
            row(in + base, pixels, excess[c], step[c], bias[c], out + base);
        }
    }
}

static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_sad_kernel", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__sad_kernel(void) { return PyModule_Create(&def); }
