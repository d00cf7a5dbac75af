/*
 * Adder convolution on the CPU: forward Y = -sum |X - W| with the geometry of a convolution,
 * AdderNet's backward (HardTanh input gradient, full-precision weight gradient) and the exact
 * sign gradients, for float32 and float64. Called through ctypes with tensor data pointers
 * (see adderquant/ops/_kernel.py).
 *
 * Layout. Each (image, group) pair is an independent "item". Its input is unfolded into K rows
 * (K = C_in/groups * kH * kW) of one value per output position, zero where the window reads
 * padding: im2col rows in general, or, with vertical stride 1, rows shared by the kernel rows
 * (unfold_columns). Register-blocked micro-kernels then sweep panels of positions:
 *   forward: MR output channels x up to NV_MAX vectors of positions, using
 *            sum |x - w| = sum x + sum w - 2 sum min(x, w) (one min and one FMA per term);
 *   input gradient: MRK unfolded rows x NVG vectors of positions, summed over the output
 *            channels, then added back onto the input (col2im);
 *   weight gradient: sum over positions of x * g (a matrix product) or sign(x - w) * g.
 *
 * Threads. With at least as many items as threads, each thread unfolds and computes whole items
 * in its own buffers; otherwise all threads share one item's buffers and split its work by
 * channels, panels and rows. Small problems run on fewer threads.
 *
 * Non-finite values. The rearranged sums can turn an overflow or an infinity into NaN; every
 * result that comes out NaN or infinite is recomputed from the definition in double precision
 * (repair_forward, repair_grad_input, repair_grad_weight), so NaN and inf follow PyTorch's
 * float64 evaluation of the definition while finite results take only a cheap check.
 *
 * Instruction sets. The code under ADDER_TEMPLATE_BODY is compiled once per (element type,
 * instruction set): this file includes itself with ADDER_DOUBLE and ADDER_ISA set. The AVX-512,
 * AVX2 and portable (16-byte GCC vectors) versions are chosen per call: the path is an argument
 * (< 0: the best this CPU runs, from the shared dispatch of kernel_common.h). Entry points
 * return KERNEL_OK or a negative KERNEL_ERR_* code.
 */
#ifndef ADDER_TEMPLATE_BODY

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_common.h"

/* Shapes of one call; the layout of the ctypes structure in _kernel.py. */
typedef struct {
    int64_t n, c_in, h, w;
    int64_t c_out, kh, kw;
    int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
    int64_t h_out, w_out;
} adder_geometry;

#define ADDER_ISA_PORTABLE 0
#define ADDER_ISA_AVX2 1
#define ADDER_ISA_AVX512 2

#define PASTE3_(a, b, c) a##_##b##_##c
#define PASTE3(a, b, c) PASTE3_(a, b, c)

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Zero-filled 64-byte aligned buffer of `bytes` bytes (NULL when out of memory). */
static void *alloc_zeroed(size_t bytes)
{
    size_t size = (size_t)round_up((int64_t)(bytes ? bytes : 1), 64);
    void *p = aligned_alloc(64, size);
    if (p)
        memset(p, 0, size);
    return p;
}

/* Threads worth starting for `terms` |x - w| terms: waking a thread costs about as much as a
 * few hundred thousand terms (and much more when the machine is oversubscribed). */
static int useful_threads(int threads, int64_t terms)
{
    const int64_t per_thread = (int64_t)1 << 19;
    const int64_t most = terms / per_thread > 1 ? terms / per_thread : 1;
    return threads < most ? threads : (int)most;
}

/* Outputs o in [*lo, *hi) read input index o * stride + offset inside [0, size). */
static inline void valid_outputs(int64_t offset, int64_t stride, int64_t size, int64_t n_out,
                                 int64_t *lo, int64_t *hi)
{
    int64_t a = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int64_t b = size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1;
    b = min64(b, n_out);
    *lo = min64(a, b);
    *hi = b;
}

/* The gradient factors of the definition in double precision, as PyTorch computes them:
 * clamp(d, -1, 1) (AdderNet's input gradient, NaN for NaN), d (its weight gradient) or, with
 * `exact`, sign(d) (0 for NaN, as torch.sign). */
static inline double sign_of(double d) { return (d > 0) - (d < 0); }
static inline double input_factor(double d, int exact)
{
    return exact ? sign_of(d) : isnan(d) ? d : d < -1 ? -1 : d > 1 ? 1 : d;
}
static inline double weight_factor(double d, int exact) { return exact ? sign_of(d) : d; }

#define ADDER_TEMPLATE_BODY
#define ADDER_DOUBLE 0
#define ADDER_ISA ADDER_ISA_PORTABLE
#include "adder_kernel.c"
#undef ADDER_ISA
#if KERNEL_X86
#define ADDER_ISA ADDER_ISA_AVX2
#include "adder_kernel.c"
#undef ADDER_ISA
#define ADDER_ISA ADDER_ISA_AVX512
#include "adder_kernel.c"
#undef ADDER_ISA
#endif
#undef ADDER_DOUBLE
#define ADDER_DOUBLE 1
#define ADDER_ISA ADDER_ISA_PORTABLE
#include "adder_kernel.c"
#undef ADDER_ISA
#if KERNEL_X86
#define ADDER_ISA ADDER_ISA_AVX2
#include "adder_kernel.c"
#undef ADDER_ISA
#define ADDER_ISA ADDER_ISA_AVX512
#include "adder_kernel.c"
#undef ADDER_ISA
#endif
#undef ADDER_DOUBLE
#undef ADDER_TEMPLATE_BODY

/* ------------------------------------------------------------------ run-time dispatch ---- */

typedef struct {
    int (*forward_f32)(const adder_geometry *, const float *, const float *, float *, int);
    int (*forward_f64)(const adder_geometry *, const double *, const double *, double *, int);
    int (*backward_f32)(const adder_geometry *, const float *, const float *, const float *,
                        float *, float *, int, int);
    int (*backward_f64)(const adder_geometry *, const double *, const double *, const double *,
                        double *, double *, int, int);
} adder_impl;

#define IMPL_ENTRY(isa) {forward_f32_##isa, forward_f64_##isa, backward_f32_##isa, backward_f64_##isa}
#define NO_IMPL {NULL, NULL, NULL, NULL}

/* By path (kernel_common.h). */
static const adder_impl IMPLS[KERNEL_PATHS] = {
    IMPL_ENTRY(portable),
#if KERNEL_X86
    IMPL_ENTRY(avx2),
    IMPL_ENTRY(avx512),
#else
    NO_IMPL,
    NO_IMPL,
#endif
};

/* The implementation of `path` (< 0: the best this CPU supports); NULL if it cannot run. */
static const adder_impl *impl(int path)
{
    path = kernel_resolve_path(path);
    return path < 0 || !IMPLS[path].forward_f32 ? NULL : &IMPLS[path];
}

/* Y (N x C_out x H_out x W_out) = -sum |X - W| over each window, on instruction-set path
 * `path` (< 0: the best). Returns KERNEL_OK or a negative KERNEL_ERR_* code. */
int adder_forward_f32(const adder_geometry *g, const float *x, const float *w, float *y,
                      int path, int threads)
{
    const adder_impl *p = impl(path);
    return p ? p->forward_f32(g, x, w, y, threads) : KERNEL_ERR_PATH;
}
int adder_forward_f64(const adder_geometry *g, const double *x, const double *w, double *y,
                      int path, int threads)
{
    const adder_impl *p = impl(path);
    return p ? p->forward_f64(g, x, w, y, threads) : KERNEL_ERR_PATH;
}

/* Gradients from the output gradient gy: gx = sum clamp(w - x, -1, 1) * gy and
 * gw = sum (x - w) * gy (AdderNet's, before the adaptive scaling), or with `exact` non-zero
 * gx = sum sign(w - x) * gy and gw = sum sign(x - w) * gy. gx or gw may be NULL (not needed). */
int adder_backward_f32(const adder_geometry *g, const float *x, const float *w, const float *gy,
                       float *gx, float *gw, int exact, int path, int threads)
{
    const adder_impl *p = impl(path);
    return p ? p->backward_f32(g, x, w, gy, gx, gw, exact, threads) : KERNEL_ERR_PATH;
}
int adder_backward_f64(const adder_geometry *g, const double *x, const double *w,
                       const double *gy, double *gx, double *gw, int exact, int path,
                       int threads)
{
    const adder_impl *p = impl(path);
    return p ? p->backward_f64(g, x, w, gy, gx, gw, exact, threads) : KERNEL_ERR_PATH;
}

#else /* ADDER_TEMPLATE_BODY: one (element type, instruction set) version of the kernels ---- */

#if ADDER_DOUBLE
#define T double
#define ITYPE int64_t
#define TSFX f64
#define INTRIN_SFX pd
#else
#define T float
#define ITYPE int32_t
#define TSFX f32
#define INTRIN_SFX ps
#endif

/* VBYTES: vector width. Forward block: MR output channels x up to NV_MAX vectors of positions;
 * input-gradient block: MRK unfolded rows x NVG vectors of positions; weight-gradient block:
 * ACC_BUDGET accumulators, up to NT_MAX vectors of output channels.
 * The AVX-512 version uses 256-bit vectors and the 32 registers of AVX-512VL: on AMD Zen 4,
 * which splits 512-bit operations in two halves, its blocks ran 15-20 % faster than the same
 * code on 512-bit vectors. */
#if ADDER_ISA == ADDER_ISA_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,fma")
#define ISA avx512
#define VBYTES 32
#define MR 6
#define NV_MAX 4
#define MRK 4
#define NVG 2
#define ACC_BUDGET 24
#define NT_MAX 4
#define ROWS_PAD 24
#define INTRIN(op) PASTE3(_mm256, op, INTRIN_SFX)
#elif ADDER_ISA == ADDER_ISA_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA avx2
#define VBYTES 32
#define MR 4
#define NV_MAX 2
#define MRK 2
#define NVG 2
#define ACC_BUDGET 12
#define NT_MAX 2
#define ROWS_PAD 12
#define INTRIN(op) PASTE3(_mm256, op, INTRIN_SFX)
#else
#define ISA portable
#define VBYTES 16
#define MR 4
#define NV_MAX 2
#define MRK 2
#define NVG 2
#define ACC_BUDGET 12
#define NT_MAX 2
#define ROWS_PAD 12
#endif

#define FN(name) PASTE3(name, TSFX, ISA)
#define VEC FN(vec)
#define IVEC FN(ivec)
typedef T VEC __attribute__((vector_size(VBYTES)));
typedef ITYPE IVEC __attribute__((vector_size(VBYTES)));
#define LANES ((int64_t)(VBYTES / sizeof(T)))
#define NBG (NVG * LANES)

#define VZERO ((VEC){0})
#define VLOAD(p) ({ VEC v_; memcpy(&v_, (p), sizeof v_); v_; })
#define VSTORE(p, v) ({ VEC s_ = (v); memcpy((p), &s_, sizeof s_); })
#ifdef INTRIN
#define VSET1(s) INTRIN(set1)(s)
#define VMIN(a, b) INTRIN(min)(a, b)
#define VMAX(a, b) INTRIN(max)(a, b)
#define VFMA(a, b, c) INTRIN(fmadd)(a, b, c)
#else
#define VSET1(s)                                                                               \
    ({                                                                                         \
        VEC set_v = VZERO;                                                                     \
        for (int set_i = 0; set_i < LANES; set_i++)                                            \
            set_v[set_i] = (s);                                                                \
        set_v;                                                                                 \
    })
#define VSELECT(m, a, b) ((VEC)(((m) & (IVEC)(a)) | (~(m) & (IVEC)(b))))
#define VMIN(a, b) ({ VEC min_a = (a), min_b = (b); VSELECT(min_a < min_b, min_a, min_b); })
#define VMAX(a, b) ({ VEC max_a = (a), max_b = (b); VSELECT(max_a > max_b, max_a, max_b); })
#define VFMA(a, b, c) ((a) * (b) + (c))
#endif
/* clamp(d, -1, 1), NaN for NaN: min and max return their second operand when one is NaN (x86
 * instructions and the portable selects alike), so d goes second. */
#define VHARDTANH(d) VMIN(VSET1(1), VMAX(VSET1(-1), (d)))
/* sign(d), 0 for zero and for NaN as torch.sign gives it; multiplied by g (not masked) so that
 * 0 * inf is NaN as in PyTorch's gradient of abs. */
#define VSIGN(d) ((VEC)((IVEC)VSET1(1) & ((d) > VZERO)) - (VEC)((IVEC)VSET1(1) & ((d) < VZERO)))
#define INLINE static inline __attribute__((always_inline))
/* Keeps loops over a few elements inline instead of calls to memset/memmove. */
#define SHORT_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))

/* Row stride of a tile holding `width` columns; avoids strides that alias in the L1 cache. */
static int64_t FN(tile_ld)(int64_t width)
{
    return (width * (int64_t)sizeof(T)) % 4096 == 0 ? width + LANES : width;
}

/* dst[j] = src[j * stride] for j < n (src + (n - 1) * stride is the last element read). */
static inline SHORT_LOOPS void FN(copy_strided)(T *restrict dst, const T *restrict src,
                                                int64_t n, int64_t stride)
{
    if (stride == 1 && n >= LANES) {
        /* Whole vectors, the last one overlapping its predecessor. */
        for (int64_t j = 0; j + LANES < n; j += LANES)
            VSTORE(dst + j, VLOAD(src + j));
        VSTORE(dst + n - LANES, VLOAD(src + n - LANES));
    } else if (stride == 2 && n >= LANES) {
        /* Even elements of two vectors; the second starts one element early so that nothing
         * past src[2 * (n - 1)] is read. */
        IVEC even;
        for (int i = 0; i < LANES; i++)
            even[i] = i < LANES / 2 ? 2 * i : 2 * i + 1;
        for (int64_t j = 0;; j = min64(j + LANES, n - LANES)) {
            const VEC lo = VLOAD(src + 2 * j), hi = VLOAD(src + 2 * j + LANES - 1);
            VSTORE(dst + j, __builtin_shuffle(lo, hi, even));
            if (j == n - LANES)
                break;
        }
    } else {
        for (int64_t j = 0; j < n; j++)
            dst[j] = src[j * stride];
    }
}

/* Zero the entries of a run copied from row i_lo column j_lo to row i_hi - 1 column j_hi - 1
 * (rows of `width`) that lie outside columns [j_lo, j_hi): they belong to neighbouring rows. */
static inline SHORT_LOOPS void FN(zero_wrapped)(T *run, int64_t width, int64_t i_lo,
                                                int64_t i_hi, int64_t j_lo, int64_t j_hi)
{
    for (int64_t i = i_lo; i < i_hi - 1; i++) {
        for (int64_t j = j_hi; j < width; j++)
            run[i * width + j] = 0;
        for (int64_t j = 0; j < j_lo; j++)
            run[(i + 1) * width + j] = 0;
    }
}

/* ----------------------------------------------------------------------- unfolding ---- */

/* Unfold the rows of channels [c0, c1) of one item's input x (C_in/groups x H x W) into
 * `tile` (row (c * kH + u) * kW + v holds x[c, i * s + u * d - pad, ...] for output i).
 * Only positions inside the input are written: the tile is zeroed once when allocated and its
 * padding positions, the same for every item, stay zero. */
static SHORT_LOOPS void FN(im2col)(const adder_geometry *g, const T *x, T *tile, int64_t ld,
                                   int64_t c0, int64_t c1)
{
    const int64_t khw = g->kh * g->kw, wo = g->w_out, ho = g->h_out, sw = g->stride_w;
    const int64_t hw = g->h * g->w, src_row = g->stride_h * g->w;
    /* Stride 1 with "same" width: the valid part of a tile row is one shifted run of the
     * input, copied at once; the columns that wrap into neighbouring rows are re-zeroed. */
    const int merge_rows = g->stride_h == 1 && sw == 1 && wo == g->w;
    for (int64_t u = 0; u < g->kh; u++)
        for (int64_t v = 0; v < g->kw; v++) {
            const int64_t row_off = u * g->dil_h - g->pad_h, col_off = v * g->dil_w - g->pad_w;
            int64_t i_lo, i_hi, j_lo, j_hi;
            valid_outputs(row_off, g->stride_h, g->h, ho, &i_lo, &i_hi);
            valid_outputs(col_off, sw, g->w, wo, &j_lo, &j_hi);
            if (i_lo >= i_hi || j_lo >= j_hi)
                continue;
            const int64_t first = i_lo * wo + j_lo, last = (i_hi - 1) * wo + j_hi;
            for (int64_t c = c0; c < c1; c++) {
                T *row = tile + (c * khw + u * g->kw + v) * ld;
                const T *src = x + c * hw + row_off * g->w + col_off;
                if (merge_rows) {
                    FN(copy_strided)(row + first, src + first, last - first, 1);
                    FN(zero_wrapped)(row, wo, i_lo, i_hi, j_lo, j_hi);
                } else {
                    for (int64_t i = i_lo; i < i_hi; i++)
                        FN(copy_strided)(row + i * wo + j_lo, src + i * src_row + j_lo * sw,
                                         j_hi - j_lo, sw);
                }
            }
        }
}

/* Stride-1 unfolding shared by the kernel rows: kernel row u reads the rows of kernel row 0
 * moved down by u * dil_h output rows, so one buffer per (channel, kernel column) serves every
 * kernel row: buf[(c * kW + v) * block + r * W_out + j] = x[c, r - pad_h, j * s + v * d - pad]
 * for r < H_out + (kH - 1) * dil_h. Channels [c0, c1); padding positions stay zero as in im2col,
 * with kW (not kH * kW) copies of the input. */
static SHORT_LOOPS void FN(unfold_columns)(const adder_geometry *g, const T *x, T *buf,
                                           int64_t block, int64_t c0, int64_t c1)
{
    const int64_t wo = g->w_out, sw = g->stride_w, hw = g->h * g->w;
    const int64_t rows = g->h_out + (g->kh - 1) * g->dil_h;
    const int64_t r_lo = min64(g->pad_h, rows), r_hi = min64(g->pad_h + g->h, rows);
    const int merge_rows = sw == 1 && wo == g->w;
    if (r_lo >= r_hi)
        return;
    for (int64_t v = 0; v < g->kw; v++) {
        const int64_t col_off = v * g->dil_w - g->pad_w;
        int64_t j_lo, j_hi;
        valid_outputs(col_off, sw, g->w, wo, &j_lo, &j_hi);
        if (j_lo >= j_hi)
            continue;
        const int64_t first = r_lo * wo + j_lo, last = (r_hi - 1) * wo + j_hi;
        for (int64_t c = c0; c < c1; c++) {
            T *dst = buf + (c * g->kw + v) * block;
            const T *src = x + c * hw - g->pad_h * g->w + col_off;
            if (merge_rows) {
                FN(copy_strided)(dst + first, src + first, last - first, 1);
                FN(zero_wrapped)(dst, wo, r_lo, r_hi, j_lo, j_hi);
            } else {
                for (int64_t r = r_lo; r < r_hi; r++)
                    FN(copy_strided)(dst + r * wo + j_lo, src + r * g->w + j_lo * sw,
                                     j_hi - j_lo, sw);
            }
        }
    }
}

/* Where the kernels find the unfolded input of one item: row kk starts at buffer + rows[kk];
 * im2col rows are ld apart, shared stride-1 rows are described above; rows past K (padding
 * of the blocks) read zeros. */
typedef struct {
    int shared;     /* rows come from unfold_columns (else im2col) */
    int64_t block;  /* unfold_columns: elements per (channel, kernel column) */
    int64_t ld;     /* im2col: row stride */
    int64_t size;   /* elements of the buffer, reads past the last position included */
} FN(unfolding);

static FN(unfolding) FN(plan_unfolding)(const adder_geometry *g, int64_t width, int64_t *rows,
                                        int64_t n_rows)
{
    const int64_t cg_in = g->c_in / g->groups, k = cg_in * g->kh * g->kw;
    FN(unfolding) u = {g->stride_h == 1 && g->kh > 1, 0, FN(tile_ld)(width), 0};
    if (u.shared) {
        /* The last `width` elements stay zero: the zero row, and reads past the last row. */
        u.block = (g->h_out + (g->kh - 1) * g->dil_h) * g->w_out;
        u.size = cg_in * g->kw * u.block + width;
    } else {
        u.size = n_rows * u.ld;
    }
    for (int64_t kk = k; kk < n_rows; kk++)
        rows[kk] = u.shared ? u.size - width : kk * u.ld;
    for (int64_t c = 0; c < cg_in; c++)
        for (int64_t kr = 0; kr < g->kh; kr++)
            for (int64_t kc = 0; kc < g->kw; kc++) {
                const int64_t kk = (c * g->kh + kr) * g->kw + kc;
                rows[kk] = u.shared ? (c * g->kw + kc) * u.block + kr * g->dil_h * g->w_out
                                    : kk * u.ld;
            }
    return u;
}

static void FN(unfold)(const adder_geometry *g, const FN(unfolding) *u, const T *x, T *buf,
                       int64_t c0, int64_t c1)
{
    if (u->shared)
        FN(unfold_columns)(g, x, buf, u->block, c0, c1);
    else
        FN(im2col)(g, x, buf, u->ld, c0, c1);
}

/* ------------------------------------------------------- non-finite results, repaired ---- */

/* The fast paths rearrange the sums (forward: sum x + sum w - 2 sum min(x, w); AdderNet's
 * weight gradient: sum x g - w sum g) and accumulate in T, so an overflow or an infinity can
 * come out as NaN or as the wrong infinity where the definition gives an infinity, NaN or a
 * finite value. Such a result is always NaN or infinite (a non-finite term or partial sum stays
 * non-finite), and each one is recomputed here from the definition, term by term in double
 * precision (stopping at the first NaN): it is then the float64 definition rounded to T. Finite
 * inputs whose results stay finite never come here. */

/* Whether any lane of m has a bit set. */
INLINE int FN(any_lane)(IVEC m)
{
    int any = 0;
    for (int i = 0; i < LANES; i++)
        any |= m[i] != 0;
    return any;
}

/* Whether any of the n values at p is NaN or infinite: v - v is +0 (no bit set) for finite v
 * and NaN otherwise; one subtraction and one OR per vector. */
static int FN(any_nonfinite)(const T *p, int64_t n)
{
    IVEC m = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const VEC v = VLOAD(p + i);
        m |= (IVEC)(v - v);
    }
    int any = FN(any_lane)(m);
    for (; i < n; i++)
        any |= !isfinite(p[i]);
    return any;
}

/* One item's input (C_in/groups x H x W) at channel c, row i, column j; zero in the padding. */
static inline T FN(input_at)(const adder_geometry *g, const T *x, int64_t c, int64_t i,
                             int64_t j)
{
    return i >= 0 && i < g->h && j >= 0 && j < g->w ? x[(c * g->h + i) * g->w + j] : 0;
}

/* The non-finite outputs at positions [q0, q1) of one item: y = -sum |x - w| (x: the item's
 * input, w: its group's weights, y: C_out/groups x P). */
static void FN(repair_forward)(const adder_geometry *g, const T *x, const T *w, T *y,
                               int64_t q0, int64_t q1)
{
    const int64_t cg_in = g->c_in / g->groups, cg_out = g->c_out / g->groups;
    const int64_t p = g->h_out * g->w_out, k = cg_in * g->kh * g->kw;
    for (int64_t t = 0; t < cg_out; t++)
        for (int64_t q = q0; q < q1; q++) {
            if (isfinite(y[t * p + q]))
                continue;
            const int64_t i0 = q / g->w_out * g->stride_h - g->pad_h;
            const int64_t j0 = q % g->w_out * g->stride_w - g->pad_w;
            const T *wt = w + t * k;
            double sum = 0;
            for (int64_t c = 0; c < cg_in && !isnan(sum); c++)
                for (int64_t u = 0; u < g->kh; u++)
                    for (int64_t v = 0; v < g->kw; v++)
                        sum += fabs((double)FN(input_at)(g, x, c, i0 + u * g->dil_h,
                                                         j0 + v * g->dil_w) -
                                    (double)wt[(c * g->kh + u) * g->kw + v]);
            y[t * p + q] = (T)-sum;
        }
}

/* The non-finite input gradients of channels [c0, c1) of one item: gx = sum f(w - x) * gy over
 * the outputs whose window reads the pixel (gy: the item's output gradient, C_out/groups x P;
 * f: see input_factor). */
static void FN(repair_grad_input)(const adder_geometry *g, const T *x, const T *w, const T *gy,
                                  T *gx, int64_t c0, int64_t c1, int exact)
{
    const int64_t cg_in = g->c_in / g->groups, cg_out = g->c_out / g->groups;
    const int64_t p = g->h_out * g->w_out, k = cg_in * g->kh * g->kw;
    if (!FN(any_nonfinite)(gx + c0 * g->h * g->w, (c1 - c0) * g->h * g->w))
        return;
    for (int64_t c = c0; c < c1; c++)
        for (int64_t i = 0; i < g->h; i++)
            for (int64_t j = 0; j < g->w; j++) {
                T *out = gx + (c * g->h + i) * g->w + j;
                if (isfinite(*out))
                    continue;
                const double xv = x[(c * g->h + i) * g->w + j];
                double sum = 0;
                for (int64_t u = 0; u < g->kh && !isnan(sum); u++) {
                    const int64_t th = i + g->pad_h - u * g->dil_h, oh = th / g->stride_h;
                    if (th < 0 || th % g->stride_h || oh >= g->h_out)
                        continue;
                    for (int64_t v = 0; v < g->kw; v++) {
                        const int64_t tw = j + g->pad_w - v * g->dil_w, ow = tw / g->stride_w;
                        if (tw < 0 || tw % g->stride_w || ow >= g->w_out)
                            continue;
                        for (int64_t t = 0; t < cg_out; t++)
                            sum += input_factor(w[t * k + (c * g->kh + u) * g->kw + v] - xv,
                                                exact) *
                                   (double)gy[t * p + oh * g->w_out + ow];
                    }
                }
                *out = (T)sum;
            }
}

/* The non-finite weight gradients: gw[t][kk] = sum over images and positions of
 * f(x - w[t][kk]) * gy (f: see weight_factor; x zero in the padding). */
static void FN(repair_grad_weight)(const adder_geometry *g, const T *x, const T *w, const T *gy,
                                   T *gw, int exact, int threads)
{
    const int64_t cg_in = g->c_in / g->groups, cg_out = g->c_out / g->groups;
    const int64_t p = g->h_out * g->w_out, hw = g->h * g->w, k = cg_in * g->kh * g->kw;
    if (!FN(any_nonfinite)(gw, g->c_out * k))
        return;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t e = 0; e < g->c_out * k; e++) {
        if (isfinite(gw[e]))
            continue;
        const int64_t t = e / k, c = e % k / (g->kh * g->kw);
        const int64_t u = e % (g->kh * g->kw) / g->kw, v = e % g->kw;
        const double wv = w[e];
        double sum = 0;
        for (int64_t n = 0; n < g->n && !isnan(sum); n++) {
            const T *xn = x + (n * g->c_in + t / cg_out * cg_in) * hw;
            const T *gn = gy + (n * g->c_out + t) * p;
            for (int64_t q = 0; q < p; q++) {
                const int64_t i = q / g->w_out * g->stride_h - g->pad_h + u * g->dil_h;
                const int64_t j = q % g->w_out * g->stride_w - g->pad_w + v * g->dil_w;
                sum += weight_factor(FN(input_at)(g, xn, c, i, j) - wv, exact) * (double)gn[q];
            }
        }
        gw[e] = (T)sum;
    }
}

/* ------------------------------------------------------------------------- forward ---- */

/* Vectors of positions per forward panel (1..NV_MAX): the fewest padded positions, weighted
 * by (NV_MAX + 6) / (nv + 6), about the measured slowdown of narrower blocks. */
static int FN(forward_nv)(int64_t p)
{
    int best = NV_MAX;
    for (int nv = NV_MAX - 1; nv >= 1; nv--)
        if (round_up(p, nv * LANES) * (NV_MAX + 6) / (nv + 6) <
            round_up(p, best * LANES) * (NV_MAX + 6) / (best + 6))
            best = nv;
    return best;
}

/* MR output channels x nv vectors of positions from p0: y = 2 sum min(x, w) - sum x - sum w.
 * Row kk of the unfolded input starts at buf + rows[kk]; wp: K x MR packed weights; colsum:
 * sum x per position; the first `nrows` channels and `np` positions are written to y (row
 * stride y_ld). The sum is accumulated with fma(min, 1, acc): on AMD Zen 4 min and add share
 * execution ports while FMA has its own, which doubles the throughput (neutral elsewhere).
 * Lanes of *nonfinite get bits set where a computed value (written or in the block's padding)
 * is NaN or infinite: the identity can overflow or give inf - inf where the definition does not,
 * so such outputs are recomputed (see repair_forward). */
INLINE void FN(forward_block)(const T *buf, const int64_t *rows, int64_t p0, const T *wp,
                              int64_t k, const VEC *colsum, const T *wsum, int64_t nrows,
                              int64_t np, T *y, int64_t y_ld, const int nv, IVEC *nonfinite)
{
    const VEC one = VSET1(1);
    VEC acc[MR][NV_MAX];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++)
            acc[r][v] = VZERO;
    for (int64_t kk = 0; kk < k; kk++) {
        const T *xp = buf + rows[kk] + p0;
        VEC xv[NV_MAX];
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++)
            xv[v] = VLOAD(xp + v * LANES);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const VEC wv = VSET1(wp[kk * MR + r]);
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++)
                acc[r][v] = VFMA(VMIN(xv[v], wv), one, acc[r][v]);
        }
    }
    for (int64_t r = 0; r < nrows; r++) {
        const VEC ws = VSET1(wsum[r]);
        T part[NV_MAX * LANES];
        T *out = np == nv * LANES ? y + r * y_ld : part;
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) {
            const VEC o = acc[r][v] + acc[r][v] - colsum[v] - ws;
            *nonfinite |= (IVEC)(o - o); /* +0 when o is finite, NaN when not */
            VSTORE(out + v * LANES, o);
        }
        if (out == part)
            memcpy(y + r * y_ld, part, (size_t)np * sizeof(T));
    }
}

/* Output panels [b0, b1) of nv vectors of positions of one item (y: C_out/groups x P);
 * non-zero when a block computed a non-finite value. */
INLINE int FN(forward_panels_nv)(const T *buf, const int64_t *rows, int64_t k,
                                 const T *wpack, const T *wsum, int64_t cg_out, int64_t p, T *y,
                                 int64_t b0, int64_t b1, const int nv)
{
    IVEC nonfinite = {0};
    for (int64_t b = b0; b < b1; b++) {
        const int64_t p0 = b * nv * LANES, np = min64(nv * LANES, p - p0);
        VEC colsum[NV_MAX];
        for (int v = 0; v < nv; v++)
            colsum[v] = VZERO;
        for (int64_t kk = 0; kk < k; kk++)
            for (int v = 0; v < nv; v++)
                colsum[v] += VLOAD(buf + rows[kk] + p0 + v * LANES);
        for (int64_t t0 = 0; t0 < cg_out; t0 += MR)
            FN(forward_block)(buf, rows, p0, wpack + t0 * k, k, colsum, wsum + t0,
                              min64(MR, cg_out - t0), np, y + t0 * p + p0, p, nv, &nonfinite);
    }
    return FN(any_lane)(nonfinite);
}

static int FN(forward_panels)(const T *buf, const int64_t *rows, int64_t k, const T *wpack,
                              const T *wsum, int64_t cg_out, int64_t p, T *y, int64_t b0,
                              int64_t b1, int nv)
{
    switch (nv) {
#if NV_MAX >= 4
    case 4:
        return FN(forward_panels_nv)(buf, rows, k, wpack, wsum, cg_out, p, y, b0, b1, 4);
#endif
#if NV_MAX >= 3
    case 3:
        return FN(forward_panels_nv)(buf, rows, k, wpack, wsum, cg_out, p, y, b0, b1, 3);
#endif
    case 2:
        return FN(forward_panels_nv)(buf, rows, k, wpack, wsum, cg_out, p, y, b0, b1, 2);
    default:
        return FN(forward_panels_nv)(buf, rows, k, wpack, wsum, cg_out, p, y, b0, b1, 1);
    }
}

static int FN(forward)(const adder_geometry *g, const T *x, const T *w, T *y, int threads)
{
    threads = useful_threads(threads, g->n * g->c_out * g->c_in / g->groups * g->kh * g->kw *
                                          g->h_out * g->w_out);
    const int64_t cg_in = g->c_in / g->groups, cg_out = g->c_out / g->groups;
    const int64_t k = cg_in * g->kh * g->kw, p = g->h_out * g->w_out, hw = g->h * g->w;
    const int nv = FN(forward_nv)(p);
    const int64_t panels = (p + nv * LANES - 1) / (nv * LANES);
    const int64_t cg_out_pad = round_up(cg_out, MR), items = g->n * g->groups;
    const int per_item = items >= threads;
    int64_t *rows = malloc((size_t)k * sizeof(int64_t));
    T *wpack = alloc_zeroed((size_t)(g->groups * cg_out_pad * k) * sizeof(T));
    T *wsum = alloc_zeroed((size_t)(g->groups * cg_out_pad) * sizeof(T));
    int failed = !rows || !wpack || !wsum;
    const FN(unfolding) u =
        failed ? (FN(unfolding)){0} : FN(plan_unfolding)(g, panels * nv * LANES, rows, k);
    T *shared_buf = per_item || failed ? NULL : alloc_zeroed((size_t)u.size * sizeof(T));
    failed = failed || (!per_item && !shared_buf);
    if (!failed) {
        /* wpack[group][channel block][k][MR]; padded channels stay zero. */
        for (int64_t gi = 0; gi < g->groups; gi++)
            for (int64_t t = 0; t < cg_out; t++) {
                const T *src = w + (gi * cg_out + t) * k;
                T *dst = wpack + gi * cg_out_pad * k + t / MR * MR * k + t % MR;
                double sum = 0;
                for (int64_t kk = 0; kk < k; kk++) {
                    dst[kk * MR] = src[kk];
                    sum += src[kk];
                }
                wsum[gi * cg_out_pad + t] = (T)sum;
            }
    }
#pragma omp parallel num_threads(threads) if (!failed)
    if (!failed) {
        if (per_item) {
            T *buf = alloc_zeroed((size_t)u.size * sizeof(T));
            if (!buf) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                const int64_t n = it / g->groups, gi = it % g->groups;
                if (!buf)
                    continue;
                const T *x_item = x + (n * g->c_in + gi * cg_in) * hw;
                T *y_item = y + (n * g->c_out + gi * cg_out) * p;
                FN(unfold)(g, &u, x_item, buf, 0, cg_in);
                if (FN(forward_panels)(buf, rows, k, wpack + gi * cg_out_pad * k,
                                       wsum + gi * cg_out_pad, cg_out, p, y_item, 0, panels, nv))
                    FN(repair_forward)(g, x_item, w + gi * cg_out * k, y_item, 0, p);
            }
            free(buf);
        } else {
            for (int64_t it = 0; it < items; it++) {
                const int64_t n = it / g->groups, gi = it % g->groups;
#pragma omp for schedule(static)
                for (int64_t c = 0; c < cg_in; c++)
                    FN(unfold)(g, &u, x + (n * g->c_in + gi * cg_in) * hw, shared_buf, c, c + 1);
                const T *x_item = x + (n * g->c_in + gi * cg_in) * hw;
                T *y_item = y + (n * g->c_out + gi * cg_out) * p;
#pragma omp for schedule(dynamic, 1)
                for (int64_t b = 0; b < panels; b++)
                    if (FN(forward_panels)(shared_buf, rows, k, wpack + gi * cg_out_pad * k,
                                           wsum + gi * cg_out_pad, cg_out, p, y_item, b, b + 1,
                                           nv))
                        FN(repair_forward)(g, x_item, w + gi * cg_out * k, y_item,
                                           b * nv * LANES, min64(p, (b + 1) * nv * LANES));
            }
        }
    }
    free(rows);
    free(wpack);
    free(wsum);
    free(shared_buf);
    return failed ? KERNEL_ERR_MEMORY : KERNEL_OK;
}

/* ------------------------------------------------------------------ input gradient ---- */

/* MRK unfolded rows x NBG positions: cols = sum_t f(w[t] - x) * g[t], f = HardTanh or sign.
 * Unfolded row r of the block starts at buf + rows[r]; gp, out: columns p0 of the output
 * gradient and of cols (row stride ld); wp: weights at row k0 (row stride k_pad). */
INLINE void FN(grad_input_block)(const T *buf, const int64_t *rows, int64_t p0, const T *gp,
                                 int64_t ld, const T *wp, int64_t k_pad, int64_t cg_out, T *out,
                                 const int exact)
{
    VEC xv[MRK][NVG], acc[MRK][NVG];
    const VEC minus_one = VSET1(-1);
#pragma GCC unroll 8
    for (int r = 0; r < MRK; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NVG; v++) {
            xv[r][v] = VLOAD(buf + rows[r] + p0 + v * LANES);
            acc[r][v] = VZERO;
        }
    for (int64_t t = 0; t < cg_out; t++) {
        VEC gv[NVG];
#pragma GCC unroll 8
        for (int v = 0; v < NVG; v++)
            gv[v] = VLOAD(gp + t * ld + v * LANES);
#pragma GCC unroll 8
        for (int r = 0; r < MRK; r++) {
            const VEC wv = VSET1(wp[t * k_pad + r]);
#pragma GCC unroll 8
            for (int v = 0; v < NVG; v++) {
                /* w - x as an FMA: keeps the min/max ports free (see forward_block). */
                const VEC d = VFMA(xv[r][v], minus_one, wv);
                if (exact)
                    acc[r][v] = VFMA(VSIGN(d), gv[v], acc[r][v]);
                else
                    acc[r][v] = VFMA(VHARDTANH(d), gv[v], acc[r][v]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MRK; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NVG; v++)
            VSTORE(out + r * ld + v * LANES, acc[r][v]);
}

/* Panels [b0, b1) of the unfolded input gradient, rows [0, k) (wpad: row stride k_pad). */
static void FN(grad_input_panels)(const T *buf, const int64_t *rows, const T *gtile,
                                  int64_t ld, const T *wpad, int64_t k, int64_t k_pad,
                                  int64_t cg_out, T *cols, int exact, int64_t b0, int64_t b1)
{
    for (int64_t k0 = 0; k0 < k; k0 += MRK)
        for (int64_t b = b0; b < b1; b++) {
            const int64_t p0 = b * NBG, at = k0 * ld + p0;
            if (exact)
                FN(grad_input_block)(buf, rows + k0, p0, gtile + p0, ld, wpad + k0, k_pad,
                                     cg_out, cols + at, 1);
            else
                FN(grad_input_block)(buf, rows + k0, p0, gtile + p0, ld, wpad + k0, k_pad,
                                     cg_out, cols + at, 0);
        }
}

/* ----------------------------------------------------------------- weight gradient ---- */

/* mk unfolded rows x nt vectors of output channels, summed over positions q < p:
 * acc[k][t] += sum_q x[k][q] * g[t][q] (AdderNet: the x.g part of sum (x - w) g), or
 * sum_q sign(x[k][q] - w[t][k]) * g[t][q] (exact). Unfolded row r of the block starts at
 * buf + rows[r]; gt, wt: positions x channels and rows x channels (row stride cg_pad);
 * acc: row k0. */
INLINE void FN(grad_weight_block)(const T *buf, const int64_t *rows, const T *gt, const T *wt,
                                  int64_t cg_pad, int64_t p, T *acc, const int mk, const int nt,
                                  const int exact)
{
    VEC a[ACC_BUDGET][NT_MAX];
    const T *xr[ACC_BUDGET];
#pragma GCC unroll 24
    for (int r = 0; r < mk; r++)
        xr[r] = buf + rows[r];
#pragma GCC unroll 24
    for (int r = 0; r < mk; r++)
#pragma GCC unroll 8
        for (int j = 0; j < nt; j++)
            a[r][j] = VZERO;
    for (int64_t q = 0; q < p; q++) {
        VEC gv[NT_MAX];
#pragma GCC unroll 8
        for (int j = 0; j < nt; j++)
            gv[j] = VLOAD(gt + q * cg_pad + j * LANES);
#pragma GCC unroll 24
        for (int r = 0; r < mk; r++) {
            const VEC xb = VSET1(xr[r][q]);
#pragma GCC unroll 8
            for (int j = 0; j < nt; j++) {
                if (exact)
                    a[r][j] = VFMA(VSIGN(xb - VLOAD(wt + r * cg_pad + j * LANES)), gv[j],
                                   a[r][j]);
                else
                    a[r][j] = VFMA(xb, gv[j], a[r][j]);
            }
        }
    }
#pragma GCC unroll 24
    for (int r = 0; r < mk; r++)
#pragma GCC unroll 8
        for (int j = 0; j < nt; j++)
            VSTORE(acc + r * cg_pad + j * LANES, VLOAD(acc + r * cg_pad + j * LANES) + a[r][j]);
}

/* Blocks of ACC_BUDGET / nt rows; rows [k0, k1) are multiples of ROWS_PAD apart. */
INLINE void FN(grad_weight_rows_nt)(const T *buf, const int64_t *rows, const T *gt,
                                    const T *wt, int64_t cg_pad, int64_t p, T *acc, int64_t k0,
                                    int64_t k1, const int nt, const int exact)
{
    const int mk = ACC_BUDGET / nt;
    for (int64_t j0 = 0; j0 < cg_pad; j0 += nt * LANES)
        for (int64_t kk = k0; kk < k1; kk += mk)
            FN(grad_weight_block)(buf, rows + kk, gt + j0, wt + kk * cg_pad + j0, cg_pad, p,
                                  acc + kk * cg_pad + j0, mk, nt, exact);
}

static void FN(grad_weight_rows)(const T *buf, const int64_t *rows, const T *gt, const T *wt,
                                 int64_t cg_pad, int64_t p, T *acc, int64_t k0, int64_t k1,
                                 int exact)
{
    const int64_t vectors = cg_pad / LANES;
#define GRAD_WEIGHT_CASE(nt)                                                                    \
    if (vectors % (nt) == 0 && vectors >= (nt)) {                                              \
        if (exact)                                                                             \
            FN(grad_weight_rows_nt)(buf, rows, gt, wt, cg_pad, p, acc, k0, k1, nt, 1);         \
        else                                                                                   \
            FN(grad_weight_rows_nt)(buf, rows, gt, wt, cg_pad, p, acc, k0, k1, nt, 0);         \
        return;                                                                                \
    }
#if NT_MAX >= 4
    GRAD_WEIGHT_CASE(4)
#endif
#if NT_MAX >= 3
    GRAD_WEIGHT_CASE(3)
#endif
    GRAD_WEIGHT_CASE(2)
    GRAD_WEIGHT_CASE(1)
#undef GRAD_WEIGHT_CASE
}

/* ------------------------------------------------------------------------ backward ---- */

/* Sum the unfolded rows of channels [c0, c1) back into one item's gradient gx (zeroed here).
 * With stride 1 and "same" width, a row is added as one run after zeroing its entries that
 * read padding (they would land on neighbouring rows); `cols` is modified. */
static SHORT_LOOPS void FN(col2im)(const adder_geometry *g, T *cols, int64_t ld, T *gx,
                                   int64_t c0, int64_t c1)
{
    const int64_t khw = g->kh * g->kw, wo = g->w_out, ho = g->h_out, sw = g->stride_w;
    const int64_t hw = g->h * g->w, dst_row = g->stride_h * g->w;
    const int merge_rows = g->stride_h == 1 && sw == 1 && wo == g->w;
    memset(gx + c0 * hw, 0, (size_t)((c1 - c0) * hw) * sizeof(T));
    for (int64_t u = 0; u < g->kh; u++)
        for (int64_t v = 0; v < g->kw; v++) {
            const int64_t row_off = u * g->dil_h - g->pad_h, col_off = v * g->dil_w - g->pad_w;
            int64_t i_lo, i_hi, j_lo, j_hi;
            valid_outputs(row_off, g->stride_h, g->h, ho, &i_lo, &i_hi);
            valid_outputs(col_off, sw, g->w, wo, &j_lo, &j_hi);
            if (i_lo >= i_hi || j_lo >= j_hi)
                continue;
            const int64_t first = i_lo * wo + j_lo, last = (i_hi - 1) * wo + j_hi;
            for (int64_t c = c0; c < c1; c++) {
                T *restrict src = cols + (c * khw + u * g->kw + v) * ld;
                T *restrict dst = gx + c * hw + row_off * g->w + col_off;
                if (merge_rows) {
                    FN(zero_wrapped)(src, wo, i_lo, i_hi, j_lo, j_hi);
                    for (int64_t q = first; q < last; q++)
                        dst[q] += src[q];
                } else if (sw == 1) {
                    for (int64_t i = i_lo; i < i_hi; i++)
                        for (int64_t j = j_lo; j < j_hi; j++)
                            dst[i * dst_row + j] += src[i * wo + j];
                } else {
                    for (int64_t i = i_lo; i < i_hi; i++)
                        for (int64_t j = j_lo; j < j_hi; j++)
                            dst[i * dst_row + j * sw] += src[i * wo + j];
                }
            }
        }
}

/* Copy one item's output gradient (C_out/groups x P) into a tile with row stride ld. */
static void FN(copy_rows)(const T *src, int64_t width, T *tile, int64_t ld, int64_t r0,
                          int64_t r1)
{
    for (int64_t r = r0; r < r1; r++)
        memcpy(tile + r * ld, src + r * width, (size_t)width * sizeof(T));
}

/* gt[q][t] = g[t][q] for positions [q0, q1) (channels past cg_out stay zero). */
static void FN(transpose_rows)(const T *gy, int64_t p, int64_t cg_out, T *gt, int64_t cg_pad,
                               int64_t q0, int64_t q1)
{
    for (int64_t q = q0; q < q1; q++)
        for (int64_t t = 0; t < cg_out; t++)
            gt[q * cg_pad + t] = gy[t * p + q];
}

/* Work buffers of one item (one image of one group) in the backward pass. */
typedef struct {
    T *x;     /* unfolded input (see plan_unfolding) */
    T *cols;  /* k_rows x ld: input gradient before col2im */
    T *gtile; /* cg_out x ld: output gradient */
    T *gt;    /* ld x cg_pad: output gradient, transposed */
    T *acc;   /* groups x k_rows x cg_pad: weight-gradient sums (per thread or shared) */
    T *gsum;  /* c_out: sum of the output gradient per channel */
} FN(backward_buffers);

/* grad_x = sum f(w - x) * g with f = HardTanh (AdderNet) or sign (exact); grad_w = sum (x - w) g
 * (AdderNet, before the adaptive scaling) or sum sign(x - w) g (exact). gx or gw may be NULL. */
static int FN(backward)(const adder_geometry *g, const T *x, const T *w, const T *gy, T *gx,
                        T *gw, int exact, int threads)
{
    threads = useful_threads(threads, g->n * g->c_out * g->c_in / g->groups * g->kh * g->kw *
                                          g->h_out * g->w_out);
    const int64_t cg_in = g->c_in / g->groups, cg_out = g->c_out / g->groups;
    const int64_t k = cg_in * g->kh * g->kw, k_rows = round_up(k, ROWS_PAD);
    const int64_t p = g->h_out * g->w_out, hw = g->h * g->w;
    const int64_t panels = (p + NBG - 1) / NBG, ld = FN(tile_ld)(panels * NBG);
    const int64_t cg_pad = round_up(cg_out, LANES), items = g->n * g->groups;
    const int64_t acc_size = g->groups * k_rows * cg_pad;
    const int per_item = items >= threads;
    int64_t *rows = malloc((size_t)k_rows * sizeof(int64_t));
    const FN(unfolding) u = rows ? FN(plan_unfolding)(g, panels * NBG, rows, k_rows)
                                 : (FN(unfolding)){0};
    const int64_t cols_at = u.size, gtile_at = cols_at + (gx ? k_rows * ld : 0);
    const int64_t gt_at = gtile_at + (gx ? cg_out * ld : 0);
    const size_t item_bytes = (size_t)(gt_at + (gw ? ld * cg_pad : 0)) * sizeof(T);
    /* wpad[t][k_rows]: weights with zero rows past k (input gradient);
     * wt[group][k_rows][cg_pad]: weights transposed (exact weight gradient). */
    T *wpad = alloc_zeroed((size_t)(g->c_out * k_rows) * sizeof(T));
    T *wt = alloc_zeroed((size_t)acc_size * sizeof(T));
    T *acc_total = alloc_zeroed((size_t)(acc_size + g->c_out) * sizeof(T));
    T *shared = per_item ? NULL : alloc_zeroed(item_bytes);
    /* Per-thread weight-gradient sums, added in thread order: the result does not depend on
     * the timing of the threads. */
    T **partials = calloc((size_t)threads, sizeof(T *));
    int failed = !rows || !wpad || !wt || !acc_total || !partials || (!per_item && !shared);
    if (!failed)
        for (int64_t t = 0; t < g->c_out; t++)
            for (int64_t kk = 0; kk < k; kk++) {
                wpad[t * k_rows + kk] = w[t * k + kk];
                wt[(t / cg_out * k_rows + kk) * cg_pad + t % cg_out] = w[t * k + kk];
            }
#pragma omp parallel num_threads(threads) if (!failed)
    if (!failed) {
        T *mine = per_item ? alloc_zeroed(item_bytes) : shared;
        T *acc_mine = per_item && gw ? alloc_zeroed((size_t)(acc_size + g->c_out) * sizeof(T))
                                     : acc_total;
        if (!mine || !acc_mine) {
#pragma omp atomic write
            failed = 1;
        }
        const FN(backward_buffers) buf = {mine, mine + cols_at, mine + gtile_at, mine + gt_at,
                                          acc_mine, acc_mine + acc_size};
        if (per_item) {
            partials[omp_get_thread_num()] = acc_mine;
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; it++) {
                const int64_t n = it / g->groups, gi = it % g->groups;
                const T *gy_item = gy + (n * g->c_out + gi * cg_out) * p;
                if (!mine || !acc_mine)
                    continue;
                FN(unfold)(g, &u, x + (n * g->c_in + gi * cg_in) * hw, buf.x, 0, cg_in);
                if (gx) {
                    FN(copy_rows)(gy_item, p, buf.gtile, ld, 0, cg_out);
                    FN(grad_input_panels)(buf.x, rows, buf.gtile, ld,
                                          wpad + gi * cg_out * k_rows, k, k_rows, cg_out,
                                          buf.cols, exact, 0, panels);
                    T *gx_item = gx + (n * g->c_in + gi * cg_in) * hw;
                    FN(col2im)(g, buf.cols, ld, gx_item, 0, cg_in);
                    FN(repair_grad_input)(g, x + (n * g->c_in + gi * cg_in) * hw,
                                          w + gi * cg_out * k, gy_item, gx_item, 0, cg_in,
                                          exact);
                }
                if (gw) {
                    FN(transpose_rows)(gy_item, p, cg_out, buf.gt, cg_pad, 0, p);
                    for (int64_t t = 0; t < cg_out; t++)
                        for (int64_t q = 0; q < p; q++)
                            buf.gsum[gi * cg_out + t] += gy_item[t * p + q];
                    FN(grad_weight_rows)(buf.x, rows, buf.gt, wt + gi * k_rows * cg_pad, cg_pad,
                                         p, buf.acc + gi * k_rows * cg_pad, 0, k_rows, exact);
                }
            }
            int any_failed; /* the same in every thread after the loop's barrier */
#pragma omp atomic read
            any_failed = failed;
            if (gw && !any_failed) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < acc_size + g->c_out; i++)
                    for (int th = 0; th < omp_get_num_threads(); th++)
                        acc_total[i] += partials[th][i];
            }
            free(mine);
            if (gw)
                free(acc_mine);
        } else {
            for (int64_t it = 0; it < items; it++) {
                const int64_t n = it / g->groups, gi = it % g->groups;
                const T *gy_item = gy + (n * g->c_out + gi * cg_out) * p;
#pragma omp for schedule(static)
                for (int64_t c = 0; c < cg_in; c++)
                    FN(unfold)(g, &u, x + (n * g->c_in + gi * cg_in) * hw, buf.x, c, c + 1);
                if (gx) {
#pragma omp for schedule(static)
                    for (int64_t t = 0; t < cg_out; t++)
                        FN(copy_rows)(gy_item, p, buf.gtile, ld, t, t + 1);
#pragma omp for schedule(dynamic, 1)
                    for (int64_t b = 0; b < panels; b++)
                        FN(grad_input_panels)(buf.x, rows, buf.gtile, ld,
                                              wpad + gi * cg_out * k_rows, k, k_rows, cg_out,
                                              buf.cols, exact, b, b + 1);
                    T *gx_item = gx + (n * g->c_in + gi * cg_in) * hw;
#pragma omp for schedule(static)
                    for (int64_t c = 0; c < cg_in; c++) {
                        FN(col2im)(g, buf.cols, ld, gx_item, c, c + 1);
                        FN(repair_grad_input)(g, x + (n * g->c_in + gi * cg_in) * hw,
                                              w + gi * cg_out * k, gy_item, gx_item, c, c + 1,
                                              exact);
                    }
                }
                if (gw) {
#pragma omp for schedule(static)
                    for (int64_t q = 0; q < p; q++)
                        FN(transpose_rows)(gy_item, p, cg_out, buf.gt, cg_pad, q, q + 1);
#pragma omp for schedule(static)
                    for (int64_t t = 0; t < cg_out; t++)
                        for (int64_t q = 0; q < p; q++)
                            buf.gsum[gi * cg_out + t] += gy_item[t * p + q];
#pragma omp for schedule(dynamic, 1)
                    for (int64_t kk = 0; kk < k_rows; kk += ROWS_PAD)
                        FN(grad_weight_rows)(buf.x, rows, buf.gt, wt + gi * k_rows * cg_pad,
                                             cg_pad, p, buf.acc + gi * k_rows * cg_pad, kk,
                                             kk + ROWS_PAD, exact);
                }
            }
        }
    }
    if (!failed && gw) {
        const T *gsum = acc_total + acc_size;
        for (int64_t t = 0; t < g->c_out; t++)
            for (int64_t kk = 0; kk < k; kk++) {
                const T sum = acc_total[(t / cg_out * k_rows + kk) * cg_pad + t % cg_out];
                gw[t * k + kk] = exact ? sum : sum - w[t * k + kk] * gsum[t];
            }
        FN(repair_grad_weight)(g, x, w, gy, gw, exact, threads);
    }
    free(rows);
    free(wpad);
    free(wt);
    free(acc_total);
    free(shared);
    free(partials);
    return failed ? KERNEL_ERR_MEMORY : KERNEL_OK;
}

#if ADDER_ISA != ADDER_ISA_PORTABLE
#pragma GCC pop_options
#endif
#undef T
#undef ITYPE
#undef TSFX
#undef INTRIN_SFX
#undef ISA
#undef VBYTES
#undef MR
#undef NV_MAX
#undef MRK
#undef NVG
#undef ACC_BUDGET
#undef NT_MAX
#undef ROWS_PAD
#undef INTRIN
#undef FN
#undef VEC
#undef IVEC
#undef LANES
#undef NBG
#undef VZERO
#undef VSET1
#undef VLOAD
#undef VSTORE
#undef VSELECT
#undef VMIN
#undef VMAX
#undef VFMA
#undef VHARDTANH
#undef VSIGN
#undef INLINE
#undef SHORT_LOOPS

#endif /* ADDER_TEMPLATE_BODY */
