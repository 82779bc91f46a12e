"""Tokenizers: bytes for the bundled model, `tokenizer.json` files for real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; BOS, EOS and PAD follow. Decoding drops special ids."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` loaded with the `tokenizers` package (no transformers).

    `tokenizer_config.json`, when the folder has one, supplies `add_bos_token` (whether a prompt
    starts with BOS; default yes) and the chat template (also read from `chat_template.jinja`).
    A text that already starts with the BOS token (a chat-formatted prompt whose template
    opens with it, as SmolLM2's `<|im_start|>`) never gets a second one."""

    def __init__(
        self,
        path: str | Path,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = RustTokenizer.from_file(str(file))
        settings = _tokenizer_config(file.parent)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(settings.get("add_bos_token", True)) if add_bos is None else add_bos
        self.chat_template = chat_template or _chat_template(file.parent, settings)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) are parsed as
        such. `add_bos=True` marks a whole prompt: BOS is prepended if the model uses one and
        the text does not already start with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self._tok.id_to_token(index)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation [{"role": ..., "content": ...}] by the model's
        chat template (jinja2, sandboxed as Hugging Face renders it)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        for message in messages:
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise ValueError(f"a chat message needs 'role' and 'content', got {message!r}")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        special = {
            "bos_token": "" if self.bos_id is None else self._tok.id_to_token(self.bos_id),
            "eos_token": "" if self.eos_id is None else self._tok.id_to_token(self.eos_id),
        }
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    file = folder / "tokenizer_config.json"
    if not file.exists():
        return {}
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    """The default chat template: `chat_template` of tokenizer_config.json (a string, or a
    list of named templates) or the file chat_template.jinja."""
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in {folder} must be a string")
    return template
