"""The OpenAI wire format: request models (what real clients send) and response builders.

Fields we cannot honour (``best_of`` > n, tool_choice "auto" without a tool-call parser, and the
others in ``_NEUTRAL``) are rejected with 400 rather than silently dropped. ``echo`` with
``logprobs`` (completions) gives the prompt's tokens logprobs too.
"""
from __future__ import annotations

import json
import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmdisagg.engine.request import MAX_LOGPROBS
from lmdisagg.errors import InvalidRequestError


# fields real clients send that this server cannot honour: refused (400) unless set to what
# they mean when absent (any other unknown field is ignored: clients send vendor fields)
_NEUTRAL = {
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "suffix": lambda v: not v,
    "prompt_logprobs": lambda v: v is None,                       # vLLM: needs echo
    "bad_words": lambda v: not v,                                 # vLLM
    "include_stop_str_in_output": lambda v: not v,                # vLLM
    "prediction": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "echo": lambda v: not v,                                      # vLLM's chat echo (completions: a field)
    "web_search_options": lambda v: v is None,
    # vLLM's: a request's own chat template (vLLM too refuses it by default), beam search, spaces
    # around special tokens (slow tokenizers only), priority scheduling, per-request logits
    # processors, RAG documents, multimodal options
    "chat_template": lambda v: v is None,
    "use_beam_search": lambda v: not v,
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "priority": lambda v: v in (None, 0),
    "logits_processors": lambda v: not v,
    "documents": lambda v: not v,
    "mm_processor_kwargs": lambda v: not v,
}
# chat_template_kwargs may not set what the request's own fields set
_TEMPLATE_FIELDS = {"messages", "tools", "chat_template", "tokenize", "add_generation_prompt", "continue_final_message",
                    "documents"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, every chunk carries the usage so far


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send vendor fields; unknown ones are ignored

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    ignore_eos: bool = False               # vLLM extension, used by benchmark clients
    stop_token_ids: list[int] | None = None  # vLLM extension
    logprobs: Union[bool, int, None] = None
    user: str | None = None
    return_token_ids: bool = False         # vLLM extension: token ids in each choice
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM extensions from here: keep the prompt's
    #                                          last k tokens (-1: what the context leaves after max_tokens)
    allowed_token_ids: list[int] | None = None  # sample only among these
    return_tokens_as_token_ids: bool = False   # logprobs name tokens "token_id:N"
    cache_salt: str | None = None              # prefix-cache chunks shared only with the same salt
    skip_special_tokens: bool = True           # False: special tokens' text stays in the output
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if not 1 <= v <= 16:
            raise ValueError("n must be between 1 and 16")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            neutral = _NEUTRAL.get(name)
            if neutral is not None and not neutral(value):
                raise InvalidRequestError(f"{name} is not supported by this server", param=name)

    def processing(self) -> dict:
        """SamplingParams fields for logit_bias, the penalties, top_k, min_p and min_tokens (unset: off)."""
        bias = []
        for tok, value in (self.logit_bias or {}).items():
            try:
                bias.append((int(tok), float(value)))
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys are token ids, got {tok!r}", param="logit_bias") from None
        out = {"logit_bias": tuple(bias), "repetition_penalty": self.repetition_penalty,
               "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
               "top_k": self.top_k, "min_p": self.min_p, "min_tokens": self.min_tokens,
               "allowed_token_ids": tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None,
               "cache_salt": self.cache_salt, "skip_special_tokens": self.skip_special_tokens}
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids must name at least one token", param="allowed_token_ids")
        return {k: v for k, v in out.items() if v is not None}

    def truncate(self, ids: list[int], room: int) -> list[int]:
        """The prompt's last ``truncate_prompt_tokens`` tokens (vLLM); -1: the last ``room`` (the
        context less max_tokens, or less one token when max_tokens is unset)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k == 0:
            raise InvalidRequestError("truncate_prompt_tokens must be -1 or at least 1", param="truncate_prompt_tokens")
        k = max(1, room) if k == -1 else k
        return ids[-k:] if len(ids) > k else ids

    def logprob_count(self) -> int | None:
        """Alternatives per generated token to return with its log-probability; None: no logprobs."""
        raise NotImplementedError

    def structured(self) -> tuple[str, object] | None:
        """SamplingParams.structured from whichever field asks for it (at most one may)."""
        found = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                found.append(("response_format", ("json", "")))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema") or {}, dict):
                    raise InvalidRequestError("response_format.json_schema must be an object whose schema is a "
                                              "JSON schema object", param="response_format")
                schema = js.get("schema")
                found.append(("response_format", ("json", "" if schema is None else schema)))
            elif kind not in (None, "text"):
                raise InvalidRequestError(f"response_format type {kind!r} is not supported (text, json_object, "
                                          f"json_schema)", param="response_format")
        so = self.structured_outputs or {}
        for key in ("json", "regex", "choice", "grammar"):
            if so.get(key) is not None:
                found.append(("structured_outputs", (key, so[key])))
        if so.get("json_object"):
            found.append(("structured_outputs", ("json", "")))
        for key in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{key}")
            if value is not None:
                found.append((f"guided_{key}", (key, value)))
        if len(found) > 1:
            raise InvalidRequestError(f"one structured-output constraint per request, got "
                                      f"{', '.join(name for name, _ in found)}", param=found[1][0])
        if not found:
            return None
        name, (kind, spec) = found[0]
        if kind == "json" and isinstance(spec, str) and spec:
            try:
                json.loads(spec)
            except ValueError as e:
                raise InvalidRequestError(f"{name}: the JSON schema is not valid JSON: {e}", param=name) from None
        return kind, spec


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    best_of: int | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def logprob_count(self) -> int | None:
        lp = self.logprobs  # the legacy API: an integer, up to 5 at OpenAI (we allow MAX_LOGPROBS)
        if lp is None or lp is False:
            return None
        if lp is True:
            raise InvalidRequestError(f"logprobs of a completion is a number of alternatives per token, "
                                      f"0 to {MAX_LOGPROBS}, not true", param="logprobs")
        if not 0 <= lp <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {lp}", param="logprobs")
        return lp

    def prompt_logprob_count(self) -> int | None:
        """With echo and logprobs: the prompt's tokens get logprobs too (the first one: null)."""
        return self.logprob_count() if self.echo else None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object (absent: no arguments)
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ToolPlan:
    """How a chat request's tools are answered: ``named`` (tool_choice names a function: its
    arguments, constrained to its parameters' schema), ``required`` (a JSON array of one or
    more {"name", "parameters"} calls, constrained to the tools' schemas, as vLLM does) or
    ``auto`` (the model answers or calls in its own format, which ``parser`` reads back)."""

    def __init__(self, mode: str, tools: list[Tool], name: str | None, parallel: bool, parser=None):
        self.mode, self.tools, self.name, self.parallel, self.parser = mode, tools, name, parallel, parser
        params = {t.function.name: t.function.parameters or {"type": "object", "properties": {}} for t in tools}
        if mode == "auto":
            self.structured = None
        elif mode == "named":
            self.structured = ("json", params[name])
        else:
            call = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "parameters": p},
                     "required": ["name", "parameters"], "additionalProperties": False} for n, p in params.items()]
            schema = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
            if not parallel:
                schema["maxItems"] = 1
            self.structured = ("json", schema)

    def stream(self):
        """auto: a choice's ToolStream (content as it comes, the calls at the end)."""
        from lmdisagg.router.tool_parsers import ToolStream
        return ToolStream(self.parser, self.parallel)

    def answer(self, text: str, finish_reason: str | None, call_id) -> tuple[str | None, list[dict] | None, str | None]:
        """(content, tool_calls, finish_reason) for a choice's whole generated text."""
        if self.mode == "auto":
            ts = self.stream()
            content = ts.feed(text)
            rest, calls = ts.finish()
            content += rest
            return content or None, self.wrap(calls, call_id), tool_finish(calls, finish_reason)
        calls, reason = self.calls(text, finish_reason, call_id)
        return (None if calls else text), calls, reason

    @staticmethod
    def wrap(calls: list[tuple[str, str]], call_id) -> list[dict] | None:
        return [tool_call(call_id(), n, a) for n, a in calls] or None

    def calls(self, text: str, finish_reason: str | None, call_id) -> tuple[list[dict] | None, str | None]:
        """Forced calls: (tool_calls, finish_reason) for a choice's generated text; (None, reason)
        when the text is not a complete call list (``max_tokens`` cut it: it is returned as content)."""
        if self.mode == "named":  # the text is the arguments object (cut short if finish is "length")
            return [tool_call(call_id(), self.name, text)], finish_reason
        try:
            calls = [tool_call(call_id(), it["name"], json.dumps(it["parameters"], ensure_ascii=False))
                     for it in json.loads(text)]
        except (ValueError, TypeError, KeyError):  # cut short (or, never expected, not the schema's shape)
            return None, finish_reason
        return calls, tool_finish(calls, finish_reason)


def make_tool_plan(tools: list[Tool] | None, choice, parallel: bool | None, parser,
                   logprobs: bool = False) -> ToolPlan | None:
    """A request's ToolPlan from its tools and tool_choice (chat's shapes); None when no tool may
    be called (no tools, or "none")."""
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools have duplicate names", param="tools")
    if choice == "none":
        return None
    if choice in (None, "auto") and parser is None:  # as vLLM without --enable-auto-tool-choice
        raise InvalidRequestError(
            'tool_choice "auto" (the default when tools are given) needs a parser for the model\'s own '
            'tool-call format, and this model\'s chat template names none: set router.tool_call_parser '
            '(hermes, llama3_json, mistral) or serve --tool-call-parser; or send tool_choice "required" or '
            '{"type": "function", "function": {"name": ...}} (the call is then constrained to the '
            'tools\' schemas), or "none"', param="tool_choice")
    if logprobs:
        raise InvalidRequestError("logprobs are not returned with tools", param="logprobs")
    if choice in (None, "auto"):
        return ToolPlan("auto", tools, None, parallel is not False, parser)
    if choice == "required":
        return ToolPlan("required", tools, None, parallel is not False)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise InvalidRequestError(f"tool_choice must be none, auto, required or {{\"type\": \"function\", "
                                  f"\"function\": {{\"name\": one of {names}}}}}", param="tool_choice")
    return ToolPlan("named", tools, name, False)


def tool_finish(calls, finish_reason: str | None) -> str | None:
    """A choice that ended by itself with calls finishes with "tool_calls"."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True      # vLLM: open the assistant's turn
    continue_final_message: bool = False    # vLLM: leave the last (assistant) message open, to be continued
    chat_template_kwargs: dict | None = None  # vLLM: more variables for the chat template

    def template_options(self) -> dict:
        """Tokenizer.apply_chat_template's options from add_generation_prompt, continue_final_message
        and chat_template_kwargs."""
        kw = self.chat_template_kwargs or {}
        clash = sorted(_TEMPLATE_FIELDS & kw.keys())
        if clash:
            raise InvalidRequestError(f"chat_template_kwargs may not set {clash}", param="chat_template_kwargs")
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, "kwargs": kw}

    def tool_plan(self, parser=None) -> ToolPlan | None:
        """None when no tool may be called (no tools, or tool_choice "none"). ``parser``: the
        served model's tool-call parser (lmdisagg.router.tool_parsers), which "auto" needs."""
        return make_tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls, parser, bool(self.logprobs))

    def tool_defs(self) -> list[dict] | None:
        """The tools as chat templates take them (templates that know tools show them to the model)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def logprob_count(self) -> int | None:
        lp, top = self.logprobs, self.top_logprobs
        if lp is not None and not isinstance(lp, bool):
            raise InvalidRequestError("logprobs of a chat completion is true or false; the number of "
                                      "alternatives is top_logprobs", param="logprobs")
        if top is not None and lp is not True:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
        return (top or 0) if lp else None

    def template_messages(self) -> list[dict]:
        """Messages for the chat template; an assistant turn's tool_calls and a tool result's
        tool_call_id go along (a template that does not render tool calls gets them written into
        the turn's content: ``Tokenizer.apply_chat_template``)."""
        out = []
        for m in self.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            extra = m.model_extra or {}
            if m.role == "assistant" and extra.get("tool_calls"):
                calls = extra["tool_calls"]
                if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                    raise InvalidRequestError("an assistant message's tool_calls must be a list of objects",
                                              param="messages")
                msg["tool_calls"] = calls
            if m.role == "tool" and extra.get("tool_call_id"):
                msg["tool_call_id"] = extra["tool_call_id"]
            out.append(msg)
        return out


class ResponsesRequest(BaseModel):
    """OpenAI's Responses API (``client.responses.create``), stateless: ``input`` text or items
    (messages with text parts, earlier ``function_call`` items and their ``function_call_output``),
    ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format``
    (structured outputs), function ``tools`` with ``tool_choice`` and ``parallel_tool_calls`` (as
    on chat), ``stream``. Nothing is stored, so ``previous_response_id`` and ``background`` are
    refused, as are built-in tools and non-text inputs."""
    model_config = ConfigDict(extra="allow")
    model: str
    input: Union[str, list[dict]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    reasoning: dict | None = None
    store: bool | None = None       # accepted: nothing is stored either way
    metadata: dict | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.previous_response_id:
            raise InvalidRequestError("this server stores no responses: send the whole conversation as input",
                                      param="previous_response_id")
        if self.background:
            raise InvalidRequestError("background responses are not supported", param="background")
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise InvalidRequestError("reasoning is not supported by this model", param="reasoning")

    def chat_tools(self) -> list[Tool] | None:
        """The function tools in chat's shape (the Responses API's are flat: type, name, ...)."""
        if not self.tools:
            return None
        out = []
        for t in self.tools:
            if not isinstance(t, dict) or t.get("type") != "function":
                raise InvalidRequestError("only function tools are supported here (no built-in tools such as "
                                          "web_search or file_search)", param="tools")
            try:
                out.append(Tool(type="function", function=FunctionDef(**{k: v for k, v in t.items() if k != "type"})))
            except ValidationError as e:
                first = e.errors()[0]
                raise InvalidRequestError(f"function tool {'.'.join(map(str, first['loc']))}: {first['msg']}",
                                          param="tools") from None
            except TypeError as e:
                raise InvalidRequestError(f"a function tool's fields must be named: {e}", param="tools") from None
        return out

    def tool_plan(self, parser=None, tools: list[Tool] | None = None) -> ToolPlan | None:
        """``tools``: chat_tools(), when the caller has them already."""
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
            choice = {"type": "function", "function": {"name": choice.get("name")}}  # the Responses API's shape
        elif choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
            raise InvalidRequestError('tool_choice must be none, auto, required or {"type": "function", "name": ...}',
                                      param="tool_choice")
        return make_tool_plan(tools if tools is not None else self.chat_tools(), choice, self.parallel_tool_calls,
                              parser)

    def messages(self) -> list[dict]:
        """The chat messages: instructions as the system message, then the input (function_call
        items join the assistant turn before them, or make one; a function_call_output is a
        tool message)."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for item in self.input:
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind == "function_call":
                if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                    raise InvalidRequestError("a function_call item needs call_id, name and arguments (text)",
                                              param="input")
                call = tool_call(item["call_id"], item["name"], item["arguments"])
                if out and out[-1]["role"] == "assistant":
                    out[-1].setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                continue
            if kind == "function_call_output":
                if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                    raise InvalidRequestError("a function_call_output item needs call_id and output (text)",
                                              param="input")
                out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
                continue
            if kind != "message" or item.get("role") not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"input items must be messages (role user, assistant, system or "
                                          f"developer), function_call or function_call_output, got {kind!r}",
                                          param="input")
            content = item.get("content")
            if isinstance(content, list):
                if any(not isinstance(c, dict) or c.get("type") not in ("input_text", "output_text")
                       or not isinstance(c.get("text"), str) for c in content):
                    raise InvalidRequestError("only text content (input_text, output_text) is supported",
                                              param="input")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise InvalidRequestError("a message's content must be text or a list of text parts", param="input")
            out.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
        if not out:
            raise InvalidRequestError("input is empty", param="input")
        return out

    def structured(self) -> tuple[str, object] | None:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict):
            raise InvalidRequestError("text.format must be an object", param="text")
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json", ""
        if kind == "json_schema" and isinstance(fmt.get("schema") or {}, dict):
            return "json", fmt.get("schema") or ""
        raise InvalidRequestError("text.format must be text, json_object or json_schema with a schema object",
                                  param="text")


def response_output(msg_id: str, content: str | None, calls: list[dict] | None, finish_reason: str | None) -> list[dict]:
    """A finished response's output items: a message (if there is content), then one
    function_call item per tool call."""
    status = "incomplete" if finish_reason == "length" else "completed"
    out = [] if content is None else [{
        "type": "message", "id": msg_id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]}]
    for c in calls or []:
        out.append({"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"), "call_id": c["id"],
                    "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    return out


def response_object(rid: str, model: str, body: ResponsesRequest, created: int, output: list[dict],
                    finish_reason: str | None, use: dict | None) -> dict:
    """A Responses API ``response``: in progress (``use`` None), completed, or incomplete (cut by
    max_output_tokens)."""
    done = use is not None
    status = "in_progress" if not done else ("incomplete" if finish_reason == "length" else "completed")
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output if done else [],
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p,
        "parallel_tool_calls": bool(body.tools) and body.parallel_tool_calls is not False,
        "tool_choice": body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none"),
        "tools": body.tools or [], "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "previous_response_id": None, "reasoning": None, "store": False, "metadata": body.metadata or {},
        "usage": None if not done else {
            "input_tokens": use["prompt_tokens"], "output_tokens": use["completion_tokens"],
            "total_tokens": use["total_tokens"],
            "input_tokens_details": {"cached_tokens": use["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: ``prompt`` text, or chat ``messages`` (rendered with the chat template)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True      # messages: as on /v1/chat/completions
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def logprobs_object(entries: list[tuple[str, float, list[tuple[str, float]]]], chat: bool,
                    offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` of a choice (or of one streamed chunk of it) from its tokens'
    (text, log-probability, [(alternative's text, log-probability)]); an echoed prompt's first
    token has (text, None, None). Chat: ``content`` items with UTF-8 ``bytes``; completions: the
    legacy parallel lists, whose ``top_logprobs`` also hold the sampled token (as OpenAI's do)
    and whose ``text_offset`` counts from ``offset``."""
    if chat:
        def item(t: str, lp: float) -> dict:
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
        return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                            for t, lp, top in entries], "refusal": None}
    offsets = []
    for t, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {**dict(top), t: lp} for t, lp, top in entries],
            "text_offset": offsets}


def completion_response(rid: str, model: str, choices: list[dict], use: dict, chat: bool) -> dict:
    if chat:
        body = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                 "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]} for c in choices]
        for b, c in zip(body, choices):
            if c.get("tool_calls"):  # OpenAI: the calls (and content only if the model wrote some before them)
                b["message"].update(content=c.get("content"), tool_calls=c["tool_calls"])
        obj = "chat.completion"
    else:
        body = [{"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"),
                 "finish_reason": c["finish_reason"]} for c in choices]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": body, "usage": use}


def stream_chunk(rid: str, model: str, index: int, text: str | None, finish_reason: str | None, chat: bool,
                 role: bool = False, created: int | None = None) -> dict:
    created = created or int(time.time())
    if chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def tool_chunk(rid: str, model: str, index: int, calls: list[dict], created: int | None = None) -> dict:
    """A chat chunk whose delta carries tool calls (each with its ``index`` among the choice's calls)."""
    chunk = stream_chunk(rid, model, index, None, None, True, created=created)
    chunk["choices"][0]["delta"]["tool_calls"] = calls
    return chunk


def usage_chunk(rid: str, model: str, use: dict, chat: bool, created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": [], "usage": use}
