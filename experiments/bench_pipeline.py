"""Input pipeline throughput at 224 px, per CPU core; prints one JSON object.

  python experiments/bench_pipeline.py [--images 300] [--batch 64] \
      [--storages original,256,224squash]

Measures, on synthetic COCO-like JPEGs (640 x 480, quality 90, smooth
content + noise so they compress like photos, ~100-150 KB each), for each
storage (``original``: the source bytes; ``256``: ``prepare --store_size
256``, shorter side 256; ``224squash``: ``--store_size 224 --squash``):

1. ``prepare``: seconds and output bytes per 1,000 images
   (``python -m rebll_jax.prepare coco_format``).
2. ``decode_resize``: images/s of the prepared reader (array_record read +
   PIL decode with draft + bilinear resize to 224) with one worker thread
   (= one core) and with all the cores given (``--workers``).
3. ``augment``: images/s of the jitted ``augment_batch`` on this host's CPU
   (XLA:CPU; on the accelerator it runs inside the train step instead).

Under load the wall-clock rates mislead; each is given per CPU-second of
the process too (``*_per_cpu_s``), and the core counts use that. It then
compares the per-core decode rate with the rate one GPU consumes at
batch 64 (whatever ``--batch``, the reader's batch, is), from an ASSUMED
TResNet-M train-step time (``--assumed_step_ms``,
default 45 ms = ~1,400 img/s for forward + backward + the old model's forward
at 224 in bfloat16 on an A100/H100-class GPU; not measured here) and prints
how many cores keep up, for each storage.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.cli_checks import positive_int  # noqa: E402  pylint: disable=wrong-import-position


def _photo_like(rng, h=480, w=640):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8)
  img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
  arr = np.asarray(img).astype(np.int16)
  arr = arr + rng.integers(-12, 13, arr.shape)
  b = io.BytesIO()
  Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(b, "JPEG",
                                                              quality=90)
  return b.getvalue()


def _make_dataset(root, n):
  rng = np.random.default_rng(0)
  images = os.path.join(root, "images")
  os.makedirs(images)
  cats = [{"id": i + 1, "name": f"class{i:02d}"} for i in range(80)]
  jsons = {}
  for split, count in (("train", n), ("test", max(8, n // 10))):
    imgs, anns = [], []
    for k in range(count):
      img_id = len(jsons.get("train", {}).get("images", [])) + k + 1
      name = f"{split}_{img_id:06d}.jpg"
      with open(os.path.join(images, name), "wb") as f:
        f.write(_photo_like(rng))
      imgs.append({"id": img_id, "file_name": name})
      for c in rng.choice(80, 3, replace=False):
        anns.append({"id": len(anns) + 1, "image_id": img_id,
                     "category_id": int(c) + 1, "iscrowd": 0})
    jsons[split] = {"images": imgs, "annotations": anns, "categories": cats}
  paths = {}
  for split, d in jsons.items():
    paths[split] = os.path.join(root, f"{split}.json")
    with open(paths[split], "w") as f:
      json.dump(d, f)
  return paths, images


def _storage(text: str) -> str:
  """argparse check of one ``--storages`` entry: original, N or Nsquash."""
  size = text[:-len("squash")] if text.endswith("squash") else text
  if text != "original" and not (size.isdigit() and int(size) >= 1):
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected original, N or Nsquash (N >= 1 pixels)")
  return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=positive_int, default=300)
  p.add_argument("--batch", type=positive_int, default=64,
                 help="the reader's batch (the assumed GPU step stays at "
                      "batch 64)")
  p.add_argument("--size", type=positive_int, default=224)
  p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
  p.add_argument("--assumed_step_ms", type=float, default=45.0)
  p.add_argument("--storages", default="original,256,224squash")
  args = p.parse_args(argv)
  if not args.assumed_step_ms > 0:
    p.error(f"--assumed_step_ms must be > 0, got {args.assumed_step_ms}")
  try:
    storages = [_storage(t.strip()) for t in args.storages.split(",")
                if t.strip()]
  except argparse.ArgumentTypeError as e:
    p.error(f"--storages {e}")
  if not storages:
    p.error("--storages names no storage")
  for storage in storages:
    # The prepared reader refuses to upsample a stored size (prepared.py):
    # found here, not after the dataset is made and prepared.
    stored = storage.replace("squash", "")
    if stored != "original" and int(stored) < args.size:
      p.error(f"--storages {storage!r} stores {stored} px images; --size "
              f"{args.size} would upsample them: give storages of at least "
              f"{args.size} px (or original), or a smaller --size")

  import ml_collections  # pylint: disable=g-import-not-at-top
  from rebll_jax import prepare  # pylint: disable=g-import-not-at-top
  from rebll_jax.data import prepared  # pylint: disable=g-import-not-at-top

  out = {"cpu_count": os.cpu_count(), "image_size": args.size,
         "batch": args.batch}
  out["storages"] = {}
  with tempfile.TemporaryDirectory() as tmp:
    paths, images = _make_dataset(tmp, args.images)
    src_bytes = sum(os.path.getsize(os.path.join(images, f))
                    for f in os.listdir(images))
    n_all = len(os.listdir(images))
    for storage in storages:
      extra = []
      if storage != "original":
        extra = ["--store_size", storage.replace("squash", "")]
        extra += ["--squash"] if storage.endswith("squash") else []
      t = time.time()
      s = prepare.prepare(prepare.build_parser().parse_args(
          ["coco_format", "--train_json", paths["train"], "--test_json",
           paths["test"], "--images", images, "--name", "bench",
           "--data_dir", os.path.join(tmp, f"out_{storage}"),
           "--workers", "1"] + extra))
      dt = time.time() - t
      row = {"prepare": {
          "images": n_all,
          "seconds_per_1000_images": round(dt / n_all * 1e3, 2),
          "output_mb_per_1000_images": round(s["bytes"] / n_all * 1e3 / 2**20,
                                             1),
          "input_mb_per_1000_images": round(src_bytes / n_all * 1e3 / 2**20,
                                            1),
          "workers": 1}}
      decode = {}
      for workers in sorted({1, args.workers}):
        cfg = ml_collections.ConfigDict(dict(
            data_dir=s["path"], image_size=args.size, num_workers=workers))
        src = prepared.build_prepared(cfg, "coco_format")
        n = len(src.train)
        src.train.read_images(np.arange(min(8, n)))  # warm the pool
        rng = np.random.default_rng(1)
        batches = [rng.integers(0, n, args.batch) for _ in range(
            max(2, (3 * n) // args.batch // 2))]
        t, c = time.time(), time.process_time()
        for b in batches:
          src.train.read_images(b)
        rate = len(batches) * args.batch / (time.time() - t)
        decode[f"workers_{workers}"] = round(rate, 1)
        # Per CPU-second of this process (all its threads): the per-core
        # rate that a loaded, shared machine distorts least.
        decode[f"workers_{workers}_per_cpu_s"] = round(
            len(batches) * args.batch / (time.process_time() - c), 1)
      row["decode_resize_images_per_s"] = decode
      out["storages"][storage] = row

  import jax  # pylint: disable=g-import-not-at-top
  from rebll_jax import config_base  # pylint: disable=g-import-not-at-top
  from rebll_jax.data import augment  # pylint: disable=g-import-not-at-top
  cfg = config_base.base_config().augment
  f = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
  x = np.random.default_rng(2).integers(
      0, 256, (args.batch, args.size, args.size, 3), np.uint8)
  x = jax.device_put(x)
  t = time.time()
  f(jax.random.key(0), x).block_until_ready()
  compile_s = time.time() - t
  reps = 3
  t = time.time()
  for i in range(reps):
    f(jax.random.key(i + 1), x).block_until_ready()
  aug_rate = reps * args.batch / (time.time() - t)
  out["augment_jit_cpu"] = {"images_per_s": round(aug_rate, 1),
                            "compile_s": round(compile_s, 1),
                            "backend": jax.default_backend(),
                            "note": "XLA:CPU on all host cores; runs on the "
                                    "accelerator inside the train step"}

  out["comparison"] = comparison(args.assumed_step_ms, out["storages"])
  print(json.dumps(out, indent=1))


# The batch of the assumed GPU step (--assumed_step_ms). --batch sets only
# the reader's batch here: the GPU's appetite does not depend on it.
ASSUMED_BATCH = 64


def comparison(assumed_step_ms: float, storages: dict) -> dict:
  """The rate one GPU consumes at batch ASSUMED_BATCH (an assumed step
  time) and the cores of decode + resize that keep up, per storage."""
  need = ASSUMED_BATCH / (assumed_step_ms / 1e3)
  return {
      f"assumed_tresnet_m_step_ms_at_batch_{ASSUMED_BATCH}": assumed_step_ms,
      "assumed": True,
      "gpu_consumes_images_per_s": round(need, 1),
      "cores_needed_for_decode": {
          k: round(need / v["decode_resize_images_per_s"][
              "workers_1_per_cpu_s"], 1)
          for k, v in storages.items()},
      "decode_resize_images_per_cpu_s": {
          k: v["decode_resize_images_per_s"]["workers_1_per_cpu_s"]
          for k, v in storages.items()},
  }


if __name__ == "__main__":
  main()
