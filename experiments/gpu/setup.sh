# On the lent GPU machine (torch preinstalled, no network): install gatekit from this checkout and
# Torch-Pruning from the wheel carried in .whl/, then unpack the carried training images into data/.
# Source it without a pipe (`source experiments/gpu/setup.sh || exit 1`): in a pipeline its exits do
# not stop the command, which is how a sweep once trained on a previous call's partial data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    ln -sfn ../adapters gatekit/adapters && export PYTHONPATH=/tmp/site:$PWD  # the layout pip would install
fi
rm -rf data  # never train on what an earlier call left there
python3 experiments/pack_data.py unpack .gpu --out data $UNPACK_FLAGS || return 1
export GATEKIT_DATA=$PWD/data PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, gatekit, torch_pruning; print('torch', torch.__version__, 'gatekit', gatekit.__version__, 'cuda', torch.cuda.is_available())" || return 1
