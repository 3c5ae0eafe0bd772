#!/usr/bin/env bash
# Release check: the sdist and the wheel build and pass `twine check`, and the wheel works installed
# alone in a fresh venv: `hrnetdet --version`, `hrnetdet models`, one small forward pass of every
# family, and every data file of the package's source tree is in the wheel.
#
# "Alone": the fresh venv holds the wheel and nothing of this checkout (installed --no-deps, run
# outside the checkout, PYTHONPATH unset, checked by where hrnetdet is imported from). Its
# third-party dependencies (torch and torchvision are gigabytes) are borrowed read-only from the
# running venv through a .pth line, which adds that folder to sys.path after the fresh venv's own
# (the .pth files inside it, an editable install's among them, are not run); every Requires-Dist of
# the wheel must then be satisfied there.
#
#   tools/release_check.sh            # uses `python` (the CI venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; exit 1; }
"$py" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)

"$py" -m venv --without-pip "$work/fresh"
"$py" -m pip --python "$work/fresh/bin/python" install -q --no-deps "$wheel"
fresh_site=$("$work/fresh/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$fresh_site/borrowed_dependencies.pth"

cd "$work"
unset PYTHONPATH
"$work/fresh/bin/hrnetdet" --version
"$work/fresh/bin/hrnetdet" models | tail -n 3
"$work/fresh/bin/python" - "$wheel" "$root" "$work/fresh" <<'EOF'
import subprocess, sys, zipfile
from importlib.metadata import distribution, PackageNotFoundError
from pathlib import Path

import torch
from packaging.requirements import Requirement

import hrnetdet
from hrnetdet.zoo.records import arch_name

wheel, root, fresh = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]).resolve()
where = Path(hrnetdet.__file__).resolve()
assert fresh in where.parents, f"hrnetdet imported from {where}, not from the fresh venv {fresh}"

missing = []
for req in map(Requirement, distribution("hrnetdet").requires or []):
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    try:
        if not req.specifier.contains(distribution(req.name).version, prereleases=True):
            missing.append(f"{req} (found {distribution(req.name).version})")
    except PackageNotFoundError:
        missing.append(str(req))
assert not missing, f"the wheel's requirements are not met: {missing}"

tracked = subprocess.run(["git", "-C", str(root), "ls-files", "hrnetdet"], capture_output=True, text=True,
                         check=True).stdout.split()
data = {p for p in tracked if not p.endswith(".py")}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
absent = sorted(data - in_wheel)
assert not absent, f"data files of the package missing from the wheel (pyproject.toml's package-data): {absent}"

for family in hrnetdet.list_families():
    arch = arch_name(family.name, min(family.widths))
    model = hrnetdet.create_model(arch, num_classes=3, min_size=128, max_size=128).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])[0]
    assert {"boxes", "scores", "labels"} <= set(out), (arch, sorted(out))
    print(f"{arch}: forward ok ({len(out['boxes'])} detections)")
print(f"release check passed: {Path(wheel).name} ({len(in_wheel)} files, data files {sorted(data)}), "
      f"hrnetdet {hrnetdet.__version__} from {where.parent}")
EOF
