/*
 * Soak: 4 threads, ITERATIONS segmentations each with one shared model, every label map compared
 * with a reference made first, and the resident set sampled after every call. Fails when an
 * output differs or when the RSS of the last fifth of the calls exceeds that of the calls just
 * after warm-up by more than TOLERANCE_MIB.
 *   soak MODEL.safetensors VOLUME.raw NX NY NZ SPACING ITERATIONS
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "prosam.h"

enum { THREADS = 4, TOLERANCE_MIB = 16 };
static prosam_model *model;
static prosam_volume volume;
static size_t n;
static int iterations;
static uint8_t *reference;
static double *rss_mib; /* [THREADS][iterations] */
static int failures[THREADS];

static double resident_mib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0.0;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
    return resident * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

static void *work(void *arg) {
    intptr_t t = (intptr_t)arg;
    uint8_t *labels = malloc(n);
    for (int i = 0; i < iterations; i++) {
        prosam_status s = prosam_segment(model, &volume, NULL, labels, n);
        if (s != PROSAM_STATUS_OK) {
            fprintf(stderr, "thread %ld call %d: %s\n", (long)t, i, prosam_last_error());
            failures[t]++;
        } else if (memcmp(labels, reference, n) != 0) {
            fprintf(stderr, "thread %ld call %d: labels differ from the reference\n", (long)t, i);
            failures[t]++;
        }
        rss_mib[t * iterations + i] = resident_mib();
    }
    free(labels);
    return NULL;
}

/* The largest RSS sample of calls [from, to) over all threads. */
static double peak(int from, int to) {
    double m = 0.0;
    for (int t = 0; t < THREADS; t++)
        for (int i = from; i < to; i++)
            if (rss_mib[t * iterations + i] > m) m = rss_mib[t * iterations + i];
    return m;
}

int main(int argc, char **argv) {
    if (argc != 8) return 2;
    int64_t d[3] = {atoll(argv[3]), atoll(argv[4]), atoll(argv[5])};
    double sp = atof(argv[6]);
    iterations = atoi(argv[7]);
    if (iterations < 10) return 2;
    n = (size_t)(d[0] * d[1] * d[2]);
    float *voxels = malloc(n * sizeof(float));
    FILE *f = fopen(argv[2], "rb");
    if (!voxels || !f || fread(voxels, sizeof(float), n, f) != n) return 1;
    fclose(f);
    prosam_model_params mp = prosam_model_default_params();
    mp.n_threads = 2;
    if (prosam_model_load(argv[1], &mp, &model) != PROSAM_STATUS_OK) {
        fprintf(stderr, "%s\n", prosam_last_error());
        return 1;
    }
    volume = (prosam_volume){
        .data = voxels, .voxel_type = PROSAM_VOXEL_TYPE_FLOAT32,
        .dims = {d[0], d[1], d[2]}, .strides = {1, d[0], d[0] * d[1]},
        .rescale_slope = 1.0, .rescale_intercept = 0.0,
        .affine = {sp, 0, 0, 0, 0, sp, 0, 0, 0, 0, sp, 0, 0, 0, 0, 1},
        .affine_convention = PROSAM_AFFINE_CONVENTION_RAS,
    };
    reference = malloc(n);
    rss_mib = calloc((size_t)THREADS * iterations, sizeof(double));
    if (prosam_segment(model, &volume, NULL, reference, n) != PROSAM_STATUS_OK) {
        fprintf(stderr, "%s\n", prosam_last_error());
        return 1;
    }
    pthread_t threads[THREADS];
    for (intptr_t t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, work, (void *)t);
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);

    int bad = 0;
    for (int t = 0; t < THREADS; t++) bad += failures[t];
    int warm_from = iterations / 10, warm_to = iterations / 10 + iterations / 5;
    double warm = peak(warm_from, warm_to), late = peak(iterations - iterations / 5, iterations);
    printf("%d calls on %d threads: %d failed or differed; RSS after warm-up %.1f MiB, at the end %.1f MiB\n",
           THREADS * iterations, THREADS, bad, warm, late);
    if (late > warm + TOLERANCE_MIB) {
        fprintf(stderr, "FAIL: the resident set grew by %.1f MiB\n", late - warm);
        bad++;
    }
    free(rss_mib);
    free(reference);
    free(voxels);
    prosam_model_free(model);
    return bad ? 1 : 0;
}
