"""Tokenizers from local files only (a HF tokenizer directory or a bare tokenizer.json), and chat templates.

transformers is imported inside the functions: it pulls in half of torch, and `import core.data` should not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Used when the tokenizer ships no template: one turn per message, each closed by EOS, so that a model
# trained with it learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# Classes that are exactly "a tokenizer.json with special tokens": loaded without AutoTokenizer, whose
# import (model auto-classes, generation, torch.distributed) costs ~5x more than the tokenizer itself.
GENERIC_TOKENIZER_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A HF tokenizer from a local directory (tokenizer.json + tokenizer_config.json) or tokenizer.json file.

    Never touches the network: a path that does not exist is an InputError, not a Hub repo id.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: tokenizer path not found")
    generic = path.is_dir() and _tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES
    try:
        if path.is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        if generic and (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())
        raise InputError(f"{path}: cannot load tokenizer: {reason}") from e


def _tokenizer_class(directory: Path) -> str | None:
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    if "auto_map" in config:  # custom code: only AutoTokenizer knows what to do (and will refuse it)
        return "auto_map"
    return config.get("tokenizer_class")


def validate_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """`messages` must be a non-empty list of {"role": str, "content": str}; returns it typed."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"{where}[{i}]: field '{key}' must be a string")
    return messages


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    """Render a conversation with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE if it has none).

    Returns text; encode it with `add_special_tokens=False` when the template already writes BOS.
    """
    messages = validate_messages(list(messages))
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
