"""--config.dry_run=True: protocol.json and the per-task table, no compile."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rebll_jax import dry_run, protocol, train
from rebll_jax.errors import UserError
from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nothing_compiles(monkeypatch):
  """Any model build, jit or train-step construction fails the test."""
  import jax
  from rebll_jax import models, steps

  def refuse(*args, **kwargs):
    raise AssertionError("the dry run built or compiled something")

  monkeypatch.setattr(jax, "jit", refuse)
  monkeypatch.setattr(steps, "make_train_step", refuse)
  monkeypatch.setattr(models, "build_model", refuse)
  try:  # the data digest reads images; where it lives depends on the merge
    from rebll_jax import run_identity  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(run_identity, "data_digest", refuse)
  except ImportError:
    monkeypatch.setattr(train, "_data_digest", refuse)


def _check_against_protocol(result, source, config):
  tasks = protocol.make_tasks(source.num_classes, config.protocol.base,
                              config.protocol.increment,
                              config.protocol.num_tasks)
  crowd_train = protocol.crowd_labels_of(source, "train", config.protocol)
  crowd_test = protocol.crowd_labels_of(source, "test", config.protocol)
  assert result["class_order"] == list(source.class_names)
  assert [t["task"] for t in result["tasks"]] == [1, 2, 3]
  for task, entry in zip(tasks, result["tasks"]):
    view = protocol.partial_view(source.train.labels, task.classes,
                                 crowd_train)
    rows = protocol.scored_rows(source.test.labels, task.seen, crowd_test)
    assert entry["classes"] == [source.class_names[c] for c in task.classes]
    assert entry["train_image_ids"] == source.train.image_ids[
        view.indices].tolist()
    assert entry["test_image_ids"] == source.test.image_ids[rows].tolist()
    assert entry["num_train_images"] == len(entry["train_image_ids"])
    assert entry["num_test_images"] == len(entry["test_image_ids"])
    assert entry["memory_budget"] == (config.memory.per_class
                                      * len(task.seen))


def test_dry_run_writes_the_protocol_and_compiles_nothing(
    tmp_path, nothing_compiles):
  from rebll_jax import data
  config = make_config(dry_run=True)
  result = train.run(config, str(tmp_path))
  with open(tmp_path / "protocol.json") as f:
    on_disk = json.load(f)
  assert on_disk == result
  assert not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / "results.json").exists()
  source = data.build_source(config.data)
  _check_against_protocol(result, source, config)
  # Synthetic test ids start at 10,000,000: ids, not row numbers.
  assert min(result["tasks"][0]["test_image_ids"]) >= 10_000_000
  assert result["memory_future_labels"] == "unknown"
  assert result["keep_crowd_only_images"] is False
  assert all(t["crowd_only_train_images"] == 0 for t in result["tasks"])
  table = dry_run.table(result)
  assert "task" in table.splitlines()[1] and "memory" in table.splitlines()[1]
  assert len(table.splitlines()) == 2 + 3 + 1
  first = table.splitlines()[2].split()
  assert first[0] == "1" and first[-4:-1] == [
      str(result["tasks"][0]["num_train_images"]),
      str(result["tasks"][0]["num_test_images"]), "8"]


def test_dry_run_lists_crowd_only_images_when_kept(
    tmp_path, monkeypatch, nothing_compiles):
  from rebll_jax import validate
  from tests.test_replay_widen import crowd_source
  results = {}
  for keep in (False, True):
    config = make_config(dry_run=True,
                         **{"protocol.keep_crowd_only_images": keep})
    source = crowd_source(config)
    monkeypatch.setattr(validate, "build_source", lambda cfg: source)
    results[keep] = train.run(config, str(tmp_path / str(keep)))
    _check_against_protocol(results[keep], source, config)
  for plain, kept in zip(results[False]["tasks"], results[True]["tasks"]):
    extra_train = set(kept["train_image_ids"]) - set(plain["train_image_ids"])
    extra_test = set(kept["test_image_ids"]) - set(plain["test_image_ids"])
    assert set(plain["train_image_ids"]) <= set(kept["train_image_ids"])
    assert len(extra_train) == plain["crowd_only_train_images"] > 0
    assert len(extra_test) == plain["crowd_only_test_images"] > 0


def test_dataset_ids_voc_stems_and_given_ids():
  class Split:
    image_ids = np.array([5, 12, 9963], np.int64)

  voc = type("Source", (), {"name": "voc2007"})()
  coco = type("Source", (), {"name": "coco2014"})()
  assert dry_run.dataset_ids(voc, Split) == ["000005", "000012", "009963"]
  assert dry_run.dataset_ids(coco, Split) == [5, 12, 9963]
  assert all(type(i) is int for i in dry_run.dataset_ids(coco, Split))

  class Named(Split):
    dataset_ids = ["a", "b", "c"]

  assert dry_run.dataset_ids(voc, Named) == ["a", "b", "c"]


def test_dry_run_checks_the_config_first(tmp_path, nothing_compiles):
  with pytest.raises(AssertionError, match="built or compiled"):
    train.run(make_config(), str(tmp_path / "real"))  # the guard bites
  with pytest.raises(UserError, match="memory_future_labels"):
    train.run(make_config(dry_run=True, **{
        "protocol.memory_future_labels": "later"}), str(tmp_path))
  with pytest.raises(UserError, match="does not fit"):
    train.run(make_config(dry_run=True, **{"protocol.increment": 7}),
              str(tmp_path))


def test_dry_run_on_the_command_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
       "--config.dry_run=True", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("synthetic B0-C4: 20 classes, 240 train / 120")
  assert lines[1].split() == ["task", "classes", "train", "test", "memory",
                              "crowd-only"]
  assert lines[-1] == f"protocol: {tmp_path / 'protocol.json'}"
  with open(tmp_path / "protocol.json") as f:
    result = json.load(f)
  assert [t["num_train_images"] for t in result["tasks"]] == [
      int(l.split()[-4]) for l in lines[2:5]]


# Crowd-only classes come from `prepare` (recorded since branch `rel`); on a
# tree without them there is nothing to read crowd boxes from.
def _records_crowd_boxes() -> bool:
  from rebll_jax.data import prepared
  return hasattr(prepared, "read_metadata")


@pytest.mark.skipif(not _records_crowd_boxes(),
                    reason="prepare does not record crowd boxes here (rel)")
def test_dry_run_on_a_coco_file_follows_cat_to_imgs(tmp_path,
                                                    nothing_compiles):
  """The baseline's loader takes a task's images from pycocotools'
  catToImgs over its classes (test: over the seen classes); the field mode
  must list exactly those ids, the default mode those minus crowd-only."""
  from pycocotools.coco import COCO
  from rebll_jax import prepare
  from tests import data_fixtures as fx
  src = fx.make_coco2014_zips(str(tmp_path / "src"))
  out = str(tmp_path / "data")
  assert prepare.main(["coco2014", "--src", src, "--data_dir", out]) == 0
  cat_id = {c["name"]: c["id"] for c in fx.COCO_CATEGORIES}
  indexes = {}
  for split, prefix, anns, extra in (
      ("train", "COCO_train2014_", fx.COCO_TRAIN, fx.COCO_TRAIN_UNANNOTATED),
      ("test", "COCO_val2014_", fx.COCO_TEST, ())):
    coco = COCO()
    coco.dataset = fx.coco_json(prefix, anns, extra)
    coco.createIndex()
    indexes[split] = (coco, anns)

  def baseline_ids(split, names, keep_crowd):
    coco, anns = indexes[split]
    cats = {cat_id[n] for n in names}
    ids = set().union(*(coco.catToImgs[c] for c in cats))
    if not keep_crowd:  # ours: an image needs a non-crowd object
      ids = {i for i in ids if any(c in cats and not crowd
                                   for c, crowd in anns[i])}
    return sorted(ids)

  for keep in (False, True):
    config = make_config(dry_run=True, **{
        "data.source": "coco2014", "data.data_dir": out,
        "protocol.increment": 2, "protocol.num_tasks": -1,
        "protocol.keep_crowd_only_images": keep})
    result = train.run(config, str(tmp_path / f"work_{keep}"))
    assert result["class_order"] == fx.COCO_CLASSES
    seen = []
    for entry in result["tasks"]:
      seen += entry["classes"]
      assert entry["train_image_ids"] == baseline_ids(
          "train", entry["classes"], keep)
      assert entry["test_image_ids"] == baseline_ids("test", seen, keep)
    # Task 2 (person, zebra): 77 holds only a crowd person, 42 a car and a
    # crowd person: in the field mode only.
    assert (77 in result["tasks"][1]["train_image_ids"]) == keep
    assert (42 in result["tasks"][1]["train_image_ids"]) == keep
    assert result["tasks"][1]["crowd_only_train_images"] == 2


def test_a_dry_run_refuses_another_runs_workdir(tmp_path, nothing_compiles):
  """protocol.json beside a run's results must describe that run: a dry run
  of another config in its workdir used to write one there, exit 0."""
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(make_config().to_json_best_effort(indent=2))
  same = dry_run.run(make_config(**{"dry_run": True}), workdir)  # its own
  written = open(os.path.join(workdir, "protocol.json")).read()
  assert json.loads(written)["setting"] == same["setting"]
  other = make_config(**{"dry_run": True, "method": "ft",
                         "protocol.increment": 2})
  with pytest.raises(UserError, match="holds another run .*method: "
                     "the run 'rebll' vs config 'ft'.*another --workdir"):
    dry_run.run(other, workdir)
  assert open(os.path.join(workdir, "protocol.json")).read() == written
  # A resume may extend a run; a table of fewer tasks is not this run's.
  with pytest.raises(UserError, match="protocol.num_tasks: the run 3 vs "
                     "config 1"):
    dry_run.run(make_config(**{"dry_run": True, "protocol.num_tasks": 1}),
                workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("[1, 2]")
  with pytest.raises(UserError, match="cannot be read"):
    dry_run.run(make_config(**{"dry_run": True}), workdir)


def test_a_validation_run_says_it_scores_the_validation_split(
    tmp_path, nothing_compiles):
  result = dry_run.run(make_config(**{"dry_run": True,
                                      "data.val_fraction": 0.2}),
                       str(tmp_path))
  assert result["evaluation_split"] == "val"
  text = dry_run.table(result)
  assert " val images" in text and " test " not in text
  plain = dry_run.run(make_config(**{"dry_run": True}), str(tmp_path / "t"))
  assert plain["evaluation_split"] == "test"
  assert plain["num_test_images"] > result["num_test_images"]


def test_the_memory_budget_is_what_the_buffer_can_hold(tmp_path,
                                                      nothing_compiles):
  # The buffer holds at most one row per training image (240 here).
  result = dry_run.run(make_config(**{"dry_run": True,
                                      "memory.per_class": 100}),
                       str(tmp_path))
  assert [t["memory_budget"] for t in result["tasks"]] == [240, 240, 240]
  small = dry_run.run(make_config(**{"dry_run": True}), str(tmp_path / "s"))
  assert [t["memory_budget"] for t in small["tasks"]] == [8, 16, 24]


def _write_checkpoint_meta(workdir, number, meta):
  """A committed checkpoint's metadata as orbax lays it out (the arrays are
  not read by the dry run)."""
  folder = os.path.join(workdir, "checkpoints", str(number), "meta")
  os.makedirs(folder)
  with open(os.path.join(folder, "metadata"), "w") as f:
    json.dump(meta, f)


def test_a_dry_run_refuses_a_workdir_whose_run_had_other_data(tmp_path):
  """data.data_dir may change on resume (the digest covers the content), so
  config.json cannot tell another dataset: a dry run pointed at one wrote
  its protocol.json beside the run's results, exit 0."""
  from rebll_jax import run_identity, validate  # pylint: disable=g-import-not-at-top
  config = make_config(dry_run=True)
  source = validate.build_source(config.data)
  fingerprint = run_identity.fingerprint(config, source, memory_capacity=1)
  workdir = str(tmp_path)
  _write_checkpoint_meta(workdir, 3, {"fingerprint": fingerprint})
  dry_run.run(config, workdir)  # the run's own data
  # The newest committed checkpoint decides; a temporary one is not read.
  _write_checkpoint_meta(workdir, 9, {"fingerprint": {
      **fingerprint, "data_digest": "0badf00d"}})
  os.makedirs(os.path.join(workdir, "checkpoints",
                           "12.orbax-checkpoint-tmp-1", "meta"))
  with pytest.raises(UserError, match="holds a run on other data or "
                     r"settings \(data_digest: the run '0badf00d' vs config"):
    dry_run.run(config, workdir)
  # Without config.json the checkpoint's config fields still tell another
  # method (a dry run wrote a protocol.json of it beside the run's results).
  os.rename(os.path.join(workdir, "checkpoints", "9"),
            os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-2"))
  with pytest.raises(UserError, match="method: the run 'rebll' vs config "
                     "'ft'"):
    dry_run.run(make_config(dry_run=True, method="ft"), workdir)
  # Read-only: a live run's save in progress is left alone.
  assert os.path.isdir(os.path.join(workdir, "checkpoints",
                                    "12.orbax-checkpoint-tmp-1"))


def test_a_dry_run_checks_init_from_and_the_optimizer(tmp_path,
                                                      nothing_compiles,
                                                      monkeypatch):
  from rebll_jax import upstream  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(upstream, "ensure",
                      lambda *a, **k: pytest.fail("the dry run pretrained"))
  dry_run.run(make_config(dry_run=True,
                          **{"model.init_from": "upstream:auto"}),
              str(tmp_path / "auto"))
  # The run refuses these at once; the dry run used to say OK.
  for overrides, says in (
      ({"model.init_from": str(tmp_path / "nowhere")}, "does not exist"),
      ({"model.init_from": "upstream:foo"}, "the only upstream value"),
      ({"optim.cycle_beta1": True, "optim.schedule": "cosine"},
       "optim.cycle_beta1 needs")):
    with pytest.raises(UserError, match=says):
      dry_run.run(make_config(dry_run=True, **overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "protocol.json")
