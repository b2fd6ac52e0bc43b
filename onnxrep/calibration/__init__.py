"""Calibration and evaluation data: readers that stream validated feeds for a model."""

from onnxrep.calibration.readers import Dataset, ImageOptions, load_data

__all__ = ["Dataset", "ImageOptions", "load_data"]
