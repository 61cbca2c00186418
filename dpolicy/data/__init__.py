"""Demonstration data: robomimic-layout HDF5 files, normalizers, device-resident window sampling."""

from dpolicy.data.normalizer import DictNormalizer, Normalizer
from dpolicy.data.robomimic import Demo, read_dataset, read_env_args, write_dataset
from dpolicy.data.windows import WindowDataset

__all__ = ["Normalizer", "DictNormalizer", "Demo", "read_dataset", "read_env_args", "write_dataset", "WindowDataset"]
