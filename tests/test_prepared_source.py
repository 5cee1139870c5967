"""Reading prepared datasets back as Sources; partial views; an e2e run."""

import concurrent.futures
import os

import ml_collections
import numpy as np
import pytest

import data_fixtures as fx
from rebll_jax import data, prepare, protocol
from rebll_jax.data import prepared


def _cfg(data_dir, source, size=16, workers=2):
  return ml_collections.ConfigDict(dict(
      source=source, data_dir=data_dir, image_size=size, num_workers=workers))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  src = fx.make_coco2014_zips(str(root / "src"), image_size=(64, 48))
  out = str(root / "out")
  assert prepare.main(["coco2014", "--src", src, "--data_dir", out]) == 0
  return out


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  src = fx.make_voc_tars(str(root / "src"))
  out = str(root / "out")
  assert prepare.main(["voc2007", "--src", src, "--data_dir", out]) == 0
  return out


def test_read_back_shapes_values_determinism(coco_dir):
  s = data.build_source(_cfg(coco_dir, "coco2014", size=24))
  n = len(s.train)
  idx = np.array([3, 0, n - 1, 3])
  a = s.train.read_images(idx)
  assert a.shape == (4, 24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a[0], a[3])
  np.testing.assert_array_equal(a, s.train.read_images(idx))
  for img, i in zip(a, s.train.image_ids[idx]):
    assert abs(int(img[12, 12, 1]) - fx.colour_of(int(i))) <= 3
  assert s.train.read_images(np.array([], np.int64)).shape == (0, 24, 24, 3)
  with pytest.raises(IndexError):
    s.train.read_images([n])
  # A second Source over the same folder reads the same bytes.
  s2 = data.build_source(_cfg(coco_dir, "coco2014", size=24, workers=1))
  np.testing.assert_array_equal(s2.train.read_images(idx), a)
  np.testing.assert_array_equal(s2.train.labels, s.train.labels)


def test_thread_safe(coco_dir):
  s = data.build_source(_cfg(coco_dir, "coco2014"))
  n = len(s.train)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, n, 5) for _ in range(12)]
  want = [s.train.read_images(b) for b in batches]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(s.train.read_images, batches))
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)


def test_partial_views_b0c4_and_b_c_style(voc_dir, coco_dir):
  s = data.build_source(_cfg(voc_dir, "voc2007"))
  blocks = protocol.task_blocks(s.num_classes, 0, 4)
  assert len(blocks) == 5
  ids = list(s.train.image_ids)
  # Task 4 (classes 12..15: horse, motorbike, person, pottedplant) sees
  # 000009 (horse, person) and 000017 (person, horse, tvmonitor), labelled
  # on its block only; 000005's difficult pottedplant does not bring it in.
  view = protocol.partial_view(s.train.labels, blocks[3])
  assert sorted(s.train.image_ids[view.indices].tolist()) == [9, 17]
  row = view.labels[list(view.indices).index(ids.index(17))]
  assert np.flatnonzero(row).tolist() == [12, 14]  # tvmonitor is unknown
  assert view.known[0].nonzero()[0].tolist() == [12, 13, 14, 15]
  # A B{b}-C{c} split with a larger first task (COCO-like B2-C1 on 4 classes).
  c = data.build_source(_cfg(coco_dir, "coco2014"))
  blocks = protocol.task_blocks(c.num_classes, 2, 1)
  assert [b.tolist() for b in blocks] == [[0, 1], [2], [3]]
  view = protocol.partial_view(c.train.labels, blocks[0])  # car, dog
  assert sorted(c.train.image_ids[view.indices].tolist()) == [5, 42, 139, 300]
  with pytest.raises(prepared.UserError, match="does not fit"):
    protocol.task_blocks(c.num_classes, 0, 3)


def _write_standard_voc(data_dir):
  """A TFDS ``voc/2007``-shaped dataset (array_record), like `tfds build`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # TFDS' own class order is the VOC list; shuffle the splits' example order.
  class Voc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("5.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2007")]
    code_path = None

    def _info(self):
      names = list(fx.VOC_CLASSES)
      return tfds.core.DatasetInfo(builder=self, features=(
          tfds.features.FeaturesDict({
              "image": tfds.features.Image(),
              "image/filename": tfds.features.Text(),
              "labels": tfds.features.Sequence(
                  tfds.features.ClassLabel(names=names)),
              "labels_no_difficult": tfds.features.Sequence(
                  tfds.features.ClassLabel(names=names)),
          })))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(fx.VOC_TRAINVAL[:3]),
              "validation": self._generate_examples(fx.VOC_TRAINVAL[3:]),
              "test": self._generate_examples(fx.VOC_TEST)}

    def _generate_examples(self, entries):
      for stem, objects in entries:
        yield stem, {
            "image": fx.jpeg_bytes(fx.colour_of(int(stem))),
            "image/filename": f"{stem}.jpg",
            "labels": sorted({n for n, _ in objects}),
            "labels_no_difficult": sorted({n for n, d in objects if not d})}

  Voc.name = "voc"
  b = Voc(data_dir=data_dir, config="2007", file_format="array_record")
  b.download_and_prepare(download_dir=os.path.join(data_dir, "dl"))


def test_standard_tfds_voc2007(tmp_path):
  out = str(tmp_path / "tfds")
  _write_standard_voc(out)
  s = data.build_source(_cfg(out, "tfds_voc2007"))
  assert list(s.class_names) == list(fx.VOC_CLASSES)
  for split, entries in ((s.train, fx.VOC_TRAINVAL), (s.test, fx.VOC_TEST)):
    ids, y = fx.voc_expected(entries)
    order = np.argsort(split.image_ids)
    np.testing.assert_array_equal(split.image_ids[order], ids)
    np.testing.assert_array_equal(split.labels[order], y)
    assert sorted(split.dataset_ids) == sorted(st for st, _ in entries)
    imgs = split.read_images(np.arange(len(split)))
    for img, i in zip(imgs, split.image_ids):
      assert abs(int(img[8, 8, 0]) - fx.colour_of(int(i))) <= 3


def test_missing_and_wrong_dirs(tmp_path, voc_dir):
  with pytest.raises(prepared.UserError, match="data_dir is empty"):
    data.build_source(_cfg("", "coco2014"))
  with pytest.raises(prepared.UserError, match="no prepared dataset "
                     "rebll_coco2014"):
    data.build_source(_cfg(voc_dir, "coco2014"))
  with pytest.raises(prepared.UserError, match="tfds build voc/2007"):
    data.build_source(_cfg(voc_dir, "tfds_voc2007"))


def test_end_to_end_two_tasks_on_prepared_coco(coco_dir, tmp_path):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  c = test_config.get_config()
  c.unlock()
  c.method = "rebll"
  c.data.source = "coco2014"
  c.data.data_dir = coco_dir
  c.data.num_workers = 2
  c.protocol.base, c.protocol.increment, c.protocol.num_tasks = 0, 2, -1
  c.train.global_batch = 8
  c.train.eval_batch = 8
  c.num_devices = 1
  c.lock()
  results = train.run(c, str(tmp_path / "work"))
  assert len(results["tasks"]) == 2
  for t in results["tasks"]:
    assert np.isfinite(t["map_seen"]) and 0 <= t["map_seen"] <= 100
  assert os.path.isfile(str(tmp_path / "work" / "results.json"))


def test_crowd_only_classes_match_the_hand_rule_and_cat_to_imgs(coco_dir):
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  s = data.build_source(_cfg(coco_dir, "coco2014"))
  for split, anns, extra, prefix in (
      (s.train, fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED, "COCO_train2014_"),
      (s.test, fx.COCO_TEST, (), "COCO_val2014_")):
    ids, y = fx.coco_expected(anns, extra)
    np.testing.assert_array_equal(split.image_ids, ids)
    np.testing.assert_array_equal(split.labels, y)
    np.testing.assert_array_equal(split.crowd_labels,
                                  fx.coco_expected_crowd(anns, extra))
    assert split.crowd_labels.dtype == np.uint8
    assert not (split.labels & split.crowd_labels).any()
    assert split.dataset_ids == ids.tolist()
    # labels | crowd_labels is pycocotools' catToImgs membership.
    coco = COCO()
    coco.dataset = fx.coco_json(prefix, anns, extra)
    coco.createIndex()
    for cat in fx.COCO_CATEGORIES:
      col = fx.COCO_CLASSES.index(cat["name"])
      union = split.labels[:, col] | split.crowd_labels[:, col]
      assert set(ids[union == 1].tolist()) == set(coco.catToImgs[cat["id"]])
  # By hand: 77 holds only a crowd person; 42 a car and a crowd person; 88 a
  # crowd and a plain person (a label, not crowd-only); test 724 a car and a
  # crowd zebra.
  ids = s.train.image_ids.tolist()
  person, zebra = fx.COCO_CLASSES.index("person"), 3
  assert s.train.crowd_labels[ids.index(77)].tolist() == [0, 0, 1, 0]
  assert s.train.crowd_labels[ids.index(42)].tolist() == [0, 0, 1, 0]
  assert s.train.crowd_labels[ids.index(88)].tolist() == [0, 0, 0, 0]
  assert s.train.labels[ids.index(88), person] == 1
  tids = s.test.image_ids.tolist()
  assert s.test.crowd_labels[tids.index(724)].tolist() == [0, 0, 0, 1]
  assert s.test.crowd_labels[:, zebra].sum() == 1
  assert s.info["num_crowd_only"] == {"train": 1, "test": 0}
  # A subset keeps every per-row field aligned.
  sub = s.train.take([ids.index(77), ids.index(5)])
  assert sub.dataset_ids == [77, 5]
  assert sub.crowd_labels.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]


def test_dataset_ids_voc_stems_and_old_folders(voc_dir, coco_dir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  s = data.build_source(_cfg(voc_dir, "voc2007"))
  assert s.train.dataset_ids == [st for st, _ in sorted(fx.VOC_TRAINVAL)]
  assert s.test.dataset_ids[0] == "000001"
  assert not s.train.crowd_labels.any()
  assert s.train.crowd_labels.shape == s.train.labels.shape
  # A folder prepared before crowd_positives / file_names existed reads as
  # no crowd-only class, VOC stems from the ids.
  for kind, src in (("coco2014", coco_dir), ("voc2007", voc_dir)):
    old = str(tmp_path / kind)
    shutil.copytree(src, old)
    path = prepared.find_dataset_dir(old, prepared.PREPARED[kind], "")
    with open(os.path.join(path, "metadata.json")) as f:
      meta = json.load(f)
    for split in meta["splits"].values():
      del split["crowd_positives"], split["file_names"]
    with open(os.path.join(path, "metadata.json"), "w") as f:
      json.dump(meta, f)
    o = data.build_source(_cfg(old, kind))
    n = data.build_source(_cfg(src, kind))
    np.testing.assert_array_equal(o.train.labels, n.train.labels)
    assert not o.train.crowd_labels.any() and not o.test.crowd_labels.any()
    assert o.train.dataset_ids == n.train.dataset_ids
