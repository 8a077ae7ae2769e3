"""florence2_rs: Florence-2 in Rust, a drop-in for transformers' Florence-2 classes."""

from ._native import Florence2Error
from .batch_feature import BatchFeature
from .processing import AutoProcessor, Florence2ImageProcessor, Florence2Processor, Florence2Tokenizer

__all__ = [
    "AutoProcessor",
    "BatchFeature",
    "Florence2Error",
    "Florence2ImageProcessor",
    "Florence2Processor",
    "Florence2Tokenizer",
]
