/* What the compiled kernels share: status codes, the instruction-set paths and the CPU-feature
 * dispatch (cpu_dispatch.c), and the guard on x86 code.
 *
 * Status codes: every entry point that can fail returns KERNEL_OK (0) or a negative
 * KERNEL_ERR_* code (adderquant/ops/_loader.py turns them into exceptions).
 *
 * x86: intrinsics and run-time CPU detection are compiled only where KERNEL_X86 is 1, i.e. on
 * x86 targets unless ADDERQUANT_PORTABLE_ONLY is defined; elsewhere only the portable path
 * (GCC generic vectors and plain C) is built, and <immintrin.h> is never included. */
#ifndef ADDERQUANT_KERNEL_COMMON_H
#define ADDERQUANT_KERNEL_COMMON_H

#include <stdint.h>

#if (defined(__x86_64__) || defined(__i386__)) && !defined(ADDERQUANT_PORTABLE_ONLY)
#define KERNEL_X86 1
#include <immintrin.h>
#else
#define KERNEL_X86 0
#endif

enum {
    KERNEL_OK = 0,
    KERNEL_ERR_PATH = -1,      /* the requested path is not available on this CPU */
    KERNEL_ERR_MEMORY = -2,    /* out of memory for work buffers */
    KERNEL_ERR_GEOMETRY = -3,  /* invalid shapes or arguments */
    KERNEL_ERR_NONFINITE = -4, /* NaN or infinite values have no integer code */
};

/* Instruction-set paths, narrowest first. AVX2 means AVX2 + FMA; AVX-512 means the F, BW, DQ
 * and VL subsets + FMA. */
enum { KERNEL_PATH_PORTABLE = 0, KERNEL_PATH_AVX2 = 1, KERNEL_PATH_AVX512 = 2 };
#define KERNEL_PATHS 3

/* Bit p set when path p can run on this CPU. */
int kernel_available_paths(void);
/* The widest available path. */
int kernel_best_path(void);
/* `path` if this CPU can run it, the best path if `path` < 0, else KERNEL_ERR_PATH. */
int kernel_resolve_path(int path);

#endif
