# Every method of examples/train.py for one short epoch on the GPU, in parallel (a CUDA smoke test).
out=${1:-runs/smoke}
T="python3 examples/train.py --dataset cifar10 --epochs 1 --train-images 5120 --no-val --device cuda"
mkdir -p $out; $T --method dense --out $out/dense > $out.dense.log 2>&1 || { cat $out.dense.log; exit 1; }
I="--init $out/dense/model.pt"
$T $I --method dlcg --layer 0.01 --channel 0.01 --out $out/dlcg > $out.dlcg.log 2>&1 &
$T $I --method channel --channel 0.01 --out $out/channel > $out.channel.log 2>&1 &
$T $I --method layer --target 0.5 --out $out/aig > $out.aig.log 2>&1 &
$T $I --method dlcg --budget 0.5 --out $out/budget > $out.budget.log 2>&1 &
$T $I --method static --static-fraction 0.5 --out $out/static > $out.static.log 2>&1 &
wait
for f in $out.*.log; do echo "== $f"; tail -2 $f; done
