"""MS-COCO 2014 and any COCO instances-format data (prepare side).

Class order: the category *names* sorted alphabetically (METHOD.md section 1),
whatever their ids; COCO's sparse ids (1..90 with gaps) are mapped through the
names. An image is labelled with a category when it holds at least one
annotation of it with ``iscrowd`` 0. Image ids are the JSON ``id`` fields.
Annotations are read with pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np

from rebll_jax.data.archives import (DirStore, UserError, ZipStore,
                                     file_signature)

ZIPS = {"train": "train2014.zip", "test": "val2014.zip"}
FOLDERS = {"train": "train2014", "test": "val2014"}
ANN_ZIP = "annotations_trainval2014.zip"
ANN_FILES = {"train": "annotations/instances_train2014.json",
             "test": "annotations/instances_val2014.json"}


def load_json(raw: bytes, where: str) -> dict:
  """Parse and check that ``raw`` is a COCO instances-format annotation file."""
  try:
    d = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{where} is not JSON: {e}") from None
  bad = f"{where} is not a COCO instances-format annotation file"
  if not isinstance(d, dict):
    raise UserError(f"{bad}: the top level is not an object")
  for key in ("images", "annotations", "categories"):
    if not isinstance(d.get(key), list):
      raise UserError(f"{bad}: no {key!r} list")
  for key, fields in (("images", ("id", "file_name")),
                      ("annotations", ("image_id", "category_id")),
                      ("categories", ("id", "name"))):
    for entry in d[key]:
      if not isinstance(entry, dict) or any(f not in entry for f in fields):
        raise UserError(f"{bad}: an entry of {key!r} lacks one of {fields}")
  for entry in d["images"]:
    if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
      raise UserError(f"{bad}: image id {entry['id']!r} is not an integer")
  names = [c["name"] for c in d["categories"]]
  if len(set(names)) != len(names):
    raise UserError(f"{where}: duplicate category names")
  if not names:
    raise UserError(f"{where}: no categories")
  return d


def class_names(d: dict) -> list[str]:
  return sorted(c["name"] for c in d["categories"])


def labels_from_json(d: dict, names: list[str], where: str
                     ) -> tuple[list, dict]:
  """[(image_id, file_name, labels uint8 [C])] sorted by id, plus counts."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  coco = COCO()
  coco.dataset = d
  with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
    coco.createIndex()
  col = {c["id"]: names.index(c["name"]) for c in d["categories"]
         if c["name"] in names}
  items = []
  n_crowd = 0
  for img_id in sorted(coco.getImgIds()):
    y = np.zeros(len(names), np.uint8)
    for a in coco.imgToAnns.get(img_id, []):
      if a["category_id"] not in col:
        raise UserError(f"{where}: annotation {a.get('id')} has unknown "
                        f"category_id {a['category_id']}")
      if a.get("iscrowd", 0):
        n_crowd += 1
        continue
      y[col[a["category_id"]]] = 1
    items.append((int(img_id), coco.imgs[img_id]["file_name"], y))
  return items, {"crowd_annotations": n_crowd}


# ----------------------------------------------------------------- COCO 2014
def locate_2014(src: str) -> tuple[dict, dict]:
  """(split -> image store, split -> (annotation bytes, where))."""
  if not os.path.isdir(src):
    raise UserError(f"--src {src} is not a folder")
  stores = {}
  for split in ("train", "test"):
    z = os.path.join(src, ZIPS[split])
    d = os.path.join(src, FOLDERS[split])
    if os.path.isfile(z):
      stores[split] = ZipStore(z, prefix=FOLDERS[split] + "/")
    elif os.path.isdir(d):
      stores[split] = DirStore(d)
    else:
      raise UserError(f"missing {ZIPS[split]} in {os.path.abspath(src)} (or "
                      f"its extracted folder {FOLDERS[split]}/ there)")
  anns = {}
  ann_zip = os.path.join(src, ANN_ZIP)
  zstore = ZipStore(ann_zip) if os.path.isfile(ann_zip) else None
  for split, rel in ANN_FILES.items():
    if zstore is not None and zstore.exists(rel):
      anns[split] = (zstore.read(rel), f"{ann_zip}:{rel}")
    elif os.path.isfile(os.path.join(src, rel)):
      anns[split] = (DirStore(src).read(rel), os.path.join(src, rel))
    elif zstore is not None:
      raise UserError(f"{ann_zip} holds no {rel}")
    else:
      raise UserError(f"missing {ANN_ZIP} in {os.path.abspath(src)} (or its "
                      f"extracted {rel} there)")
  return stores, anns


def fingerprint_2014(src: str) -> list:
  out = []
  for p in list(ZIPS.values()) + [ANN_ZIP] + list(ANN_FILES.values()):
    if os.path.isfile(os.path.join(src, p)):
      out.append(file_signature(os.path.join(src, p)))
  for p in FOLDERS.values():
    if os.path.isdir(os.path.join(src, p)):
      out.append(os.path.abspath(os.path.join(src, p)))
  return out


# --------------------------------------------------------------- COCO format
def check_format_paths(train_json: str, test_json: str, images: str):
  """Names exactly which of the three inputs is missing (UserError)."""
  for flag, p in (("--train_json", train_json), ("--test_json", test_json)):
    if not p:
      raise UserError(f"coco_format needs {flag}")
    if not os.path.isfile(p):
      raise UserError(f"{flag}: missing file {os.path.abspath(p)}")
  if not images:
    raise UserError("coco_format needs --images (the folder that the "
                    "file_name fields are relative to)")
  if not os.path.isdir(images):
    raise UserError(f"--images: missing folder {os.path.abspath(images)}")


def locate_format(train_json: str, test_json: str, images: str
                  ) -> tuple[dict, dict]:
  check_format_paths(train_json, test_json, images)
  store = DirStore(images)
  anns = {}
  for split, p in (("train", train_json), ("test", test_json)):
    with open(p, "rb") as f:
      anns[split] = (f.read(), p)
  return {"train": store, "test": store}, anns


def fingerprint_format(train_json, test_json, images) -> list:
  check_format_paths(train_json, test_json, images)
  return [file_signature(train_json), file_signature(test_json),
          os.path.abspath(images)]
