"""Turn VOC 2007 / COCO 2014 / any COCO-format data into a TFDS dataset.

  python -m rebll_jax.prepare voc2007  --src ~/archives/voc  --data_dir ~/rebll_data
  python -m rebll_jax.prepare coco2014 --src ~/archives/coco --data_dir ~/rebll_data
  python -m rebll_jax.prepare coco_format --name mydata --train_json train.json \\
      --test_json test.json --images ~/mydata/images --data_dir ~/rebll_data

The output is a standard TFDS dataset in array_record form (written by a
``tfds.core.GeneratorBasedBuilder``; no TensorFlow is needed or imported) at
``DATA_DIR/rebll_voc2007/1.0.0``, ``DATA_DIR/rebll_coco2014/1.0.0`` or
``DATA_DIR/rebll_coco_format/NAME/1.0.0``. Each record holds the original
encoded image bytes, ``image_id``, ``file_name`` and ``labels`` (the full
multi-hot vector in the protocol's class order). Records are in increasing
image id order (shuffling disabled). ``metadata.json`` holds the class names,
the ids, file names, positive classes and crowd-only classes (COCO: classes
present only as crowd boxes) of every record (so a reader loads all labels
without touching the images), the counts of skipped images and, over the
images written (not the skipped ones), of images without a label,
crowd-only images, crowd annotations and difficult objects, a fingerprint
of the inputs (archives and annotation files by path, size and mtime;
image folders by path) and a ``source_digest`` of the loose files read (the
images of a folder, VOC's extracted XMLs: names, sizes and mtimes; nothing
for archives).

Atomic: TFDS writes into ``incomplete.*`` and renames the folder at the end,
so a half-written output never looks prepared. Idempotent: rerunning with the
same inputs finds the finished dataset and returns at once; other inputs, or
an image file added, removed or replaced since, are refused unless
``--overwrite``. A dataset prepared before ``source_digest`` was recorded is
taken as prepared with a warning line (nothing to compare against). Clean:
whatever TFDS puts in the temp dir goes in a private folder removed at the
end (success, error or Ctrl-C).
Refused (one line naming the first bad entry, exit 2): malformed annotation
files (``coco.load_json``, ``voc.read_lists``), an archive that cannot
be opened, an output whose ``metadata.json`` is unreadable (unless
``--overwrite``), train and test splits that share an image file (same
path or link; ``--train_json`` and ``--test_json`` naming the same file
above all; for VOC the same stem, whatever store each split is read
from), one split naming the same loose file twice (by link),
``--squash`` or a non-default ``--store_quality`` without
``--store_size``, a split none of whose images could be read (after the
skip warnings; nothing is written). Skipped (a warning after the progress
bars, counted and listed in ``metadata.json``): images that are missing,
that PIL cannot decode, or whose pixels are 16-bit / 32-bit / float (PIL
would clip them converting to RGB). A full disk ends with one line and
exit 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from rebll_jax import preemption
from rebll_jax.data import coco, prepare_inputs, prepared, voc
from rebll_jax.errors import UserError

FORMAT_VERSION = 1
BUILDER_NAMES = prepared.PREPARED  # the one dataset table
_CHUNK = 64  # images read, then checked in parallel, per step
_MAX_WARNINGS = 20  # skip warnings printed; metadata.json lists them all
_DEFAULT_QUALITY = 90  # --store_quality


# PIL modes of more than 8 bits a channel: convert("RGB") clips them (a
# 16-bit PNG came out near-white) instead of scaling, so such an image is
# skipped with its reason like an unreadable one.
_WIDE_MODES = ("I", "F")


def _check_image(raw: bytes) -> str | None:
  """None when PIL decodes ``raw`` (at reduced scale: fast), else the reason."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(raw)) as im:
      if im.mode.split(";")[0] in _WIDE_MODES:
        return (f"{im.mode!r} pixels (16-bit, 32-bit or float): reading "
                "them as RGB would clip them; save it with 8 bits a channel")
      im.draft("RGB", (64, 64))
      im.load()
      if im.width < 1 or im.height < 1:
        return "empty image"
    return None
  except Image.UnidentifiedImageError:
    return "not an image format PIL can read"
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"


def encode_stored(raw: bytes, store_size: int, squash: bool = False,
                  quality: int = 90) -> bytes:
  """The bytes ``prepare --store_size`` keeps for one encoded image.

  The shorter side resized to ``store_size`` (aspect kept; an image already
  that small is kept as it is), or exactly ``store_size`` x ``store_size``
  with ``squash`` (as the field's ``Resize((224, 224))`` squashes), then
  re-encoded as JPEG: the reader's decode + resize per step gets cheaper.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(raw)) as im:
    w, h = im.size
    if squash:
      size = (store_size, store_size)
    else:
      if min(w, h) <= store_size:
        return raw
      scale = store_size / min(w, h)
      size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im.draft("RGB", size)  # DCT-domain downscale first (never below size)
    im = im.convert("RGB")
    if im.size != size:
      im = im.resize(size, Image.BILINEAR)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _builder_class():
  """The TFDS builder (defined lazily: importing tfds takes a second)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class _Prepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builder whose examples come from a plan computed before it runs."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS locates a builder's source file to find checksums; for a class in
    # a package that path needs the optional ``importlib_resources``. We
    # download nothing, so there is nothing to look up.
    code_path = None
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, plan, **kwargs):
      self._plan = plan
      super().__init__(**kwargs)

    def _info(self):
      c = len(self._plan["class_names"])
      return tfds.core.DatasetInfo(
          builder=self,
          description=self._plan["description"],
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "image_id": np.int64,
              "file_name": tfds.features.Text(),
              "labels": tfds.features.Tensor(shape=(c,), dtype=np.uint8),
          }),
          metadata=tfds.core.MetadataDict(),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split):
      items, store = self._plan["splits"][split]
      workers = self._plan["workers"]
      kept_ids, kept_pos, kept_crowd, kept_files, skipped = [], [], [], [], []
      first_why = None
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), _CHUNK):
          chunk = items[start:start + _CHUNK]
          raws = []
          for _, path, _, _ in chunk:
            try:
              raws.append(store.read(path))
            except (KeyError, OSError) as e:
              raws.append(e)
          reasons = list(pool.map(
              lambda r: (f"missing: {r}" if isinstance(r, Exception)
                         else _check_image(r)), raws))
          stored = self._plan.get("store")
          if stored:  # --store_size: keep resized JPEGs
            raws = list(pool.map(
                lambda rw: rw[0] if rw[1] is not None else encode_stored(
                    rw[0], *stored), zip(raws, reasons)))
          for (img_id, path, y, crowd), raw, why in zip(chunk, raws,
                                                        reasons):
            if why is not None:
              # Printed after the progress bars (prepare()), never inside.
              self._plan["warnings"].append(
                  f"warning: skipped unreadable image {store.where}:{path} "
                  f"({why})")
              skipped.append(path)
              first_why = first_why or f"{store.where}:{path}: {why}"
              continue
            kept_ids.append(img_id)
            kept_pos.append(np.flatnonzero(y).tolist())
            kept_crowd.append(np.flatnonzero(crowd).tolist())
            kept_files.append(path)
            yield img_id, {"image": raw, "image_id": img_id,
                           "file_name": path, "labels": y}
      if not kept_ids:
        # TFDS refused the empty split with an AssertionError traceback.
        # prepare() prints the skip warnings, then this line.
        raise UserError(
            f"the {split} split has no readable image: {len(skipped)} of "
            f"{len(items)} skipped (e.g. {first_why}); nothing was written")
      _count_kept(self._plan, split, kept_ids, kept_pos, kept_crowd)
      md = self.info.metadata
      md.setdefault("splits", {})[split] = {
          "image_ids": kept_ids, "positives": kept_pos,
          "crowd_positives": kept_crowd, "file_names": kept_files,
          "num_skipped": len(skipped), "skipped": skipped}
      md["num_skipped"] = sum(v["num_skipped"]
                              for v in md["splits"].values())
      for k, v in self._plan["meta"].items():
        md[k] = v

  return _Prepared


def _count_kept(plan: dict, split: str, ids: list, pos: list, crowd: list):
  """The split's counts in ``plan["meta"]`` over the images written (until
  2026-12-07 they counted the skipped ones too): per-image counts summed,
  images without a label, crowd-only images."""
  meta = plan["meta"]
  kept = set(ids)
  for name, per_image in plan["per_image"][split].items():
    meta[f"{split}_{name}"] = int(sum(n for i, n in per_image.items()
                                      if i in kept))
  meta["num_without_label"][split] = sum(not p for p in pos)
  # Images whose every class is present only as crowd boxes.
  meta["num_crowd_only"][split] = sum(not p and bool(c)
                                      for p, c in zip(pos, crowd))


def _out_name(kind: str, name: str) -> str:
  if kind != "coco_format":
    return BUILDER_NAMES[kind]
  return f"{BUILDER_NAMES[kind]}/{name}"


def output_dir(kind: str, data_dir: str, name: str = "") -> str:
  """Where ``prepare`` writes (and the readers look)."""
  return os.path.join(data_dir, _out_name(kind, name), "1.0.0")


def _plan(args, format_read=None, voc_read=None) -> tuple[dict, list]:
  """Read the annotations: class names and per-split items + stores.

  ``format_read``: coco_format's (stores, checked annotations);
  ``voc_read``: voc2007's (stores, checked image lists); each read once by
  ``prepare`` before it decides whether the output is up to date. The
  counts of ``metadata.json`` are filled in as the images are written.
  """
  kind = args.dataset
  per_image = {}  # {split: {count name: {image id: n}}}
  if kind == "voc2007":
    stores, lists = voc_read or prepare_inputs.read_voc(args.src)
    names = list(voc.CLASSES)
    splits = {}
    for split, store in stores.items():
      items, per_image[split] = voc.split_items(store, split, lists[split])
      splits[split] = (items, store)
    desc = "PASCAL VOC 2007 (trainval -> train, test -> test), multi-label."
  else:
    if kind == "coco2014":
      stores, anns = coco.locate_2014(args.src)
      jsons = {s: coco.load_json(raw, where)
               for s, (raw, where) in anns.items()}
      desc = "MS-COCO 2014 (train2014 -> train, val2014 -> test), multi-label."
    else:
      stores, jsons = format_read or coco.read_format(
          args.train_json, args.test_json, args.images)
      desc = f"COCO-format dataset {args.name!r}, multi-label."
    names = coco.class_names(jsons["train"])
    test_names = coco.class_names(jsons["test"])
    if test_names != names:
      extra = sorted(set(test_names) ^ set(names))
      raise UserError(f"train and test annotation files have different "
                      f"categories (e.g. {extra[:5]})")
    splits = {}
    for split, d in jsons.items():
      items, per_image[split] = coco.labels_from_json(d, names)
      splits[split] = (items, stores[split])
  meta = {"format_version": FORMAT_VERSION, "dataset": kind,
          "class_names": names, "num_without_label": {},
          "num_crowd_only": {}}
  return {"class_names": names, "splits": splits, "description": desc,
          "meta": meta, "per_image": per_image, "warnings": []}, names


# Options that only some datasets read: given for another, they would be
# silently ignored.
_OPTIONS_OF = {"src": ("voc2007", "coco2014"), "train_json": ("coco_format",),
               "test_json": ("coco_format",), "images": ("coco_format",),
               "name": ("coco_format",)}


def prepare(args) -> dict:
  """Run one prepare command; returns a summary dict (also printed)."""
  t0 = time.time()
  unread = [k for k, kinds in _OPTIONS_OF.items()
            if getattr(args, k) is not None and args.dataset not in kinds]
  if unread:
    owners = sorted({d for k in unread for d in _OPTIONS_OF[k]})
    raise UserError(f"{args.dataset} does not read "
                    f"{', '.join('--' + k for k in unread)} (for "
                    f"{' and '.join(owners)}: see --help); drop them")
  if args.dataset == "coco_format":
    if args.name is None:
      args.name = "custom"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", args.name or ""):
      raise UserError(f"--name {args.name!r}: use lower-case letters, digits "
                      "and '_', starting with a letter")
    if (args.train_json and args.test_json and os.path.isfile(args.train_json)
        and os.path.isfile(args.test_json)
        and os.path.samefile(args.train_json, args.test_json)):
      raise UserError(f"--train_json and --test_json are the same file "
                      f"({args.test_json}): the test split would be the "
                      "training images")
  elif args.src is None:
    raise UserError(f"{args.dataset} needs --src")
  if not args.data_dir:
    raise UserError("--data_dir is required")
  fp = prepare_inputs.fingerprint(args)
  format_read = (coco.read_format(args.train_json, args.test_json,
                                  args.images)
                 if args.dataset == "coco_format" else None)
  # VOC's lists are checked before any loose file is looked at (an entry
  # such as "0\x001" made os.stat fail with a traceback).
  voc_read = (prepare_inputs.read_voc(args.src)
              if args.dataset == "voc2007" else None)
  loose = prepare_inputs.loose_files(args, format_read)
  prepare_inputs.refuse_shared_images(args, loose, voc_read)
  source = prepare_inputs.source_digest(loose)
  store = None
  if args.store_size:
    if args.store_size < 1:
      raise UserError(f"--store_size {args.store_size}: give a positive "
                      "side in pixels (0 keeps the original bytes)")
    store = (args.store_size, args.squash, args.store_quality)
    fp = fp + [f"store_size={store}"]  # another storage, another dataset
  out = output_dir(args.dataset, args.data_dir, args.name)
  _recover_moved_aside(out)
  info_json = os.path.join(out, "dataset_info.json")
  if os.path.isfile(info_json):
    try:
      old = prepared.read_metadata(out)
      for split in ("train", "test"):  # a lost shard is no finished output
        prepared.check_shards(out, split)
    except UserError as e:
      if not args.overwrite:
        raise UserError(f"{e}; pass --overwrite to rebuild it") from None
      old = {}
    if old.get("fingerprint") == fp and not args.overwrite:
      prepare_inputs.check_same_source(old, source, out)
      summary = _summary(out, old, time.time() - t0, done_before=True)
      print(f"already prepared at {out}; nothing to do", file=sys.stderr)
      return summary
    if not args.overwrite:
      raise UserError(f"{out} holds a dataset prepared from other inputs; "
                      "remove it or pass --overwrite")
  plan, _ = _plan(args, format_read, voc_read)
  plan["meta"]["fingerprint"] = fp
  plan["meta"]["source_digest"] = source
  plan["workers"] = max(1, args.workers)
  plan["store"] = store
  if store:
    plan["meta"].update(store_size=store[0], store_squash=store[1])
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if args.dataset == "coco_format":
    kwargs["config"] = tfds.core.BuilderConfig(name=args.name)
  cls = _builder_class()
  cls.name = BUILDER_NAMES[args.dataset]
  created = _missing_folders(os.path.dirname(out))
  os.makedirs(args.data_dir, exist_ok=True)
  with _scratch_tempdir() as scratch:
    builder = cls(plan=plan, data_dir=args.data_dir,
                  file_format="array_record", **kwargs)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    if args.overwrite and os.path.isdir(out):
      # Build next to the old one, then swap: never a moment without either.
      old_dir = out + f".old{os.getpid()}"
      os.rename(out, old_dir)
    else:
      old_dir = None
    try:
      builder.download_and_prepare(
          download_dir=os.path.join(scratch, "downloads"),
          download_config=tfds.download.DownloadConfig(
              download_mode=mode,
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except BaseException as e:
      if old_dir is not None and not os.path.isdir(out):
        os.rename(old_dir, out)
        old_dir = None
      for folder in created:  # no empty DATA_DIR/rebll_x/NAME left behind
        with contextlib.suppress(OSError):
          os.rmdir(folder)
      if isinstance(e, UserError):  # a split with no readable image:
        _print_warnings(plan["warnings"], None)  # why, before the error
      raise
    finally:
      if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)
  _print_warnings(plan["warnings"], os.path.join(out, "metadata.json"))
  meta = prepared.read_metadata(out)
  return _summary(out, meta, time.time() - t0, done_before=False)


def _missing_folders(path: str) -> list:
  """``path`` and those of its parents that do not exist yet, deepest
  first (what a failed build removes again when they are empty)."""
  out = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    out.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return out


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _recover_moved_aside(out: str) -> None:
  """Cleans up after an ``--overwrite`` run killed mid-build (SIGKILL,
  power): it had moved the old output aside to ``OUT.old<pid>``, which no
  later run looked at. Where ``out`` is gone, the newest such copy is put
  back (it was a finished dataset); otherwise they are removed. Copies of a
  live process are its own and left alone."""
  parent, base = os.path.split(out)
  try:
    names = os.listdir(parent)
  except FileNotFoundError:
    return
  stale = []
  for name in names:
    match = re.fullmatch(re.escape(base) + r"\.old(\d+)", name)
    if match and not _pid_alive(int(match.group(1))):
      path = os.path.join(parent, name)
      stale.append((os.path.getmtime(path), path))
  for _, path in sorted(stale, reverse=True):
    if not os.path.exists(out):
      os.rename(path, out)
      print(f"put back {out} from {path}: an --overwrite run was killed "
            "before its new output was finished", file=sys.stderr)
    else:
      shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _scratch_tempdir():
  """A private temp folder, the process's default temp dir while TFDS runs.

  TFDS leaves a folder behind per builder (``DatasetInfo.
  initialize_from_bucket`` makes ``$TMPDIR/tmp*tfds`` and returns without
  removing it when the dataset is not on GCS). Whatever it, or the download
  folder, makes goes in here and is removed on success, error or Ctrl-C.
  """
  scratch = tempfile.mkdtemp(prefix="rebll_prepare_")
  saved = tempfile.tempdir
  tempfile.tempdir = scratch  # what mkdtemp() without dir= uses
  try:
    yield scratch
  finally:
    tempfile.tempdir = saved
    shutil.rmtree(scratch, ignore_errors=True)


def _print_warnings(warnings: list, where: str | None):
  """The skip warnings, after the progress bars (at most _MAX_WARNINGS);
  ``where`` lists them all (None: nothing was written)."""
  for line in warnings[:_MAX_WARNINGS]:
    print(line, file=sys.stderr)
  if len(warnings) > _MAX_WARNINGS:
    listed = f", all listed in {where}" if where else ""
    print(f"warning: ... and {len(warnings) - _MAX_WARNINGS} more skipped "
          f"images{listed}", file=sys.stderr)


def _summary(out, meta, seconds, done_before) -> dict:
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  n = {s: len(v["image_ids"]) for s, v in meta["splits"].items()}
  return {"path": out, "num_images": n, "num_skipped": meta["num_skipped"],
          "num_classes": len(meta["class_names"]), "bytes": size,
          "seconds": round(seconds, 3), "already_prepared": done_before}


CONFIG_FILES = {"voc2007": "configs/voc.py", "coco2014": "configs/coco.py",
                "coco_format": "configs/coco_format.py"}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m rebll_jax.prepare",
      description="Prepare VOC 2007, COCO 2014 or a COCO-format dataset as a "
      "TFDS (array_record) dataset for rebll_jax. No TensorFlow needed; "
      "nothing is downloaded: place the archives yourself.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="""inputs:
  voc2007      --src holds VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar
               (or their extracted VOCdevkit/VOC2007)
  coco2014     --src holds train2014.zip, val2014.zip and
               annotations_trainval2014.zip (or train2014/, val2014/ and
               annotations/instances_{train,val}2014.json)
  coco_format  --train_json A.json --test_json B.json --images DIR --name NAME
               (instances-style JSON; file_name relative to DIR)

output: DATA_DIR/rebll_voc2007/1.0.0, DATA_DIR/rebll_coco2014/1.0.0 or
DATA_DIR/rebll_coco_format/NAME/1.0.0; train with --config.data.data_dir=DATA_DIR""")
  p.add_argument("dataset", choices=sorted(BUILDER_NAMES))
  p.add_argument("--src", help="folder with the archives (voc2007, coco2014)")
  p.add_argument("--data_dir", required=True, help="output root folder")
  p.add_argument("--train_json", help="coco_format: train annotations")
  p.add_argument("--test_json", help="coco_format: test annotations")
  p.add_argument("--images", help="coco_format: image folder")
  p.add_argument("--name", default=None,
                 help="coco_format: dataset name (default: custom)")
  p.add_argument("--workers", type=_int_in(1),
                 default=min(8, os.cpu_count() or 1),
                 help="threads checking images (default: min(8, #cpus))")
  p.add_argument("--overwrite", action="store_true",
                 help="rebuild even if prepared from other inputs")
  p.add_argument("--store_size", type=_int_in(0), default=0,
                 help="store images resized: shorter side N px (0: keep the "
                      "original bytes); the reader then decodes less")
  p.add_argument("--squash", action="store_true",
                 help="with --store_size: store exactly N x N (aspect not "
                      "kept, as training resizes)")
  p.add_argument("--store_quality", type=_int_in(1, 100),
                 default=_DEFAULT_QUALITY,
                 help="with --store_size: JPEG quality of the stored images "
                      f"(default {_DEFAULT_QUALITY})")
  return p


def _int_in(low: int, high: int | None = None):
  """An argparse type: an integer in [low, high] (high: no bound if None)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
      bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
      raise argparse.ArgumentTypeError(f"{value} is not {bound}")
    return value
  return parse


def _one_line(error) -> str:
  return " ".join(str(error).split())


STOPPED = ("nothing half-written is taken as prepared; the same command "
           "prepares it again")


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.squash and not args.store_size:
    parser.error("--squash needs --store_size N (the side it squashes to)")
  if args.store_quality != _DEFAULT_QUALITY and not args.store_size:
    # Without --store_size the original bytes are kept: nothing re-encodes.
    parser.error("--store_quality needs --store_size N (only resized images "
                 "are re-encoded)")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    # (the temp folder and an --overwrite's old output are cleaned up)
    s, stopped = preemption.call_stoppable(lambda: prepare(args), STOPPED)
  except UserError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      print(f"error: no space left on device while preparing into "
            f"{args.data_dir}; free space and rerun (nothing half-written "
            "is taken as prepared)", file=sys.stderr)
      return 1
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
    return 2
  if stopped:
    return stopped
  print(json.dumps(s))
  data_dir = args.data_dir
  extra = (f" --config.data.data_dir={s['path']}" if args.dataset ==
           "coco_format" else f" --config.data.data_dir={data_dir}")
  print(f"train with: python -m rebll_jax.main "
        f"--config={CONFIG_FILES[args.dataset]}{extra} --workdir=WORKDIR",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
