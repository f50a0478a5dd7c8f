#!/usr/bin/env bash
# Install what ct-denoise-node needs on a Debian/Ubuntu machine into ./.venv.
#   scripts/install.sh            the node (demo included)
#   scripts/install.sh test       plus the test and training tools, and a running PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

need=()
for pair in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools gdcmconv:libgdcm-tools; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
# Orthanc's own plugins: the PACS speaks DICOMweb (STOW-RS) and shows the derived series.
for pair in libOrthancDicomWeb:orthanc-dicomweb libOrthancWebViewer:orthanc-webviewer; do
  [ -e "/usr/share/orthanc/plugins/${pair%%:*}.so" ] || need+=("${pair##*:}")
done
if [ "$mode" = test ] && ! command -v chromium >/dev/null 2>&1; then need+=(chromium); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$mode" = test ]; then
  # torch==2.13.0 is pinned in the train extra: a CPU build, never an unpinned CUDA one.
  .venv/bin/python -m pip install -q -e ".[test,train]"
  if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
