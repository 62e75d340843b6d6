"""Datasets of captioned images for the three training stages."""

from .dataset import CaptionedImages, Sample, StepBatchSampler, collate, scan_samples

__all__ = ["CaptionedImages", "Sample", "StepBatchSampler", "collate", "scan_samples"]
