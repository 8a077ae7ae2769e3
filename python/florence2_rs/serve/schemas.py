"""The request bodies the server accepts, checked by pydantic before anything is queued or decoded.

Two shapes: the native request (`POST /v1/florence2`: one image, one or several tasks, generation settings as
top-level keys) and OpenAI's chat-completion request (`POST /v1/chat/completions`). Both end as a `Work`: the
image source, the task prompts and the generation settings the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..apps.labeling import TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT, task_token

#: The largest values a request may ask for; they bound the work one request can make.
MAX_NEW_TOKENS = 4096
MAX_NUM_BEAMS = 16
MAX_TASKS = 16


class RequestError(ValueError):
    """A request the server refuses: the message, the HTTP status, OpenAI's error code and type
    (`error_type`), and headers for the answer (`Retry-After`)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 error_type: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.error_type, self.headers = status, code, error_type, headers or {}

    def body(self) -> Dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": str(self), "type": self.error_type, "code": self.code}}


class GenerationSettings(BaseModel):
    """The generate() settings a request may set; each one left out takes the server's default."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    num_beams: Optional[int] = Field(None, ge=1, le=MAX_NUM_BEAMS)
    do_sample: Optional[bool] = None
    temperature: Optional[float] = Field(None, gt=0, le=100)
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    length_penalty: Optional[float] = Field(None, ge=-100, le=100)
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0, le=1024)
    early_stopping: Optional[bool] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**64)

    def given(self) -> Dict[str, Any]:
        """The generation settings the request set."""
        values = {key: getattr(self, key) for key in GenerationSettings.model_fields}
        return {key: value for key, value in values.items() if value is not None}


class NativeRequest(GenerationSettings):
    """`POST /v1/florence2`: `{"image": ..., "tasks": [...], "text": ..., <generation settings>}`.

    `image` is base64, a `data:` URL, or an http(s) URL (when the server allows fetching). `text` is the input
    of the tasks that take one (a phrase, or a region as four `<loc_*>` tokens); tasks are task tokens (`"<OD>"`)
    or their names (`"od"`).
    """

    image: str = Field(min_length=1)
    tasks: List[str] = Field(min_length=1, max_length=MAX_TASKS)
    text: Optional[str] = None


@dataclass(frozen=True)
class TaskPrompt:
    """One task of a request: its token (for post-processing) and the prompt given to the processor."""

    task: str
    prompt: str


def task_prompts(tasks: List[str], text: Optional[str]) -> List[TaskPrompt]:
    """The prompts of a native request's tasks, each task once; `text` goes to the tasks that take an input.

    Raises:
        RequestError: an unknown task, a task that needs an input without `text`, or `text` that no task reads.
    """
    tokens = []
    for name in tasks:
        try:
            tokens.append(task_token(name))
        except ValueError as err:
            raise RequestError(str(err), code="unknown_task") from None
    tokens = list(dict.fromkeys(tokens))
    reads_text = [t for t in tokens if t in TASKS_WITH_INPUT]
    if reads_text and not text:
        raise RequestError(f"{reads_text[0]} needs an input: pass text (a phrase, or a region as "
                           "<loc_x1><loc_y1><loc_x2><loc_y2>)", code="missing_text")
    if text and not reads_text:
        raise RequestError(f"text was given, but none of {tokens} takes an input", code="unexpected_text")
    return [TaskPrompt(t, t + text if t in TASKS_WITH_INPUT else t) for t in tokens]


def split_prompt(prompt: str) -> TaskPrompt:
    """A chat prompt (`"<OD>"`, `"<CAPTION_TO_PHRASE_GROUNDING> a red car"`) as its task and the prompt.

    Raises:
        RequestError: the prompt does not start with a task token, or gives an input to a task without one.
    """
    prompt = prompt.strip()
    end = prompt.find(">")
    token = prompt[:end + 1] if prompt.startswith("<") and end > 0 else ""
    if token not in TASKS_WITHOUT_INPUT + TASKS_WITH_INPUT:
        choices = ", ".join(TASKS_WITHOUT_INPUT + TASKS_WITH_INPUT)
        raise RequestError(f"the text part must start with a Florence-2 task token, one of: {choices}; "
                           f"got {prompt[:80]!r}", code="unknown_task")
    rest = prompt[len(token):]
    if token in TASKS_WITH_INPUT and not rest.strip():
        raise RequestError(f"{token} needs an input after the task token", code="missing_text")
    if token in TASKS_WITHOUT_INPUT and rest.strip():
        raise RequestError(f"{token} takes no input, but {rest.strip()[:80]!r} follows it", code="unexpected_text")
    return TaskPrompt(token, prompt)


# -- OpenAI chat completions -----------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, List[ContentPart]]] = None


class ChatRequest(BaseModel):
    """OpenAI's chat-completion request, as far as Florence-2 gives its fields a meaning.

    The last user message holds one `image_url` part and one text part with the task prompt. `temperature`
    above 0 samples (one beam unless `num_beams` is given; 0 or absent: beam search as Microsoft's examples,
    `num_beams=3`), `top_p` applies to
    sampling, `max_tokens` / `max_completion_tokens` is `max_new_tokens`, `seed` seeds the sampling; `n`
    above 1 and the tool, log-probability and response-format options are refused.
    """

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    messages: List[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    num_beams: Optional[int] = Field(None, ge=1, le=MAX_NUM_BEAMS)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Optional[int]) -> Optional[int]:
        if n is not None and n != 1:
            raise ValueError("n must be 1: Florence-2 answers once per request")
        return n


#: Chat fields that have no meaning for Florence-2 and change what a client expects, so they are refused
#: rather than ignored.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
                           "response_format", "logit_bias", "audio", "prediction")

def chat_inputs(request: ChatRequest) -> Tuple[str, TaskPrompt, GenerationSettings]:
    """The image URL, the task prompt and the generation settings of a chat request.

    Raises:
        RequestError: a field Florence-2 cannot honour, or no user message with one image and one text part.
    """
    extra = request.model_extra or {}
    for name in UNSUPPORTED_CHAT_FIELDS:
        if extra.get(name) not in (None, False, [], {}, {"type": "text"}):
            raise RequestError(f"`{name}` is not supported by Florence-2", code="unsupported_parameter")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise RequestError("no user message: send one with an image_url part and a text part holding the task",
                           code="missing_message")
    content = users[-1].content
    parts = content if isinstance(content, list) else [ContentPart(type="text", text=content or "")]
    images = [p.image_url for p in parts if p.type == "image_url" and p.image_url is not None]
    texts = [p.text for p in parts if p.type == "text" and p.text is not None]
    if len(images) != 1:
        raise RequestError(f"the user message must hold exactly one image_url part, not {len(images)}",
                           code="missing_image" if not images else "too_many_images")
    if len(texts) != 1:
        raise RequestError(f"the user message must hold exactly one text part (the task prompt), not {len(texts)}",
                           code="missing_text")
    image = images[0]
    url = image.url if isinstance(image, ImageURL) else image
    settings: Dict[str, Any] = {}
    if request.temperature:
        settings.update(do_sample=True, temperature=request.temperature, num_beams=1)
    if request.top_p is not None:
        if not request.temperature:
            raise RequestError("top_p applies to sampling: set temperature above 0 with it",
                               code="unsupported_parameter")
        settings["top_p"] = request.top_p
    if request.seed is not None:
        if not request.temperature:
            raise RequestError("seed applies to sampling: set temperature above 0 with it",
                               code="unsupported_parameter")
        settings["seed"] = request.seed
    length = request.max_completion_tokens or request.max_tokens
    if length is not None:
        settings["max_new_tokens"] = length
    if request.num_beams is not None:
        settings["num_beams"] = request.num_beams
    return url, split_prompt(texts[0]), GenerationSettings(**settings)
