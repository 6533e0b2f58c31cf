/*
 * segment.c: segment a raw CT volume with libprosam and print the organ volumes.
 *
 *   segment MODEL.safetensors VOLUME.raw NX NY NZ A00 A01 A02 A03 A10 A11 A12 A13 A20 A21 A22 A23 [LABELS.raw]
 *
 * VOLUME.raw holds NX*NY*NZ little-endian float32 values in HU, first dimension fastest (as NIfTI
 * stores voxels); A.. are the first three rows of the voxel-to-world affine in RAS+ millimetres.
 * LABELS.raw, when given, receives the uint8 label map in the same voxel order.
 *
 * Build:  gcc -O2 segment.c -I../include -L<libdir> -lprosam -o segment          (shared)
 *         gcc -O2 segment.c -I../include <libdir>/libprosam.a \
 *             -lgcc_s -lutil -lrt -lpthread -lm -ldl -o segment                   (static)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "prosam.h"

static int32_t report_progress(int32_t done, int32_t total, void *user_data) {
    (void)user_data;
    fprintf(stderr, "\rwindows %d/%d", done, total);
    if (done == total) fputc('\n', stderr);
    return 0; /* keep going */
}

int main(int argc, char **argv) {
    if (argc != 18 && argc != 19) {
        fprintf(stderr, "usage: %s MODEL VOLUME.raw NX NY NZ A00 .. A23 [LABELS.raw]\n", argv[0]);
        return 2;
    }
    int64_t dims[3] = {atoll(argv[3]), atoll(argv[4]), atoll(argv[5])};
    double affine[16] = {0};
    for (int i = 0; i < 12; i++) affine[i] = atof(argv[6 + i]);
    affine[15] = 1.0;
    size_t n = (size_t)(dims[0] * dims[1] * dims[2]);

    float *voxels = malloc(n * sizeof(float));
    uint8_t *labels = malloc(n);
    FILE *f = fopen(argv[2], "rb");
    if (!voxels || !labels || !f || fread(voxels, sizeof(float), n, f) != n) {
        fprintf(stderr, "cannot read %zu float32 voxels from %s\n", n, argv[2]);
        return 1;
    }
    fclose(f);

    printf("libprosam %s (header %s)\n", prosam_version(), PROSAM_VERSION_STRING);
    prosam_model *model = NULL;
    prosam_model_params mparams = prosam_model_default_params();
    prosam_status status = prosam_model_load(argv[1], &mparams, &model);
    if (status != PROSAM_STATUS_OK) {
        fprintf(stderr, "%s: %s\n", prosam_status_name(status), prosam_last_error());
        return 1;
    }

    prosam_volume volume = {
        .data = voxels,
        .voxel_type = PROSAM_VOXEL_TYPE_FLOAT32,
        .dims = {dims[0], dims[1], dims[2]},
        .strides = {1, dims[0], dims[0] * dims[1]},
        .rescale_slope = 1.0,
        .rescale_intercept = 0.0,
        .affine_convention = PROSAM_AFFINE_CONVENTION_RAS,
    };
    for (int i = 0; i < 16; i++) volume.affine[i] = affine[i];
    prosam_segment_params sparams = prosam_segment_default_params();
    sparams.progress = report_progress;
    status = prosam_segment(model, &volume, &sparams, labels, n);
    if (status != PROSAM_STATUS_OK) {
        fprintf(stderr, "%s: %s\n", prosam_status_name(status), prosam_last_error());
        prosam_model_free(model);
        return 1;
    }

    /* Organ volumes: voxel count times the voxel volume |det(A)| in mL. */
    double det = affine[0] * (affine[5] * affine[10] - affine[6] * affine[9]) -
                 affine[1] * (affine[4] * affine[10] - affine[6] * affine[8]) +
                 affine[2] * (affine[4] * affine[9] - affine[5] * affine[8]);
    int32_t count = 0;
    prosam_model_label_count(model, &count);
    size_t *per_label = calloc((size_t)count, sizeof(size_t));
    for (size_t v = 0; v < n; v++) per_label[labels[v]]++;
    for (int32_t l = 1; l < count; l++) {
        const char *name = NULL;
        prosam_model_label_name(model, l, &name);
        if (per_label[l]) printf("%-28s %10zu voxels %10.2f mL\n", name, per_label[l], per_label[l] * fabs(det) / 1000.0);
    }

    if (argc == 19) {
        FILE *out = fopen(argv[18], "wb");
        if (!out || fwrite(labels, 1, n, out) != n || fclose(out) != 0) {
            fprintf(stderr, "cannot write %s\n", argv[18]);
            return 1;
        }
    }
    free(per_label);
    free(labels);
    free(voxels);
    prosam_model_free(model);
    return 0;
}
