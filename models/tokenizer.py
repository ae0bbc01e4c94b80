"""The client's tokenizer, loaded without transformers where the folder allows it.

Importing transformers and building its tokenizer takes ~1.7 s, a third of a `chat` start. A folder
whose tokenizer is the `tokenizers` library with nothing model-specific on top (tokenizer_config.json
names PreTrainedTokenizerFast or TokenizersBackend, a tokenizer.json holds the rest) is read here
with `tokenizers` and `jinja2` directly: `PlainTokenizer` does what transformers does for the calls a
client makes (encode with the post-processor's special tokens, decode, the vocabulary, the chat
template rendered in the same sandbox with the same helpers, then encoded without added special
tokens). tests/test_models_tokenizer.py checks that both give the same ids and text. Anything else
(another class, a setting transformers applies on top: add_bos_token, clean-up of spaces, tokens
added in the config only, a template with generation tags) goes through transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError

PLAIN_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json settings that make transformers change what the backend does: not plain
_NOT_PLAIN_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "do_lower_case")


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer: a PlainTokenizer where it is one, else transformers' AutoTokenizer."""
    try:
        plain = PlainTokenizer.load(folder)
        if plain is not None:
            return plain
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {folder} ({type(e).__name__}: {e})") from None


class PlainTokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its folder."""

    def __init__(self, backend: Any, special: dict[str, str], chat_template: str | None) -> None:
        self.backend = backend
        self.special_tokens_map = special
        self.chat_template = chat_template
        eos = special.get("eos_token")
        self.eos_token_id = backend.token_to_id(eos) if eos is not None else None

    @classmethod
    def load(cls, folder: Path) -> PlainTokenizer | None:
        """The folder's tokenizer if it is plain (see the module docstring), else None."""
        cfg = _read_json(folder / "tokenizer_config.json")
        if cfg.get("tokenizer_class") not in PLAIN_CLASSES or not (folder / "tokenizer.json").is_file():
            return None
        if any(k in cfg for k in _NOT_PLAIN_KEYS) or cfg.get("clean_up_tokenization_spaces"):
            return None
        special = {k: _token_text(cfg[k]) for k in SPECIAL_TOKENS if cfg.get(k) is not None}
        if any(v is None for v in special.values()):
            return None
        template = _chat_template(folder, cfg)
        if template is False or (template and "endgeneration" in template):
            return None
        import jinja2
        from tokenizers import Tokenizer

        if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
            return None  # older sandboxes have known escapes: transformers says so itself

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        try:
            added = {int(i): _token_text(t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
        except (TypeError, ValueError, AttributeError):
            return None  # a form only transformers reads
        if any(backend.id_to_token(i) != text for i, text in added.items()):
            return None  # tokens the config adds that tokenizer.json lacks: transformers adds them
        if any(backend.token_to_id(text) is None for text in special.values()):
            return None
        backend.no_truncation()
        backend.no_padding()
        return cls(backend, special, template or None)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(messages=[dict(m) for m in messages], tools=None,
                                                    documents=None, add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens_map)
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as saved: its text, or an AddedToken's {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(folder: Path, cfg: dict) -> str | bool:
    """The template text, "" for none, False for a form read only by transformers (named templates)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    value = cfg.get("chat_template")
    if value is None:
        return "" if not (folder / "chat_template.json").exists() else False
    return value if isinstance(value, str) else False


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template in a sandbox set up as transformers sets it up (utils/chat_template_utils.py):
    trimmed blocks, loop controls, a tojson that leaves non-ASCII alone, raise_exception and
    strftime_now, and dict() / namespace() that cannot reach Python internals."""
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
