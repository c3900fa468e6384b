"""Load a resolved model: weights into ``LlamaModel``, its tokenizer, and its fingerprint."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import xxhash

from lmdisagg.engine.model import LlamaModel
from lmdisagg.models.config import ModelConfig
from lmdisagg.errors import InvalidRequestError, ModelCacheCorruptError
from lmdisagg.models.registry import ModelSource


def fingerprint(src: ModelSource, seed: int = 0) -> str:
    """Identity of the weights, cheap to compute: part of every chunk key.

    Fetched models: the manifest's digests. Other directories: config.json, and for each
    safetensors file its size, header (tensor names, shapes, offsets) and first MiB of data.
    Dummy weights: the shape name and seed."""
    h = xxhash.xxh3_128()
    if src.dummy is not None:
        h.update(f"dummy|{src.name}|{seed}|{json.dumps(src.dummy.to_hf(), sort_keys=True)}".encode())
        return h.hexdigest()
    manifest = src.path / "lmdisagg-manifest.json"
    if manifest.exists():
        h.update(manifest.read_bytes())
        return h.hexdigest()
    h.update((src.path / "config.json").read_bytes())
    for f in sorted(src.path.glob("*.safetensors")):
        h.update(f"{f.name}|{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def load_model(src: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    cfg = src.config
    with torch.device(device):
        model = LlamaModel(cfg)
    model.to(dtype=dtype)
    model.inv_freq = model.inv_freq.float()  # rotary frequencies stay fp32
    if src.dummy is not None:
        model.init_dummy(seed)
        return model.eval()
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.path.glob("*.safetensors")):
        try:
            tensors.update(load_file(f, device="cpu"))
        except (SafetensorError, OSError, struct.error, ValueError) as e:
            raise ModelCacheCorruptError(f"cannot read weights {f}: {e}") from e
    try:
        model.load_hf_state_dict(tensors)
    except (ValueError, RuntimeError) as e:
        raise ModelCacheCorruptError(f"weights in {src.path} do not fit the config: {e}") from e
    return model.eval()


def _hf_tokenizer(path: Path):
    """``AutoTokenizer.from_pretrained(path)``, skipping its AutoConfig lookup where the class it
    picks is known. That lookup imports the model's config module, and with it (transformers 5)
    torch.distributed.tensor and sympy: an engine started in 4.71 s on the 2-core VM that way,
    3.67 s without (benchmarks/start_bench.py), at every worker (re)start. A Llama model whose tokenizer_config.json names
    ``TokenizersBackend`` (transformers 5 saves that for a tokenizer.json tokenizer; our model
    cache is saved so) and no remote code gets that class from AutoTokenizer, as long as
    transformers maps no tokenizer class of its own to the llama model type; anything else goes
    through AutoTokenizer."""
    import transformers
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text())
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        declared, model_type = {}, None
    if (declared.get("tokenizer_class") == "TokenizersBackend" and "auto_map" not in declared
            and model_type == "llama" and hasattr(transformers, "TokenizersBackend")):
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
        if TOKENIZER_MAPPING_NAMES.get("llama") is None:
            return transformers.TokenizersBackend.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


class Tokenizer:
    """The model's own tokenizer and chat template (HF ``tokenizer.json``)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        try:
            self.hf = _hf_tokenizer(Path(path))
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged cache
            raise ModelCacheCorruptError(f"cannot load tokenizer from {path}: {e}") from e
        eos = set(cfg.eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = len(self.hf)
        self._token_text: dict[int, str] = {}  # token_texts' cache, at most one entry per vocabulary id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens included), as logprobs name tokens; each id is
        decoded once per process (an echoed prompt names thousands per request)."""
        new = [i for i in dict.fromkeys(ids) if i not in self._token_text]
        if new:
            self._token_text.update(zip(new, self.hf.batch_decode([[i] for i in new], skip_special_tokens=False)))
        return [self._token_text[i] for i in ids]

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, render_calls=None,
                            template: str | None = None, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, kwargs: dict | None = None) -> list[int]:
        """``tools`` (OpenAI's function definitions) go to templates that show them to the model.
        An assistant turn's ``tool_calls`` are written into its content for a template that does
        not render them (else the conversation would lose them): by ``render_calls`` (a list of
        (name, arguments dict) → text, the model's own call format) if given, else as JSON.
        ``template``: a Jinja chat template used instead of the model's; ``add_generation_prompt``
        opens the assistant's turn; ``continue_final_message`` leaves the last (assistant) message
        open for the model to go on with; ``kwargs``: more variables for the template (vLLM's
        ``chat_template_kwargs``)."""
        template = template or self.hf.chat_template
        if not template:
            raise InvalidRequestError("this model has no chat template; use a plain prompt")
        if "tool_calls" not in template:
            messages = [_calls_as_text(m, render_calls) for m in messages]
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be true",
                                      param="continue_final_message")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise InvalidRequestError("continue_final_message needs an assistant message last",
                                      param="continue_final_message")
        try:
            text = self.hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a template's own error (jinja raise_exception, a missing key)
            raise InvalidRequestError(f"the chat template cannot render these messages: {e}", param="messages") from e
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def _calls_as_text(m: dict, render=None) -> dict:
    calls = m.get("tool_calls")
    if not calls:
        return m
    shown = []
    for c in calls:
        f = c.get("function", c) if isinstance(c, dict) else {}
        args = f.get("arguments")
        try:  # OpenAI sends the arguments as JSON text: shown as the object
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        shown.append((f.get("name"), args))
    text = render(shown) if render else json.dumps([{"name": n, "arguments": a} for n, a in shown], ensure_ascii=False)
    return {k: v for k, v in m.items() if k != "tool_calls"} | {"content": (m.get("content") or "") + text}
