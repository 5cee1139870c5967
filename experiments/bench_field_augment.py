"""Host cost of ``augment.policy=field``; prints one JSON object.

  python experiments/bench_field_augment.py [--batches 6] [--batch 64]
      [--threads 1,2]

The field policy (rebll_jax/data/field_augment.py: CutoutPIL + the
`randaugment` package's RandAugment, in PIL) runs per image in the loader's
producer thread. This measures images/s of ``HostAugment`` on photo-like
uint8 images at 64 and 224 px, with one thread and with more threads when
asked (PIL releases the GIL inside its ops): images per wall-clock second
and per CPU-second of the process (the per-core rate, which stays right on
a machine other processes share). The first batch is a warm-up and is not
timed. Each policy draw is random, so the rate is an average over the
sub-policy table.

It also prints how many cores keep up with a GPU eating ``--assumed_step_ms``
per batch of 64 at 224 px (an ASSUMED step time, not measured here; the
default 45 ms is experiments/bench_pipeline.py's TResNet-M guess).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from experiments.cli_checks import parse_positive_ints, positive_float, positive_int  # noqa: E402
# pylint: enable=wrong-import-position

# The batch the assumed GPU step time is for (bench_pipeline.py's too).
ASSUMED_BATCH = 64


def _photo_like(rng, n, size):
  """Smooth colour fields plus noise: histograms like photos, not flat."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    phase = rng.uniform(0, 6.3, (3, 2))
    base = [128 + 90 * np.sin(3 * xx + phase[c, 0])
            * np.cos(2 * yy + phase[c, 1]) for c in range(3)]
    img = np.stack(base, -1) + rng.normal(0, 12, (size, size, 3))
    out[i] = np.clip(img, 0, 255).astype(np.uint8)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=positive_int, default=6)
  parser.add_argument("--batch", type=positive_int, default=64)
  parser.add_argument("--threads", default="1",
                      help="comma list of thread counts (>= 1)")
  parser.add_argument("--sizes", default="64,224",
                      help="comma list of image sides in px (>= 1)")
  parser.add_argument("--assumed_step_ms", type=positive_float, default=45.0,
                      help=f"assumed GPU step time at batch {ASSUMED_BATCH}"
                           ", 224 px (> 0)")
  args = parser.parse_args(argv)
  # Checked before any image is made or augmented.
  sizes = parse_positive_ints(parser, "--sizes", args.sizes)
  threads_list = parse_positive_ints(parser, "--threads", args.threads)

  from rebll_jax.data import field_augment  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  out = {"batch": args.batch, "batches_timed": args.batches,
         "cpu_count": os.cpu_count(),
         "load_average_1min": round(os.getloadavg()[0], 2),
         "images_per_s": {}, "images_per_cpu_s": {}}
  for size in sizes:
    images = _photo_like(rng, args.batch, size)
    rows = np.arange(args.batch)
    for threads in threads_list:
      aug = field_augment.HostAugment(workers=threads)
      aug(images, seed=0, task=0, step=-1 % 2**31, rows=rows)  # warm-up
      start, cpu_start = time.perf_counter(), time.process_time()
      for step in range(args.batches):
        aug(images, seed=0, task=0, step=step, rows=rows)
      count = args.batches * args.batch
      name = f"{size}px_threads_{threads}"
      out["images_per_s"][name] = round(
          count / (time.perf_counter() - start), 1)
      # Per CPU-second of this process: the per-core rate even when other
      # processes share the cores (wall-clock rates then understate it).
      out["images_per_cpu_s"][name] = round(
          count / (time.process_time() - cpu_start), 1)
  per_core_224 = out["images_per_cpu_s"].get("224px_threads_1")
  if per_core_224:
    gpu_rate = ASSUMED_BATCH / (args.assumed_step_ms / 1000.0)
    out["assumed_gpu_images_per_s_224"] = round(gpu_rate, 1)
    out["cores_to_keep_up_224"] = round(gpu_rate / per_core_224, 1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
