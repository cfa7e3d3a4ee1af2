#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a bare GPU machine that has python3 with torch (and its CUDA libraries) but no
# onnxruntime-gpu and no network: onnxruntime-gpu comes as .whlp/ort.tar.xz.part* (the wheel's contents, xz'd and
# split, since one transfer is capped), gathered under /tmp/parts by earlier calls. stip itself is put on the path
# from this checkout. Results: $OUT/gpu.json and $OUT/gpu.log.
#
#   bash benchmarks/gpu_run.sh stage      # copy this call's parts to /tmp/parts
#   bash benchmarks/gpu_run.sh run [ARGS] # stage, unpack once, run gpu_check.py ARGS
set -euo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/parts /tmp/site /tmp/pk/stip
cp .whlp/ort.tar.xz.part* .whlp/*.whl /tmp/parts/ 2>/dev/null || true
ls -la /tmp/parts
[ "${1:-run}" = stage ] && exit 0
shift || true
if [ ! -d /tmp/site/onnxruntime ]; then
  cat /tmp/parts/ort.tar.xz.part* | python3 -c \
    "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/site')"
fi
# pure-python wheels carried alongside (e.g. the transformers the examples were written against)
for w in /tmp/parts/*.whl; do
  [ -e "$w" ] && python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$w"
done
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LD_LIBRARY_PATH=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
for d in compiler passes runtime; do ln -sfn "$PWD/$d" /tmp/pk/stip/$d; done
export PYTHONPATH=/tmp/site:/tmp/pk
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -c "import onnxruntime as o, torch, transformers; print(o.__file__, o.__version__, o.get_available_providers(), torch.__version__, transformers.__version__)"
out=${OUT:-/tmp}
PYTHONWARNINGS=ignore python3 benchmarks/gpu_check.py --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
