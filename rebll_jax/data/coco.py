"""MS-COCO 2014 and any COCO instances-format data (prepare side).

Class order: the category *names* sorted alphabetically (METHOD.md section 1),
whatever their ids; COCO's sparse ids (1..90 with gaps) are mapped through the
names. An image is labelled with a category when it holds at least one
annotation of it with ``iscrowd`` 0; a category whose only annotations on the
image are crowd boxes is recorded apart (``crowd_labels``). Image ids are the
JSON ``id`` fields. Malformed files are refused naming the first bad entry
(``load_json``); annotations are then indexed with pycocotools. An
annotation's own ``id`` is not needed for labels: it may be missing (as in
hand-written multi-label files) or repeat; pycocotools is given ids of its
own (the annotation's index).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath

import numpy as np

from rebll_jax.data.archives import DirStore, ZipStore, file_signature
from rebll_jax.errors import UserError

ZIPS = {"train": "train2014.zip", "test": "val2014.zip"}
FOLDERS = {"train": "train2014", "test": "val2014"}
ANN_ZIP = "annotations_trainval2014.zip"
ANN_FILES = {"train": "annotations/instances_train2014.json",
             "test": "annotations/instances_val2014.json"}


INT64 = (-2 ** 63, 2 ** 63 - 1)  # image ids are stored as int64


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _same_name(name: str) -> str:
  """The one spelling of a relative file name (``./a.jpg``, ``a//b.jpg``
  and ``a.jpg``, ``a/b.jpg`` name the same file)."""
  return posixpath.normpath(name)


def _entry(key: str, index: int, entry) -> str:
  """How a message names an entry: ``images[3] (id 42)``."""
  ident = entry.get("id") if isinstance(entry, dict) else None
  return f"{key}[{index}]" + (f" (id {ident!r})" if _is_int(ident) else "")


def load_json(raw: bytes, where: str) -> dict:
  """Parse and check a COCO instances-format annotation file.

  Anything that would silently change a label is refused with a UserError
  naming the first bad entry: ids that are not integers or repeat (image
  ids also outside int64), file names that are not relative paths, hold a
  NUL or a lone surrogate (not UTF-8 text), or repeat (also as another
  spelling: ``./a.jpg``), category names that are not strings or repeat,
  annotations whose image or category does not exist, an ``iscrowd`` that
  is not 0 or 1, an empty ``images`` or ``categories`` list. An
  annotation's ``id`` is not read (see the module docstring).
  """
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
    for i, entry in enumerate(d[key]):
      if not isinstance(entry, dict) or any(f not in entry for f in fields):
        raise UserError(f"{bad}: {key}[{i}] is not an object with the "
                        f"fields {', '.join(fields)}")
  cat_ids = _check_categories(d["categories"], where)
  image_ids = _check_images(d["images"], where)
  _check_annotations(d["annotations"], image_ids, cat_ids, where)
  return d


def _check_categories(categories: list, where: str) -> set:
  if not categories:
    raise UserError(f"{where}: the 'categories' list is empty")
  by_id, by_name = {}, {}
  for i, c in enumerate(categories):
    at = f"{where}: categories[{i}]"
    if not _is_int(c["id"]):
      raise UserError(f"{at}: id {c['id']!r} is not an integer")
    if not isinstance(c["name"], str) or not c["name"].strip():
      raise UserError(f"{at} (id {c['id']}): name {c['name']!r} is not a "
                      "non-empty string")
    if c["id"] in by_id:
      j = by_id[c["id"]]
      raise UserError(f"{at}: category id {c['id']} is listed twice "
                      f"(categories[{j}] {categories[j]['name']!r} and "
                      f"categories[{i}] {c['name']!r})")
    if c["name"] in by_name:
      raise UserError(f"{at} (id {c['id']}): category name {c['name']!r} is "
                      f"listed twice (also categories[{by_name[c['name']]}])")
    by_id[c["id"]], by_name[c["name"]] = i, i
  return set(by_id)


def _check_images(images: list, where: str) -> set:
  if not images:
    raise UserError(f"{where}: the 'images' list is empty")
  by_id, by_file = {}, {}
  for i, im in enumerate(images):
    at = f"{where}: {_entry('images', i, im)}"
    if not _is_int(im["id"]):
      raise UserError(f"{at}: id {im['id']!r} is not an integer")
    if not INT64[0] <= im["id"] <= INT64[1]:
      # The record stores it as int64 (TFDS failed with a traceback).
      raise UserError(f"{at}: id {im['id']} is outside the 64-bit integer "
                      "range")
    name = im["file_name"]
    if not isinstance(name, str) or not name.strip():
      raise UserError(f"{at}: file_name {name!r} is not a non-empty string")
    if "\0" in name:  # no file system path can hold it
      raise UserError(f"{at}: file_name {name!r} holds a NUL character")
    try:
      name.encode("utf-8")  # the record's file_name is UTF-8 text
    except UnicodeEncodeError:
      raise UserError(f"{at}: file_name {name!r} is not valid UTF-8 text (a "
                      "lone surrogate); rename the file") from None
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
      raise UserError(f"{at}: file_name {name!r} must be a path inside the "
                      "image folder")
    if im["id"] in by_id:
      raise UserError(f"{at}: image id {im['id']} is listed twice (also "
                      f"images[{by_id[im['id']]}])")
    key = _same_name(name)
    if key in by_file:
      j = by_file[key]
      other = images[j]["file_name"]
      also = f"images[{j}]" + (f" as {other!r}" if other != name else "")
      raise UserError(f"{at}: file_name {name!r} is listed twice (also "
                      f"{also})")
    by_id[im["id"]], by_file[key] = i, i
  return set(by_id)


def _check_annotations(annotations: list, image_ids: set, cat_ids: set,
                       where: str):
  for i, a in enumerate(annotations):
    at = f"{where}: {_entry('annotations', i, a)}"
    if not _is_int(a["image_id"]):
      raise UserError(f"{at}: image_id {a['image_id']!r} is not an integer")
    if a["image_id"] not in image_ids:
      raise UserError(f"{at}: image_id {a['image_id']} is not in 'images'")
    if not _is_int(a["category_id"]):
      raise UserError(f"{at}: category_id {a['category_id']!r} is not an "
                      "integer")
    if a["category_id"] not in cat_ids:
      raise UserError(f"{at}: category_id {a['category_id']} is not in "
                      "'categories'")
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(
        a.get("iscrowd", 0), float):
      raise UserError(f"{at}: iscrowd {a['iscrowd']!r} is not 0 or 1")


def class_names(d: dict) -> list[str]:
  return sorted(c["name"] for c in d["categories"])


def labels_from_json(d: dict, names: list[str]) -> tuple[list, dict]:
  """[(image_id, file_name, labels, crowd_labels)] sorted by id, plus counts.

  ``labels`` (uint8 [C]) marks the classes with at least one non-crowd
  annotation on the image; ``crowd_labels`` the classes whose annotations on
  the image are all crowd boxes (so the two never overlap, and their union is
  pycocotools' ``catToImgs`` membership). ``d`` has passed ``load_json``.
  The counts are per image (``{"crowd_annotations": {image_id: n}}``):
  prepare sums them over the images it keeps.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  coco = COCO()
  # pycocotools indexes annotations by their "id", which labels never read:
  # a file without ids (or with unhashable ones) failed with a KeyError.
  # It gets the fields it reads, under ids of its own.
  coco.dataset = {
      "images": d["images"], "categories": d["categories"],
      "annotations": [{"id": k, "image_id": a["image_id"],
                       "category_id": a["category_id"],
                       "iscrowd": a.get("iscrowd", 0)}
                      for k, a in enumerate(d["annotations"])]}
  with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
    coco.createIndex()
  col = {c["id"]: names.index(c["name"]) for c in d["categories"]}
  items = []
  n_crowd = {}
  for img_id in sorted(coco.getImgIds()):
    y = np.zeros(len(names), np.uint8)
    crowd = np.zeros(len(names), np.uint8)
    for a in coco.imgToAnns.get(img_id, []):
      if a["iscrowd"]:
        n_crowd[int(img_id)] = n_crowd.get(int(img_id), 0) + 1
        crowd[col[a["category_id"]]] = 1
      else:
        y[col[a["category_id"]]] = 1
    crowd[y == 1] = 0
    items.append((int(img_id), coco.imgs[img_id]["file_name"], y, crowd))
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


def loose_files_2014(src: str) -> dict:
  """``{split: (folder, image files, other files)}`` of the splits read from
  an extracted folder: every file under it (it is the official folder of
  that split; a zip's signature in the fingerprint covers its members)."""
  out = {}
  for split in ("train", "test"):
    folder = os.path.join(src, FOLDERS[split])
    if os.path.isfile(os.path.join(src, ZIPS[split])) or not os.path.isdir(
        folder):
      continue
    rels = []
    for parent, _, names in os.walk(folder):
      rels.extend(os.path.relpath(os.path.join(parent, n), folder)
                  for n in names)
    out[split] = (folder, sorted(rels), [])
  return out


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


def read_format(train_json: str, test_json: str, images: str
                ) -> tuple[dict, dict]:
  """(split -> image store, split -> checked annotation dict)."""
  stores, anns = locate_format(train_json, test_json, images)
  return stores, {s: load_json(raw, where) for s, (raw, where) in anns.items()}


def loose_files_format(images: str, jsons: dict) -> dict:
  """``{split: (images, image files, other files)}``: the files the
  ``file_name`` fields of each split's (checked) annotations name."""
  return {split: (images, [im["file_name"] for im in d["images"]], [])
          for split, d in jsons.items()}


def fingerprint_format(train_json, test_json, images) -> list:
  check_format_paths(train_json, test_json, images)
  return [file_signature(train_json), file_signature(test_json),
          os.path.abspath(images)]
