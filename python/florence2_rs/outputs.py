"""Model outputs shaped like transformers' `ModelOutput`: attribute, key and index access."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ModelOutput(OrderedDict):
    """An ordered dict whose entries are also attributes; `out[0]` is the first entry that is not None."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        """The values that are not None, in order (transformers' `ModelOutput.to_tuple`)."""
        return tuple(v for v in self.values() if v is not None)


class Florence2Seq2SeqLMOutput(ModelOutput):
    """`loss` (None without labels), `logits`, `encoder_last_hidden_state`, `image_hidden_states` (as
    transformers' class of that name: `out[0]` is the loss where there is one, else the logits)."""


class Florence2Seq2SeqModelOutput(ModelOutput):
    """`last_hidden_state` (the decoder's), `encoder_last_hidden_state` and `image_hidden_states` of
    `Florence2Model.forward`, as transformers' class of that name."""


class BaseModelOutputWithPooling(ModelOutput):
    """`last_hidden_state` and `pooler_output` (the projected image tokens), as transformers returns from
    `get_image_features`."""


class GenerateOutput(ModelOutput):
    """`sequences`, `sequences_scores` (beam search) and `scores` (per step), for return_dict_in_generate; and
    `token_scores`, florence2_rs's per-token log-probabilities (the source of the per-box confidences)."""
