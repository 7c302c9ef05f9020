"""Batch inference from Python: run a registered model over images or a dataset on Ray Data, then read the results.

Usage: python docs/examples/batch_inference.py MODEL INPUT OUT_FOLDER
"""

import sys

import pyarrow.compute as pc
import pyarrow.dataset as pads

from cluster.jobs.batch_infer import BatchJobConfig, connect_ray, run_batch_job
from visionfleet.settings import Settings

model, source, out = sys.argv[1:4]

settings = Settings.from_env()  # $VISIONFLEET_HOME, made absolute
config = BatchJobConfig(model=model, input=source, out=out, batch_size=64, max_actors=2, overwrite=True)
connect_ray(settings, address=None)  # $RAY_ADDRESS, else this state dir's head, else a local Ray
summary = run_batch_job(config, settings)
print(f"{summary.model}:{summary.version}: {summary.rows} rows, {summary.errors} errors", end=", ")
print(f"{summary.images_per_s:.1f} images/s")

table = pads.dataset(out, format="parquet").to_table()
good = table.filter(pc.is_null(table["error"]))
if "true_label" in table.column_names:  # a dataset with labels: score the model
    correct = pc.sum(pc.cast(pc.equal(good["label"], good["true_label"]), "int64")).as_py()
    print(f"top-1 accuracy {correct / good.num_rows:.3f} on {good.num_rows} images")
unsure = good.filter(pc.less(good["confidence"], 0.5))
print(f"{unsure.num_rows} predictions below 0.5 confidence (candidates for labeling)")
for row in table.filter(pc.is_valid(table["error"])).to_pylist()[:5]:
    print(f"error: {row.get('path') or row.get('id')}: {row['error']}")
