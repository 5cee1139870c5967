"""What ``prepare`` reads, and the checks on it before anything is written.

The fingerprint of the inputs (archives and annotation files by path, size
and mtime), the loose files a split reads and their ``source_digest``
(names, sizes, mtimes: an image replaced in place is a changed source), and
the refusals that need the files themselves: a test image that is one of
the training images (same path or link; for VOC the same stem, whatever
store each split comes from), and one split naming the same file twice.
``rebll_jax.prepare`` calls them before it builds anything.
"""

from __future__ import annotations

import os
import sys

from rebll_jax.data import archives, coco, voc
from rebll_jax.errors import UserError


def read_voc(src: str) -> tuple[dict, dict]:
  """voc2007's (split -> store, split -> checked list of stems)."""
  stores = voc.locate(src)
  return stores, voc.read_lists(stores)


def fingerprint(args) -> list:
  if args.dataset == "voc2007":
    return voc.fingerprint(args.src)
  if args.dataset == "coco2014":
    return coco.fingerprint_2014(args.src)
  return coco.fingerprint_format(args.train_json, args.test_json, args.images)


def loose_files(args, format_read) -> dict:
  """{split: (root, image files, other files)} read from loose files (not
  from an archive, whose signature the fingerprint holds)."""
  if args.dataset == "voc2007":
    return voc.loose_files(args.src)
  if args.dataset == "coco2014":
    return coco.loose_files_2014(args.src)
  return coco.loose_files_format(args.images, format_read[1])


def refuse_shared_images(args, loose: dict, voc_read=None):
  """UserError when a test image is one of the training images (the same
  file, by path, symbolic or hard link; for VOC also the same stem, whatever
  store each split is read from): the test split would measure memorised
  images. Official archives keep the splits apart; a JSON or an image list
  written by hand may not. Also when one split names the same loose file
  twice (a link to another of its images): it would be trained as two
  images with their own labels."""
  what = ("--train_json and --test_json" if args.dataset == "coco_format"
          else "the train and test splits")
  if voc_read is not None:
    # The stem is the VOC image (a trainval tar and an extracted test
    # folder were never compared: the check below sees loose files only).
    shared = voc.shared_stems(voc_read[1])
    if shared:
      _refuse_shared(what, len(shared), f"JPEGImages/{shared[0]}.jpg")
  keys = {}
  if args.dataset != "coco2014":  # its loose listing is the whole folder,
    for split, (root, images, _) in loose.items():  # not the files named
      keys[split] = _keys_once(args, split, root, images)
  if "train" not in loose or "test" not in loose:
    return
  (train_root, train_images, _), (test_root, test_images, _) = (
      loose["train"], loose["test"])
  train_keys = set(keys["train"]) if "train" in keys else {
      archives.file_key(os.path.join(train_root, rel))
      for rel in train_images}
  test_keys = keys.get("test") or [
      archives.file_key(os.path.join(test_root, rel)) for rel in test_images]
  shared = [rel for rel, key in zip(test_images, test_keys)
            if key in train_keys]
  if shared:
    _refuse_shared(what, len(shared), shared[0])


def _refuse_shared(what: str, count: int, example: str):
  raise UserError(f"{what} share {count} image file(s) (e.g. "
                  f"{example!r}): the test split would hold training "
                  "images; give the test split images of its own")


def _keys_once(args, split: str, root: str, images: list) -> list:
  """``archives.file_key`` of each image of one split; UserError when two
  of them are the same file (``a.jpg`` and a link to it; another spelling
  of one name is refused earlier, by ``coco.load_json``)."""
  keys, first = [], {}
  for rel in images:
    key = archives.file_key(os.path.join(root, rel))
    if key in first:
      where = (f"--{split}_json" if args.dataset == "coco_format"
               else f"the {split} split")
      raise UserError(f"{where} names the same image file twice "
                      f"({first[key]!r} and {rel!r}, one a link to the "
                      "other): it would be two images with labels of their "
                      "own; list it once")
    first[key] = rel
    keys.append(key)
  return keys


def source_digest(loose: dict) -> dict:
  """Digest of the loose files' names, sizes and mtimes (archives: none)."""
  return archives.listing_digest({
      split: archives.stat_listing(root, images + others)
      for split, (root, images, others) in loose.items()})


def check_same_source(old: dict, source: dict, out: str):
  """With the fingerprint unchanged: UserError when an image file was added,
  removed or replaced since ``out`` was prepared. A dataset prepared before
  the digest was recorded is taken as it is, with a warning line."""
  had = old.get("source_digest")
  if had is None:
    if source["files"]:
      print(f"warning: {out} was prepared before prepare recorded its "
            f"source files, so it cannot tell whether any of the "
            f"{source['files']} changed since; taken as prepared (pass "
            "--overwrite to rebuild it if one did)", file=sys.stderr)
    return
  if had != source:
    had = had if isinstance(had, dict) else {}
    if had.get("files") != source["files"]:
      count = f"{had.get('files')} files then, {source['files']} now"
    elif had.get("missing") != source["missing"]:
      count = (f"{had.get('missing')} of the {source['files']} missing then, "
               f"{source['missing']} now")
    else:
      count = "a file replaced: a new size or modification time"
    raise UserError(f"{out} was prepared from image or annotation files "
                    f"that have changed since ({count}); pass --overwrite "
                    "to rebuild it")
