"""PASCAL VOC 2007: locate the archives, read the labels (prepare side).

Class order is the standard VOC list (METHOD.md section 1). An image is
labelled with a class when it holds at least one object of that class that is
not marked ``difficult``. Image ids are the numeric file stems (``000005``
-> 5). ``trainval`` becomes the train split, ``test`` the test split. The
stem is an image's identity: ``read_lists`` refuses a list naming no image,
an entry that is not ASCII digits within int64, or a stem listed twice, and
``shared_stems`` finds a test list naming trainval images, whether each
split is read from its tar or from the extracted folder.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from rebll_jax.data.archives import DirStore, TarStore
from rebll_jax.errors import UserError

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
           "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
           "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

TARS = {"train": "VOCtrainval_06-Nov-2007.tar",
        "test": "VOCtest_06-Nov-2007.tar"}
LISTS = {"train": "ImageSets/Main/trainval.txt",
         "test": "ImageSets/Main/test.txt"}


def _extracted_root(src: str) -> str | None:
  for cand in (src, os.path.join(src, "VOC2007"),
               os.path.join(src, "VOCdevkit", "VOC2007")):
    if os.path.isdir(os.path.join(cand, "Annotations")):
      return cand
  return None


def locate(src: str) -> dict:
  """Split name -> store rooted at ``VOC2007/`` (tar preferred if both)."""
  if not os.path.isdir(src):
    raise UserError(f"--src {src} is not a folder")
  root = _extracted_root(src)
  stores = {}
  for split, tar in TARS.items():
    tar_path = os.path.join(src, tar)
    if os.path.isfile(tar_path):
      store = TarStore(tar_path, prefix="VOC2007/")
    elif root is not None and os.path.isfile(os.path.join(root, LISTS[split])):
      store = DirStore(root)
    else:
      raise UserError(
          f"missing {tar} in {os.path.abspath(src)} (or its extracted form "
          f"VOCdevkit/VOC2007/{LISTS[split]} there)")
    if not store.exists(LISTS[split]):
      raise UserError(f"{store.where} holds no {LISTS[split]}: not the VOC "
                      "2007 archive?")
    stores[split] = store
  return stores


def parse_annotation(xml_bytes: bytes, where: str) -> tuple[np.ndarray, int]:
  """Multi-hot over CLASSES from one annotation XML; also #difficult objects."""
  try:
    root = ET.fromstring(xml_bytes)
  except ET.ParseError as e:
    raise UserError(f"malformed annotation {where}: {e}") from None
  y = np.zeros(len(CLASSES), np.uint8)
  n_difficult = 0
  for obj in root.iter("object"):
    name = (obj.findtext("name") or "").strip()
    if name not in CLASSES:
      raise UserError(f"unknown VOC class {name!r} in {where}")
    if (obj.findtext("difficult") or "0").strip() == "1":
      n_difficult += 1
      continue
    y[CLASSES.index(name)] = 1
  return y, n_difficult


def read_lists(stores: dict) -> dict:
  """``{split: [stem, ...]}`` in list order, each entry checked (UserError
  naming the list and the entry's line)."""
  out = {}
  for split, store in stores.items():
    where = f"{store.where}:{LISTS[split]}"
    try:
      names = store.read(LISTS[split]).decode().split()
    except UnicodeDecodeError:
      raise UserError(f"{where} is not a text file of image names") from None
    if not names:  # TFDS then failed with an AssertionError traceback
      raise UserError(f"{where} lists no image: the {split} split would be "
                      "empty")
    seen = {}
    for line, stem in enumerate(names, 1):
      # isdigit alone takes "²" (which int() refuses); ids are int64.
      if not (stem.isascii() and stem.isdigit()) or int(stem) >= 2 ** 63:
        raise UserError(f"{where} entry {line} {stem!r} is not a VOC image "
                        "name (digits, e.g. 000005)")
      if int(stem) in seen:
        raise UserError(f"{where} lists image {stem} twice (entries "
                        f"{seen[int(stem)]} and {line})")
      seen[int(stem)] = line
    out[split] = names
  return out


def shared_stems(lists: dict) -> list:
  """The test list's stems that the trainval list names too (the stem is
  the image: the same picture whichever store each split comes from)."""
  train = set(lists["train"])
  return [stem for stem in lists["test"] if stem in train]


def split_items(store, split: str, stems: list) -> tuple[list, dict]:
  """[(image_id, image_path, labels uint8 [20], crowd uint8 [20])] by id.

  ``stems``: the split's list, checked by ``read_lists``. VOC has no crowd
  boxes: ``crowd`` is all zeros (the slot keeps one record layout for every
  dataset). The count is per image (``{"difficult_objects": {id: n}}``):
  prepare sums it over the images it keeps.
  """
  items = []
  n_difficult = {}
  for stem in stems:
    ann = f"Annotations/{stem}.xml"
    if not store.exists(ann):
      raise UserError(f"missing {ann} in {store.where}")
    y, d = parse_annotation(store.read(ann), f"{store.where}:{ann}")
    if d:
      n_difficult[int(stem)] = d
    items.append((int(stem), f"JPEGImages/{stem}.jpg", y,
                  np.zeros_like(y)))
  items.sort(key=lambda t: t[0])
  return items, {"difficult_objects": n_difficult}


def loose_files(src: str) -> dict:
  """``{split: (root, image files, annotation files)}`` of the splits read
  from the extracted folder (a tar's signature in the fingerprint covers its
  members): those its image list names. A list that is missing or not text
  is left to ``locate`` / ``split_items`` to refuse."""
  root = _extracted_root(src)
  out = {}
  for split, tar in TARS.items():
    listed = os.path.join(root or "", LISTS[split])
    if (root is None or os.path.isfile(os.path.join(src, tar)) or
        not os.path.isfile(listed)):
      continue
    with open(listed, "rb") as f:
      stems = f.read().decode("utf-8", "replace").split()
    out[split] = (root, [f"JPEGImages/{s}.jpg" for s in stems],
                  [f"Annotations/{s}.xml" for s in stems])
  return out


def fingerprint(src: str) -> list:
  from rebll_jax.data.archives import file_signature
  out = []
  for split, tar in TARS.items():
    p = os.path.join(src, tar)
    if os.path.isfile(p):
      out.append(file_signature(p))
  root = _extracted_root(src)
  if root is not None and len(out) < 2:
    for split in LISTS:
      p = os.path.join(root, LISTS[split])
      if os.path.isfile(p):
        out.append(file_signature(p))
    out.append(file_signature(os.path.join(root, "Annotations")))
  return out
