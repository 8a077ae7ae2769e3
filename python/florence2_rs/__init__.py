"""florence2_rs: Microsoft's Florence-2 in Rust, a drop-in for transformers' Florence-2 classes.

Change `from transformers import ...` to `from florence2_rs import ...`; the rest of the script stays.
"""

from ._native import Florence2Error
from .configuration import Florence2Config, Florence2VisionConfig, GenerationConfig
from .modeling import Florence2ForConditionalGeneration, Florence2PreTrainedModel

__all__ = [
    "Florence2Config",
    "Florence2Error",
    "Florence2ForConditionalGeneration",
    "Florence2PreTrainedModel",
    "Florence2VisionConfig",
    "GenerationConfig",
]
