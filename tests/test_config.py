"""Config validation: one line naming the field, the value and what is allowed."""

import pytest

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
