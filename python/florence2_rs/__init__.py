"""florence2_rs: Microsoft's Florence-2 in Rust, a drop-in for transformers' Florence-2 classes.

Change `from transformers import ...` to `from florence2_rs import ...`; the rest of the script stays.
"""

from ._native import Florence2Error
from .auto import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from .batch_feature import BatchFeature
from .configuration import Florence2Config, Florence2VisionConfig, GenerationConfig
from .draw import draw
from .modeling import Florence2ForConditionalGeneration, Florence2Model, Florence2PreTrainedModel, Florence2VisionBackbone
from .pipeline import ImageTextToTextPipeline, pipeline
from .processing import AutoProcessor, Florence2ImageProcessor, Florence2Processor, Florence2Tokenizer
from .quantization import BitsAndBytesConfig

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoProcessor",
    "BatchFeature",
    "BitsAndBytesConfig",
    "Florence2Config",
    "Florence2Error",
    "Florence2ForConditionalGeneration",
    "Florence2ImageProcessor",
    "Florence2Model",
    "Florence2PreTrainedModel",
    "Florence2Processor",
    "Florence2Tokenizer",
    "Florence2VisionBackbone",
    "Florence2VisionConfig",
    "GenerationConfig",
    "ImageTextToTextPipeline",
    "draw",
    "pipeline",
]
