#!/usr/bin/env bash
# The Python environment of the independent DICOM checks (scripts/check_dicom.py): pydicom with
# JPEG 2000 decoding, highdicom, nibabel, in target/pyenv. The tests use it when it exists; CI makes it.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=target/pyenv
if [ ! -x "$env_dir/bin/python" ]; then
  python3 -m venv "$env_dir"
fi
"$env_dir/bin/pip" install --quiet --disable-pip-version-check \
  "pydicom==3.0.*" "pylibjpeg==2.*" "pylibjpeg-openjpeg==2.*" "highdicom==0.28.*" "nibabel==5.*" "numpy==2.*"
"$env_dir/bin/python" -c "import pydicom, highdicom, nibabel, openjpeg; print('python checks ready:', pydicom.__version__, highdicom.__version__)"
