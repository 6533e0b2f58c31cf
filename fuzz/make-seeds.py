"""Makes the fuzz seed corpora in fuzz/seeds/<target>/ from ../shared: small copies of the
real fixtures (a crop of the example CT, cropped DICOM slices, model file headers, a small
PyTorch checkpoint in torch.save's zip layout), plus the variants the readers branch on.

Run once with the project's Python (scripts/python-env.sh) and a release build of prosam:
    target/pyenv/bin/python fuzz/make-seeds.py
The seeds are committed; this script records where they came from.
"""

import copy
import glob
import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def out(target, name, data):
    folder = os.path.join(SEEDS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def nifti_seeds():
    img = nib.load(os.path.join(SHARED, "data", "example_ct_sm.nii.gz"))
    crop = np.asarray(img.dataobj)[40:46, 30:35, 3:7]
    small = nib.Nifti1Image(crop, img.affine, img.header)
    raw = small.to_bytes()
    out("nifti", "ct_crop_int16.nii", raw)
    out("nifti", "ct_crop_int16.nii.gz", gzip.compress(raw, mtime=0))
    floats = nib.Nifti1Image(crop.astype(">f4"), img.affine)
    floats.header.set_qform(img.affine, code=1)
    floats.header.set_sform(None, code=0)
    floats.header["scl_slope"], floats.header["scl_inter"] = 2.0, -1024.0
    out("nifti", "ct_crop_float32_big_endian_qform.nii", floats.to_bytes())


def npy_seeds():
    grid = os.path.join(SHARED, "fixtures", "monai", "ct_sm_fs12_model_grid.safetensors")
    with open(grid, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        values = np.frombuffer(f.read(4 * 2 * 3 * 4), dtype="<f4").reshape(1, 2, 3, 4)
    for name, array in [
        ("f32_c.npy", values),
        ("f64_fortran.npy", np.asfortranarray(values.astype("<f8"))),
        ("i16.npy", (values * 100).astype("<i2")),
        ("f16.npy", values.astype("<f2")),
    ]:
        buf = io.BytesIO()
        np.save(buf, array)
        out("npy", name, buf.getvalue())


class _Storage:
    """Stands in for torch's storage classes, pickled by name as torch.save writes them."""


def checkpoint_seeds():
    # torch.save's zip layout with a pickle that names torch's classes, without torch: the
    # pickler writes globals by module and name, so fake modules with the right names suffice.
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    float_storage = type("FloatStorage", (_Storage,), {"__module__": "torch"})
    torch.FloatStorage = float_storage
    torch._utils = utils
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    class Tensor:
        def __init__(self, key, shape):
            self.key, self.shape = key, shape

        def __reduce__(self):
            strides, s = [], 1
            for d in reversed(self.shape):
                strides.insert(0, s)
                s *= d
            storage = ("storage", float_storage, self.key, "cpu", s)
            return (_rebuild_tensor_v2, (_Persistent(storage), 0, tuple(self.shape), tuple(strides), False, {}))

    class _Persistent:
        def __init__(self, pid):
            self.pid = pid

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _Persistent) else None

    shapes = [
        ("swinViT.patch_embed.proj.weight", (12, 1, 2, 2, 2)),
        ("swinViT.patch_embed.proj.bias", (12,)),
        ("out.conv.conv.weight", (14, 12, 1, 1, 1)),
    ]
    rng = np.random.default_rng(0)
    for name, nested in [("state_dict.pt", None), ("nested_state_dict.pt", "state_dict")]:
        state = {k: Tensor(str(i), s) for i, (k, s) in enumerate(shapes)}
        root = {nested: state, "epoch": 3} if nested else state
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(root)
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            for i, (_, s) in enumerate(shapes):
                z.writestr(f"archive/data/{i}", rng.standard_normal(int(np.prod(s))).astype("<f4").tobytes())
            z.writestr("archive/version", "3\n")
        out("checkpoint", name, zbuf.getvalue())
    del sys.modules["torch"], sys.modules["torch._utils"]


def model_file_seeds():
    prosam = os.path.join(ROOT, "target", "release", "prosam")
    tmp = os.path.join(ROOT, "target", "fuzz-seed-models")
    os.makedirs(tmp, exist_ok=True)
    f32 = os.path.join(tmp, "fs12.safetensors")
    ckpt = os.path.join(SHARED, "fixtures", "monai", "swinunetr_fs12.pt")
    subprocess.run([prosam, "-q", "convert", "--monai", ckpt, "-o", f32], check=True)
    files = {"fs12_f32": f32}
    for precision in ["f16", "int8"]:
        files[f"fs12_{precision}"] = os.path.join(tmp, f"fs12_{precision}.safetensors")
        subprocess.run([prosam, "-q", "quantize", "-m", f32, "--to", precision, "-o", files[f"fs12_{precision}"]],
                       check=True)
    for name, path in files.items():
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            f.seek(0)
            # The header alone: the fuzz target pads the data section with zeros.
            out("model_file", f"{name}_header.safetensors", f.read(8 + n))


def dicom_seeds():
    source = sorted(glob.glob(os.path.join(SHARED, "data", "example_ct_dicom", "*.dcm")))[0]
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array[240:272, 240:272].copy()

    def variant(syntax):
        d = copy.deepcopy(ds)
        d.Rows, d.Columns = pixels.shape
        d.PixelData = pixels.tobytes()
        d.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for tag in [0x00280301, 0x00282110, 0x00282112, 0x00282114]:
            if tag in d:
                del d[tag]
        if syntax in (RLELossless, JPEG2000Lossless):
            d.compress(syntax, pixels)
        else:
            d.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        d.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    out("dicom", "ct_crop_explicit.dcm", variant(ExplicitVRLittleEndian))
    out("dicom", "ct_crop_implicit.dcm", variant(ImplicitVRLittleEndian))
    out("dicom", "ct_crop_rle.dcm", variant(RLELossless))
    out("dicom", "ct_crop_j2k.dcm", variant(JPEG2000Lossless))


def c_volume_seeds():
    def descriptor(voxel_type, dims, strides, slope, intercept, affine, convention):
        return (struct.pack("<i", voxel_type) + struct.pack("<3q", *dims) + struct.pack("<3q", *strides)
                + struct.pack("<2d", slope, intercept) + struct.pack("<16d", *affine) + struct.pack("<i", convention))

    identity = [1.5, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 3.0, 0, 0, 0, 0, 1]
    out("c_volume", "int16_dense.bin", descriptor(0, (4, 3, 2), (1, 4, 12), 1.0, -1024.0, identity, 0))
    out("c_volume", "float32_flipped.bin", descriptor(4, (4, 3, 2), (-1, -4, 12), 1.0, 0.0, identity, 1))
    out("c_volume", "uint8_padded_rows.bin", descriptor(2, (3, 3, 3), (1, 5, 20), 0.5, 0.0, identity, 0))


if __name__ == "__main__":
    nifti_seeds()
    npy_seeds()
    checkpoint_seeds()
    model_file_seeds()
    dicom_seeds()
    c_volume_seeds()
    for target in sorted(os.listdir(SEEDS)):
        files = os.listdir(os.path.join(SEEDS, target))
        size = sum(os.path.getsize(os.path.join(SEEDS, target, f)) for f in files)
        print(f"{target}: {len(files)} seeds, {size} bytes")
