#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks into .whl/ (git-ignored),
# for Python 3.12 on manylinux x86-64. benchmarks/gpu_suite.sh installs them there.
#
#   bash benchmarks/fetch_gpu_wheels.sh        # from the repository root
#
# The set: what stagejax imports that the image does not have (grain, array-record,
# ml-collections, tensorflow-datasets, tensorboardX, clu; for whole sections shapely
# and imagecodecs, the JPEG tiles' codec) and their own requirements that are missing
# there (checked against the image's package list). The versions are the ones this
# project is tested with on CPU. protobuf travels too although the image has one:
# googleapis-common-protos and tensorflow-metadata are generated code that refuses an
# older protobuf runtime, so the three go together; tifffile too (the image has one of
# unknown version; stagejax asks for >= 2026.3), 0.2 MB. imagecodecs is the largest
# wheel (26 MB; the whole set about 40 MB of the 64 MB a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
  ml-collections==1.1.0 clu==0.0.12 tensorboardX==2.6.5
  tensorflow-datasets==4.9.10 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0 toml==0.10.2
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 protobuf==7.36.2
  shapely==2.2.0 imagecodecs==2026.3.6 tifffile==2026.3.3
)
# Published as source only; pure Python, so a wheel built here runs there.
SDIST_ONLY=(promise==2.3)

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
python3 -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"

count=$(find .whl -type f -name '*.whl' | wc -l)
expected=$(( ${#WHEELS[@]} + ${#SDIST_ONLY[@]} ))
if [ "$count" -ne "$expected" ]; then
  echo "error: .whl/ holds $count wheels, expected $expected" >&2
  exit 1
fi
echo "$count wheels in .whl/ ($(du -sh .whl | cut -f1))"
