"""The data layer: calibration, evaluation and training data as one :class:`Dataset`."""

from onnxrep.data.readers import Dataset, ImageOptions, as_dataset, load_data

__all__ = ["Dataset", "ImageOptions", "as_dataset", "load_data"]
