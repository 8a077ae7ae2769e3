"""Training-side calls on the inference model, and transformers' training names on a switched import line: each
gets a clear exception that names the way that works (fine-tune with transformers + peft, then load the merged
weights or the adapter here), never an AttributeError deep inside peft or a bare "cannot import name"."""

from __future__ import annotations

import importlib

import peft
import pytest

import florence2_rs
import transformers
from florence2_rs import Florence2ForConditionalGeneration

# What every training-call message must name: the way that works.
WAY = ("transformers", "peft", "from_pretrained", "load_adapter")


@pytest.fixture(scope="module")
def model(reference_checkpoints):
    return Florence2ForConditionalGeneration.from_pretrained(reference_checkpoints / "tiny" / "hf")


def _assert_names_the_way(err: BaseException) -> None:
    message = str(err)
    assert "inference only" in message and all(word in message for word in WAY), message


@pytest.mark.parametrize("call", [
    lambda m: m.train(),
    lambda m: m.train(True),
    lambda m: m.parameters(),
    lambda m: list(m.named_parameters()),
    lambda m: m.requires_grad_(False),
    lambda m: m.state_dict(),
    lambda m: m.load_state_dict({}),
    lambda m: list(m.modules()),
    lambda m: m.gradient_checkpointing_enable(),
    lambda m: m.enable_input_require_grads(),
    # maestro's FREEZE strategy (Microsoft's remote code has model.vision_tower), and transformers' path to it.
    lambda m: [p for p in m.vision_tower.parameters()],
    lambda m: [p for p in m.model.vision_tower.parameters()],
    lambda m: m.model.parameters(),
], ids=["train()", "train(True)", "parameters", "named_parameters", "requires_grad_", "state_dict",
        "load_state_dict", "modules", "gradient_checkpointing_enable", "enable_input_require_grads",
        "vision_tower.parameters", "model.vision_tower.parameters", "model.parameters"])
def test_training_calls_raise_naming_the_way(model, call):
    with pytest.raises(NotImplementedError) as info:
        call(model)
    _assert_names_the_way(info.value)


def test_eval_mode_keeps_working(model):
    assert model.train(False) is model
    assert model.eval() is model
    assert model.training is False


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_get_peft_model_gives_our_message(model, task_type):
    """maestro's default loader: `get_peft_model(model, LoraConfig(..., task_type="CAUSAL_LM"))`."""
    config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, bias="none", task_type=task_type,
                             target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "linear", "Conv2d", "lm_head",
                                             "fc2"])
    with pytest.raises(NotImplementedError) as info:
        peft.get_peft_model(model, config)
    _assert_names_the_way(info.value)


def test_peft_model_from_pretrained_gives_our_message(model, reference_checkpoints, tmp_path):
    """peft's own PeftModel over our model (florence2_rs.peft.PeftModel and load_adapter are the ways that work)."""
    from test_adapters import make_adapter

    make_adapter(reference_checkpoints / "tiny", tmp_path / "adapter")
    with pytest.raises(NotImplementedError) as info:
        peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
    _assert_names_the_way(info.value)


def _transformers_training_names() -> list[str]:
    """The names transformers exports from its training modules (the Trainer, its arguments and callbacks,
    optimizers and schedules, data collators), but set_seed, which florence2-rs has."""
    prefixes = ("transformers.trainer", "transformers.training_args", "transformers.optimization",
                "transformers.data.data_collator")
    names = []
    for name in dir(transformers):
        if name.startswith("_") or name == "set_seed":
            continue
        try:
            module = getattr(getattr(transformers, name), "__module__", None) or ""
        except (ImportError, AttributeError):
            continue
        if module.startswith(prefixes):
            names.append(name)
    return names


def test_the_training_names_cover_transformers_and_the_clients():
    names = _transformers_training_names()
    for used in ("get_scheduler", "Trainer", "TrainingArguments", "get_linear_schedule_with_warmup",
                 "Seq2SeqTrainer", "DataCollatorForSeq2Seq"):
        assert used in names


@pytest.mark.parametrize("name", ["AdamW", *_transformers_training_names()])
def test_training_names_raise_an_import_error_saying_where(name):
    with pytest.raises(ImportError) as info:
        exec(f"from florence2_rs import {name}", {})
    message = str(info.value)
    assert f"`{name}`" in message and "inference only" in message, message
    assert ("torch.optim" if name == "AdamW" else "import it from transformers") in message
    assert "cannot import name" not in message
    # As CPython's own "cannot import name" errors: the module's name and file.
    assert (info.value.name, info.value.path) == ("florence2_rs", florence2_rs.__file__)


def test_hasattr_on_a_training_name_raises_the_import_error():
    """Documented: the answer is an ImportError, so hasattr does not swallow it."""
    with pytest.raises(ImportError, match="inference only"):
        hasattr(florence2_rs, "Trainer")


def test_other_names_stay_plain():
    assert not hasattr(florence2_rs, "NoSuchName")
    with pytest.raises(ImportError, match="cannot import name"):
        exec("from florence2_rs import NoSuchName", {})
    assert importlib.import_module("florence2_rs").set_seed is florence2_rs.seeding.set_seed
