"""Chat templates: a list of ``{"role", "content"}`` messages -> the text a model is trained on and prompted with.

Two sources, one interface (:class:`ChatTemplate`): the tokenizer's own Jinja ``chat_template`` (a Hugging Face
``tokenizer_config.json`` next to the ``tokenizer.json``, rendered by ``transformers``' ``apply_chat_template``), or
a named template written here (:data:`NAMED_TEMPLATES`) for tokenizers that ship none, such as the bundled
GPT-NeoX-20B tokenizer and the character-level one.

Fine-tuning labels need to know which text belongs to which turn; :func:`turn_segments` renders growing prefixes of
the conversation and takes the differences (GPT-NeoX's ``build_chat``), so any prefix-stable template works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron.data.errors import PrepareError

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")
#: the value of ``--chat-template`` that means "the tokenizer's own template"
TOKENIZER_TEMPLATE = "tokenizer"


@dataclass(frozen=True)
class ChatTemplate:
    """``render(messages, add_generation_prompt)`` -> text. ``name`` is shown in messages."""

    name: str
    render: Callable[[Sequence[Message], bool], str]


def _format_template(turn: Mapping[str, str], generation_prompt: str) -> Callable[[Sequence[Message], bool], str]:
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = "".join(turn[m["role"]].format(content=m["content"]) for m in messages)
        return text + (generation_prompt if add_generation_prompt else "")
    return render


#: name -> (one format string per role, the generation prompt that opens an assistant turn)
NAMED_TEMPLATES: dict[str, tuple[dict[str, str], str]] = {
    # OpenAI's ChatML, the usual default of HF chat models
    "chatml": ({role: "<|im_start|>" + role + "\n{content}<|im_end|>\n" for role in ROLES},
               "<|im_start|>assistant\n"),
    # plain text markers, readable by tokenizers without special tokens (GPT-NeoX-20B, char-level)
    "plain": ({"system": "{content}\n\n", "user": "### User:\n{content}\n\n",
               "assistant": "### Assistant:\n{content}\n\n"}, "### Assistant:\n"),
}


def named_template(name: str) -> ChatTemplate:
    if name not in NAMED_TEMPLATES:
        raise PrepareError(f"--chat-template {name!r}: expected one of {', '.join(NAMED_TEMPLATES)} or "
                           f"{TOKENIZER_TEMPLATE!r} (the tokenizer's own chat_template)")
    turn, generation_prompt = NAMED_TEMPLATES[name]
    return ChatTemplate(name, _format_template(turn, generation_prompt))


def tokenizer_config_of(vocab_file: Optional[str]) -> Optional[Path]:
    """``tokenizer_config.json`` beside a ``tokenizer.json`` (where Hugging Face keeps ``chat_template``)."""
    if not vocab_file:
        return None
    path = Path(vocab_file)
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    return config if config.is_file() else None


def tokenizer_template(vocab_file: Optional[str]) -> Optional[ChatTemplate]:
    """The tokenizer's own ``chat_template``, rendered by ``transformers``; None when it has none."""
    config_path = tokenizer_config_of(vocab_file)
    if config_path is None:
        return None
    try:
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{config_path}: not readable JSON ({exc})") from None
    template = config.get("chat_template")
    if not template:
        return None
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = Path(vocab_file) if Path(vocab_file).is_file() else config_path.parent / "tokenizer.json"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                 **{k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
    hf.chat_template = template

    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return hf.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    return ChatTemplate(f"{config_path}'s chat_template", render)


def resolve_template(name: Optional[str], vocab_file: Optional[str]) -> Optional[ChatTemplate]:
    """``--chat-template``: a named template, ``tokenizer`` (its own, required), or None: the tokenizer's own when
    it has one, else None (the caller refuses chat records then)."""
    if name is None or name == TOKENIZER_TEMPLATE:
        found = tokenizer_template(vocab_file)
        if found is None and name == TOKENIZER_TEMPLATE:
            raise PrepareError(f"--chat-template {TOKENIZER_TEMPLATE}: the tokenizer {vocab_file} has no chat_template "
                               f"(no tokenizer_config.json with one beside it); name a template: "
                               f"{', '.join(NAMED_TEMPLATES)}")
        return found
    return named_template(name)


def turn_segments(template: ChatTemplate, messages: Sequence[Message],
                  generation_role: str = "assistant") -> list[tuple[str, str]]:
    """``(role, text)`` per turn such that the texts concatenate to the whole rendered conversation.

    A turn followed by a ``generation_role`` turn renders with the generation prompt, so the prompt that opens the
    reply (``<|im_start|>assistant\\n``) belongs to the turn before it and is never trained on. Raises PrepareError
    when the template is not prefix-stable (a later render does not extend the earlier one).
    """
    segments: list[tuple[str, str]] = []
    done = ""
    for i, message in enumerate(messages):
        add_generation = i + 1 < len(messages) and messages[i + 1]["role"] == generation_role
        text = template.render(messages[: i + 1], add_generation)
        if not text.startswith(done):
            raise PrepareError(f"chat template {template.name} is not prefix-stable: rendering turn {i + 1} changes "
                               f"the text of the turns before it, so turns cannot be told apart")
        segments.append((message["role"], text[len(done):]))
        done = text
    return segments


def prompt_segments(template: ChatTemplate, prompt: str, generation_role: str = "assistant") -> list[str]:
    """The pieces of a prompt for a model fine-tuned on ``template``: one user message followed by the opening of
    the ``generation_role`` reply, cut the way :func:`turn_segments` cut the training data (so each piece tokenizes
    as it did there)."""
    messages = [{"role": "user", "content": prompt}, {"role": generation_role, "content": ""}]
    return [text for _, text in turn_segments(template, messages, generation_role)[:-1]]


def prompt_text(template: ChatTemplate, prompt: str, generation_role: str = "assistant") -> str:
    """:func:`prompt_segments` joined: the text a model fine-tuned on ``template`` is prompted with."""
    return "".join(prompt_segments(template, prompt, generation_role))
