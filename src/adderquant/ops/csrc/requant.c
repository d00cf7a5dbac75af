/* Requantization of the integer engine: the code producers that quantize float32 values,
 * requantize int32 SAD sums or divide int64 stream values and write the codes straight into
 * the SAD convolution's packed layout (sad_layout.h) for the consuming layer, and the
 * fixed-point requantization, stream conversion and float output of int32 sums.
 *
 * Row loops are written once (the *_ROW macros) and compiled for the baseline and, on x86,
 * for AVX-512; the integer rows also have AVX2 versions. Each call runs the rows of the best
 * path the shared dispatch (kernel_common.h) finds.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_common.h"
#include "sad_layout.h"

/* ---- Row loops ---------------------------------------------------------------------------
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
#if KERNEL_X86
DEFINE_ROWS(avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))))
#endif

#if KERNEL_X86
/* FLOAT_ROW with AVX2, 8 values at a time: the same IEEE division, rounding to nearest even,
 * addition and clamp, hence the same codes; a value is non-finite when v - v is not zero. */
__attribute__((target("avx2,fma"))) static int float_row_avx2(const float *restrict src,
                                                              int64_t pixels, float sc,
                                                              float zf, float qf,
                                                              uint8_t *restrict dst) {
    const __m256 vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(zf), vq = _mm256_set1_ps(qf);
    const __m256 zero = _mm256_setzero_ps();
    __m256 bad = zero;
    int64_t p = 0;
    for (; p + 8 <= pixels; p += 8) {
        const __m256 v = _mm256_loadu_ps(src + p);
        bad = _mm256_or_ps(bad, _mm256_sub_ps(v, v));
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v, vs),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), zero), vq);
        const __m256i i = _mm256_cvttps_epi32(q);
        const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i),
                                           _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(dst + p), _mm_packus_epi16(w, w));
    }
    const int tail = float_row_base(src + p, pixels - p, sc, zf, qf, dst + p);
    return tail | (_mm256_movemask_ps(_mm256_cmp_ps(bad, zero, _CMP_NEQ_UQ)) != 0);
}
#endif

static inline int64_t clamp_code(int64_t q, int qmax) { return q < 0 ? 0 : q > qmax ? qmax : q; }

static void codes_row_base(const int32_t *src, int64_t pixels, int64_t m, int64_t o, int k,
                           int64_t z, int qmax, int relu, uint8_t *dst) {
    CODES_ROW
}

#if KERNEL_X86
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
#endif

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

#if KERNEL_X86
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
/* ---- AVX2 rows of the integer requantization, 4 int64 lanes at a time ----------------------
 * AVX2 has neither a 64-bit multiply nor a 64-bit arithmetic shift. M * s is formed exactly
 * from two signed 32 x 32 -> 64 products, M = Mh * 2^31 + Ml with 0 <= Ml < 2^31 (|Mh * s| <
 * 2^31 because |M * s| < 2^62), and x >> k as ~(~x >>> k) for negative x. */
__attribute__((target("avx2"))) static inline __m256i fixed_mul_shift_avx2(
    __m256i s, __m256i mh, __m256i ml, __m256i o, __m128i count) {
    const __m256i hi = _mm256_slli_epi64(_mm256_mul_epi32(s, mh), 31);
    const __m256i x = _mm256_add_epi64(_mm256_add_epi64(hi, _mm256_mul_epi32(s, ml)), o);
    const __m256i sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), x);
    return _mm256_xor_si256(_mm256_srl_epi64(_mm256_xor_si256(x, sign), count), sign);
}

__attribute__((target("avx2"))) static inline __m256i clamp_epi64_avx2(__m256i v, __m256i lo,
                                                                      __m256i hi) {
    v = _mm256_blendv_epi8(v, lo, _mm256_cmpgt_epi64(lo, v));
    return _mm256_blendv_epi8(v, hi, _mm256_cmpgt_epi64(v, hi));
}

/* The low bytes of the 4 int64 lanes of a and of b (values 0..255), in order. */
__attribute__((target("avx2"))) static inline void store_bytes_avx2(uint8_t *dst, __m256i a,
                                                                   __m256i b) {
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i a32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a, low_dwords));
    const __m128i b32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, low_dwords));
    const __m128i w = _mm_packus_epi32(a32, b32);
    _mm_storel_epi64((__m128i *)dst, _mm_packus_epi16(w, w));
}

__attribute__((target("avx2"))) static void codes_row_avx2(const int32_t *src, int64_t pixels,
                                                          int64_t m, int64_t o, int k, int64_t z,
                                                          int qmax, int relu, uint8_t *dst) {
    const __m256i mh = _mm256_set1_epi64x(m >> 31), ml = _mm256_set1_epi64x(m & 0x7FFFFFFF);
    const __m256i vo = _mm256_set1_epi64x(o), vz = _mm256_set1_epi64x(z);
    const __m256i lo = _mm256_set1_epi64x(relu ? 0 : -z), hi = _mm256_set1_epi64x(qmax - z);
    const __m128i count = _mm_cvtsi32_si128(k);
    int64_t p = 0;
    for (; p + 8 <= pixels; p += 8) {
        __m256i u[2];
        for (int h = 0; h < 2; h++) {
            const __m256i s = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(src + p + 4 * h)));
            u[h] = _mm256_add_epi64(clamp_epi64_avx2(fixed_mul_shift_avx2(s, mh, ml, vo, count),
                                                     lo, hi), vz);
        }
        store_bytes_avx2(dst + p, u[0], u[1]);
    }
    codes_row_base(src + p, pixels - p, m, o, k, z, qmax, relu, dst + p);
}

__attribute__((target("avx2"))) static void fixed_row_avx2(const int32_t *restrict src,
                                                          int64_t pixels, int64_t m, int64_t o,
                                                          int k, const int64_t *restrict res,
                                                          int relu, int64_t *restrict dst) {
    const __m256i mh = _mm256_set1_epi64x(m >> 31), ml = _mm256_set1_epi64x(m & 0x7FFFFFFF);
    const __m256i vo = _mm256_set1_epi64x(o), zero = _mm256_setzero_si256();
    const __m128i count = _mm_cvtsi32_si128(k);
    int64_t p = 0;
    for (; p + 4 <= pixels; p += 4) {
        const __m256i s = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(src + p)));
        __m256i u = fixed_mul_shift_avx2(s, mh, ml, vo, count);
        if (res) u = _mm256_add_epi64(u, _mm256_loadu_si256((const __m256i *)(res + p)));
        if (relu) u = _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, u), u);
        _mm256_storeu_si256((__m256i *)(dst + p), u);
    }
    fixed_row_base(src + p, pixels - p, m, o, k, res ? res + p : NULL, relu, dst + p);
}

/* stream_row_base with AVX2: the quotient is estimated in double precision and corrected with
 * an exact remainder, as in the AVX-512 row; int64 -> double by the 2^52 + 2^51 bias, exact for
 * |2x + d| < 2^51 (4 values at a time; a vector with a larger value takes the baseline). */
__attribute__((target("avx2,fma"))) static void stream_row_avx2(const int64_t *src,
                                                               int64_t pixels, int64_t d,
                                                               int64_t z, int qmax,
                                                               uint8_t *dst) {
    if (d <= 0 || d >= ((int64_t)1 << 50)) {
        stream_row_base(src, pixels, d, z, qmax, dst);
        return;
    }
    const double bias = 6755399441055744.0; /* 2^52 + 2^51 */
    const __m256i vbias = _mm256_castpd_si256(_mm256_set1_pd(bias));
    const __m256i vd = _mm256_set1_epi64x(d);
    const __m256i limit = _mm256_set1_epi64x(((int64_t)1 << 51) - 1);
    const __m256i neg_limit = _mm256_set1_epi64x(-((int64_t)1 << 51));
    const __m256d d2 = _mm256_set1_pd(2.0 * (double)d), inv = _mm256_set1_pd(1.0 / (2.0 * (double)d));
    const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
    const __m256d vz = _mm256_set1_pd((double)z), vmax = _mm256_set1_pd((double)qmax);
    int64_t p = 0;
    for (; p + 4 <= pixels; p += 4) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(src + p));
        const __m256i num = _mm256_add_epi64(_mm256_add_epi64(x, x), vd);
        const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi64(num, limit),
                                            _mm256_cmpgt_epi64(neg_limit, num));
        if (!_mm256_testz_si256(out, out)) {
            stream_row_base(src + p, 4, d, z, qmax, dst + p);
            continue;
        }
        const __m256d nd = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(num, vbias)),
                                         _mm256_set1_pd(bias));
        __m256d q = _mm256_floor_pd(_mm256_mul_pd(nd, inv));
        const __m256d r = _mm256_fnmadd_pd(q, d2, nd); /* exact: |q * 2d| < 2^53 */
        q = _mm256_add_pd(q, _mm256_and_pd(_mm256_cmp_pd(r, d2, _CMP_GE_OQ), one));
        q = _mm256_sub_pd(q, _mm256_and_pd(_mm256_cmp_pd(r, zero, _CMP_LT_OQ), one));
        q = _mm256_min_pd(_mm256_max_pd(_mm256_add_pd(q, vz), zero), vmax);
        const __m128i i = _mm256_cvttpd_epi32(q);
        const __m128i w = _mm_packus_epi32(i, i);
        const uint32_t bytes = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(w, w));
        memcpy(dst + p, &bytes, 4);
    }
    stream_row_base(src + p, pixels - p, d, z, qmax, dst + p);
}
#else /* the baseline rows stand in for the AVX-512 ones, never chosen without KERNEL_X86 */
#define fixed_row_avx512 fixed_row_base
#define float_row_avx512 float_row_base
#define float_row_avx2 float_row_base
#define affine_row_avx2 affine_row_base
#define codes_row_avx512 codes_row_base
#define stream_row_avx512 stream_row_base
#define affine_row_avx512 affine_row_base
#define codes_row_avx2 codes_row_base
#define fixed_row_avx2 fixed_row_base
#define stream_row_avx2 stream_row_base
#endif


/* The rows of float values for the best path: AVX-512, AVX2 or the baseline. */
typedef int (*FloatRow)(const float *, int64_t, float, float, float, uint8_t *);
static FloatRow float_row(void) {
    const int path = kernel_best_path();
    return path == KERNEL_PATH_AVX512 ? float_row_avx512
           : path == KERNEL_PATH_AVX2 ? float_row_avx2 : float_row_base;
}

static inline int64_t with_half(int64_t o, int32_t k) {
    return o + (k > 0 ? (int64_t)1 << (k - 1) : 0);
}

/* ---- Code producers: values -> codes on G grids, written packed for the consuming layer ---- */

enum { FROM_FLOAT = 0, FROM_SUMS = 1, FROM_STREAM = 2 };

typedef struct {
    int kind, path, qmax, relu; /* path: the shared dispatch's best */
    FloatRow float_row;                 /* FROM_FLOAT: the row of the best path */
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
        return s->float_row((const float *)s->values + base, count, s->scale[g], (float)z, (float)s->qmax, dst);
    } else if (s->kind == FROM_SUMS) {
        const int64_t i = g * geo->cin + c;
        (s->path == KERNEL_PATH_AVX512 ? codes_row_avx512
         : s->path == KERNEL_PATH_AVX2 ? codes_row_avx2 : codes_row_base)(
            (const int32_t *)s->values + base, count, s->mult[i],
            with_half(s->offset[i], s->shift[i]), s->shift[i], z, s->qmax, s->relu, dst);
    } else {
        (s->path == KERNEL_PATH_AVX512 ? stream_row_avx512
         : s->path == KERNEL_PATH_AVX2 ? stream_row_avx2 : stream_row_base)(
            (const int64_t *)s->values + base, count, s->divisor[g], z, s->qmax, dst);
    }
    return 0;
}

/* even[i] = src[2i] and odd[i] = src[2i + 1] for the n bytes of src. */
static void split_even_odd(const uint8_t *src, int64_t n, uint8_t *even, uint8_t *odd) {
    int64_t i = 0;
#if KERNEL_X86 && defined(__SSE2__)
    const __m128i low = _mm_set1_epi16(0x00FF);
    for (; i + 32 <= n; i += 32) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        const __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        _mm_storeu_si128((__m128i *)(even + i / 2),
                         _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low)));
        _mm_storeu_si128((__m128i *)(odd + i / 2),
                         _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)));
    }
    for (; i + 16 <= n; i += 16) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        _mm_storel_epi64((__m128i *)(even + i / 2), _mm_packus_epi16(_mm_and_si128(a, low), a));
        _mm_storel_epi64((__m128i *)(odd + i / 2), _mm_packus_epi16(_mm_srli_epi16(a, 8), a));
    }
#endif
    for (; i < n; i++) (i & 1 ? odd : even)[i / 2] = src[i];
}

/* Whether input row h is read by some tap (strided 1x1 layers skip rows). */
static inline int row_used(const Geometry *geo, int64_t h) {
    const int64_t hp = h + geo->ph;
    return hp % geo->sh < geo->ah && hp / geo->sh < geo->hs;
}

/* Codes of every image on every grid, packed: out[g][n][image]; padding cells hold zero[g]. */
static int produce(const Source *s, const Geometry *geo, int64_t groups, uint8_t *out,
                   int threads) {
    int status = KERNEL_OK;
    const int64_t n_img = geo->n_img, w = geo->w, pixels = geo->h * geo->w;
    const int skips_rows = geo->ah < geo->sh;
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
        uint8_t *planes = malloc((size_t)(8 * pixels + 8 * w));
        int bad = 0;
        if (!planes) {
#pragma omp atomic write
            status = KERNEL_ERR_MEMORY;
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
                            sad_interleave_rows(planes + h * w, pixels, w, row + geo->pw * 8);
                            continue;
                        }
                        const int64_t half = (w + 1) / 2;
                        if (geo->sw == 2) /* each row's even columns, then its odd ones */
                            for (int64_t e = 0; e < 8; e++)
                                split_even_odd(planes + e * pixels + h * w, w, cells + e * w,
                                               cells + e * w + half);
                        for (int64_t b = 0; b < geo->aw; b++) { /* one phase at a time */
                            int64_t lo, hi;
                            phase_columns(geo, b, &lo, &hi);
                            const int64_t x0 = lo * geo->sw + b - geo->pw; /* first column */
                            if (geo->sw != 2) {
                                for (int64_t e = 0; e < 8; e++)
                                    for (int64_t col = 0; col < hi - lo; col++)
                                        cells[e * w + col] =
                                            planes[e * pixels + h * w + x0 + col * geo->sw];
                            }
                            const uint8_t *src =
                                geo->sw == 2 ? cells + (x0 & 1) * half + (x0 >> 1) : cells;
                            sad_interleave_rows(src, w, hi - lo, row + b * geo->plane + lo * 8);
                        }
                    }
                }
            }
        }
        free(planes);
        if (bad && planes) {
#pragma omp atomic write
            status = KERNEL_ERR_NONFINITE;
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
    const int status = sad_init_geometry(&geo, n_img, c, h, w, 0, kh, kw, sh, sw, ph, pw);
    if (status != KERNEL_OK || kind < FROM_FLOAT || kind > FROM_STREAM || qmax < 1 || qmax > 255)
        return KERNEL_ERR_GEOMETRY;
    const Source s = {kind, kernel_best_path(), qmax, relu, float_row(), values, scale, mult, offset, shift,
                      divisor, zero};
    return produce(&s, &geo, groups, out, threads);
}

/* Stream values: out[n][c][p] = relu?(u + residual[n][c][p]) in int64, with u from the int32
 * in[n][c][p] and the parameters [c]; residual may be NULL. */
void requant_fixed(const int32_t *in, int64_t n_img, int64_t channels, int64_t pixels,
                   const int64_t *mult, const int64_t *offset, const int32_t *shift,
                   const int64_t *residual, int relu, int64_t *out, int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    const int path = kernel_best_path();
    void (*row)(const int32_t *, int64_t, int64_t, int64_t, int, const int64_t *, int,
                int64_t *) = path == KERNEL_PATH_AVX512 ? fixed_row_avx512
                             : path == KERNEL_PATH_AVX2 ? fixed_row_avx2 : fixed_row_base;
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

#if KERNEL_X86
__attribute__((optimize("fp-contract=off"), target("avx512f,avx512bw,avx512dq,avx512vl")))
static void affine_row_avx512(const int32_t *restrict src, int64_t pixels, int32_t e, float st,
                              float b, float *restrict dst) {
    AFFINE_ROW
}

__attribute__((optimize("fp-contract=off"), target("avx2,fma"))) static void
affine_row_avx2(const int32_t *restrict src, int64_t pixels, int32_t e, float st, float b,
                float *restrict dst) {
    AFFINE_ROW
}
#endif

void sums_to_float(const int32_t *in, int64_t n_img, int64_t channels, int64_t pixels,
                   const int32_t *excess, const float *step, const float *bias, float *out,
                   int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    const int path = kernel_best_path();
    void (*row)(const int32_t *, int64_t, int32_t, float, float, float *) =
        path == KERNEL_PATH_AVX512 ? affine_row_avx512
        : path == KERNEL_PATH_AVX2 ? affine_row_avx2 : affine_row_base;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_img; n++) {
        for (int64_t c = 0; c < channels; c++) {
            const int64_t base = (n * channels + c) * pixels;
            row(in + base, pixels, excess[c], step[c], bias[c], out + base);
        }
    }
}

/* Float outputs of SAD sums through an eval-mode BatchNorm, a residual and a ReLU, in one pass:
 * y = (float)(s + excess[c]) * step[c] + bias[c] (rounded as in sums_to_float), then
 * fmaf(y, alpha[c], beta[c]) as PyTorch's BatchNorm inference computes it, then + residual
 * (float32, may be NULL), then max(., 0) if relu (NaN stays NaN, as torch.relu). */
#define BN_ROW                                                                              \
    for (int64_t p = 0; p < pixels; p++) {                                                  \
        float v = fmaf((float)(src[p] + e) * st + b, al, be);                               \
        if (res) v = v + res[p];                                                            \
        dst[p] = relu && v < 0.0f ? 0.0f : v;                                               \
    }

__attribute__((optimize("fp-contract=off"))) static void
bn_row_base(const int32_t *restrict src, int64_t pixels, int32_t e, float st, float b, float al,
            float be, const float *restrict res, int relu, float *restrict dst) {
    BN_ROW
}

#if KERNEL_X86
__attribute__((optimize("fp-contract=off"), target("avx2,fma"))) static void
bn_row_avx2(const int32_t *restrict src, int64_t pixels, int32_t e, float st, float b, float al,
            float be, const float *restrict res, int relu, float *restrict dst) {
    BN_ROW
}
#else
#define bn_row_avx2 bn_row_base
#endif

void sums_to_bn(const int32_t *in, int64_t n_img, int64_t channels, int64_t pixels,
                const int32_t *excess, const float *step, const float *bias, const float *alpha,
                const float *beta, const float *residual, int relu, float *out, int threads) {
    if (threads <= 0) threads = omp_get_max_threads();
    void (*row)(const int32_t *, int64_t, int32_t, float, float, float, float, const float *,
                int, float *) = kernel_best_path() >= KERNEL_PATH_AVX2 ? bn_row_avx2 : bn_row_base;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_img; n++) {
        for (int64_t c = 0; c < channels; c++) {
            const int64_t base = (n * channels + c) * pixels;
            row(in + base, pixels, excess[c], step[c], bias[c], alpha[c], beta[c],
                residual ? residual + base : NULL, relu, out + base);
        }
    }
}
