#!/usr/bin/env bash
# What a device call carries for the GPU speed suite (../shared/device/README.md): the wheels the
# GPU machine lacks (Hydra, OmegaConf, antlr4, and py-spy for the suite's sample of the fit) in
# .whl/, and CUHK03-NP in .dev/cuhk03-np (42 MB; the device limit is 64 MiB). Both folders are
# listed in git's info/exclude (the main repository's, from a worktree), so they never reach a commit.
#
#   bash scripts/gpu_bundle.sh [shared folder, default ../shared]
#
# then one device call, carrying [".dev", ".whl"] (timeout 600 s), runs
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl;
#   export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH;
#   SUITE=quick bash scripts/benchmark_gpu.sh .dev/cuhk03-np/detected $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
[ -d "$SHARED/data/cuhk03-np/detected" ] || { echo "no CUHK03-NP under $SHARED/data/cuhk03-np/detected" >&2; exit 2; }
# the exclude file git reads: in a worktree .git is a file, and info/ is the main repository's
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.dev/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done
bash "$SHARED/device/wheels.sh" .whl py-spy==0.4.3 >/dev/null
mkdir -p .dev
rm -rf .dev/cuhk03-np
cp -r "$SHARED/data/cuhk03-np" .dev/
du -sh .whl .dev
