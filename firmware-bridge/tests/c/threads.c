/*
 * 4 threads segment 4 volumes at once with one shared model, then the same 4 in a row on one
 * thread; all 8 label maps must be identical. Prints both wall times.
 *   threads MODEL.safetensors VOLUME.raw NX NY NZ SPACING
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "prosam.h"

enum { N = 4 };
static prosam_model *model;
static prosam_volume volume;
static size_t n;
static uint8_t *labels[2 * N];
static prosam_status status[2 * N];

static void *work(void *arg) {
    intptr_t i = (intptr_t)arg;
    status[i] = prosam_segment(model, &volume, NULL, labels[i], n);
    if (status[i] != PROSAM_STATUS_OK) fprintf(stderr, "thread %ld: %s\n", (long)i, prosam_last_error());
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 7) return 2;
    int64_t d[3] = {atoll(argv[3]), atoll(argv[4]), atoll(argv[5])};
    double sp = atof(argv[6]);
    n = (size_t)(d[0] * d[1] * d[2]);
    float *voxels = malloc(n * sizeof(float));
    FILE *f = fopen(argv[2], "rb");
    if (!voxels || !f || fread(voxels, sizeof(float), n, f) != n) return 1;
    fclose(f);
    prosam_model_params mp = prosam_model_default_params();
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
    for (int i = 0; i < 2 * N; i++) labels[i] = malloc(n);

    double t0 = now();
    pthread_t threads[N];
    for (intptr_t i = 0; i < N; i++) pthread_create(&threads[i], NULL, work, (void *)i);
    for (int i = 0; i < N; i++) pthread_join(threads[i], NULL);
    double concurrent = now() - t0;
    t0 = now();
    for (intptr_t i = N; i < 2 * N; i++) work((void *)i);
    double serial = now() - t0;

    int bad = 0;
    for (int i = 0; i < 2 * N; i++) {
        if (status[i] != PROSAM_STATUS_OK || memcmp(labels[i], labels[0], n) != 0) {
            fprintf(stderr, "FAIL run %d differs (status %d)\n", i, status[i]);
            bad++;
        }
    }
    printf("4 volumes on 4 threads: %.2f s; 4 in a row on one thread: %.2f s\n", concurrent, serial);
    for (int i = 0; i < 2 * N; i++) free(labels[i]);
    free(voxels);
    prosam_model_free(model);
    return bad ? 1 : 0;
}
