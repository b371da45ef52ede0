#!/bin/bash
# Prepare what bench/gpu_round.sh carries to a GPU machine (../shared/FACTS.md: Python 3.12 with
# torch, numpy, pandas, scikit-learn, matplotlib, pyyaml; no mlflow, optuna, openpyxl, pytest,
# and no network): wheels for Python 3.12 in .whl/ (without what the machine has, to stay
# under the 64 MiB a call carries) and the MEGC2019 flow images in data/. Both are gitignored.
#   bash bench/gpu_wheels.sh      then run bench/gpu_round.sh there with carry [".whl", "data"]
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any "mlflow==3.17.2" optuna openpyxl nvidia-ml-py psutil pytest
# the machine has these (and their wheels are large)
for p in numpy scipy pandas matplotlib scikit_learn pillow torch nvidia_ pyarrow contourpy \
         fonttools kiwisolver pyparsing cycler python_dateutil pytz tzdata six packaging pyyaml \
         PyYAML joblib threadpoolctl jinja2 Jinja2 markupsafe MarkupSafe filelock fsspec sympy \
         mpmath networkx typing_extensions triton setuptools; do
  find .whl -maxdepth 1 -iname "${p}*.whl" ! -iname "nvidia_ml_py*" -delete
done
du -sh .whl; ls .whl | wc -l
mkdir -p data && rm -rf data/megc2019_flow28
cp -r "${MEXP_DATA:-../shared/data}/megc2019_flow28" data/
du -sh data/megc2019_flow28
