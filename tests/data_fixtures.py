"""Tiny VOC / COCO fixtures (archives + annotations) built in the tests.

Each image is a flat colour whose value encodes its id, so a test can check
that the image read back belongs to the id read back.
"""

import io
import json
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image


def jpeg_bytes(value, size=(40, 30), fmt="JPEG"):
  """A flat image of grey ``value`` (0..255)."""
  b = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(b, fmt)
  return b.getvalue()


def colour_of(image_id):
  return (image_id * 37) % 200 + 20


# ------------------------------------------------------------------ VOC 2007
# (stem, [(class, difficult)]) per split.
VOC_TRAINVAL = [
    ("000012", [("car", 0)]),
    ("000005", [("chair", 0), ("chair", 1), ("pottedplant", 1)]),
    ("000009", [("horse", 0), ("person", 0), ("person", 0)]),
    ("000017", [("person", 0), ("horse", 0), ("tvmonitor", 0)]),
    ("000023", [("bicycle", 1)]),  # only a difficult object: no label
]
VOC_TEST = [
    ("000001", [("dog", 0), ("person", 0)]),
    ("000004", [("car", 0), ("car", 1)]),
    ("000006", [("diningtable", 0), ("pottedplant", 0), ("chair", 1)]),
]


def _voc_xml(stem, objects):
  objs = "".join(
      f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
      f"<difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
      f"<xmax>9</xmax><ymax>9</ymax></bndbox></object>" for n, d in objects)
  return (f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg"
          f"</filename><size><width>40</width><height>30</height><depth>3"
          f"</depth></size>{objs}</annotation>").encode()


def _voc_files(entries, list_name):
  files = {f"ImageSets/Main/{list_name}.txt":
           "".join(f"{s}\n" for s, _ in entries).encode()}
  for stem, objects in entries:
    files[f"Annotations/{stem}.xml"] = _voc_xml(stem, objects)
    files[f"JPEGImages/{stem}.jpg"] = jpeg_bytes(colour_of(int(stem)))
  return files


def _add_tar(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_voc_tars(src, corrupt=None):
  """Writes the two official-named tars into ``src``; returns ``src``."""
  os.makedirs(src, exist_ok=True)
  for tar_name, entries, list_name in (
      ("VOCtrainval_06-Nov-2007.tar", VOC_TRAINVAL, "trainval"),
      ("VOCtest_06-Nov-2007.tar", VOC_TEST, "test")):
    files = _voc_files(entries, list_name)
    if corrupt and f"JPEGImages/{corrupt}.jpg" in files:
      files[f"JPEGImages/{corrupt}.jpg"] = b"not a jpeg at all"
    with tarfile.open(os.path.join(src, tar_name), "w") as tar:
      for rel, data in files.items():
        _add_tar(tar, f"VOCdevkit/VOC2007/{rel}", data)
  return src


def make_voc_folder(src):
  root = os.path.join(src, "VOCdevkit", "VOC2007")
  for entries, list_name in ((VOC_TRAINVAL, "trainval"), (VOC_TEST, "test")):
    for rel, data in _voc_files(entries, list_name).items():
      os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
      with open(os.path.join(root, rel), "wb") as f:
        f.write(data)
  return src


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse",
               "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_expected(entries):
  """Hand-computed (ids, labels) in id order."""
  rows = []
  for stem, objects in sorted(entries, key=lambda e: int(e[0])):
    y = np.zeros(20, np.uint8)
    for n, d in objects:
      if not d:
        y[VOC_CLASSES.index(n)] = 1
    rows.append((int(stem), y))
  return (np.array([r[0] for r in rows], np.int64),
          np.stack([r[1] for r in rows]))


# ------------------------------------------------------------------ COCO
# Sparse ids, not in name order: sorted names are car, dog, person, zebra.
COCO_CATEGORIES = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"},
                   {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
COCO_CLASSES = ["car", "dog", "person", "zebra"]


def coco_json(prefix, image_anns, extra_images=()):
  """image_anns: {image_id: [(category_id, iscrowd)]}."""
  images, anns = [], []
  for img_id in list(image_anns) + list(extra_images):
    images.append({"id": img_id, "file_name": f"{prefix}{img_id:012d}.jpg",
                   "width": 40, "height": 30})
  k = 1
  for img_id, lst in image_anns.items():
    for cat, crowd in lst:
      anns.append({"id": k, "image_id": img_id, "category_id": cat,
                   "iscrowd": crowd, "bbox": [1, 1, 5, 5], "area": 25,
                   "segmentation": [[1, 1, 6, 1, 6, 6]]})
      k += 1
  return {"info": {}, "licenses": [], "images": images, "annotations": anns,
          "categories": COCO_CATEGORIES}


COCO_TRAIN = {
    139: [(1, 0), (18, 0)],  # person, dog
    9: [(90, 0), (90, 0)],  # zebra
    42: [(3, 0), (1, 1)],  # car; crowd person excluded
    77: [(1, 1)],  # crowd only: no label
    5: [(3, 0), (18, 0), (90, 0)],
    300: [(18, 0)],
    88: [(1, 1), (1, 0)],  # a crowd and a plain person: person, not crowd
}
COCO_TEST = {
    632: [(1, 0)],
    724: [(3, 0), (90, 1)],
    1000: [(18, 0), (1, 0)],
}
COCO_TRAIN_UNANNOTATED = (61,)  # an image with no annotations at all


def coco_expected(image_anns, extra=()):
  rows = {}
  for img_id in list(image_anns) + list(extra):
    y = np.zeros(4, np.uint8)
    for cat, crowd in image_anns.get(img_id, []):
      if not crowd:
        name = {c["id"]: c["name"] for c in COCO_CATEGORIES}[cat]
        y[COCO_CLASSES.index(name)] = 1
    rows[img_id] = y
  ids = np.array(sorted(rows), np.int64)
  return ids, np.stack([rows[i] for i in sorted(rows)])


def coco_expected_crowd(image_anns, extra=()):
  """Hand rule: classes whose every annotation on the image is crowd."""
  by_id = {c["id"]: COCO_CLASSES.index(c["name"]) for c in COCO_CATEGORIES}
  rows = {}
  for img_id in list(image_anns) + list(extra):
    y = np.zeros(4, np.uint8)
    anns = image_anns.get(img_id, [])
    plain = {by_id[cat] for cat, crowd in anns if not crowd}
    for cat, crowd in anns:
      if crowd and by_id[cat] not in plain:
        y[by_id[cat]] = 1
    rows[img_id] = y
  return np.stack([rows[i] for i in sorted(rows)])


def make_coco2014_zips(src, corrupt_id=None, image_size=(40, 30)):
  """train2014.zip, val2014.zip, annotations_trainval2014.zip in ``src``."""
  os.makedirs(src, exist_ok=True)
  tr = coco_json("COCO_train2014_", COCO_TRAIN, COCO_TRAIN_UNANNOTATED)
  te = coco_json("COCO_val2014_", COCO_TEST)
  for zip_name, folder, d in (("train2014.zip", "train2014", tr),
                              ("val2014.zip", "val2014", te)):
    with zipfile.ZipFile(os.path.join(src, zip_name), "w") as z:
      for im in d["images"]:
        data = (b"\xff\xd8garbage" if im["id"] == corrupt_id
                else jpeg_bytes(colour_of(im["id"]), image_size))
        z.writestr(f"{folder}/{im['file_name']}", data)
  with zipfile.ZipFile(os.path.join(src, "annotations_trainval2014.zip"),
                       "w") as z:
    z.writestr("annotations/instances_train2014.json", json.dumps(tr))
    z.writestr("annotations/instances_val2014.json", json.dumps(te))
    z.writestr("annotations/captions_train2014.json", "{}")
  return src


def make_coco_format(root, corrupt_id=None, png=False):
  """An image folder + two JSONs; returns (train_json, test_json, images)."""
  images = os.path.join(root, "images")
  os.makedirs(images, exist_ok=True)
  tr = coco_json("tr_", COCO_TRAIN, COCO_TRAIN_UNANNOTATED)
  te = coco_json("te_", COCO_TEST)
  for d in (tr, te):
    for im in d["images"]:
      data = (b"garbage" if im["id"] == corrupt_id else
              jpeg_bytes(colour_of(im["id"]), fmt="PNG" if png else "JPEG"))
      with open(os.path.join(images, im["file_name"]), "wb") as f:
        f.write(data)
  paths = []
  for name, d in (("train.json", tr), ("test.json", te)):
    paths.append(os.path.join(root, name))
    with open(paths[-1], "w") as f:
      json.dump(d, f)
  return paths[0], paths[1], images
