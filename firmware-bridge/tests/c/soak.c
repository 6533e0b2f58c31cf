/*
 * Soak: 4 threads, ITERATIONS segmentations each with one shared model, every label map compared
 * with a reference made first. The calls run in rounds of ROUND calls per thread; between rounds
 * every thread waits at a barrier while the main thread returns freed heap to the system
 * (malloc_trim) and takes two readings:
 * - the bytes the program holds from malloc (mallinfo2: chunks in use in every arena plus mmapped
 *   ones). A leak, or a cache that keeps growing, shows here and nothing else does: over 1,200
 *   calls it moved by 0.25 MiB in all, most of it in the first rounds (the threads' tcaches
 *   filling), and by 0.05 MiB after warm-up in a run of 50 calls per thread. The test fails when
 *   the median of the last three rounds exceeds that of rounds 2-4 by more than
 *   HEAP_TOLERANCE_KIB: at 50 calls per thread, 120 calls apart, a leak of about 2 KB per call
 *   (a leak of 6,000 bytes a call, made on purpose, read 0.75 MiB);
 * - the resident set, which also sees memory mapped outside malloc but moves by up to ~18 MiB
 *   between readings with how freed memory lies in the arenas; it guards only against gross
 *   growth (RSS_TOLERANCE_MIB).
 *   soak MODEL.safetensors VOLUME.raw NX NY NZ SPACING ITERATIONS
 */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "prosam.h"

enum { THREADS = 4, ROUND = 5, HEAP_TOLERANCE_KIB = 256, RSS_TOLERANCE_MIB = 64 };
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

/* Bytes the program holds from malloc: small chunks in every arena plus mmapped large ones. */
static double in_use_mib(void) {
    struct mallinfo2 m = mallinfo2();
    return (double)(m.uordblks + m.hblkhd) / (1024.0 * 1024.0);
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
    double *heap_mib = calloc((size_t)rounds, sizeof(double));
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
        heap_mib[r] = in_use_mib();
        pthread_barrier_wait(&sampled);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);

    int bad = 0;
    for (int t = 0; t < THREADS; t++) bad += failures[t];
    printf("%d calls on %d threads: %d failed or differed; RSS between rounds of %d calls per thread (MiB):",
           THREADS * iterations, THREADS, bad, ROUND);
    for (int r = 0; r < rounds; r++) printf(" %.1f", rss_mib[r]);
    printf("\nheap in use (MiB):");
    for (int r = 0; r < rounds; r++) printf(" %.3f", heap_mib[r]);
    printf("\n");
    double heap_growth = median3(heap_mib + rounds - 3) - median3(heap_mib + 1);
    double rss_growth = median3(rss_mib + rounds - 3) - median3(rss_mib + 1);
    printf("growth after warm-up (median of the last three rounds less that of rounds 2-4): "
           "heap in use %.3f MiB, resident set %.1f MiB\n",
           heap_growth, rss_growth);
    if (heap_growth * 1024.0 > HEAP_TOLERANCE_KIB) {
        fprintf(stderr, "FAIL: the heap in use grew by %.3f MiB after warm-up (tolerance %d KiB)\n", heap_growth,
                HEAP_TOLERANCE_KIB);
        bad++;
    }
    if (rss_growth > RSS_TOLERANCE_MIB) {
        fprintf(stderr, "FAIL: the resident set grew by %.1f MiB after warm-up (tolerance %d MiB)\n", rss_growth,
                RSS_TOLERANCE_MIB);
        bad++;
    }
    pthread_barrier_destroy(&calls_done);
    pthread_barrier_destroy(&sampled);
    free(rss_mib);
    free(heap_mib);
    free(reference);
    free(voxels);
    prosam_model_free(model);
    return bad ? 1 : 0;
}
