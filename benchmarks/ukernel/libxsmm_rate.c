/* Rate of a maintained micro-kernel library (libxsmm) on the contractions of one flash step.
 *
 * Each case is one block contraction of the cpu target's work-group step, row-major,
 * C (M x N) += A (M x K) . B (K x N) in f32, with all three operands resident in L1/L2
 * (the best case for the library: no data movement counted):
 *
 *   scores  M = row tile, N = kv tile, K = head dim     (Q . K^T, K^T materialized)
 *   values  M = row tile, N = head dim, K = kv tile     (P . V)
 *
 * timed for libxsmm's JIT small-matrix kernel (libxsmm_smmdispatch, Debian libxsmm-dev)
 * on one thread, median of 9 rounds; prints GFLOP/s per case.  (oneDNN's ukernel BRGeMM
 * would be the other candidate: PyPI's onednn is built without DNNL_EXPERIMENTAL_UKERNEL,
 * its library has no dnnl_brgemm_* symbols.)  Built and run by benchmarks/ukernel/run.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libxsmm.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float *filled(size_t n) {
    float *p = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
    for (size_t i = 0; i < n; ++i) p[i] = (float)((i * 7919) % 13) / 13.0f - 0.5f;
    return p;
}

/* Median of `rounds` timings of `reps` calls, as GFLOP/s. */
#define RATE(M, N, K, CALL)                                                   \
    ({                                                                        \
        double best[9];                                                       \
        for (int round = 0; round < 9; ++round) {                             \
            double t0 = now();                                                \
            for (int rep = 0; rep < reps; ++rep) { CALL; }                    \
            best[round] = now() - t0;                                         \
        }                                                                     \
        for (int i = 0; i < 9; ++i)                                           \
            for (int j = i + 1; j < 9; ++j)                                   \
                if (best[j] < best[i]) { double t = best[i]; best[i] = best[j]; best[j] = t; } \
        2.0 * (M) * (N) * (K) * reps / best[4] * 1e-9;                        \
    })

static double libxsmm_rate(int M, int N, int K, float *A, float *B, float *C, int reps) {
    /* column-major library: C^T (N x M) += B^T (N x K) . A^T (K x M) is the row-major product */
    const float one = 1.0f;
    libxsmm_smmfunction kernel = libxsmm_smmdispatch(N, M, K, &N, &K, &N, &one, &one, NULL, NULL);
    if (!kernel) return -1.0;
    return RATE(M, N, K, kernel(B, A, C));
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 20000;
    int cases[][4] = {  /* row tile, kv tile, head dim */
        {24, 64, 64}, {24, 64, 128}, {6, 64, 64}, {6, 64, 128},
    };
    libxsmm_init();
    printf("%-28s %10s\n", "contraction (M x N x K)", "libxsmm GFLOP/s");
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); ++c) {
        int R = cases[c][0], T = cases[c][1], E = cases[c][2];
        int shapes[2][3] = {{R, T, E}, {R, E, T}};
        const char *names[2] = {"scores", "values"};
        for (int s = 0; s < 2; ++s) {
            int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            float *A = filled((size_t)M * K), *B = filled((size_t)K * N), *C = filled((size_t)M * N);
            char label[64];
            snprintf(label, sizeof label, "%s %dx%dx%d", names[s], M, N, K);
            printf("%-28s %10.1f\n", label, libxsmm_rate(M, N, K, A, B, C, reps));
            free(A); free(B); free(C);
        }
    }
    libxsmm_finalize();
    return 0;
}
