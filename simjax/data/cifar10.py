"""CIFAR-10 through `tfds.data_source` (array_record; no TensorFlow needed), from a data dir the user prepared."""
import numpy as np

from simjax.data.digits import Split
from simjax.errors import UserError

PREPARE_HINT = ("prepare it once on a machine with internet: `pip install tensorflow tensorflow-datasets && "
                "python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10', data_dir='DIR', "
                "file_format='array_record').download_and_prepare()\"`, then pass --config.data.data_dir=DIR")


def _read_split(data_dir, split):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("CIFAR-10 is read with tensorflow-datasets, which is not installed; "
                    "pip install -e '.[cifar10]'.") from None
  try:
    source = tfds.data_source("cifar10", split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises several types for a missing dataset
    raise UserError(f"CIFAR-10 not found in data dir {data_dir!r} ({type(e).__name__}); {PREPARE_HINT}.") from None
  images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
  labels = np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)
  return Split((images.astype(np.float32) / 127.5 - 1.0), labels)


def load_splits(data_dir):
  """(train, test) NHWC float32 in [-1, 1]; the test split is the evaluation's independent real sample."""
  return _read_split(data_dir, "train"), _read_split(data_dir, "test")
