"""custom_values_yaml's reader: the same bounds and answers with libyaml's composer and with PyYAML's own."""

from __future__ import annotations

import pytest
import yaml

from apphosting import yamlbounds
from apphosting.settings import Limits

LIMITS = Limits(custom_values_yaml_max_depth=8, custom_values_yaml_max_aliases=2, custom_values_yaml_max_nodes=50)


@pytest.fixture(params=["libyaml", "pyyaml"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML is built without libyaml here")
        monkeypatch.setattr(yamlbounds, "_LOADER", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(yamlbounds, "_LOADER", yaml.SafeLoader)
    return str(request.param)


def _refused(text: str) -> tuple[str, str]:
    with pytest.raises(yamlbounds.TooBig) as raised:
        yamlbounds.load(text, LIMITS)
    return raised.value.reason, raised.value.message


def test_a_document_reads_as_safe_load_reads_it(loader: str) -> None:
    text = "service:\n  type: ClusterIP\n  ports: [80, 443]\nshared: &s {a: 1}\nagain: *s\n"
    assert yamlbounds.load(text, LIMITS) == yaml.safe_load(text)
    assert yamlbounds.load("", LIMITS) is None


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 8 + "]" * 8,
        "a:\n" + "".join("  " * level + f"k{level}:\n" for level in range(1, 9)) + "  " * 9 + "x: 1\n",
        # Past libyaml's own bound (1,000 levels) and PyYAML's recursion.
        "a: " + "[" * 5000 + "]" * 5000,
    ],
    ids=["flow", "block", "past-libyaml"],
)
def test_nesting_past_the_limit_is_too_deep(loader: str, text: str) -> None:
    assert _refused(text) == ("TOO_DEEP", "must nest at most 8 levels deep")


def test_nesting_at_the_limit_reads(loader: str) -> None:
    # The mapping is level 1, its value's lists levels 2 to 7, the innermost scalar level 8.
    assert yamlbounds.load("a: " + "[" * 6 + "x" + "]" * 6, LIMITS) == {"a": [[[[[["x"]]]]]]}


def test_alias_uses_are_counted_in_document_order(loader: str) -> None:
    assert yamlbounds.load("a: &x 1\nb: *x\nc: [*x]\n", LIMITS) == {"a": 1, "b": 1, "c": [1]}
    assert _refused("a: &x 1\nb: *x\nc: [*x, *x]\n") == ("TOO_LONG", "must use at most 2 aliases (*name)")


def test_an_alias_of_itself_and_an_expansion_past_the_nodes_are_refused(loader: str) -> None:
    assert _refused("a: &x [*x]\n")[0] == "INVALID_FORMAT"
    many = Limits(custom_values_yaml_max_aliases=100, custom_values_yaml_max_nodes=50)
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
    with pytest.raises(yamlbounds.TooBig) as raised:
        yamlbounds.load(bomb, many)
    assert raised.value.reason == "TOO_LONG"
    assert "expanded" in raised.value.message


def test_a_syntax_error_says_where(loader: str) -> None:
    with pytest.raises(yaml.MarkedYAMLError) as raised:
        yamlbounds.load("a: [1, 2\nb: 3\n", LIMITS)
    assert not isinstance(raised.value, yamlbounds.TooBig)
    assert raised.value.problem_mark is not None


def test_documents_only_pyyaml_s_own_scanner_refused_are_read() -> None:
    """A tab after a key's colon, a block scalar's indicator with a comment after it: libyaml reads them, as
    does go-yaml (a port of libyaml) with which Helm reads values; PyYAML's own scanner refused them."""
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML is built without libyaml here")
    assert yamlbounds.load("a:\t1\n", LIMITS) == {"a": 1}
    assert yamlbounds.load("a: >#\n  x\n", LIMITS) == {"a": "x\n"}
