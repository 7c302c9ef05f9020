"""Optimize a model from Python: INT8, then pruned + fine-tuned + INT8, measured and registered.

Runs anywhere in about a minute: it makes a small dataset and a small model first.
Set VISIONFLEET_HOME to a scratch folder to keep your own state dir clean.
"""

from edge_export.measure import OrtRunner, compare, count_macs
from edge_export.optimize import OptimizeSettings, optimize
from edge_export.quantize import QuantizeConfig
from train.checkpoint import save_checkpoint
from train.finetune import FinetuneConfig, prune_tools, train_in_process
from train.pipeline import register_checkpoint
from visionfleet.datasets.store import load_arrays, synthesize
from visionfleet.registry import Registry
from visionfleet.settings import Settings

s = Settings.from_env().ensure()
data = s.datasets_dir / "example-opt"
if not (data / "manifest.json").exists():
    synthesize(data, n_train=400, n_holdout=200, size=32, seed=1)

# A small ResNet trained in this process (no Ray), registered as "example:1".
model, meta = train_in_process(
    {"arch": "resnet", "width": 8, "stem_stride": 2}, data, input_size=32,
    config=FinetuneConfig(epochs=2, lr=0.05, batch_size=32, threads=1),
)
ckpt = save_checkpoint(s.runs_dir / "example" / "model.pt", model, meta)
reg = Registry(s.registry_dir)
parity, _ = load_arrays(data, "holdout", (32, 32), limit=16)
parent = register_checkpoint(ckpt, reg, "example", parity_images=parity)
cache = s.home / "cache" / "variants"

# 1. NNCF post-training INT8 with 64 calibration images from the model's own dataset.
int8 = optimize(
    parent.ref,
    OptimizeSettings(quantize=QuantizeConfig(mode="int8-static", calibration=64), threads=1, compare_rounds=3),
    registry=reg,
    cache_dir=cache,
)
m = int8.card.metrics
print(f"{int8.card.ref}: top-1 {m['holdout_top1']:.3f} (parent {m['parent_holdout_top1']:.3f}), "
      f"{m['size_mb']:.2f} MB (parent {m['parent_size_mb']:.2f} MB)")

# 2. Half of the MACs removed, one fine-tune epoch, then INT8; budgets of a target checked.
small = optimize(
    parent.ref,
    OptimizeSettings(
        prune=0.5, finetune_epochs=1, quantize=QuantizeConfig(mode="int8-static", calibration=64),
        round_to=1,  # this tiny model has 8-channel layers: do not round channel counts to 8
        target="android", threads=1, compare_rounds=3,
    ),
    registry=reg,
    cache_dir=cache,
    tools=prune_tools(),  # pruning loads, fine-tunes and saves the weights with train's code
)
print(f"{small.card.ref}: {[step['op'] for step in small.card.lineage.steps]}")
print(f"MACs/image {count_macs(reg.local_dir('example', small.card.version) / small.card.model_file):,} "
      f"(parent {count_macs(reg.local_dir('example', parent.version) / parent.model_file):,})")
for check in small.budgets:
    print("  ", check.message())

# 3. The three versions side by side, Offline batch 8, rotating order, 5 rounds.
runners = [
    OrtRunner(reg.local_dir("example", c.version) / c.model_file, threads=1, name=c.ref)
    for c in (parent, int8.card, small.card)
]
images, _ = load_arrays(data, "holdout", (32, 32), limit=64)
result = compare(runners, images, "offline", rounds=5, batch=8)
for name, v in result["variants"].items():
    speedup = v.get("speedup_vs_baseline")
    print(f"{name}: {v['median']:.0f} images/s" + (f", {speedup['median']:.2f}x the parent" if speedup else ""))
