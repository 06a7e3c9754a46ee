# Sourced by run.sh and run_profile.sh on the device machine (with R, the results folder, set):
# the carried wheels (.whl: transformers 5.24.0 and its pydantic) on PYTHONPATH beside the
# machine's own torch, and the software versions written to $R/versions.txt.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee $R/versions.txt
