"""Templates: a row's request rendered from its columns with Jinja2.

    template:
      messages:
        - {role: system, content: "Answer from the context."}
        - {role: user, content: "Context: {{ context }}\\nQuestion: {{ question }}"}

Every string in the section is a Jinja2 template, rendered in a sandbox
(`ImmutableSandboxedEnvironment`: a template cannot reach Python's internals nor
change the row), with undefined names as errors: a column the row lacks, or holds a
null in, stops the job before any request, never renders as an empty or "None"
prompt. `{{ x | default('') }}` says a missing value is fine.

Rendering is the price of every row, paid once more to validate the input, so a
string that only substitutes columns (`"Q: {{ question }}"`, the common case) is
rendered by plain concatenation, exactly as Jinja2 would render it (`str()` of each
value) but several times faster; anything else goes through Jinja2.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import SpecError
from ..endpoints import field_of, implied_by

__all__ = ["Template", "TemplateRowError"]

_MARKERS = ("{{", "{%", "{#")

Render = Callable[[Mapping[str, Any]], Any]


class TemplateRowError(Exception):
    """A row the template cannot render; the reader names the file and row."""


class Template:
    """A `template:` section compiled once; `render(record)` gives the request's fields."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = dict(raw)
        self._fields: list[tuple[str, Render]] = [(key, _compile(value, key)) for key, value in raw.items()]

    @property
    def field(self) -> str | None:
        """The request field the template asks in (the spec allows one): messages, prompt or input."""
        return field_of(self.raw)

    @property
    def endpoint(self) -> str | None:
        """What the template sends to, unless the spec says: messages → chat, prompt → completions."""
        implied = implied_by(self.field)
        return implied.name if implied else None

    def render(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The request fields for one row. Null values count as absent.

        Whatever the row holds, what comes out is the section's structure with text in
        it: `str()` of a value, never the value itself, so it is always sendable JSON.
        """
        return {key: render(record) for key, render in self._fields}


def _compile(value: Any, path: str) -> Render:
    """A function of the row giving `value` rendered. A part with no template in it is
    the same object for every row (`_Constant`): the request is only ever encoded, never
    changed, and a million rows then share one system message."""
    if isinstance(value, str):
        if not any(marker in value for marker in _MARKERS):
            return _Constant(value)
        return _compile_string(value, path)
    if isinstance(value, list):
        items = [_compile(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if all(isinstance(item, _Constant) for item in items):
            return _Constant(value)
        return lambda record: [item(record) for item in items]
    if isinstance(value, dict):
        fields = [(k, _compile(v, f"{path}.{k}")) for k, v in value.items()]
        if all(isinstance(field, _Constant) for _, field in fields):
            return _Constant(value)
        return lambda record: {k: field(record) for k, field in fields}
    return _Constant(value)


class _Constant:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, record: Mapping[str, Any]) -> Any:
        return self.value


def _compile_string(source: str, path: str) -> Render:
    import jinja2  # only a job with a template pays its 20 ms of import
    from jinja2 import nodes

    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"template.{path}: not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from None
    [output] = tree.body if len(tree.body) == 1 else [None]
    simple = isinstance(output, nodes.Output) and all(
        isinstance(n, nodes.TemplateData) or isinstance(n, nodes.Name) and n.ctx == "load" for n in output.nodes)
    if simple:
        assert isinstance(output, nodes.Output)
        return _concatenation(output.nodes, path)
    template = env.from_string(tree)

    def render(record: Mapping[str, Any]) -> str:
        try:
            return template.render({k: v for k, v in record.items() if v is not None})
        except jinja2.UndefinedError as exc:
            raise TemplateRowError(_undefined(path, exc.message or "", record)) from None
        except Exception as exc:  # a filter or test may raise anything on some value
            raise TemplateRowError(f"template.{path} failed on this row: {type(exc).__name__}: {exc}") from None

    return render


def _concatenation(parts: list[Any], path: str) -> Render:
    """Text and `{{ name }}`s only: `str.format` does what Jinja2 would, `format(value, "")`
    being `str(value)` for every type a row holds."""
    from jinja2 import nodes

    names = [p.name for p in parts if isinstance(p, nodes.Name)]
    pattern = "".join("{}" if isinstance(p, nodes.Name) else p.data.replace("{", "{{").replace("}", "}}")
                      for p in parts)

    def render(record: Mapping[str, Any]) -> str:
        values = [record.get(name) for name in names]
        if None in values:
            missing = names[values.index(None)]
            raise TemplateRowError(_undefined(path, f"'{missing}' is undefined", record))
        return pattern.format(*values)

    return render


def _undefined(path: str, message: str, record: Mapping[str, Any]) -> str:
    name = message.split("'")[1] if message.count("'") >= 2 else ""
    if name and record.get(name) is None:
        columns = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
        return (f"template.{path} uses column {name!r}, which this row does not have or holds null in "
                f"(its columns: {columns}); fix the template, or write {{{{ {name} | default('') }}}}")
    return f"template.{path}: {message}"


@functools.cache
def _environment() -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["data_url"] = data_url
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env


_MIME = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
         (b"%PDF", "application/pdf"))


def data_url(value: Any, mime: str | None = None) -> str:
    """Bytes (an image column) as a `data:` URL for an `image_url` content part; the
    type is read from the bytes' signature unless given."""
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"data_url needs bytes, got {type(value).__name__}")
    if mime is None:
        if value[:4] == b"RIFF" and value[8:12] == b"WEBP":
            mime = "image/webp"
        else:
            mime = next((m for magic, m in _MIME if value.startswith(magic)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(value).decode('ascii')}"
