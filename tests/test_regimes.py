"""Budgets in epochs, the two regimes, what the experiments compress, early CLI refusals."""

import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths
from vcon_experiments import compare, methods, models, presets, pretrain, runner, tasks
from vcon_experiments.config import Config

TINY = Config().replace(model="mlp", model_kwargs={"hidden": (32,)}, train_limit=512,
                        test_limit=256, batch_size=64, pretrain_steps=6, steps=4,
                        eval_every=2, eval_examples=128, checkpoint_every=2)


def test_run_names_carry_budget_regime_and_training_options():
  a = TINY.replace(epochs=4.0, method="vcon")
  names = {a.run_name(), a.replace(epochs=16.0).run_name(), a.replace(epochs=0.0).run_name(),
           a.replace(regime="transfer").run_name(), a.replace(mixup=1.0).run_name(),
           a.replace(augment=True).run_name(), a.replace(lr=3e-3).run_name()}
  assert len(names) == 7
  assert a.run_name() == "same-task/e4/prune90/vcon-fitQ20/seed0"
  # a dense run is shared by every severity of its budget
  d = runner.resolve(a.replace(method="dense", compression="low-rank"))
  assert d.run_name() == "same-task/e4/dense/seed0"
  assert runner.resolve(a.replace(method="dense", sparsity=0.5)).to_dict() == d.to_dict()


def test_epochs_set_the_steps_from_the_training_set_size():
  cfg = TINY.replace(epochs=2.5)
  assert tasks.steps_for(cfg) == round(2.5 * 512 / 64)
  assert tasks.steps_for(TINY) == TINY.steps
  t = cfg.replace(regime="transfer")  # the target half of the classes, then the limit
  x, y = tasks.split(t, "train")
  assert len(x) == 512 and set(np.unique(y)) <= set(range(5))
  assert tasks.steps_for(t) == round(2.5 * 512 / 64)


def test_transfer_split_disjoint_classes_renumbered():
  cfg = TINY.replace(regime="transfer", test_limit=0)
  full = tasks.split(cfg.replace(regime="same-task"), "test")
  src, tgt = tasks.split(cfg, "test", "source"), tasks.split(cfg, "test")
  assert len(src[0]) + len(tgt[0]) == len(full[0])
  assert set(np.unique(src[1])) == set(range(5)) == set(np.unique(tgt[1]))
  assert tasks.num_classes(cfg) == 5 and tasks.num_classes(cfg, "source") == 5


@pytest.mark.slow
def test_transfer_keeps_the_pretrained_network_with_a_fresh_head(tmp_path):
  cfg = TINY.replace(regime="transfer", model="vit",
                     model_kwargs={"patch_size": 7, "dim": 16, "depth": 1, "heads": 2,
                                   "mlp_dim": 32})
  pretrain.pretrain(cfg, tmp_path, progress=False)
  src_model, step = pretrain._dense_step(cfg)  # pylint: disable=protected-access
  mgr = vj.CheckpointManager(tmp_path / "dense" / "checkpoints", max_to_keep=None)
  pre = mgr.restore(step.init()).params
  mgr.close()
  model, params = pretrain.dense_model(cfg, tmp_path)
  assert params["head"]["kernel"].shape == (16, 5)
  np.testing.assert_array_equal(params["blocks"][0]["attn"]["query"]["kernel"],
                                pre["blocks"][0]["attn"]["query"]["kernel"])
  assert pre["head"]["kernel"].shape == (16, 5)  # the source head: other classes
  r = runner.train_and_evaluate(cfg.replace(method="vcon"), tmp_path, progress=False)
  assert 0.0 <= r["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_text_transfer_pretrains_a_masked_byte_lm(tmp_path):
  tokens = np.array([[5, 6, 7, 8, 0, 0]] * 64, np.int32)
  b = tasks.mlm_batch(tokens, np.random.default_rng(0), mask_token=257)
  assert ((b["inputs"] == 257) == (b["weights"] > 0)).all()
  assert (b["weights"][:, 4:] == 0).all() and 0 < b["weights"].mean() < 0.3
  cfg = Config().replace(dataset="wordnet", model="transformer", regime="transfer",
                         model_kwargs={"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
                         max_len=24, train_limit=256, test_limit=128, batch_size=32,
                         pretrain_steps=3, steps=2, eval_every=2, eval_examples=64,
                         checkpoint_every=2)
  dense = pretrain.pretrain(cfg, tmp_path, progress=False)
  assert dense["task"] == "masked-byte LM" and 0.0 <= dense["test_accuracy"] <= 1.0
  model, params = pretrain.dense_model(cfg, tmp_path)
  assert params["head"]["kernel"].shape == (16, 45) and "lm_head" not in params
  assert params["embed"]["embedding"].shape[0] == 258  # bytes, padding and [MASK]


def test_experiments_leave_head_and_stem_dense():
  cfg = TINY.replace(model="vit", model_kwargs={"patch_size": 7, "dim": 16, "depth": 1,
                                                "heads": 2, "mlp_dim": 32})
  model = models.build_model(cfg)
  step = vj.make_train_step(model, vj.identity(), vj.constant(1.0), optax.sgd(0.0))
  params = step.init().params
  for comp in ("prune", "binarize", "quantize", "low-rank"):
    transform, _, _ = methods.build(cfg.replace(compression=comp), params)
    chosen = {p for p, leaf in _paths.leaf_paths(params) if transform.select(p, leaf)}
    assert not any(p.startswith(("head/", "patch_proj/")) for p in chosen), comp
    assert any("attn/query" in p for p in chosen) and any("mlp/fc1" in p for p in chosen)


def test_mixup_and_augmentation_are_deterministic_per_step():
  cfg = TINY.replace(mixup=1.0, augment=True)
  arrays = tasks.split(TINY, "train")
  b0 = tasks.finetune_batch(cfg, tasks.batch_at(arrays, 3, 64, 0), 3, 0)
  b1 = tasks.finetune_batch(cfg, tasks.batch_at(arrays, 3, 64, 0), 3, 0)
  jax.tree.map(np.testing.assert_array_equal, b0, b1)
  assert b0["inputs"].shape == (64, 28, 28, 1) and 0 <= b0["lam"][0] <= 1
  loss = tasks.mixup_loss(np.zeros((64, 10), np.float32), b0)
  np.testing.assert_allclose(float(loss), np.log(10), rtol=1e-5)


def test_map_jobs_run_budget_by_budget():
  suites, _ = presets.suites("map", Config())
  jobs = compare._jobs(suites, 3, None)  # pylint: disable=protected-access
  budgets = [c.epochs for _, c in jobs]
  grid = presets.load("map")["grid"]
  first = budgets.index(grid["datasets"]["fashion_mnist/vit"]["budgets"][1][0])
  assert set(budgets[:first]) == {grid["headline_epochs"]}
  assert {c.seed for _, c in jobs[:first]} == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("args,msg", [
    (["compress", "--model", "mlp", "--model-kwargs", '{"hiden": [64]}'], "did you mean 'hidden'"),
    (["compare", "--quick", "--preset", "full"], "contradict"),
    (["compare", "--methd", "vcon"], "did you mean '--method"),
    (["compare", "--dataset", "tfds:mnist", "--data-dir", "."], "not prepared"),
    (["compare", "--shard", "2/2"], "--shard"),
])
def test_cli_refuses_before_writing_anything(tmp_path, args, msg):
  work = tmp_path / "w"
  p = subprocess.run([sys.executable, "-m", "vcon_experiments", *args, "--workdir", str(work)],
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
  assert not work.exists()


@pytest.mark.slow
def test_paper_preset_runs_a_few_steps_from_init_weights_on_mock_cifar10(tmp_path):
  """The accelerator preset's config, shrunk to a tiny ViT, on tfds mock data."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from vcon_experiments import config as config_lib  # pylint: disable=import-outside-toplevel
  from vcon_experiments.models import ViT  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).parents[1] / "experiments/configs/paper_cifar10_vit_ti.json"
  paper = config_lib.load(path)
  assert paper.lr == 1e-4 and paper.epochs == 60 and paper.mixup == 1.0
  tiny_kw = {"image_size": 64, "patch_size": 16, "dim": 16, "depth": 1, "heads": 2,
             "mlp_dim": 32, "resize_inputs": True}
  # "pretrained" weights with a 1000-class head: the head is replaced, the rest kept
  src = ViT(in_channels=3, num_classes=1000, rngs=nnx.Rngs(3), **tiny_kw)
  step = vj.make_train_step(src, vj.identity(), vj.constant(1.0), optax.sgd(0.0))
  flat = {p: np.asarray(v) for p, v in _paths.leaf_paths(step.init().params)}
  np.savez(tmp_path / "vit.npz", **flat)
  cfg = paper.replace(model_kwargs=tiny_kw, init_from=str(tmp_path / "vit.npz"), epochs=0.0,
                      steps=3, batch_size=8, eval_every=3, eval_examples=16,
                      checkpoint_every=3, train_limit=32, test_limit=16)
  with tfds.testing.mock_data(num_examples=64):
    model, params = pretrain.dense_model(cfg, tmp_path)
    np.testing.assert_array_equal(params["blocks"][0]["mlp"]["fc1"]["kernel"],
                                  flat["blocks/0/mlp/fc1/kernel"])
    assert params["head"]["kernel"].shape == (16, 10)
    r = runner.train_and_evaluate(cfg.replace(method="vcon"), tmp_path / "w", progress=False)
  assert r["steps"] == 3 and 0.0 <= r["test_accuracy"] <= 1.0
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{k: v for k, v in flat.items() if "fc1" not in k})
  with pytest.raises(ValueError, match="has no leaf 'blocks/0/mlp/fc1/bias'"):
    pretrain.dense_model(cfg.replace(init_from=str(bad)), tmp_path)
