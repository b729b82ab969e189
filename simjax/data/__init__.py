"""Data sources: embedded digits, CIFAR-10 through tfds data_source, and generic arrays."""
from simjax.errors import UserError


def load_splits(config):
  """(train, heldout) splits of the configured dataset, NHWC in [-1, 1]."""
  name = config.data.name
  if name == "digits":
    from simjax.data import digits  # pylint: disable=import-outside-toplevel
    return digits.load_digits_splits(float(config.data.holdout_fraction), int(config.data.split_seed))
  if name == "cifar10":
    from simjax.data import cifar10  # pylint: disable=import-outside-toplevel
    return cifar10.load_splits(config.data.data_dir)
  raise UserError(f"unknown dataset {name!r}; set --config.data.name to 'digits' or 'cifar10'.")


def data_shape(config):
  return tuple(int(s) for s in config.data.shape)
