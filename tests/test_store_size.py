"""``prepare --store_size``: images stored resized, read back by the reader.

``encode_stored`` on its own (aspect kept, squash, small images untouched),
then a COCO-format dataset prepared with ``--store_size`` (and ``--squash``)
read back through ``build_prepared``: same labels and colours as the
original storage, smaller records, the sizes recorded in metadata.json, and
an image_size above the stored size refused in one line.
"""

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from rebll_jax import prepare
from rebll_jax.data import prepared
from rebll_jax.errors import UserError


def _jpeg(w, h, colour=(200, 40, 90)):
  b = io.BytesIO()
  Image.new("RGB", (w, h), colour).save(b, "JPEG", quality=95)
  return b.getvalue()


def _size(raw):
  with Image.open(io.BytesIO(raw)) as im:
    return im.size


def test_encode_stored_sizes():
  raw = _jpeg(640, 480)
  assert _size(prepare.encode_stored(raw, 256)) == (341, 256)  # aspect kept
  assert _size(prepare.encode_stored(_jpeg(300, 900), 100)) == (100, 300)
  assert _size(prepare.encode_stored(raw, 224, squash=True)) == (224, 224)
  small = _jpeg(200, 150)
  assert prepare.encode_stored(small, 256) == small  # never upsampled
  img = np.asarray(Image.open(io.BytesIO(prepare.encode_stored(raw, 64))))
  assert np.abs(img.astype(int) - (200, 40, 90)).max() <= 3


def _source(data_dir, size):
  cfg = ml_collections.ConfigDict(dict(data_dir=data_dir, image_size=size,
                                       num_workers=2))
  return prepared.build_prepared(cfg, "coco_format")


def test_prepared_with_store_size_reads_back(tmp_path):
  tr, te, images = fx.make_coco_format(str(tmp_path / "src"))
  args = ["coco_format", "--train_json", tr, "--test_json", te,
          "--images", images, "--name", "small"]
  out_full = str(tmp_path / "full")
  assert prepare.main(args + ["--data_dir", out_full]) == 0
  stores = {"short": ["--store_size", "20"],
            "squash": ["--store_size", "16", "--squash"]}
  full = _source(out_full, 16)
  for name, extra in stores.items():
    out = str(tmp_path / name)
    assert prepare.main(args + ["--data_dir", out] + extra) == 0
    path = prepare.output_dir("coco_format", out, "small")
    with open(os.path.join(path, "metadata.json")) as f:
      meta = json.load(f)
    assert meta["store_size"] == int(extra[1])
    assert meta["store_squash"] == (name == "squash")
    s = _source(out, 16)
    np.testing.assert_array_equal(s.train.labels, full.train.labels)
    np.testing.assert_array_equal(s.train.image_ids, full.train.image_ids)
    got = s.train.read_images(np.arange(len(s.train)))
    ref = full.train.read_images(np.arange(len(full.train)))
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int))[:, 4:-4, 4:-4].max() <= 4
    with pytest.raises(UserError, match="store_size"):
      _source(out, 32)  # would upsample the stored images
  # Another storage of the same inputs is another dataset.
  assert prepare.main(args + ["--data_dir", str(tmp_path / "short"),
                              "--store_size", "24"]) == 2
