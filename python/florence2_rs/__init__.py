"""florence2_rs: Microsoft's Florence-2 in Rust, a drop-in for transformers' Florence-2 classes.

Change `from transformers import ...` to `from florence2_rs import ...`; the rest of the script stays.
"""

from ._native import Florence2Error
from .batch_feature import BatchFeature
from .configuration import Florence2Config, Florence2VisionConfig, GenerationConfig
from .draw import draw
from .modeling import Florence2ForConditionalGeneration, Florence2PreTrainedModel
from .processing import AutoProcessor, Florence2ImageProcessor, Florence2Processor, Florence2Tokenizer

__all__ = [
    "AutoProcessor",
    "BatchFeature",
    "Florence2Config",
    "Florence2Error",
    "Florence2ForConditionalGeneration",
    "Florence2ImageProcessor",
    "Florence2PreTrainedModel",
    "Florence2Processor",
    "Florence2Tokenizer",
    "Florence2VisionConfig",
    "GenerationConfig",
    "draw",
]
