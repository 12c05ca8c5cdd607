#!/usr/bin/env bash
# Prepare `python -m benchmarks gpu` for a lent GPU machine (the `device` tool's `run`).
#
# The device gets a copy of the working tree and nothing beside it: not ../shared (GSM8K), not
# git, and no network to install the benchmark's one missing package (schedulefree). This
# writes the git-ignored folder .device/ with
#   gsm8k -> the GSM8K folder (a link: the data are pointed at, never copied into the repo;
#            `carry` sends the two files through it),
#   wheels/  the schedulefree wheel of the version installed here,
#   env      GRAFF_GIT_COMMIT / GRAFF_GIT_DIRTY of this checkout (provenance without git).
# Then, from the device tool (one call, ~7 of its 10 minutes):
#   run(command="bash benchmarks/device/run_gpu.sh",
#       carry=[".device/gsm8k/train.jsonl", ".device/gsm8k/test.jsonl", ".device/wheels", ".device/env"],
#       timeout_s=600)
# and copy its files_at/gpu/results.{json,md} to benchmarks/results/gpu/ (benchmarks/README.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
data="$(cd "${GRAFF_GSM8K_DIR:-../shared/data/gsm8k}" && pwd)"
for f in train.jsonl test.jsonl; do
  [ -f "$data/$f" ] || { echo "prepare.sh: $data/$f not found; set GRAFF_GSM8K_DIR" >&2; exit 1; }
done
git check-ignore -q .device/env || { echo "prepare.sh: .device/ must be git-ignored" >&2; exit 1; }
rm -rf .device
mkdir -p .device/wheels
ln -s "$data" .device/gsm8k
version="$(python -c 'import importlib.metadata as m; print(m.version("schedulefree"))')"
python -m pip download -q --no-deps -d .device/wheels "schedulefree==$version"
# the commit and cleanliness exactly as benchmarks/meta.py records them (one definition)
python -c 'from benchmarks.meta import git_state
commit, dirty = git_state()
print(f"GRAFF_GIT_COMMIT={commit}\nGRAFF_GIT_DIRTY={int(dirty)}")' > .device/env
dirty="$(sed -n 's/^GRAFF_GIT_DIRTY=//p' .device/env)"
echo "prepared .device/ for commit $(git rev-parse --short HEAD) (dirty=$dirty): $(ls .device/wheels)"
[ "$dirty" = 0 ] || echo "warning: graff/ or benchmarks/ has uncommitted changes; commit first" >&2
