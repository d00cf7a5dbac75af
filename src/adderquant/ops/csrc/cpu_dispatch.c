/* The one CPU-feature dispatch of the compiled kernels (see kernel_common.h). */
#include "kernel_common.h"

int kernel_available_paths(void)
{
    int mask = 1 << KERNEL_PATH_PORTABLE;
#if KERNEL_X86
    __builtin_cpu_init();
    const int fma = __builtin_cpu_supports("fma");
    if (fma && __builtin_cpu_supports("avx2"))
        mask |= 1 << KERNEL_PATH_AVX2;
    if (fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        mask |= 1 << KERNEL_PATH_AVX512;
#endif
    return mask;
}

int kernel_best_path(void)
{
    const int mask = kernel_available_paths();
    for (int path = KERNEL_PATHS - 1; path > 0; path--)
        if (mask & (1 << path))
            return path;
    return KERNEL_PATH_PORTABLE;
}

int kernel_resolve_path(int path)
{
    if (path < 0)
        return kernel_best_path();
    if (path >= KERNEL_PATHS || !(kernel_available_paths() & (1 << path)))
        return KERNEL_ERR_PATH;
    return path;
}
