/*
 * Soak: 4 threads, ITERATIONS segmentations each with one shared model, every label map compared
 * with a reference made first. The calls run in rounds of ROUND calls per thread; between rounds
 * every thread waits at a barrier while the main thread returns freed heap to the system
 * (malloc_trim) and reads the resident set. Memory that is still in use (a leak, a cache that
 * keeps growing) survives the trim; memory that is free but parked in a thread's malloc arena
 * does not, so the figure is the process's real footprint, independent of which calls happened
 * to overlap at the moment it was read (a peak sampled during calls measured that, and was
 * flaky). Even so a single reading moves by up to ~15 MiB (Candle's and rayon's allocations in
 * flight elsewhere), while a leak grows steadily: the test compares the median of the three
 * rounds after the warm-up round with the median of the last three, and fails when an output
 * differs or when that grew by more than TOLERANCE_MIB (a leak of about 90 KB per call).
 *   soak MODEL.safetensors VOLUME.raw NX NY NZ SPACING ITERATIONS
 */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "prosam.h"

enum { THREADS = 4, ROUND = 5, TOLERANCE_MIB = 12 };
static prosam_model *model;
static prosam_volume volume;
static size_t n;
static int rounds;
static uint8_t *reference;
static pthread_barrier_t calls_done, sampled;
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
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < ROUND; i++) {
            prosam_status s = prosam_segment(model, &volume, NULL, labels, n);
            if (s != PROSAM_STATUS_OK) {
                fprintf(stderr, "thread %ld call %d: %s\n", (long)t, r * ROUND + i, prosam_last_error());
                failures[t]++;
            } else if (memcmp(labels, reference, n) != 0) {
                fprintf(stderr, "thread %ld call %d: labels differ from the reference\n", (long)t, r * ROUND + i);
                failures[t]++;
            }
        }
        pthread_barrier_wait(&calls_done);
        pthread_barrier_wait(&sampled);
    }
    free(labels);
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median3(const double *v) {
    double s[3] = {v[0], v[1], v[2]};
    qsort(s, 3, sizeof(double), by_value);
    return s[1];
}

int main(int argc, char **argv) {
    if (argc != 8) return 2;
    int64_t d[3] = {atoll(argv[3]), atoll(argv[4]), atoll(argv[5])};
    double sp = atof(argv[6]);
    int iterations = atoi(argv[7]);
    if (iterations < 7 * ROUND || iterations % ROUND != 0) return 2;
    rounds = iterations / ROUND;
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
    double *rss_mib = calloc((size_t)rounds, sizeof(double));
    if (prosam_segment(model, &volume, NULL, reference, n) != PROSAM_STATUS_OK) {
        fprintf(stderr, "%s\n", prosam_last_error());
        return 1;
    }
    pthread_barrier_init(&calls_done, NULL, THREADS + 1);
    pthread_barrier_init(&sampled, NULL, THREADS + 1);
    pthread_t threads[THREADS];
    for (intptr_t t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, work, (void *)t);
    for (int r = 0; r < rounds; r++) {
        pthread_barrier_wait(&calls_done);
        malloc_trim(0);
        rss_mib[r] = resident_mib();
        pthread_barrier_wait(&sampled);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);

    int bad = 0;
    for (int t = 0; t < THREADS; t++) bad += failures[t];
    printf("%d calls on %d threads: %d failed or differed; RSS between rounds of %d calls per thread (MiB):",
           THREADS * iterations, THREADS, bad, ROUND);
    for (int r = 0; r < rounds; r++) printf(" %.1f", rss_mib[r]);
    printf("\n");
    double warm = median3(rss_mib + 1), late = median3(rss_mib + rounds - 3);
    printf("median after warm-up %.1f MiB, at the end %.1f MiB\n", warm, late);
    if (late - warm > TOLERANCE_MIB) {
        fprintf(stderr, "FAIL: the resident set grew by %.1f MiB after warm-up (tolerance %d MiB)\n", late - warm,
                TOLERANCE_MIB);
        bad++;
    }
    pthread_barrier_destroy(&calls_done);
    pthread_barrier_destroy(&sampled);
    free(rss_mib);
    free(reference);
    free(voxels);
    prosam_model_free(model);
    return bad ? 1 : 0;
}
