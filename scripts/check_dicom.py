#!/usr/bin/env python3
"""Independent checks of prosam's DICOM input and DICOM-SEG output, with pydicom and highdicom.

    check_dicom.py volume DICOM_DIR VOLUME.nii        prosam's volume (float32 NIfTI) equals the series
    check_dicom.py seg DICOM_DIR SEG.dcm LABELS.nii   the DICOM-SEG holds exactly the label map

The series is read here without prosam: pydicom decodes the pixels (pylibjpeg for JPEG 2000), slices
are sorted along the normal, rows reversed (dcm2niix's layout), rescaled to HU, and the affine is
built from ImagePositionPatient/ImageOrientationPatient/PixelSpacing in LPS, then flipped to RAS.
Prints one JSON line with the figures; exits 1 on the first disagreement.
"""
import json
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def read_series(folder):
    slices = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" in ds:
            slices.append(ds)
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    p0 = np.array(slices[0].ImagePositionPatient, dtype=float)
    p1 = np.array(slices[-1].ImagePositionPatient, dtype=float)
    step = (p1 - p0) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = -col * dr
    lps[:3, 2] = step
    lps[:3, 3] = p0 + col * dr * (rows - 1)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = np.zeros((cols, rows, len(slices)), dtype=np.float64)
    for k, ds in enumerate(slices):
        hu = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0)
        )
        # pixel_array is (rows, columns); prosam's axis 0 is the column, axis 1 the reversed row.
        volume[:, :, k] = hu[::-1, :].T
    uids = [str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID) for ds in slices]
    return volume, ras, uids, slices


def check_volume(folder, nifti_path):
    volume, ras, _, _ = read_series(folder)
    img = nib.load(nifti_path)
    got = np.asarray(img.dataobj, dtype=np.float64)
    if got.shape != volume.shape:
        fail(f"shape {got.shape} != pydicom's {volume.shape}")
    affine_diff = float(np.abs(img.affine - ras).max())
    if affine_diff > 1e-3:
        fail(f"affine differs by {affine_diff}:\n{img.affine}\nvs pydicom's\n{ras}")
    voxel_diff = float(np.abs(got - volume).max())
    if voxel_diff > 0:
        fail(f"voxels differ by up to {voxel_diff} HU")
    print(json.dumps({"check": "volume", "shape": list(volume.shape), "affine_max_diff": affine_diff,
                      "voxel_max_diff": voxel_diff, "hu_range": [float(volume.min()), float(volume.max())]}))


def check_seg(folder, seg_path, labels_path):
    _, _, uids, _ = read_series(folder)
    labels = np.asarray(nib.load(labels_path).dataobj).astype(np.int64)
    ds = pydicom.dcmread(seg_path)
    seg = hd.seg.segread(seg_path)
    if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4" or ds.SegmentationType != "BINARY":
        fail(f"not a binary Segmentation: {ds.SOPClassUID} {ds.SegmentationType}")
    present = [int(v) for v in np.unique(labels) if v != 0]
    if seg.number_of_segments != len(present):
        fail(f"{seg.number_of_segments} segments for {len(present)} labels present")
    # Frames: one per (segment, slice) with voxels.
    expected_frames = sum(int(np.any(labels[:, :, k] == l)) for l in present for k in range(labels.shape[2]))
    if int(ds.NumberOfFrames) != expected_frames:
        fail(f"{ds.NumberOfFrames} frames, expected {expected_frames}")
    referenced = [str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    if sorted(referenced) != sorted(uids):
        fail(f"{len(referenced)} referenced instances do not match the {len(uids)} source images")
    codes = {}
    for item in ds.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        codes[item.SegmentLabel] = (code.CodingSchemeDesignator, code.CodeValue)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        if "model_checksum=sha256:" not in algorithm.AlgorithmParameters:
            fail("no model checksum in the algorithm identification")
    if "liver" in codes and codes["liver"] != ("SCT", "10200004"):
        fail(f"liver coded as {codes['liver']}")
    # Masks, through highdicom: per source image, one plane per segment.
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(range(1, len(present) + 1)), ignore_spatial_locations=True
    )
    number_of = {item.SegmentLabel: int(item.SegmentNumber) for item in ds.SegmentSequence}
    mismatched = 0
    for k in range(labels.shape[2]):
        want = labels[:, :, k].T[::-1, :]  # back to (rows, columns) in stored row order
        for s, label in enumerate(present):
            mask = pixels[k, :, :, s] > 0
            mismatched += int(np.count_nonzero(mask != (want == label)))
    if mismatched:
        fail(f"{mismatched} mask pixels differ from the label map")
    # And through pydicom alone: each frame's source image and segment number.
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    segment_label = {int(item.SegmentNumber): present[int(item.SegmentNumber) - 1] for item in ds.SegmentSequence}
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = uids.index(source)
        want = labels[:, :, k].T[::-1, :] == segment_label[number]
        if not np.array_equal(frames[f] > 0, want):
            fail(f"frame {f} (segment {number}, source {source}) differs from the label map")
    print(json.dumps({"check": "seg", "segments": seg.number_of_segments, "frames": int(ds.NumberOfFrames),
                      "referenced_instances": len(referenced), "segment_numbers": number_of}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "volume":
        check_volume(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "seg":
        check_seg(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
