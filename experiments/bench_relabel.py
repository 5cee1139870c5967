"""Throughput of the between-task relabel pass vs plain model inference.

  python experiments/bench_relabel.py [--rows 1000 --capacity 1200 \
      --chunk 256 --repeats 3 --width 32]

Builds the configured model (config_base: small ResNet of ``--width``,
default 32, the width the README's figures were measured with; the default
experiment's net is width 16; image size and chunk from c.data.image_size /
c.relabel.chunk unless overridden), fills a replay buffer of ``--capacity``
rows with random uint8 images, ``--rows`` of them valid, and times,
interleaved:

- ``inference_host``: the jitted predict function over the buffer's valid
  rows in chunks of ``chunk`` rows taken from host numpy, results fetched to
  host (what any evaluation pass does);
- ``inference_device``: the same chunks already on the device (model only);
- ``relabel``: ``relabel.relabel_buffer`` over the same rows (gather, pad the
  last chunk, predict, threshold, write);
- ``relabel_overhead``: the same pass with a near-free jitted predict
  function, i.e. everything the pass adds to the model's own time. On a
  loaded shared machine this is the noise-robust number: the relabel/inference
  ratio is about t_model / (t_model + t_overhead).

Both wall seconds and process CPU seconds (all threads) are recorded.

Prints one JSON line per measurement and a summary line with the ratio of
relabel to host-fed inference throughput (target >= 0.8). Throughputs count
real rows, so the padding of the last chunk counts against relabel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from rebll_jax import config_base
from rebll_jax import relabel
from rebll_jax.models import build_model
from experiments.cli_checks import positive_int
# pylint: enable=wrong-import-position


# The small ResNet's width the README's relabel figures were measured with
# (the script's model when they were: config_base's width was 32 then).
DEFAULT_WIDTH = 32


def main(argv=None):
  c = config_base.base_config()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=positive_int, default=1000)
  parser.add_argument("--capacity", type=positive_int, default=1200)
  parser.add_argument("--chunk", type=positive_int, default=c.relabel.chunk)
  parser.add_argument("--image_size", type=positive_int, default=c.data.image_size)
  parser.add_argument("--num_classes", type=positive_int, default=20)
  parser.add_argument("--repeats", type=positive_int, default=3)
  parser.add_argument("--width", type=positive_int, default=DEFAULT_WIDTH,
                      help="the small ResNet's width (model.width)")
  args = parser.parse_args(argv)
  if args.rows > args.capacity:
    parser.error(f"--rows {args.rows} must be <= --capacity "
                 f"{args.capacity} (the valid rows of the buffer)")
  c.model.width = args.width

  model = build_model(c.model, args.num_classes)
  size = args.image_size
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False)

  @jax.jit
  def predict(variables, images):
    x = images.astype(jnp.float32) / 255.0
    return jax.nn.sigmoid(model.apply(variables, x, train=False)["logits"])

  predict_fn = functools.partial(predict, variables)

  @jax.jit
  def free_predict(images):  # same output shape, negligible compute
    x = images[:, 0, 0, :1].astype(jnp.float32) / 255.0
    return jnp.broadcast_to(x, (images.shape[0], args.num_classes))

  rng = np.random.default_rng(0)
  cap, c_ = args.capacity, args.num_classes
  images = rng.integers(0, 256, (cap, size, size, 3), dtype=np.uint8)
  labels = (rng.random((cap, c_)) < 0.2).astype(np.float32)
  known = np.zeros((cap, c_), bool)
  valid = np.zeros(cap, bool)
  valid[rng.choice(cap, args.rows, replace=False)] = True
  column_mask = np.zeros(c_, bool)
  column_mask[-4:] = True  # the task just learned

  rows = np.flatnonzero(valid)
  chunk = args.chunk
  n_chunks = -(-rows.size // chunk)
  host_chunks = []
  for i in range(n_chunks):
    b = images[rows[i * chunk:(i + 1) * chunk]]
    pad = np.zeros((chunk - b.shape[0], *b.shape[1:]), np.uint8)
    host_chunks.append(np.concatenate([b, pad]))
  device_chunks = [jax.device_put(b) for b in host_chunks]

  def inference_host():
    outs = [predict_fn(b) for b in host_chunks]
    return [np.asarray(o) for o in outs]

  def inference_device():
    return jax.block_until_ready([predict_fn(b) for b in device_chunks])

  def relabel_pass():
    return relabel.relabel_buffer(predict_fn, images, labels, known, valid,
                                  column_mask, c.relabel.tau_cur, chunk)

  def relabel_overhead():
    return relabel.relabel_buffer(free_predict, images, labels, known, valid,
                                  column_mask, c.relabel.tau_cur, chunk)

  runs = {"inference_host": inference_host,
          "inference_device": inference_device, "relabel": relabel_pass,
          "relabel_overhead": relabel_overhead}
  for fn in runs.values():  # compile and warm caches
    fn()
  times = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for rep in range(args.repeats):
    for name, fn in runs.items():  # interleaved, so load drifts hit all
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      dt, dc = time.perf_counter() - t0, time.process_time() - c0
      times[name].append(dt)
      cpu[name].append(dc)
      print(json.dumps({"measure": name, "repeat": rep, "seconds": round(dt, 4),
                        "cpu_seconds": round(dc, 4),
                        "rows_per_s": round(rows.size / dt, 1)}), flush=True)

  best = {k: rows.size / min(v) for k, v in times.items()}
  median = {k: rows.size / float(np.median(v)) for k, v in times.items()}
  overhead = min(times["relabel_overhead"])
  model = min(times["inference_host"])
  print(json.dumps({
      "summary": True, "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "rows": int(rows.size),
      "chunk": chunk, "chunks": n_chunks, "image_size": size,
      "arch": c.model.arch, "width": c.model.width,
      "best_rows_per_s": {k: round(v, 1) for k, v in best.items()},
      "median_rows_per_s": {k: round(v, 1) for k, v in median.items()},
      "ratio_relabel_vs_inference_host_best":
          round(best["relabel"] / best["inference_host"], 3),
      "ratio_relabel_vs_inference_host_median":
          round(median["relabel"] / median["inference_host"], 3),
      "ratio_relabel_vs_inference_device_best":
          round(best["relabel"] / best["inference_device"], 3),
      "best_cpu_seconds": {k: round(min(v), 3) for k, v in cpu.items()},
      "overhead_seconds_best": round(overhead, 4),
      "ratio_estimate_from_overhead": round(model / (model + overhead), 3),
  }), flush=True)


if __name__ == "__main__":
  main()
