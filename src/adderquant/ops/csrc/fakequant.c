/* Fused fake quantization of activations on G grids, and its straight-through/LSQ backward.
 *
 * Grid g: step s_g, code bounds [lo_g, hi_g] = [-z_g, 2^b - 1 - z_g] (codes minus the zero
 * point), u = clamp(rint(x / s_g), lo_g, hi_g) (half to even, as torch.round(x / s)).
 * x is (N, inner); the G copies are laid out (N, G, inner), as a grouped adder call reads them.
 * forward:  out[n][g][i] = u (dequant = 0) or u * s_g (dequant = 1), one pass per grid.
 * backward: with pass = lo_g <= rint(x/s_g) <= hi_g and grad (N, G, inner):
 *           grad_x[n][i] = sum_g (pass ? grad[n][g][i] : 0);
 *           step_grad[g] = sum_{n,i} grad[n][g][i] * (pass ? u - x/s_g : u) in double
 *           (the steps' gradients, unscaled).
 * Plain C + OpenMP; no libtorch.
 */
#include <math.h>
#include <stdint.h>

static inline float clampf(float t, float lo, float hi) { return t < lo ? lo : (t > hi ? hi : t); }

void fq_act_forward(const float *x, int64_t n_img, int64_t inner, int64_t groups,
                    const float *step, const float *lo, const float *hi, int dequant,
                    float *out, int threads)
{
    for (int64_t g = 0; g < groups; g++) {
        const float s = step[g], a = lo[g], b = hi[g], m = dequant ? step[g] : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < n_img; n++) {
            const float *xi = x + n * inner;
            float *o = out + (n * groups + g) * inner;
            for (int64_t i = 0; i < inner; i++)
                o[i] = clampf(rintf(xi[i] / s), a, b) * m;
        }
    }
}

void fq_act_backward(const float *x, const float *grad, int64_t n_img, int64_t inner,
                     int64_t groups, const float *step, const float *lo, const float *hi,
                     float *grad_x, double *step_grad, int threads)
{
    for (int64_t g = 0; g < groups; g++) {
        const float s = step[g], a = lo[g], b = hi[g];
        double acc = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : acc)
        for (int64_t n = 0; n < n_img; n++) {
            const float *xi = x + n * inner;
            const float *gi = grad + (n * groups + g) * inner;
            float *gx = grad_x + n * inner;
            double part = 0.0;
            for (int64_t i = 0; i < inner; i++) {
                const float q = xi[i] / s;
                const float t = rintf(q);
                const int pass = t >= a && t <= b;
                const float v = gi[i];
                const float kept = pass ? v : 0.0f;
                gx[i] = g == 0 ? kept : gx[i] + kept;
                part += (double)(v * (pass ? t - q : clampf(t, a, b)));
            }
            acc += part;
        }
        step_grad[g] = acc;
    }
}
