/*
 * Every function with bad arguments: the right status and a message each time, never a crash.
 *   api_errors MODEL.safetensors CORRUPT.safetensors
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prosam.h"

static int failures = 0;

static void expect(const char *what, prosam_status got, prosam_status want, const char *needle) {
    const char *msg = prosam_last_error();
    if (got != want || (needle && !strstr(msg, needle)) || (want != PROSAM_STATUS_OK && msg[0] == '\0')) {
        fprintf(stderr, "FAIL %s: got %s (%s), want %s with \"%s\"\n", what, prosam_status_name(got), msg,
                prosam_status_name(want), needle ? needle : "");
        failures++;
    } else {
        printf("ok   %s: %s %s\n", what, prosam_status_name(got), msg);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    prosam_model *model = (prosam_model *)0x1; /* must be reset to NULL on failure */
    prosam_model_params mp = prosam_model_default_params();

    expect("load NULL path", prosam_model_load(NULL, &mp, &model), PROSAM_STATUS_INVALID_ARGUMENT, "path is NULL");
    if (model != NULL) { fprintf(stderr, "FAIL out_model not reset\n"); failures++; }
    expect("load NULL out", prosam_model_load(argv[1], &mp, NULL), PROSAM_STATUS_INVALID_ARGUMENT, "out_model");
    expect("load missing file", prosam_model_load("/nonexistent/model.safetensors", &mp, &model), PROSAM_STATUS_IO, "nonexistent");
    expect("load corrupt file", prosam_model_load(argv[2], &mp, &model), PROSAM_STATUS_MODEL, "checksum");
    mp.n_threads = -1;
    expect("load negative threads", prosam_model_load(argv[1], &mp, &model), PROSAM_STATUS_INVALID_ARGUMENT, "n_threads");
    mp = prosam_model_default_params();
    mp.device = PROSAM_DEVICE_CUDA;
    expect("load cuda", prosam_model_load(argv[1], &mp, &model), PROSAM_STATUS_UNSUPPORTED, "without CUDA support");
    mp.device = PROSAM_DEVICE_METAL;
    expect("load metal", prosam_model_load(argv[1], &mp, &model), PROSAM_STATUS_UNSUPPORTED, "--features metal");
    mp.device = 42;
    expect("load unknown device", prosam_model_load(argv[1], &mp, &model), PROSAM_STATUS_INVALID_ARGUMENT, "unknown device");
    mp = prosam_model_default_params();
    mp.n_threads = 1;
    expect("load", prosam_model_load(argv[1], &mp, &model), PROSAM_STATUS_OK, NULL);
    if (!model) return 1;

    int32_t count = 0;
    const char *name = NULL, *json = NULL;
    expect("label_count NULL model", prosam_model_label_count(NULL, &count), PROSAM_STATUS_INVALID_ARGUMENT, "model is NULL");
    expect("label_count NULL out", prosam_model_label_count(model, NULL), PROSAM_STATUS_INVALID_ARGUMENT, "out_count");
    expect("label_count", prosam_model_label_count(model, &count), PROSAM_STATUS_OK, NULL);
    expect("label_name -1", prosam_model_label_name(model, -1, &name), PROSAM_STATUS_INVALID_ARGUMENT, "index -1");
    expect("label_name count", prosam_model_label_name(model, count, &name), PROSAM_STATUS_INVALID_ARGUMENT, "outside");
    expect("label_name NULL out", prosam_model_label_name(model, 0, NULL), PROSAM_STATUS_INVALID_ARGUMENT, "out_name");
    expect("label_name 0", prosam_model_label_name(model, 0, &name), PROSAM_STATUS_OK, NULL);
    expect("metadata NULL model", prosam_model_metadata_json(NULL, &json), PROSAM_STATUS_INVALID_ARGUMENT, "model is NULL");
    expect("metadata NULL out", prosam_model_metadata_json(model, NULL), PROSAM_STATUS_INVALID_ARGUMENT, "out_json");
    expect("metadata", prosam_model_metadata_json(model, &json), PROSAM_STATUS_OK, NULL);
    if (count != 14 || strcmp(name, "background") != 0 || !strstr(json, "\"swin_unetr\"")) {
        fprintf(stderr, "FAIL model info: %d labels, label 0 %s\n", count, name);
        failures++;
    }

    enum { NX = 40, NY = 20, NZ = 20 };
    static float voxels[NX * NY * NZ];
    static uint8_t labels[NX * NY * NZ];
    prosam_volume good = {
        .data = voxels, .voxel_type = PROSAM_VOXEL_TYPE_FLOAT32,
        .dims = {NX, NY, NZ}, .strides = {1, NX, NX * NY},
        .rescale_slope = 1.0, .rescale_intercept = 0.0,
        .affine = {1.5, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 1},
        .affine_convention = PROSAM_AFFINE_CONVENTION_RAS,
    };
    size_t n = sizeof labels;
    prosam_segment_params sp = prosam_segment_default_params();
    prosam_volume v;

    expect("segment NULL model", prosam_segment(NULL, &good, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "model is NULL");
    expect("segment NULL volume", prosam_segment(model, NULL, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "volume is NULL");
    expect("segment NULL labels", prosam_segment(model, &good, &sp, NULL, n), PROSAM_STATUS_INVALID_ARGUMENT, "labels is NULL");
    expect("segment buffer one byte short", prosam_segment(model, &good, &sp, labels, n - 1), PROSAM_STATUS_BUFFER_TOO_SMALL, "16000 voxels");
    v = good; v.data = NULL;
    expect("segment NULL data", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "data is NULL");
    v = good; v.dims[1] = 0;
    expect("segment zero dimension", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "dims[1] = 0");
    v = good; v.dims[2] = -4;
    expect("segment negative dimension", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "dims[2] = -4");
    v = good; v.strides[0] = 0;
    expect("segment zero stride", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "strides[0]");
    v = good; v.voxel_type = 99;
    expect("segment unknown voxel type", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "voxel type 99");
    v = good; v.affine[5] = NAN;
    expect("segment NaN in affine", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "NaN");
    v = good; v.affine[0] = 0;
    expect("segment singular affine", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "singular");
    v = good; v.affine[15] = 2;
    expect("segment bad last row", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "last row");
    v = good; v.affine_convention = 7;
    expect("segment unknown convention", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "convention 7");
    v = good; v.rescale_slope = 0;
    expect("segment zero slope", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "slope");
    prosam_segment_params bad = sp; bad.overlap = 1.0;
    expect("segment overlap 1", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "overlap");
    bad = sp; bad.batch = 0;
    expect("segment batch 0", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "batch");
    bad = sp; bad.blend = 5;
    expect("segment unknown blend", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "blend 5");
    bad = sp; bad.postprocess = 3;
    expect("segment unknown postprocess", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "postprocess 3");
    bad = sp; bad.organs = "liver,lungs";
    expect("segment unknown organ", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "\"lungs\"");
    v = good; v.strides[2] = INT64_MAX / 8;
    expect("segment strides past any buffer", prosam_segment(model, &v, &sp, labels, n), PROSAM_STATUS_INVALID_ARGUMENT, "strides");
    bad = sp; bad.max_memory_bytes = 1 << 20;
    expect("segment over the memory budget", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_OUT_OF_MEMORY, "memory budget of 1.00 MiB");
    bad = sp; bad.organs = "liver,spleen"; bad.postprocess = PROSAM_POSTPROCESS_ALL;
    expect("segment organ subset", prosam_segment(model, &good, &bad, labels, n), PROSAM_STATUS_OK, NULL);
    for (size_t i = 0; i < n; i++) {
        if (labels[i] != 0 && labels[i] != 1 && labels[i] != 6) {
            fprintf(stderr, "FAIL organ subset: label %d at voxel %zu\n", labels[i], i);
            failures++;
            break;
        }
    }
    expect("segment", prosam_segment(model, &good, NULL, labels, n), PROSAM_STATUS_OK, NULL);
    if (prosam_last_error()[0] != '\0') { fprintf(stderr, "FAIL error not cleared after success\n"); failures++; }
    if (strcmp(prosam_status_name(PROSAM_STATUS_CANCELLED), "PROSAM_STATUS_CANCELLED") != 0 ||
        strcmp(prosam_status_name(PROSAM_STATUS_OUT_OF_MEMORY), "PROSAM_STATUS_OUT_OF_MEMORY") != 0 ||
        strcmp(prosam_status_name(1234), "unknown status") != 0) {
        fprintf(stderr, "FAIL status names\n");
        failures++;
    }
    prosam_model_free(model);
    prosam_model_free(NULL);
    printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
