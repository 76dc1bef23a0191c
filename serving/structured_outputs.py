"""A request's structured-output fields -> one StructuredOutputSpec for the engine: OpenAI's
`response_format` (text, json_object, json_schema) and vLLM's extras under vLLM's names, both
`structured_outputs: {json, regex, choice, grammar, json_object, structural_tag}` and the older
`guided_json / guided_regex / guided_choice / guided_grammar`."""

from __future__ import annotations

import json
from typing import Any

from model_parallel.structured import GuideKind, StructuredOutputSpec
from serving.protocol import OpenAIError, SamplingFields

# vLLM's structured_outputs keys -> our kinds
_STRUCTURED_OUTPUTS: dict[str, GuideKind] = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
    "structural_tag": "structural_tag",
}
_GUIDED: dict[str, GuideKind] = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _spec(kind: GuideKind, value: Any, param: str) -> StructuredOutputSpec:
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind in ("json_schema", "structural_tag"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise OpenAIError(f"not valid JSON: {e}", param=param) from e
        if not isinstance(value, dict):
            raise OpenAIError("must be a JSON object", param=param)
        return StructuredOutputSpec(kind, json.dumps(value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise OpenAIError("must be a non-empty list of strings", param=param)
        return StructuredOutputSpec(kind, json.dumps(value))
    if not isinstance(value, str) or not value:
        raise OpenAIError("must be a non-empty string", param=param)
    return StructuredOutputSpec(kind, value)


def _response_format(fmt: dict[str, Any], param: str) -> StructuredOutputSpec | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError(
                "json_schema needs an object with a name and a schema",
                param=f"{param}.json_schema",
            )
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return StructuredOutputSpec("json_object")
        return _spec("json_schema", schema, f"{param}.json_schema.schema")
    if kind == "structural_tag":
        return _spec("structural_tag", fmt, param)
    raise OpenAIError(
        f"{param}.type must be text, json_object, json_schema or structural_tag",
        param=f"{param}.type",
    )


def requested_guide(
    req: SamplingFields,
    response_format: dict[str, Any] | None = None,
    format_param: str = "response_format",
) -> tuple[str, StructuredOutputSpec] | None:
    """The one structured-output constraint a request asks for, with the field that asked for
    it, or None. `format_param` names the field `response_format` came from."""
    found: list[tuple[str, StructuredOutputSpec | None]] = []
    if response_format is not None:
        found.append((format_param, _response_format(response_format, format_param)))
    for key, value in (req.structured_outputs or {}).items():
        if key not in _STRUCTURED_OUTPUTS:
            continue  # vLLM's options beside the constraint (backend, whitespace) do not apply
        if value is None or value is False:
            continue
        param = f"structured_outputs.{key}"
        found.append((param, _spec(_STRUCTURED_OUTPUTS[key], value, param)))
    for key, kind in _GUIDED.items():
        value = getattr(req, key)
        if value is not None:
            found.append((key, _spec(kind, value, key)))
    found = [(p, g) for p, g in found if g is not None]
    if len(found) > 1:
        raise OpenAIError(
            f"ask for one structured output at a time, not {', '.join(p for p, _ in found)}",
            param=found[1][0],
        )
    return found[0] if found else None  # type: ignore[return-value]
