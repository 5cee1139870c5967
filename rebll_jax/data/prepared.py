"""Read prepared TFDS datasets (array_record) as ``Source``s, without TF.

Sources registered in ``rebll_jax.data.SOURCES``:

- ``voc2007``, ``coco2014``, ``coco_format``: written by
  ``python -m rebll_jax.prepare``. ``config.data.data_dir`` is the folder
  given to ``prepare --data_dir`` or the dataset's own version folder
  (``.../rebll_coco_format/NAME/1.0.0``). Labels and ids come from the
  dataset's ``metadata.json`` (no image is read to load them), checked
  field by field (``read_metadata``): a damaged file is one line, never a
  traceback or a wrong label.
- ``tfds_voc2007``: a standard TFDS ``voc/2007`` copy in array_record form
  (``tfds build voc/2007 --file_format=array_record``). Train = its
  ``train`` + ``validation`` splits (= VOC trainval), test = ``test``;
  labels from its ``labels_no_difficult`` field (read once at start).

Images are read through ``tfds`` data sources (``ArrayRecordDataSource``,
random access by record index) with image decoding skipped, then decoded and
resized to ``image_size`` x ``image_size`` by PIL in a thread pool of
``config.data.num_workers`` threads: JPEGs are decoded at the smallest DCT
scale that still covers the target size (``Image.draft``), converted to RGB
and resized with bilinear (antialiased) filtering, ignoring the aspect ratio
(the field's ``Resize((224, 224))``). ``read_images`` is deterministic and
thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import logging
import os
import threading

import numpy as np

from rebll_jax.data import voc
from rebll_jax.errors import UserError
from rebll_jax.data.base import Source, Split

PREPARED = {"voc2007": "rebll_voc2007", "coco2014": "rebll_coco2014",
            "coco_format": "rebll_coco_format"}


def decode_resize(raw: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(raw)) as im:
    im.draft("RGB", (size, size))
    im = im.convert("RGB")
    if im.size != (size, size):
      im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _complete(d: str) -> bool:
  return (os.path.isfile(os.path.join(d, "dataset_info.json")) and
          os.path.isfile(os.path.join(d, "features.json")))


def find_dataset_dir(data_dir: str, builder_name: str, hint: str) -> str:
  """The finished dataset folder under ``data_dir`` (or ``data_dir`` itself).

  Raises UserError naming what is missing; an ``incomplete.*`` folder left
  by an interrupted prepare is never used.
  """
  if not data_dir:
    raise UserError(f"config.data.data_dir is empty: {hint}")
  if not os.path.isdir(data_dir):
    what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
    raise UserError(f"config.data.data_dir {data_dir} {what}: {hint}")
  if _complete(data_dir):
    return data_dir
  base = os.path.join(data_dir, builder_name)
  found = sorted(d for d in glob.glob(os.path.join(base, "**"), recursive=True)
                 if os.path.isdir(d) and _complete(d)
                 and "incomplete." not in d)
  if len(found) == 1:
    return found[0]
  if len(found) > 1:
    raise UserError(f"several prepared datasets under {base}: {found}; point "
                    "config.data.data_dir at one of them")
  if glob.glob(os.path.join(base, "**", "incomplete.*"), recursive=True):
    raise UserError(f"{base} holds only a half-written dataset (an "
                    f"interrupted prepare): {hint}")
  raise UserError(f"no prepared dataset {builder_name} in {data_dir}: {hint}")


class _Reader:
  """Random-access image reader over one split's TFDS data source(s)."""

  def __init__(self, builder, splits, size, pool):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    skip = {"image": tfds.decode.SkipDecoding()}
    self._sources = [builder.as_data_source(split=s, decoders=skip)
                     for s in splits]
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])
    self._size = size
    self._pool = pool
    self._lock = threading.Lock()

  def __len__(self):
    return int(self._offsets[-1])

  def records(self, indices) -> list:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"indices out of range [0, {len(self)})")
    which = np.searchsorted(self._offsets, indices, side="right") - 1
    out = [None] * len(indices)
    with self._lock:
      for s in np.unique(which):
        pos = np.flatnonzero(which == s)
        local = (indices[pos] - self._offsets[s]).tolist()
        recs = self._sources[s].__getitems__(local)
        for p, r in zip(pos, recs):
          out[p] = r
    return out

  def read_images(self, indices) -> np.ndarray:
    recs = self.records(indices)
    raws = [r["image"] for r in recs]
    size = self._size
    imgs = list(self._pool().map(lambda b: decode_resize(b, size), raws))
    if not imgs:
      return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(imgs)


class _LazyPool:
  """A thread pool made on first use (so building a Source stays cheap)."""

  def __init__(self, n):
    self._n = max(1, int(n))
    self._pool = None
    self._lock = threading.Lock()

  def __call__(self):
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._n, thread_name_prefix="decode")
      return self._pool


def _fail_meta(path: str, why: str):
  raise UserError(f"{os.path.join(path, 'metadata.json')} is unreadable "
                  f"({why}): prepare the dataset again with `python -m "
                  "rebll_jax.prepare ... --overwrite`")


def _int_list(value) -> bool:
  return isinstance(value, list) and all(
      isinstance(v, int) and not isinstance(v, bool) for v in value)


def read_metadata(path: str) -> dict:
  """``path/metadata.json`` of a prepared dataset, checked (UserError).

  Everything the reader relies on is checked: the class names, and per
  split the ids (strictly increasing, as the records are written), the
  positive classes, and, when present, the crowd-only classes and file
  names (older datasets lack them: no crowd-only classes, stems from ids).
  """
  try:
    with open(os.path.join(path, "metadata.json"), "rb") as f:
      meta = json.loads(f.read())
  except OSError as e:
    _fail_meta(path, e.strerror or str(e))
  except (ValueError, UnicodeDecodeError) as e:
    _fail_meta(path, f"not JSON: {' '.join(str(e).split())}")
  if not isinstance(meta, dict):
    _fail_meta(path, "the top level is not an object")
  names = meta.get("class_names")
  if (not isinstance(names, list) or not names or
      not all(isinstance(n, str) for n in names) or
      len(set(names)) != len(names)):
    _fail_meta(path, "class_names is not a list of distinct names")
  splits = meta.get("splits")
  if not isinstance(splits, dict):
    _fail_meta(path, "no splits")
  for split in ("train", "test"):
    s = splits.get(split)
    if not isinstance(s, dict) or not _int_list(s.get("image_ids")):
      _fail_meta(path, f"splits.{split}.image_ids is not a list of integers")
    ids = s["image_ids"]
    if any(b <= a for a, b in zip(ids, ids[1:])):
      _fail_meta(path, f"splits.{split}.image_ids is not increasing")
    for key in ("positives", "crowd_positives"):
      if key == "crowd_positives" and key not in s:
        continue
      rows = s.get(key)
      if (not isinstance(rows, list) or len(rows) != len(ids) or
          not all(_int_list(r) and all(0 <= c < len(names) for c in r)
                  for r in rows)):
        _fail_meta(path, f"splits.{split}.{key} is not one list of class "
                   f"indices in [0, {len(names)}) per image")
    if "file_names" in s and (
        not isinstance(s["file_names"], list) or
        len(s["file_names"]) != len(ids) or
        not all(isinstance(n, str) for n in s["file_names"])):
      _fail_meta(path, f"splits.{split}.file_names is not one name per "
                 "image")
  return meta


def _multi_hot(rows, num_classes) -> np.ndarray:
  y = np.zeros((len(rows), num_classes), np.uint8)
  for i, pos in enumerate(rows):
    y[i, pos] = 1
  return y


def _dataset_ids(kind, s, ids) -> list:
  """The dataset's own ids: VOC file stems, otherwise the integer ids."""
  if kind != "voc2007":
    return [int(i) for i in ids]
  if "file_names" in s:
    return [os.path.splitext(os.path.basename(f))[0] for f in s["file_names"]]
  return [f"{int(i):06d}" for i in ids]  # VOC 2007's stems: six digits


def check_shards(path: str, split: str):
  """UserError unless every array_record shard of ``split`` is in ``path``
  (a file lost after prepare finished: the reader would fail mid-run)."""
  names = glob.glob(os.path.join(path, f"*-{split}.array_record-*-of-*"))
  if not names:
    raise UserError(f"{path}: the {split} split has no array_record files: "
                    "re-prepare it (prepare ... --overwrite)")
  total = int(names[0].rsplit("-of-", 1)[1])
  have = {int(n.rsplit("-of-", 1)[0].rsplit("-", 1)[1]) for n in names}
  missing = sorted(set(range(total)) - have)
  if missing:
    raise UserError(f"{path}: {len(missing)} of the {total} {split} shard "
                    f"files are missing (shard {missing[0]:05d} first): "
                    "re-prepare it (prepare ... --overwrite)")


def build_prepared(cfg, kind: str) -> Source:
  """A Source over a dataset written by ``python -m rebll_jax.prepare``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)  # "OpenCV not installed"
  hint = (f"prepare it with `python -m rebll_jax.prepare {kind} ... "
          f"--data_dir DIR` and pass --config.data.data_dir=DIR")
  path = find_dataset_dir(cfg.data_dir, PREPARED[kind], hint)
  meta = read_metadata(path)
  if meta.get("dataset") != kind:
    raise UserError(f"{path} holds {meta.get('dataset')!r}, not {kind!r}")
  names = list(meta["class_names"])
  stored = int(meta.get("store_size", 0) or 0)
  if stored and int(cfg.image_size) > stored:
    raise UserError(f"{path} stores images resized to {stored} px (prepare "
                    f"--store_size); config.data.image_size "
                    f"{cfg.image_size} would upsample them: re-prepare with "
                    f"--store_size >= {cfg.image_size}")
  builder = tfds.builder_from_directory(path)
  pool = _LazyPool(cfg.num_workers)
  splits = {}
  for split in ("train", "test"):
    s = meta["splits"][split]
    ids = np.asarray(s["image_ids"], np.int64)
    check_shards(path, split)
    reader = _Reader(builder, [split], int(cfg.image_size), pool)
    if len(reader) != len(ids):
      raise UserError(f"{path}: {split} has {len(reader)} records but its "
                      f"metadata lists {len(ids)}: re-prepare it")
    if len(ids):  # records are in metadata order: spot-check both ends
      first, last = reader.records([0, len(ids) - 1])
      if (int(first["image_id"]), int(last["image_id"])) != (ids[0], ids[-1]):
        raise UserError(f"{path}: {split} records do not match metadata")
    splits[split] = Split(
        labels=_multi_hot(s["positives"], len(names)), image_ids=ids,
        read_images=reader.read_images,
        crowd_labels=_multi_hot(s.get("crowd_positives", [[]] * len(ids)),
                                len(names)),
        dataset_ids=_dataset_ids(kind, s, ids))
  info = {"path": path, "num_skipped": meta.get("num_skipped", 0),
          **{k: v for k, v in meta.items()
             if k not in ("splits", "class_names")}}
  return Source(name=kind, class_names=names, train=splits["train"],
                test=splits["test"], info=info)


def build_tfds_voc2007(cfg) -> Source:
  """A Source over a standard TFDS ``voc/2007`` copy (array_record form)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  hint = ("build it with `tfds build voc/2007 --file_format=array_record`, "
          "or prepare the archives with `python -m rebll_jax.prepare "
          "voc2007` and use data.source=voc2007")
  path = find_dataset_dir(cfg.data_dir, os.path.join("voc", "2007"), hint)
  builder = tfds.builder_from_directory(path)
  fmt = str(builder.info.file_format.value if builder.info.file_format
            else "tfrecord")
  if "array_record" not in fmt:
    raise UserError(f"{path} is in {fmt} form, which needs TensorFlow to "
                    f"read; {hint}")
  feat = builder.info.features["labels_no_difficult"].feature
  order = [feat.names.index(c) for c in voc.CLASSES]
  pool = _LazyPool(cfg.num_workers)
  splits = {}
  for name, parts in (("train", ["train", "validation"]), ("test", ["test"])):
    reader = _Reader(builder, parts, int(cfg.image_size), pool)
    n = len(reader)
    ids = np.zeros(n, np.int64)
    stems = [""] * n
    y = np.zeros((n, len(voc.CLASSES)), np.uint8)
    for start in range(0, n, 256):
      idx = np.arange(start, min(n, start + 256))
      for i, r in zip(idx, reader.records(idx)):
        fname = r["image/filename"]
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        stems[i] = os.path.splitext(os.path.basename(fname))[0]
        ids[i] = int(stems[i])
        raw = np.asarray(r["labels_no_difficult"], np.int64).reshape(-1)
        y[i, [order.index(c) for c in raw]] = 1
    splits[name] = Split(labels=y, image_ids=ids,
                         read_images=reader.read_images, dataset_ids=stems)
  return Source(name="tfds_voc2007", class_names=list(voc.CLASSES),
                train=splits["train"], test=splits["test"],
                info={"path": path})
