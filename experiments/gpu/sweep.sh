# On the lent GPU machine, after setup.sh: the whole sweep in SECONDS, then its results packed into $OUT.
# usage: source experiments/gpu/setup.sh || exit 1; bash experiments/gpu/sweep.sh SECONDS
budget=$1
timeout $((budget + 30)) python3 experiments/sweep.py --datasets cifar10 fashion-mnist mnist --small-grid mnist \
    --mnist-scale 0.5 --workers 14 --time-budget $budget --out runs/sweep -- --device cuda --no-val 2>&1 | tee $OUT/sweep.log
# Checkpoints of the reported runs (not the pretraining ones, nor last.pt) and every log, CIFAR-10 first:
# what comes back is capped at 64 MiB, so a cut loses the end of the stream.
cd runs && find sweep/cifar10 sweep/fashion-mnist sweep/mnist sweep/sweep.json -type f \
    \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.log' -o -name model.pt \) \
    ! -path '*pretrain*/model.pt' | sort > /tmp/files
tar cf - -T /tmp/files | xz -T0 -3 | split -b 15M - $OUT/sweep.tar.xz.
ls -la $OUT
