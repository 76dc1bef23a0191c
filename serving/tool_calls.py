"""Tools in, tool calls out, in the Hermes format every small chat model has seen:

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

A chat template that takes `tools` gets them; for one that does not (the default model's), they go
into the system prompt with instructions. Whenever a call may be made, decoding is constrained by
an xgrammar structural tag, so a call always parses and its arguments match the function's schema:
`required` and named choices allow only calls, `auto` allows text until the model opens a call.
The same parser reads whole and streamed outputs, so both carry the same arguments."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from model_parallel.structured import MAX_JSON_WHITESPACE, StructuredOutputSpec, build_grammar
from serving.protocol import ChatCompletionRequest, OpenAIError

CALL_BEGIN = "<tool_call>"
CALL_END = "</tool_call>"
RESPONSE_BEGIN = "<tool_response>"
TRIGGER = "<tool_"  # in auto mode, text that starts tool markup is a call
_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}}

TOOLS_PROMPT = """# Tools

You can call the functions described below, inside <tools></tools>, to help with the user's \
request:
<tools>
{tools}
</tools>

To call a function, reply with its name and arguments as a JSON object inside \
<tool_call></tool_call> tags, one call per tag:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>"""


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request's tools mean for its prompt, its decoding and its response."""

    mode: Literal["none", "auto", "required"]
    tools: list[dict[str, Any]] = field(default_factory=list)  # shown in the prompt
    callable: list[dict[str, Any]] = field(default_factory=list)  # functions a call may name
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"

    def guide(self) -> StructuredOutputSpec | None:
        """The structural tag that constrains the calls (None when no call may be made)."""
        if not self.parses_calls:
            return None
        tags = [
            {
                "type": "tag",
                "begin": f'{CALL_BEGIN}\n{{"name": {json.dumps(f["name"])}, "arguments": ',
                "content": {
                    "type": "json_schema",
                    "json_schema": f.get("parameters") or _NO_PARAMETERS,
                    "max_whitespace_cnt": MAX_JSON_WHITESPACE,
                },
                "end": f"}}\n{CALL_END}",
            }
            for f in self.callable
        ]
        if self.mode == "required":
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n"}
        else:
            # Whatever tool markup the model opens becomes a call: a small model imitating the
            # history writes "<tool_response>" or "<tool_answer>" where it means to call
            # (measured: SmolLM2-135M with one call in its history called on 2 of 20 weather
            # asks when only "<tool_call>" triggered).
            fmt = {"type": "triggered_tags", "triggers": [TRIGGER], "tags": tags}
        fmt |= {"at_least_one": self.mode == "required", "stop_after_first": not self.parallel}
        return StructuredOutputSpec(
            "structural_tag", json.dumps({"type": "structural_tag", "format": fmt})
        )


def _function(tool: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise OpenAIError("only tools of type 'function' are supported", param=f"{param}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise OpenAIError("a function tool needs a 'function' object", param=f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise OpenAIError(
            "a function needs a name of 1 to 64 letters, digits, '_', '.' or '-'",
            param=f"{param}.function.name",
        )
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise OpenAIError(
                "parameters must be a JSON schema object", param=f"{param}.function.parameters"
            )
        try:
            build_grammar(StructuredOutputSpec("json_schema", json.dumps(params)))
        except ValueError as e:
            raise OpenAIError(str(e), param=f"{param}.function.parameters") from e
    return fn


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    """Validate tools and tool_choice (400s name the field) and decide what they mean."""
    functions = [_function(t, i) for i, t in enumerate(req.tools or [])]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise OpenAIError("function names must be unique", param="tools")
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if functions else "none"
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise OpenAIError(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        if name not in names:
            raise OpenAIError(
                f"tool_choice names {name!r}, which is not in tools", param="tool_choice"
            )
        chosen = [f for f in functions if f["name"] == name]
        return ToolPlan("required", functions, chosen, parallel=False)
    if choice not in ("none", "auto", "required"):
        raise OpenAIError(
            "tool_choice must be 'none', 'auto', 'required' or a named function",
            param="tool_choice",
        )
    if choice != "none" and not functions:
        raise OpenAIError(f"tool_choice {choice!r} needs tools", param="tool_choice")
    if choice == "none":  # plain text: the tools are not shown, so the model does not try
        return ToolPlan("none")
    return ToolPlan(choice, functions, functions, parallel)


def render_call(name: str, arguments: str) -> str:
    return f'{CALL_BEGIN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CALL_END}'


def prompt_messages(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """For a template without tool support: tools into the system prompt, assistant tool calls
    and tool results into text in the same format."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [
                render_call(tc["function"]["name"], tc["function"]["arguments"] or "{}")
                for tc in m.pop("tool_calls")
            ]
            m["content"] = "\n".join(filter(None, [m["content"], *calls]))
        if m["role"] == "tool":
            m.pop("tool_call_id", None)
            m = {"role": "user", "content": f"{RESPONSE_BEGIN}\n{m['content']}\n</tool_response>"}
        out.append(m)
    if plan.tools:
        listing = "\n".join(json.dumps({"type": "function", "function": f}) for f in plan.tools)
        section = TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ParserEvents:
    """What one piece of text added: content, and the indices of the calls it completed."""

    content: str = ""
    calls: list[int] = field(default_factory=list)


# (?=\S): the header ends where the arguments begin, however the text was cut into pieces
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\}\s*" + re.escape(CALL_END))


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits one choice's text into content and tool calls as it arrives. A call is handed out
    only once it is complete, so a stream and the whole response list the same calls with the
    same arguments, and a call that max_tokens cuts off appears in neither. Arguments are the raw
    text between the header and the call's closing brace; a `}</tool_call>` inside a string
    value is not taken for the end (the arguments before it must parse)."""

    def __init__(self, new_id: Any):
        self.calls: list[ParsedCall] = []
        self._new_id = new_id
        self._buf = ""
        self._space = ""  # trailing whitespace, handed out only if more text follows
        self._open: ParsedCall | None = None  # the call whose arguments are arriving

    def feed(self, text: str, final: bool = False) -> ParserEvents:
        ev = ParserEvents()
        self._buf += text
        progressed = True
        while progressed:
            progressed = self._step_call(ev) if self._open else self._step_text(ev, final)
        if final:  # what is left of an unfinished call (cut by max_tokens) is dropped
            self._buf, self._open = "", None
        return ev

    def _content(self, ev: ParserEvents, text: str) -> None:
        """Text outside calls; whitespace before a call or at the end is not content (held back
        until more text shows it is inside the content)."""
        text = self._space + text
        kept = text.rstrip()
        ev.content += kept
        self._space = text[len(kept) :]

    def _step_text(self, ev: ParserEvents, final: bool) -> bool:
        start = self._buf.find(CALL_BEGIN)
        if start < 0:
            keep = 0 if final else _held_prefix(self._buf, CALL_BEGIN)
            self._content(ev, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        header = _HEADER.match(self._buf, start + len(CALL_BEGIN))
        self._content(ev, self._buf[:start])
        self._buf = self._buf[start:]
        if header is None:
            return False  # wait for the whole header
        self._space = ""
        self._open = ParsedCall(self._new_id(), json.loads(header.group(1)))
        self._buf = self._buf[header.end() - start :]
        return True

    def _step_call(self, ev: ParserEvents) -> bool:
        for m in _TAIL.finditer(self._buf):
            args = self._buf[: m.start()]
            if _is_json_object(args):
                call, self._open = self._open, None
                call.arguments = args
                self.calls.append(call)
                ev.calls.append(len(self.calls) - 1)
                self._buf = self._buf[m.end() :]
                return True
        return False


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
