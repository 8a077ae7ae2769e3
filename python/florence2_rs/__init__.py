"""florence2_rs: Microsoft's Florence-2 in Rust, a drop-in for transformers' Florence-2 classes.

Change `from transformers import ...` to `from florence2_rs import ...`; the rest of the script stays.
"""

from ._native import Florence2Error
from .auto import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from .batch_feature import BatchFeature
from .configuration import Florence2Config, Florence2VisionConfig, GenerationConfig
from .modeling import Florence2ForConditionalGeneration, Florence2Model, Florence2PreTrainedModel, Florence2VisionBackbone
from .pipeline import ImageTextToTextPipeline, pipeline
from .processing import AutoProcessor, Florence2ImageProcessor, Florence2Processor, Florence2Tokenizer
from .quantization import BitsAndBytesConfig
from .seeding import set_seed

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
    "pipeline",
    "set_seed",
]

# transformers' training utilities, which a switched import line often carries along. florence2-rs runs inference
# only, so these are answered with an ImportError that says where to import them from: transformers, but AdamW,
# which transformers 5 no longer has.
_TRAINING_HOMES = {"AdamW": "torch.optim (transformers 5 no longer has its own AdamW)"}
# The names transformers exports from its training modules (trainer*, training_args, optimization,
# data.data_collator) that the families below do not catch by name, and AdamW, which it used to export.
_TRAINING_NAMES = {"AdamW", "Adafactor", "AdafactorSchedule", "EvalPrediction", "GreedyLR", "IntervalStrategy",
                   "SchedulerType", "TrainerControl", "TrainerState", "enable_full_determinism",
                   "torch_distributed_zero_first"}
# The families by name: the Trainer and its arguments and callbacks, the schedules (get_scheduler,
# get_linear_schedule_with_warmup ...) and the data collators.
_TRAINING_SUFFIXES = ("Trainer", "TrainingArguments", "Callback")
_TRAINING_PARTS = ("DataCollator", "data_collator")


def _is_training_name(name: str) -> bool:
    return (name in _TRAINING_NAMES or name.endswith(_TRAINING_SUFFIXES) or any(p in name for p in _TRAINING_PARTS)
            or (name.startswith("get_") and "_schedule" in name))


def __getattr__(name: str):
    """Answers transformers' training utilities (`AdamW`, `get_scheduler`, `Trainer`, `DataCollator*` ...) with an
    ImportError naming where to import them from; any other missing name is an AttributeError as usual.

    `from florence2_rs import X` turns an AttributeError raised here into a bare "cannot import name", but lets
    other exceptions through, so the ImportError's message reaches the user. The error's `name` and `path` are
    this module's, as in CPython's own "cannot import name" errors. Because it is an ImportError, not an
    AttributeError, `hasattr(florence2_rs, "Trainer")` (and `getattr` with a default) raises it too rather than
    answering False.

    Raises:
        ImportError: `name` is a training utility.
        AttributeError: any other name this module does not have.
    """
    if _is_training_name(name):
        home = _TRAINING_HOMES.get(name, "transformers")
        raise ImportError(
            f"florence2-rs runs Florence-2 inference only and has no `{name}` (a training utility): import it from "
            f"{home}. To fine-tune, train transformers' Florence2ForConditionalGeneration (with peft for LoRA), "
            f"then load the merged weights or the adapter folder here with from_pretrained (or load_adapter).",
            name=__name__, path=__file__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
