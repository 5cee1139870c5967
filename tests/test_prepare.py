"""Tests for ``python -m rebll_jax.prepare`` on tiny archives built here."""

import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import ml_collections
import numpy as np
import pytest

import data_fixtures as fx
from rebll_jax import prepare
from rebll_jax.data import prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv):
  return prepare.main(list(argv))


def _source(data_dir, kind, size=16):
  cfg = ml_collections.ConfigDict(dict(data_dir=data_dir, image_size=size,
                                       num_workers=2))
  return prepared.build_prepared(cfg, kind)


def _meta(path):
  with open(os.path.join(path, "metadata.json")) as f:
    return json.load(f)


def test_voc_tars_ids_labels_order(tmp_path):
  src = fx.make_voc_tars(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  s = _source(out, "voc2007")
  assert list(s.class_names) == list(fx.VOC_CLASSES)
  for split, entries in ((s.train, fx.VOC_TRAINVAL), (s.test, fx.VOC_TEST)):
    ids, y = fx.voc_expected(entries)
    np.testing.assert_array_equal(split.image_ids, ids)
    np.testing.assert_array_equal(split.labels, y)
  # Hand-checked rows: 000005 has chair (a second, difficult chair does not
  # matter) but not pottedplant (difficult only); 000023 has nothing.
  row5 = s.train.labels[list(s.train.image_ids).index(5)]
  assert np.flatnonzero(row5).tolist() == [fx.VOC_CLASSES.index("chair")]
  assert not s.train.labels[list(s.train.image_ids).index(23)].any()
  assert s.info["train_difficult_objects"] == 3
  assert s.info["test_difficult_objects"] == 2
  assert s.info["num_skipped"] == 0
  # Images belong to their ids (the fixture's grey level encodes the id).
  imgs = s.test.read_images(np.arange(len(s.test)))
  for img, i in zip(imgs, s.test.image_ids):
    assert abs(int(img[8, 8, 0]) - fx.colour_of(int(i))) <= 3


def test_voc_extracted_folder_same_labels(tmp_path):
  src = fx.make_voc_folder(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  s = _source(out, "voc2007")
  ids, y = fx.voc_expected(fx.VOC_TRAINVAL)
  np.testing.assert_array_equal(s.train.image_ids, ids)
  np.testing.assert_array_equal(s.train.labels, y)


def test_coco2014_sparse_ids_crowd_and_corrupt(tmp_path, capsys):
  src = fx.make_coco2014_zips(str(tmp_path / "src"), corrupt_id=300)
  out = str(tmp_path / "out")
  assert _run("coco2014", "--src", src, "--data_dir", out) == 0
  err = capsys.readouterr().err
  # The warning comes once, on its own line, after every progress bar.
  lines = err.splitlines()
  warned = [i for i, l in enumerate(lines) if "skipped unreadable" in l]
  assert len(warned) == 1 and "000000000300" in lines[warned[0]]
  assert lines[warned[0]].startswith("warning: ")
  assert not any("examples" in l or "splits" in l for l in lines[warned[0]:])
  s = _source(out, "coco2014")
  assert list(s.class_names) == fx.COCO_CLASSES  # sorted names, not ids
  ids, y = fx.coco_expected(fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED)
  keep = ids != 300
  np.testing.assert_array_equal(s.train.image_ids, ids[keep])
  np.testing.assert_array_equal(s.train.labels, y[keep])
  # By hand: image 5 = car(3), dog(18), zebra(90) -> columns 0, 1, 3;
  # image 42: its crowd person is not a label; image 77: crowd only.
  ids_l = list(s.train.image_ids)
  assert s.train.labels[ids_l.index(5)].tolist() == [1, 1, 0, 1]
  assert s.train.labels[ids_l.index(42)].tolist() == [1, 0, 0, 0]
  assert s.train.labels[ids_l.index(77)].tolist() == [0, 0, 0, 0]
  assert s.train.labels[ids_l.index(61)].tolist() == [0, 0, 0, 0]
  tids, ty = fx.coco_expected(fx.COCO_TEST)
  np.testing.assert_array_equal(s.test.image_ids, tids)
  np.testing.assert_array_equal(s.test.labels, ty)
  assert s.info["num_skipped"] == 1
  meta = _meta(s.info["path"])
  assert meta["splits"]["train"]["skipped"] == [
      "COCO_train2014_000000000300.jpg"]
  assert meta["train_crowd_annotations"] == 3


def test_coco_format_png_and_name(tmp_path):
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"), png=True)
  out = str(tmp_path / "out")
  assert _run("coco_format", "--train_json", tr, "--test_json", te,
              "--images", images, "--name", "mine", "--data_dir", out) == 0
  path = os.path.join(out, "rebll_coco_format", "mine", "1.0.0")
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  for data_dir in (out, path):  # the root or the dataset folder itself
    s = _source(data_dir, "coco_format")
    ids, y = fx.coco_expected(fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED)
    np.testing.assert_array_equal(s.train.image_ids, ids)
    np.testing.assert_array_equal(s.train.labels, y)
  img = s.train.read_images([0])[0]
  assert abs(int(img[5, 5, 0]) - fx.colour_of(int(ids[0]))) <= 1


def test_idempotent_and_changed_inputs(tmp_path, capsys):
  src = fx.make_voc_tars(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  path = prepare.output_dir("voc2007", out)
  before = {f: os.stat(os.path.join(path, f)).st_mtime_ns
            for f in os.listdir(path)}
  capsys.readouterr()
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  assert "nothing to do" in capsys.readouterr().err
  after = {f: os.stat(os.path.join(path, f)).st_mtime_ns
           for f in os.listdir(path)}
  assert before == after
  # Other inputs (a different archive) are refused, then rebuilt on request.
  fx.make_voc_tars(str(tmp_path / "src"), corrupt="000009")
  os.utime(os.path.join(src, "VOCtrainval_06-Nov-2007.tar"), ns=(1, 1))
  assert _run("voc2007", "--src", src, "--data_dir", out) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert _run("voc2007", "--src", src, "--data_dir", out,
              "--overwrite") == 0
  s = _source(out, "voc2007")
  assert 9 not in s.train.image_ids and s.info["num_skipped"] == 1
  assert sorted(os.listdir(os.path.dirname(path))) == ["1.0.0"]


def test_a_killed_overwrites_moved_aside_output_is_recovered(tmp_path,
                                                             capsys):
  # An --overwrite run killed mid-build (SIGKILL) left its OUT.old<pid>
  # behind for good, and with OUT gone the next run prepared from scratch.
  src = fx.make_voc_tars(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  argv = ("voc2007", "--src", src, "--data_dir", out)
  assert _run(*argv) == 0
  path = prepare.output_dir("voc2007", out)
  dead = 2 ** 22 + 7  # above Linux's largest pid: no such process
  os.rename(path, f"{path}.old{dead}")
  live = f"{path}.old{os.getpid()}"  # a running prepare's own: left alone
  os.makedirs(live)
  capsys.readouterr()
  assert _run(*argv) == 0
  err = capsys.readouterr().err
  assert f"put back {path} from {path}.old{dead}" in err
  assert "nothing to do" in err  # the finished dataset, not a rebuild
  assert sorted(os.listdir(os.path.dirname(path))) == [
      "1.0.0", f"1.0.0.old{os.getpid()}"]
  os.rmdir(live)
  # With the output there, a stale copy is only removed.
  os.makedirs(f"{path}.old{dead}")
  assert _run(*argv) == 0
  assert sorted(os.listdir(os.path.dirname(path))) == ["1.0.0"]


def test_half_written_output_is_not_done(tmp_path, monkeypatch):
  src = fx.make_coco2014_zips(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  calls = []

  def dies(raw):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("killed mid-way")
    return None
  monkeypatch.setattr(prepare, "_check_image", dies)
  with pytest.raises(RuntimeError, match="killed"):
    _run("coco2014", "--src", src, "--data_dir", out)
  final = prepare.output_dir("coco2014", out)
  assert not os.path.exists(final)
  # A crash that left its temporary folder (kill -9) is never taken as done.
  junk = os.path.join(out, "rebll_coco2014", "incomplete.ABC123_1.0.0")
  os.makedirs(junk)
  with open(os.path.join(junk, "rebll_coco2014-train.array_record-00000-of-"
                         "00001"), "wb") as f:
    f.write(b"half")
  with pytest.raises(prepared.UserError, match="half-written"):
    _source(out, "coco2014")
  monkeypatch.undo()
  assert _run("coco2014", "--src", src, "--data_dir", out) == 0
  s = _source(out, "coco2014")
  assert len(s.train) == len(fx.COCO_TRAIN) + 1


def test_user_errors(tmp_path, capsys):
  out = str(tmp_path / "out")
  # VOC: the missing archive is named, with where it should be.
  src = tmp_path / "voc"
  fx.make_voc_tars(str(src))
  os.remove(src / "VOCtest_06-Nov-2007.tar")
  assert _run("voc2007", "--src", str(src), "--data_dir", out) == 2
  err = capsys.readouterr().err.strip()
  assert "missing VOCtest_06-Nov-2007.tar in " + str(src) in err
  assert len(err.splitlines()) == 1
  # COCO: the annotation zip.
  src = tmp_path / "coco"
  fx.make_coco2014_zips(str(src))
  os.remove(src / "annotations_trainval2014.zip")
  assert _run("coco2014", "--src", str(src), "--data_dir", out) == 2
  assert "missing annotations_trainval2014.zip" in capsys.readouterr().err
  # coco_format: not COCO JSON; missing image folder; missing JSON.
  tr, te, images = fx.make_coco_format(str(tmp_path / "cf"))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"images": [], "annotations": []}))
  assert _run("coco_format", "--train_json", str(bad), "--test_json", te,
              "--images", images, "--data_dir", out) == 2
  err = capsys.readouterr().err
  assert "not a COCO instances-format annotation file" in err
  assert "'categories'" in err
  bad.write_text("[1, 2")
  assert _run("coco_format", "--train_json", str(bad), "--test_json", te,
              "--images", images, "--data_dir", out) == 2
  assert "is not JSON" in capsys.readouterr().err
  assert _run("coco_format", "--train_json", tr, "--test_json", te,
              "--images", str(tmp_path / "nope"), "--data_dir", out) == 2
  assert "missing folder" in capsys.readouterr().err
  assert _run("coco_format", "--train_json", str(tmp_path / "x.json"),
              "--test_json", te, "--images", images, "--data_dir", out) == 2
  assert "x.json" in capsys.readouterr().err
  assert _run("coco_format", "--train_json", tr, "--test_json", te,
              "--images", images, "--name", "Bad Name",
              "--data_dir", out) == 2
  # Reading a data_dir that does not exist / holds nothing.
  with pytest.raises(prepared.UserError, match="does not exist"):
    _source(out, "voc2007")
  os.makedirs(out)
  with pytest.raises(prepared.UserError, match="no prepared dataset"):
    _source(out, "voc2007")


def test_cli_subprocess_help_and_clean_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "rebll_jax.prepare", "--help"],
                     capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=60)
  assert r.returncode == 0 and "VOCtrainval_06-Nov-2007.tar" in r.stdout
  r = subprocess.run([sys.executable, "-m", "rebll_jax.prepare", "coco2014",
                      "--src", str(tmp_path), "--data_dir",
                      str(tmp_path / "o")], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=60)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().startswith("error: missing train2014.zip")
  assert "tensorflow" not in r.stderr.lower()


# --- malformed COCO files: refused naming the first bad entry --------------
# Train images in order: 139, 9, 42, 77, 5, 300, 88, 61; annotation ids from
# 1 (image 139: person, dog; image 9: zebra, zebra; ...); categories in the
# fixture's order: zebra (90), person (1), dog (18), car (3).

def _set(key, i, field, value):
  return lambda d: d[key][i].__setitem__(field, value)


MALFORMED = [
    ("duplicate image id", _set("images", 1, "id", 139),
     "images[1] (id 139): image id 139 is listed twice (also images[0])"),
    ("category id twice, two names",
     lambda d: d["categories"].append({"id": 18, "name": "puppy"}),
     "categories[4]: category id 18 is listed twice (categories[2] 'dog' "
     "and categories[4] 'puppy')"),
    ("category id twice, same name",
     lambda d: d["categories"].append({"id": 18, "name": "dog"}),
     "categories[4]: category id 18 is listed twice"),
    ("image_id a string", _set("annotations", 0, "image_id", "139"),
     "annotations[0] (id 1): image_id '139' is not an integer"),
    ("image_id of no image", _set("annotations", 2, "image_id", 4242),
     "annotations[2] (id 3): image_id 4242 is not in 'images'"),
    ("file_name a number", _set("images", 0, "file_name", 123),
     "images[0] (id 139): file_name 123 is not a non-empty string"),
    ("file_name null", _set("images", 3, "file_name", None),
     "images[3] (id 77): file_name None is not a non-empty string"),
    ("file_name twice", _set("images", 2, "file_name",
                             "tr_000000000139.jpg"),
     "images[2] (id 42): file_name 'tr_000000000139.jpg' is listed twice"),
    ("file_name outside the folder", _set("images", 0, "file_name",
                                          "../x.jpg"),
     "images[0] (id 139): file_name '../x.jpg' must be a path inside"),
    ("category name a number", _set("categories", 0, "name", 7),
     "categories[0] (id 90): name 7 is not a non-empty string"),
    ("category_id a list", _set("annotations", 2, "category_id", [3]),
     "annotations[2] (id 3): category_id [3] is not an integer"),
    ("category_id unknown", _set("annotations", 2, "category_id", 5),
     "annotations[2] (id 3): category_id 5 is not in 'categories'"),
    ("iscrowd not 0/1", _set("annotations", 1, "iscrowd", 2),
     "annotations[1] (id 2): iscrowd 2 is not 0 or 1"),
    ("empty images", lambda d: d.update(images=[], annotations=[]),
     "the 'images' list is empty"),
    # Since 2026-12-07 (these were tracebacks, or two images of one file):
    ("image id 2**63", _set("images", 6, "id", 2 ** 63),
     f"images[6] (id {2 ** 63}): id {2 ** 63} is outside the 64-bit "
     "integer range"),
    ("image id below -2**63", _set("images", 6, "id", -2 ** 63 - 1),
     "is outside the 64-bit integer range"),
    ("file_name with a NUL", _set("images", 0, "file_name", "a.jpg\0x"),
     "images[0] (id 139): file_name 'a.jpg\\x00x' holds a NUL character"),
    ("file_name not UTF-8", _set("images", 0, "file_name", "tr\udc80.jpg"),
     "images[0] (id 139): file_name 'tr\\udc80.jpg' is not valid UTF-8 "
     "text"),
    ("file_name twice, two spellings",
     _set("images", 2, "file_name", "./tr_000000000139.jpg"),
     "images[2] (id 42): file_name './tr_000000000139.jpg' is listed twice "
     "(also images[0] as 'tr_000000000139.jpg')"),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_coco_is_refused_with_the_entry(tmp_path, capsys, mutate,
                                                  expected):
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  with open(tr) as f:
    d = json.load(f)
  mutate(d)
  with open(tr, "w") as f:
    json.dump(d, f)
  out = str(tmp_path / "out")
  assert _run("coco_format", "--train_json", tr, "--test_json", te,
              "--images", images, "--data_dir", out) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {tr}: "), err
  assert expected in err
  assert not os.path.exists(os.path.join(out, "rebll_coco_format"))


def test_malformed_coco2014_names_the_member(tmp_path, capsys):
  src = fx.make_coco2014_zips(str(tmp_path / "src"))
  ann_zip = os.path.join(src, "annotations_trainval2014.zip")
  tr = fx.coco_json("COCO_train2014_", fx.COCO_TRAIN)
  tr["images"][1]["id"] = 139
  te = fx.coco_json("COCO_val2014_", fx.COCO_TEST)
  with zipfile.ZipFile(ann_zip, "w") as z:
    z.writestr("annotations/instances_train2014.json", json.dumps(tr))
    z.writestr("annotations/instances_val2014.json", json.dumps(te))
  assert _run("coco2014", "--src", src, "--data_dir",
              str(tmp_path / "o")) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert (f"{ann_zip}:annotations/instances_train2014.json: images[1] "
          "(id 139): image id 139 is listed twice") in err


def test_garbage_voc_tar_is_one_line(tmp_path, capsys):
  src = fx.make_voc_tars(str(tmp_path / "src"))
  with open(os.path.join(src, "VOCtest_06-Nov-2007.tar"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(5000))
  assert _run("voc2007", "--src", src, "--data_dir",
              str(tmp_path / "o")) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert "cannot read tar archive" in err and "VOCtest" in err


def _prepared_coco_format(tmp_path):
  """(prepare's argv, its --data_dir, the dataset folder) of a small
  coco_format dataset prepared under ``tmp_path``."""
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  argv = ["coco_format", "--train_json", tr, "--test_json", te, "--images",
          images, "--data_dir", out]
  assert _run(*argv) == 0
  return argv, out, prepare.output_dir("coco_format", out, "custom")


def test_corrupt_metadata_rerun_read_and_train(tmp_path, capsys):
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  from tests.helpers import make_config  # pylint: disable=g-import-not-at-top
  argv, out, path = _prepared_coco_format(tmp_path)
  meta_path = os.path.join(path, "metadata.json")
  good = _meta(path)
  capsys.readouterr()
  # Truncated JSON: rerunning prepare and reading it are one line each.
  with open(meta_path, "w") as f:
    f.write(json.dumps(good)[:100])
  assert _run(*argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "metadata.json is unreadable" in err
  assert "--overwrite" in err
  with pytest.raises(prepared.UserError, match="metadata.json is unreadable"
                     r" \(not JSON"):
    _source(out, "coco_format")
  config = make_config(**{"data.source": "coco_format", "data.data_dir": out})
  with pytest.raises(prepared.UserError) as error:
    train.run(config, str(tmp_path / "work"))
  assert "metadata.json is unreadable" in str(error.value)
  assert "\n" not in str(error.value)
  # Valid JSON with impossible content is refused too, naming the field.
  for edit, field in (
      (lambda m: m["splits"]["train"]["positives"][0].append(9),
       "splits.train.positives"),
      (lambda m: m["splits"]["test"].update(image_ids=["x"]),
       "splits.test.image_ids"),
      (lambda m: m["splits"]["train"]["image_ids"].reverse(),
       "splits.train.image_ids is not increasing"),
      (lambda m: m.update(class_names=[1, 2]), "class_names")):
    bad = json.loads(json.dumps(good))
    edit(bad)
    with open(meta_path, "w") as f:
      json.dump(bad, f)
    with pytest.raises(prepared.UserError, match=re.escape(field)):
      _source(out, "coco_format")
  # --overwrite rebuilds it.
  assert _run(*argv, "--overwrite") == 0
  rebuilt = _meta(path)
  assert rebuilt == {**good, "fingerprint": rebuilt["fingerprint"],
                     "source_digest": rebuilt["source_digest"]}


@pytest.mark.parametrize("bad,why", [
    (["--store_quality", "0"], "--store_quality: 0 is not in [1, 100]"),
    (["--store_quality", "500"], "--store_quality: 500 is not in [1, 100]"),
    (["--workers", "0"], "--workers: 0 is not >= 1"),
    (["--workers", "x"], "--workers: 'x' is not an integer"),
    (["--store_size", "-1"], "--store_size: -1 is not >= 0"),
    (["--squash"], "--squash needs --store_size N"),
    # Kept the original bytes (exit 0) as if no quality had been given.
    (["--store_quality", "50"], "--store_quality needs --store_size N"),
    (["--store_size", "0", "--store_quality", "50"],
     "--store_quality needs --store_size N"),
])
def test_out_of_range_options_are_usage_errors(tmp_path, capsys, bad, why):
  with pytest.raises(SystemExit) as exit_info:
    _run("voc2007", "--src", str(tmp_path), "--data_dir",
         str(tmp_path / "out"), *bad)
  assert exit_info.value.code == 2
  assert why in capsys.readouterr().err
  assert not (tmp_path / "out").exists()  # nothing written


def test_the_default_store_quality_without_store_size_is_no_error(
    tmp_path, capsys):
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  assert _run("coco_format", "--train_json", tr, "--test_json", te,
              "--images", images, "--data_dir", str(tmp_path / "out"),
              "--store_quality", "90") == 0
  assert "store_size" not in _meta(prepare.output_dir(
      "coco_format", str(tmp_path / "out"), "custom"))


def test_same_train_and_test_json_is_refused(tmp_path, capsys):
  # Was prepared (exit 0) with the training images as the test split.
  tr, _, images = fx.make_coco_format(str(tmp_path / "cf"))
  link = tmp_path / "also_train.json"
  link.symlink_to(tr)
  out = tmp_path / "out"
  for test_json in (tr, str(link)):
    assert _run("coco_format", "--train_json", tr, "--test_json", test_json,
                "--images", images, "--data_dir", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --train_json and --test_json are the same "
                          "file") and len(err.splitlines()) == 1
  assert not out.exists()


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def test_a_test_split_sharing_training_images_is_refused(tmp_path, capsys):
  # A copy of train.json as --test_json, or a test JSON naming some of the
  # training images, was prepared (exit 0): the test split measured
  # training images.
  tr, te, images = fx.make_coco_format(str(tmp_path / "cf"))
  out = tmp_path / "out"
  with open(tr) as f:
    train = json.load(f)
  with open(te) as f:
    test = json.load(f)
  copy = tmp_path / "copy.json"
  copy.write_text(json.dumps(train))
  subset = dict(test, images=test["images"] + train["images"][2:4])
  (tmp_path / "subset.json").write_text(json.dumps(subset))
  # Under another name: a symbolic link and a hard link to a train image.
  first, second = train["images"][0]["file_name"], train["images"][1][
      "file_name"]
  os.symlink(os.path.join(images, first), os.path.join(images, "sym.jpg"))
  os.link(os.path.join(images, second), os.path.join(images, "hard.jpg"))
  linked = dict(test, images=test["images"] + [
      dict(test["images"][0], id=5000, file_name="sym.jpg"),
      dict(test["images"][0], id=5001, file_name="hard.jpg")])
  (tmp_path / "linked.json").write_text(json.dumps(linked))
  for test_json, count, example in (
      (copy, len(train["images"]), train["images"][0]["file_name"]),
      (tmp_path / "subset.json", 2, train["images"][2]["file_name"]),
      (tmp_path / "linked.json", 2, "sym.jpg")):
    assert _run("coco_format", "--train_json", tr, "--test_json",
                str(test_json), "--images", images,
                "--data_dir", str(out)) == 2
    err = _error_line(capsys)
    assert (f"--train_json and --test_json share {count} image file(s) "
            f"(e.g. {example!r})") in err
  assert not out.exists()  # refused before any work
  # VOC's extracted folder: a test list naming a trainval image.
  src = fx.make_voc_folder(str(tmp_path / "voc"))
  lst = os.path.join(src, "VOCdevkit", "VOC2007", "ImageSets", "Main",
                     "test.txt")
  with open(lst, "a") as f:
    f.write("000012\n")
  assert _run("voc2007", "--src", src, "--data_dir", str(out)) == 2
  assert ("the train and test splits share 1 image file(s) (e.g. "
          "'JPEGImages/000012.jpg')") in _error_line(capsys)
  assert not out.exists()


def _replace_image(path, value=255):
  time.sleep(0.01)  # a later mtime even on a coarse clock
  with open(path, "wb") as f:
    f.write(fx.jpeg_bytes(value))


def test_images_changed_after_prepare_are_not_already_prepared(
    tmp_path, capsys):
  # An image overwritten in the --images folder: the rerun said "already
  # prepared" (exit 0) and training read the old pixels.
  argv, out, path = _prepared_coco_format(tmp_path)
  images = argv[argv.index("--images") + 1]
  capsys.readouterr()
  assert _run(*argv) == 0  # unchanged: nothing to do
  assert "nothing to do" in capsys.readouterr().err
  # An image replaced; an unrelated file added to the folder is no change.
  (tmp_path / "src" / "images" / "notes.txt").write_text("not an image")
  replaced = os.path.join(images, "tr_000000000009.jpg")
  _replace_image(replaced)
  assert _run(*argv) == 2
  err = _error_line(capsys)
  assert "changed since (a file replaced" in err and "--overwrite" in err
  assert _run(*argv, "--overwrite") == 0
  assert _meta(path)["source_digest"]["files"] == (
      len(fx.COCO_TRAIN) + len(fx.COCO_TRAIN_UNANNOTATED) + len(fx.COCO_TEST))
  s = _source(out, "coco_format")
  row = list(s.train.image_ids).index(9)
  assert abs(int(s.train.read_images([row])[0][5, 5, 0]) - 255) <= 3
  assert _run(*argv) == 0
  # A referenced image removed.
  os.remove(os.path.join(images, "te_000000000632.jpg"))
  capsys.readouterr()
  assert _run(*argv) == 2
  assert "changed since (0 of the 11 missing then, 1 now)" in _error_line(
      capsys)
  # The run identity does not read the digest: a checkpoint of a run on the
  # rebuilt dataset stays resumable (run_identity.data_digest covers labels,
  # ids and a few decoded images).
  from rebll_jax import run_identity  # pylint: disable=g-import-not-at-top
  assert "source_digest" not in json.dumps(
      run_identity.fingerprint(ml_collections.ConfigDict({"a": 1}), s, 0))


def test_extracted_voc_and_coco2014_folders_notice_changed_images(
    tmp_path, capsys):
  voc_src = fx.make_voc_folder(str(tmp_path / "voc"))
  out = str(tmp_path / "out")
  assert _run("voc2007", "--src", voc_src, "--data_dir", out) == 0
  _replace_image(os.path.join(voc_src, "VOCdevkit", "VOC2007", "JPEGImages",
                              "000005.jpg"))
  capsys.readouterr()
  assert _run("voc2007", "--src", voc_src, "--data_dir", out) == 2
  assert "changed since" in _error_line(capsys)
  # COCO 2014 extracted: a file added to val2014/.
  zips = fx.make_coco2014_zips(str(tmp_path / "zips"))
  src = tmp_path / "coco"
  for name in ("train2014.zip", "val2014.zip",
               "annotations_trainval2014.zip"):
    with zipfile.ZipFile(os.path.join(zips, name)) as z:
      z.extractall(src)
  assert _run("coco2014", "--src", str(src), "--data_dir", out) == 0
  (src / "val2014" / "COCO_val2014_000000000999.jpg").write_bytes(
      fx.jpeg_bytes(9))
  capsys.readouterr()
  assert _run("coco2014", "--src", str(src), "--data_dir", out) == 2
  assert "changed since (11 files then, 12 now)" in _error_line(capsys)
  # From the archives there are no loose files: nothing more to compare.
  voc_tars = fx.make_voc_tars(str(tmp_path / "tars"))
  out2 = str(tmp_path / "out2")
  assert _run("voc2007", "--src", voc_tars, "--data_dir", out2) == 0
  assert _meta(prepare.output_dir("voc2007", out2))["source_digest"][
      "files"] == 0


def test_a_dataset_prepared_before_the_digest_is_kept_with_a_warning(
    tmp_path, capsys):
  # No source_digest in metadata.json: neither rebuilt nor silently taken.
  argv, out, path = _prepared_coco_format(tmp_path)
  meta = _meta(path)
  del meta["source_digest"]
  with open(os.path.join(path, "metadata.json"), "w") as f:
    json.dump(meta, f)
  capsys.readouterr()
  assert _run(*argv) == 0
  err = capsys.readouterr().err
  assert ("was prepared before prepare recorded its source files, so it "
          "cannot tell whether any of the 11 changed since") in err
  assert "--overwrite" in err and "nothing to do" in err
  assert "source_digest" not in _meta(path)  # not blessed as it is now
  assert len(_source(out, "coco_format").train) > 0  # still readable
  # From archives there is nothing the fingerprint misses: no warning.
  src = fx.make_voc_tars(str(tmp_path / "tars"))
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  voc_path = prepare.output_dir("voc2007", out)
  meta = _meta(voc_path)
  del meta["source_digest"]
  with open(os.path.join(voc_path, "metadata.json"), "w") as f:
    json.dump(meta, f)
  capsys.readouterr()
  assert _run("voc2007", "--src", src, "--data_dir", out) == 0
  assert "warning" not in capsys.readouterr().err


def test_a_lost_shard_is_damage_not_a_finished_dataset(tmp_path, capsys):
  # A shard deleted after prepare finished: prepare said "already prepared"
  # (exit 0) and the run's reader failed with a traceback, even a dry run.
  argv, out, path = _prepared_coco_format(tmp_path)
  (shard,) = glob.glob(os.path.join(path, "*-train.array_record-*"))
  os.remove(shard)
  capsys.readouterr()
  assert _run(*argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "the train split has no array_record" in err
  assert "--overwrite" in err
  with pytest.raises(prepared.UserError, match="train split has no "
                     "array_record files: re-prepare it"):
    _source(out, "coco_format")
  assert _run(*argv, "--overwrite") == 0
  assert len(_source(out, "coco_format").train) > 0


def test_check_shards_names_the_first_missing_one(tmp_path):
  for i in (0, 2):
    (tmp_path / f"x-train.array_record-{i:05d}-of-00004").write_bytes(b"")
  with pytest.raises(prepared.UserError, match=r"2 of the 4 train shard "
                     r"files are missing \(shard 00001 first\)"):
    prepared.check_shards(str(tmp_path), "train")
  for i in (1, 3):
    (tmp_path / f"x-train.array_record-{i:05d}-of-00004").write_bytes(b"")
  prepared.check_shards(str(tmp_path), "train")


@pytest.mark.parametrize("argv,why", [
    (["voc2007", "--src", "S", "--name", "foo", "--train_json", "x"],
     "voc2007 does not read --train_json, --name (for coco_format: see "
     "--help); drop them"),
    (["coco2014", "--src", "S", "--images", "I"],
     "coco2014 does not read --images (for coco_format"),
    (["coco_format", "--src", "S", "--train_json", "a", "--test_json", "b",
      "--images", "c"],
     "coco_format does not read --src (for coco2014 and voc2007"),
])
def test_options_of_another_dataset_are_refused(tmp_path, capsys, argv, why):
  # They were ignored: a --name given to voc2007 named nothing (exit 0).
  assert _run(*argv, "--data_dir", str(tmp_path / "out")) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and why in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stop", [None, RuntimeError, KeyboardInterrupt,
                                  "SIGTERM"])
def test_prepare_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch, capsys,
                                                stop):
  # TFDS made one $TMPDIR/tmp*tfds folder per run and never removed it.
  src = fx.make_voc_tars(str(tmp_path / "src"))
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp))
  monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
  argv = ("voc2007", "--src", src, "--data_dir", str(tmp_path / "out"))
  handler = signal.getsignal(signal.SIGTERM)
  if stop is None:
    assert _run(*argv) == 0
  elif stop is RuntimeError:  # an error while the images are being written
    def dies(raw):
      raise stop("stopped")
    monkeypatch.setattr(prepare, "_check_image", dies)
    with pytest.raises(stop):
      _run(*argv)
  else:  # Ctrl-C or SIGTERM there: one line, the shell's exit code
    def stopped(raw):
      if stop == "SIGTERM":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this thread first
      raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "_check_image", stopped)
    assert _run(*argv) == (143 if stop == "SIGTERM" else 130)
    err = capsys.readouterr().err  # the progress bars, then one line
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: " if stop == "SIGTERM"
                           else "interrupted: ")
    assert last.endswith("the same command prepares it again")
    assert "Traceback" not in err
  assert os.listdir(tmp) == []
  assert tempfile.gettempdir() == str(tmp)  # the default is given back
  assert signal.getsignal(signal.SIGTERM) == handler


# --- review of 2026-12-07: tracebacks and wrong records ---------------------
# pylint: disable=protected-access

def _coco_format_argv(tmp_path, tr, te, images):
  return ["coco_format", "--train_json", tr, "--test_json", te, "--images",
          images, "--data_dir", str(tmp_path / "out")]


def _edit_json(path, edit):
  with open(path) as f:
    d = json.load(f)
  edit(d)
  with open(path, "w") as f:
    json.dump(d, f)


def test_annotations_without_an_id_are_labels_all_the_same(tmp_path):
  # pycocotools indexes annotations by "id": a file without them (common in
  # hand-written multi-label files) failed with a KeyError traceback.
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))

  def drop_ids(d):
    for a in d["annotations"]:
      del a["id"]
    d["annotations"][0]["id"] = [1]  # unhashable: not read either
    d["annotations"][1]["id"] = d["annotations"][2]["id"] = 7  # repeated
  _edit_json(tr, drop_ids)
  assert _run(*_coco_format_argv(tmp_path, tr, te, images)) == 0
  s = _source(str(tmp_path / "out"), "coco_format")
  ids, y = fx.coco_expected(fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED)
  np.testing.assert_array_equal(s.train.image_ids, ids)
  np.testing.assert_array_equal(s.train.labels, y)
  np.testing.assert_array_equal(
      s.train.crowd_labels,
      fx.coco_expected_crowd(fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED))
  assert s.info["train_crowd_annotations"] == 3


def test_a_split_without_a_readable_image_is_one_line(tmp_path, capsys):
  # TFDS refused the empty split with an AssertionError traceback, before
  # the skip warnings were printed.
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  argv = _coco_format_argv(tmp_path, tr, te, images)
  assert _run(*argv) == 0  # a good dataset first: --overwrite keeps it
  good = _meta(prepare.output_dir("coco_format", str(tmp_path / "out"),
                                  "custom"))

  def move_away(d):
    for im in d["images"]:
      im["file_name"] = "gone/" + im["file_name"]
  _edit_json(te, move_away)
  capsys.readouterr()
  assert _run(*argv, "--overwrite") == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len([l for l in lines if "skipped unreadable image" in l]) == 3
  assert "gone/te_000000000632.jpg" in lines[-4]  # the warnings first
  assert lines[-1].startswith("error: the test split has no readable image: "
                              "3 of 3 skipped (e.g. ")
  assert "gone/te_000000000632.jpg: missing: " in lines[-1]
  out = tmp_path / "out"
  assert sorted(os.listdir(out / "rebll_coco_format" / "custom")) == [
      "1.0.0"]  # the old output put back, nothing half-written
  assert _meta(out / "rebll_coco_format" / "custom" / "1.0.0") == good
  # Into a new folder: nothing at all is left.
  argv[-1] = str(tmp_path / "new")
  assert _run(*argv) == 2
  assert not (tmp_path / "new").exists()
  # VOC: an empty image list is refused before any work.
  src = fx.make_voc_folder(str(tmp_path / "voc"))
  open(os.path.join(src, "VOCdevkit", "VOC2007", "ImageSets", "Main",
                    "test.txt"), "w").close()
  capsys.readouterr()
  assert _run("voc2007", "--src", src, "--data_dir",
              str(tmp_path / "v")) == 2
  assert ("ImageSets/Main/test.txt lists no image: the test split would be "
          "empty") in _error_line(capsys)
  assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("entry", ["\u00b2", "9" * 20])
def test_voc_list_entries_beyond_ascii_int64_are_one_line(tmp_path, capsys,
                                                         entry):
  # "²".isdigit() is True but int("²") fails: a ValueError traceback; a
  # stem beyond int64 failed as the record was written.
  src = fx.make_voc_folder(str(tmp_path / "voc"))
  root = os.path.join(src, "VOCdevkit", "VOC2007")
  with open(os.path.join(root, "ImageSets", "Main", "trainval.txt"), "a",
            encoding="utf-8") as f:
    f.write(entry + "\n")
  for rel, data in ((f"JPEGImages/{entry}.jpg", fx.jpeg_bytes(50)),
                    (f"Annotations/{entry}.xml",
                     fx._voc_xml(entry, [("car", 0)]))):
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)
  assert _run("voc2007", "--src", src, "--data_dir", str(tmp_path / "o")) == 2
  assert (f"trainval.txt entry 6 {entry!r} is not a VOC image name"
          in _error_line(capsys))


def test_voc_test_list_naming_trainval_stems_from_any_store(tmp_path, capsys):
  # With the trainval tar and an extracted test folder (a layout
  # voc.locate supports), a test list naming trainval images was prepared
  # (exit 0): the check compared loose files only.
  src = fx.make_voc_folder(str(tmp_path / "mixed"))
  fx.make_voc_tars(src)
  os.remove(os.path.join(src, "VOCtest_06-Nov-2007.tar"))
  with open(os.path.join(src, "VOCdevkit", "VOC2007", "ImageSets", "Main",
                         "test.txt"), "a") as f:
    f.write("000017\n000012\n")
  expected = ("error: the train and test splits share 2 image file(s) (e.g. "
              "'JPEGImages/000017.jpg'): the test split would hold training "
              "images")
  assert _run("voc2007", "--src", src, "--data_dir", str(tmp_path / "o")) == 2
  assert _error_line(capsys).startswith(expected)
  # Two tars: the test tar's list names a trainval stem.
  tars = fx.make_voc_tars(str(tmp_path / "tars"))
  files = fx._voc_files(fx.VOC_TEST + fx.VOC_TRAINVAL[3:4], "test")
  with tarfile.open(os.path.join(tars, "VOCtest_06-Nov-2007.tar"), "w") as t:
    for rel, data in files.items():
      fx._add_tar(t, f"VOCdevkit/VOC2007/{rel}", data)
  assert _run("voc2007", "--src", tars, "--data_dir",
              str(tmp_path / "o")) == 2
  assert _error_line(capsys).startswith(expected.replace("share 2", "share 1"))
  assert not (tmp_path / "o").exists()


def test_metadata_counts_only_the_images_written(tmp_path):
  # Skipped images were counted as images without a label, crowd-only
  # images, crowd annotations and (VOC) difficult objects.
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))

  def add_missing(d):
    d["images"] += [{"id": 900, "file_name": "gone.jpg"},
                    {"id": 950, "file_name": "gone_crowd.jpg"}]
    d["annotations"].append({"id": 999, "image_id": 950, "category_id": 90,
                             "iscrowd": 1})
  _edit_json(tr, add_missing)
  assert _run(*_coco_format_argv(tmp_path, tr, te, images)) == 0
  s = _source(str(tmp_path / "out"), "coco_format")
  assert s.info["num_skipped"] == 2
  # By hand, over the fixture's images: 77 (crowd only) and 61 (nothing)
  # have no label; crowd boxes on 42, 77, 88.
  assert s.info["num_without_label"] == {"train": 2, "test": 0}
  assert s.info["num_crowd_only"] == {"train": 1, "test": 0}
  assert s.info["train_crowd_annotations"] == 3
  assert s.info["test_crowd_annotations"] == 1
  # VOC: 000005 (two difficult objects of the three) unreadable.
  src = fx.make_voc_tars(str(tmp_path / "voc"), corrupt="000005")
  assert _run("voc2007", "--src", src, "--data_dir", str(tmp_path / "v")) == 0
  s = _source(str(tmp_path / "v"), "voc2007")
  assert s.info["num_skipped"] == 1
  assert s.info["train_difficult_objects"] == 1
  assert s.info["test_difficult_objects"] == 2
  assert s.info["num_without_label"] == {"train": 1, "test": 0}


def test_one_file_twice_in_a_split_is_refused(tmp_path, capsys):
  # A link to an image of the same split was a second image, with labels of
  # its own (another spelling of the name: MALFORMED above).
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  os.symlink("tr_000000000139.jpg", os.path.join(images, "sym.jpg"))
  _edit_json(tr, lambda d: d["images"].append(
      {"id": 5000, "file_name": "sym.jpg"}))
  assert _run(*_coco_format_argv(tmp_path, tr, te, images)) == 2
  assert ("error: --train_json names the same image file twice "
          "('tr_000000000139.jpg' and 'sym.jpg', one a link to the other)"
          ) in _error_line(capsys)
  assert not (tmp_path / "out").exists()


def test_images_of_more_than_8_bits_are_skipped_not_clipped(tmp_path, capsys):
  # convert("RGB") clipped a 16-bit greyscale PNG to near-white, silently.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  wide = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)
  Image.fromarray(wide).save(os.path.join(images, "tr_000000000009.jpg"),
                             "PNG")
  assert _run(*_coco_format_argv(tmp_path, tr, te, images)) == 0
  err = capsys.readouterr().err
  assert ("skipped unreadable image " + images + ":tr_000000000009.jpg "
          "('I;16' pixels (16-bit, 32-bit or float): reading them as RGB "
          "would clip them") in err
  s = _source(str(tmp_path / "out"), "coco_format")
  assert 9 not in s.train.image_ids and s.info["num_skipped"] == 1
  # 32-bit integer and float pixels alike; 8-bit modes are read.
  for array in (wide.astype(np.int32), wide.astype(np.float32)):
    raw = io.BytesIO()
    Image.fromarray(array).save(raw, "TIFF")
    assert "would clip them" in prepare._check_image(raw.getvalue())
  for mode in ("L", "LA", "P", "1", "RGBA", "CMYK"):
    raw = io.BytesIO()
    Image.new(mode, (4, 4)).save(raw, "TIFF")
    assert prepare._check_image(raw.getvalue()) is None, mode
