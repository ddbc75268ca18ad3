from __future__ import annotations

import string

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from batchrun import SpecError, parse_spec
from batchrun.inputs.template import Template, TemplateRowError, data_url

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Context: {{ context }}\nQuestion: {{ question }}"},
]


def test_messages_are_rendered_from_the_columns() -> None:
    template = Template({"messages": MESSAGES})
    assert template.endpoint == "chat"
    assert template.render({"context": "sky", "question": "colour?", "gold": "blue"}) == {"messages": [
        {"role": "system", "content": "Answer from the context."},
        {"role": "user", "content": "Context: sky\nQuestion: colour?"},
    ]}


values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(text=st.text(alphabet=string.printable.replace("{", "").replace("}", "").replace("%", "")),
       a=values, b=values)
def test_the_fast_path_renders_exactly_as_jinja2_does(text: str, a: object, b: object) -> None:
    source = f"{text}{{{{ a }}}}{text}{{{{b}}}}"
    expected = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                             ).from_string(source).render(a=a, b=b)
    assert Template({"prompt": source}).render({"a": a, "b": b}) == {"prompt": expected}


@pytest.mark.parametrize("source", ["Q: {{ question }}", "Q: {{ question | upper }}"])
def test_a_column_the_row_lacks_or_holds_null_in_is_named(source: str) -> None:
    template = Template({"prompt": source})
    for record in ({"context": "c"}, {"context": "c", "question": None}):
        with pytest.raises(TemplateRowError) as info:
            template.render(record)
        assert "template.prompt uses column 'question'" in str(info.value)
        assert "(its columns: context)" in str(info.value)


def test_default_makes_a_missing_value_fine() -> None:
    assert Template({"prompt": "[{{ note | default('none') }}]"}).render({}) == {"prompt": "[none]"}


def test_a_template_that_fails_on_a_row_says_why() -> None:
    template = Template({"prompt": "{{ '%d' % n }}"})
    assert template.render({"n": 7}) == {"prompt": "7"}
    with pytest.raises(TemplateRowError, match=r"template.prompt failed on this row: TypeError: %d format"):
        template.render({"n": "x"})


def test_the_sandbox_keeps_python_internals_out() -> None:
    with pytest.raises(TemplateRowError, match="SecurityError|undefined"):
        Template({"prompt": "{{ q.__class__.__mro__[1].__subclasses__() }}"}).render({"q": "x"})
    with pytest.raises(TemplateRowError, match="SecurityError"):
        Template({"prompt": "{{ q.append(1) }}"}).render({"q": [1]})


def test_image_bytes_become_a_data_url_content_part() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 4
    template = Template({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "{{ caption }}"},
        {"type": "image_url", "image_url": {"url": "{{ image | data_url }}"}},
    ]}]})
    [message] = template.render({"caption": "what", "image": png})["messages"]
    assert message["content"][1] == {"type": "image_url", "image_url": {"url": data_url(png)}}
    assert data_url(png) == "data:image/png;base64,iVBORw0KGgoAAAAA"


@pytest.mark.parametrize(
    ("template", "extra", "message"),
    [
        ({"messages": [{"role": "user", "content": "{{ q"}]}, {},
         "template.messages[0].content: not a valid Jinja2 template"),
        ({"prompt": "a", "messages": MESSAGES}, {}, "give exactly one of messages"),
        ({"promt": "a"}, {}, "template.promt: unknown key; did you mean prompt?"),
        ({"messages": [{"content": "x"}]}, {}, "template.messages: expected a list of {role, content}"),
        ({"messages": MESSAGES}, {"endpoint": "completions"}, "template.messages is for endpoint: chat"),
        ({"prompt": "\ud800"}, {}, "template: holds a lone surrogate"),
        ({"prompt": "{{ x }}", "instructions": "be brief"}, {}, "template.instructions is for endpoint: responses"),
    ],
)
def test_bad_templates_stop_at_the_spec(template: dict, extra: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"input": "in.parquet", "output": "o.parquet", "template": template, **extra}, environ={})
    assert message in str(info.value)


def test_the_template_is_part_of_the_request_config() -> None:
    base = {"input": "in.parquet", "output": "o.parquet"}
    plain = parse_spec(base, environ={})
    one = parse_spec({**base, "template": {"prompt": "A {{ q }}"}}, environ={})
    two = parse_spec({**base, "template": {"prompt": "B {{ q }}"}}, environ={})
    assert "template" not in plain.request_config()  # states saved before templates still resume
    assert one.request_config() != two.request_config()
