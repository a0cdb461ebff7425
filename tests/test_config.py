"""Config validation: one line naming the field, the value and what is allowed."""

import pytest

from vcon_experiments import config as config_lib
from vcon_experiments.config import Config, severity_name


@pytest.mark.parametrize("changes, message", [
    ({"max_len": 1}, "max_len=1 is not allowed: an integer in [2, 4096]."),
    ({"batch_size": 0}, "batch_size=0 is not allowed: an integer in [1, inf]."),
    ({"steps": 2.0}, "steps=2.0 is not allowed: an integer."),
    ({"seed": True}, "seed=True is not allowed: an integer."),
    ({"lr": 0}, "lr=0 is not allowed: a number in (0, 10]."),
    ({"sparsity": 1.0}, "sparsity=1.0 is not allowed: a number in [0, 1)."),
    ({"epochs": -1.0}, "epochs=-1.0 is not allowed: a number in [0, 10000]."),
    ({"mixup": "1"}, "mixup='1' is not allowed: a number."),
    ({"augment": 1}, "augment=1 is not allowed: true or false."),
])
def test_a_bad_field_names_itself_and_what_is_allowed(changes, message):
  with pytest.raises(ValueError) as err:
    Config().replace(**changes)
  assert str(err.value) == message


def test_range_ends_are_allowed_unless_open():
  cfg = Config().replace(max_len=4096, sparsity=0.0, transition=1.0, lr=10, seed=0)
  assert (cfg.max_len, cfg.sparsity, cfg.transition, cfg.lr) == (4096, 0.0, 1.0, 10)


def test_severity_name_of_a_config_or_its_dict():
  cfg = Config()
  assert severity_name(cfg) == severity_name(cfg.to_dict()) == "prune 90%"
  assert [severity_name(cfg.replace(**c)) for c in (
      {"compression": "binarize"}, {"compression": "quantize", "bits": 3},
      {"compression": "low-rank", "rank": 8})] == ["binary", "3-bit", "rank 8"]


def test_registries_name_each_compression_as_run_dirs_and_tables_always_have():
  # pylint: disable=import-outside-toplevel
  from vcon_experiments import model_registry
  CHOICES = config_lib.CHOICES
  assert CHOICES["compression"] == ("prune", "binarize", "quantize", "low-rank", "prune-units")
  assert CHOICES["model"] == ("mlp", "cnn", "vit", "transformer", "lm")
  assert CHOICES["method"] == ("post-shot", "gradual", "vcon", "vcon-distill", "dense",
                               "post-shot-distill")
  assert model_registry.KEEP_DENSE == r"(^|/)(head|lm_head|patch_proj)(/|$)|(^|/)convs/0(/|$)"
  cfg = Config().replace(steps=100)
  cases = [({}, "prune90", "prune 90%"), ({"pattern": "2:4"}, "prune2of4", "prune 2:4"),
           ({"compression": "quantize", "group_size": 32}, "quantize4g32", "4-bit g32"),
           ({"compression": "binarize"}, "binarize", "binary"),
           ({"compression": "low-rank"}, "lowrank4", "rank 4"),
           ({"compression": "prune-units", "sparsity": 0.5}, "units50", "units 50%")]
  for changes, name, severity in cases:
    c = cfg.replace(**changes)
    assert c.run_name() == f"same-task/s100/{name}/vcon-fitQ20/seed0"
    assert severity_name(c) == severity_name(c.to_dict()) == severity
  assert cfg.replace(update_every=5).run_name() == "same-task/s100/prune90/vcon-fitQ20-every5/seed0"
  assert "every" not in cfg.replace(compression="prune-units", update_every=5).run_name()


def test_distillation_in_the_transfer_regime_is_refused():
  """Its frozen teacher would be the pretrained network with an untrained target head."""
  from vcon_experiments import presets  # pylint: disable=import-outside-toplevel
  for method in ("vcon-distill", "post-shot-distill"):
    with pytest.raises(ValueError, match="regime=transfer"):
      config_lib.Config(regime="transfer", method=method).replace()
  config_lib.Config(regime="same-task", method="vcon-distill").replace()
  suites, _ = presets.suites("map", config_lib.Config())
  assert all("vcon-distill" not in methods for _, cfg, methods in suites
             if cfg.regime == "transfer")
  assert any("vcon-distill" in methods for _, cfg, methods in suites
             if cfg.regime == "same-task")


def test_the_fields_come_in_six_sections_each_declared_once():
  sections = config_lib.SECTIONS
  assert list(sections) == ["data", "model", "pretraining", "fine-tuning", "compression",
                            "method"]
  assert [n for s in sections.values() for n in s.fields] == list(config_lib.FIELDS)
  assert sections["model"].fields == ("model", "model_kwargs")
  assert sections["method"].fields == ("method", "transition", "transition_rule",
                                       "beta_schedule", "beta_hold", "distill_weight")
  # the fields added after runs were stored are left out at their defaults (old run
  # directories stay valid), and only they
  omitted = {n for n, info in config_lib.INFO.items() if info.omit_default}
  assert omitted == {"init_from", "pattern", "group_size", "beta_hold", "lr_schedule"}
  assert set(config_lib.FIELDS) - set(Config().to_dict()) == omitted
  # the transition rule is stored only where beta vanishes (post-shot runs stay valid)
  assert "transition_rule" not in Config(method="post-shot").to_dict()
  assert Config(method="vcon-distill").to_dict()["transition_rule"] == "fitted"
  # the dense pretraining depends on the data, model and pretraining sections
  assert set(Config().dense_key()) == {
      "dataset", "model", "model_kwargs", "data_dir", "source_dir", "max_len",
      "train_limit", "batch_size", "pretrain_steps", "pretrain_lr", "regime"}
  assert Config(init_from=".").replace().dense_key()["init_from"] == "."


def test_a_field_declares_its_checks():
  assert config_lib.INFO["sparsity"].range == config_lib.Range("a number", 0, 1, hi_open=True)
  assert config_lib.INFO["regime"].choices == ("same-task", "transfer")
  with pytest.raises(ValueError, match=r"regime='transfr' is not allowed \(did you mean "
                                       r"'transfer'\?\); choose one of same-task, transfer"):
    Config().replace(regime="transfr")
