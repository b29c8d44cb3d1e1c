"""Tests for ccpu.filters against containerd's filter semantics.

Expected error strings and the corpus results come from containerd's own
tests (filters/filter_test.go, filters/scanner_test.go); the rest pin the
behaviour read off filters/parser.go, scanner.go, quote.go and filter.go.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccpu.filters import (
    Adaptor,
    Filter,
    FilterSyntaxError,
    Operator,
    Selector,
    parse,
    parse_filter,
    snapshot_adaptor,
)


def nothing(path: tuple[str, ...]) -> str | None:
    """An object without any field."""
    return None


def labels_of(labels: Mapping[str, str], **rest: str) -> Adaptor:
    return snapshot_adaptor(
        name=rest.get("name", "n"),
        parent=rest.get("parent", ""),
        kind=rest.get("kind", "committed"),
        labels=labels,
    )


def matches(filters: list[str], adaptor: Adaptor) -> bool:
    return parse(filters).match(adaptor)


# --- parsing of each construct ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "op", "value"),
    [
        ("name==foo", Operator.EQUAL, "foo"),
        ("name!=foo", Operator.NOT_EQUAL, "foo"),
        ("name~=^fo+$", Operator.MATCHES, "^fo+$"),
        ("name", Operator.PRESENT, ""),
    ],
)
def test_operators(text: str, op: Operator, value: str) -> None:
    assert parse_filter(text) == (Selector(("name",), op, value),)


def test_whitespace_allowed_before_operator_and_value() -> None:
    assert parse_filter("name == foo") == (Selector(("name",), Operator.EQUAL, "foo"),)


def test_quoted_field_components() -> None:
    sel = parse_filter('labels."containerd.io/snapshot.ref"==x')
    assert sel[0].fieldpath == ("labels", "containerd.io/snapshot.ref")
    sel = parse_filter('"leading quote".post==v')
    assert sel[0].fieldpath == ("leading quote", "post")


def test_dash_and_digits_in_unquoted_fields() -> None:
    assert parse_filter("labels.foo-bar_1")[0].fieldpath == ("labels", "foo-bar_1")


def test_quoted_values_with_go_escapes() -> None:
    (sel,) = parse_filter(r'x=="a\"b\\c\n\t\a\x41\101\u00e9\U0001F600"')
    assert sel.value == 'a"b\\c\n\t\x07AAé\U0001f600'


def test_hex_escapes_are_bytes_like_go() -> None:
    # "\xc3\xa9" is the UTF-8 of é, so it must equal a label spelled é.
    (sel,) = parse_filter(r'x=="\xc3\xa9"')
    assert sel.value == "é"
    # A lone invalid byte never equals any real text.
    (sel,) = parse_filter(r'x=="\xff"')
    assert sel.value not in ("ÿ", "\ufffd")


def test_quoted_value_keeps_commas_and_spaces() -> None:
    assert parse_filter('other=="too complex, yo"')[0].value == "too complex, yo"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("parent==default/3/sha256:abc", "default/3/sha256:abc"),
        ("labels.foo==omg_asdf.asdf-qwer", "omg_asdf.asdf-qwer"),
        ("a==x=y!z~", "x=y!z~"),
        ("a==牛", "牛"),
        # No in-string OR: "|" inside an unquoted value is literal.
        ("a==1|b==2", "1|b==2"),
        # Single quotes are not quotes in containerd 1.x.
        ("name=='x'", "'x'"),
    ],
)
def test_unquoted_values(text: str, value: str) -> None:
    (sel,) = parse_filter(text)
    assert sel.value == value


def test_regexp_alternative_quotes() -> None:
    assert parse_filter(r"a~=/foo\/bar/")[0].value == "foo/bar"
    assert parse_filter("a~=|foo/bar|")[0].value == "foo/bar"
    assert parse_filter("a~=/[abc]{0,2}/,b")[0].value == "[abc]{0,2}"


def test_empty_inputs() -> None:
    assert parse_filter("") == ()
    assert parse([]) == Filter(())
    assert parse([]).match(nothing)
    assert parse([""]).match(nothing)


def test_parse_rejects_bare_string() -> None:
    with pytest.raises(TypeError):
        parse("name==foo")  # type: ignore[arg-type]


# --- syntax errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Verbatim from containerd's filter_test.go.
        ("name==foo,", "[name==foo,]: expected field or quoted"),
        ("labels.", "[labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "[image~= >|,|< id?=?fbaq]: expected value or quoted"),
        (
            "labels.ns/key==value",
            "[labels.ns >|/|< key==value]: quoted literal not terminated",
        ),
        (
            "labels.key==/value",
            "[labels.key== >|/|< value]: quoted literal not terminated",
        ),
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "[labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
        ),
        (
            r'labels.?"more complex label with \\ and \"".post==present',
            r'[labels. >|?|< "more complex label with \\ and \"".post==present]: '
            "expected field or quoted",
        ),
        # Derived from the same parser.
        ("==x", "[ >|=|< =x]: expected field or quoted"),
        ("a==", "[a==]: expected value or quoted"),
        ("a=b", '[a >|=|< b]: unsupported operator "="'),
        ("a===b", '[a >|=|< ==b]: unsupported operator "==="'),
        ('a=="abc', '[a== >|"|< abc]: quoted literal not terminated'),
        ('labels."abc==x', '[labels. >|"|< abc==x]: quoted literal not terminated'),
        ("a==b c", "[a==b >| |< c]: unexpected input:  "),
        ("a==b ", "[a==b >| |< ]: unexpected input:  "),
        ("a ,b", '[a  >|,|< b]: expected an operator ("=="|"!="|"~=")'),
        (",a", "[ >|,|< a]: expected field or quoted"),
        ("a,,b", "[a, >|,|< b]: expected field or quoted"),
        ("a==.b", "[a== >|.|< b]: expected value or quoted"),
        ("a==|x|", "[a== >|||< x|]: invalid quote encountered"),
        ("a!=/x/", "[a!= >|/|< x/]: invalid quote encountered"),
        ("'a'==b", "[ >|'|< a'==b]: expected field or quoted"),
        (r'labels."\g"', r'[labels. >|"|< \g"]: illegal escape sequence'),
        (r'labels."\xaz"', r'[labels. >|"|< \xaz"]: illegal numeric escape sequence'),
        (r'a=="\777"', r'[a== >|"|< \777"]: unquoting failed: quote syntax error'),
        ("foo\x00bar", "[foo >|\x00|< bar]: unexpected null"),
        (" ", "[ ]: expected field or quoted"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse([text])
    assert str(info.value) == "filters: parse error: " + message
    assert isinstance(info.value, ValueError)
    assert info.value.text == text


def test_error_position_attribute() -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("labels.key==/value")
    assert info.value.position == 12
    assert info.value.reason == "quoted literal not terminated"


def test_one_bad_string_fails_the_whole_request() -> None:
    with pytest.raises(FilterSyntaxError):
        parse(["name==foo", "name=foo"])


# --- matching ---------------------------------------------------------------


def test_and_within_one_string() -> None:
    f = ["name==a,kind==active"]
    assert matches(f, snapshot_adaptor("a", "", "active", {}))
    assert not matches(f, snapshot_adaptor("a", "", "committed", {}))
    assert not matches(f, snapshot_adaptor("b", "", "active", {}))


def test_or_across_strings() -> None:
    f = ["name==a", "name==b,kind==view"]
    assert matches(f, snapshot_adaptor("a", "", "active", {}))
    assert matches(f, snapshot_adaptor("b", "", "view", {}))
    assert not matches(f, snapshot_adaptor("b", "", "active", {}))
    assert not matches(f, snapshot_adaptor("c", "", "view", {}))


def test_empty_string_among_filters_matches_all() -> None:
    assert matches(["name==zzz", ""], snapshot_adaptor("a", "", "active", {}))


def test_regex_is_unanchored_search() -> None:
    a = labels_of({"x": "hello world"})
    assert matches(['labels.x~="o w"'], a)
    assert matches(["labels.x~=^hello"], a)
    assert not matches(["labels.x~=^world"], a)
    assert matches(["labels.x~=/l{2}/"], a)


def test_regex_is_ascii_like_re2() -> None:
    assert not matches([r"labels.x~=^\d$"], labels_of({"x": "٣"}))  # Arabic-Indic 3
    assert matches([r"labels.x~=^\d$"], labels_of({"x": "3"}))


def test_regex_has_go_re2_semantics() -> None:
    """The answers Go's regexp gives (containerd's), which Python's re does not."""
    assert matches([r'labels.x~="^\\pL+$"'], labels_of({"x": "été"}))  # RE2 Unicode classes
    assert not matches(["labels.x~=/a$/"], labels_of({"x": "a\n"}))  # $ = end of text only
    assert matches([r'labels.x~="a\\z"'], labels_of({"x": "ba"}))
    assert not matches(["labels.x~=/(?i)straße/"], labels_of({"x": "STRASSE"}))  # simple folds only
    assert matches(["labels.x~=/(?i)k/"], labels_of({"x": "\u212a"}))  # Kelvin sign folds to k
    # what Go refuses never matches: back-references, look-around, repeats above 1000
    assert not matches([r'labels.x~="(a)\\1"'], labels_of({"x": "aa"}))
    assert not matches(["labels.x~=/a(?=b)/"], labels_of({"x": "ab"}))
    assert not matches(["labels.x~=/a{1001}/"], labels_of({"x": "a" * 1001}))
    assert matches(["labels.x~=/a{1000}/"], labels_of({"x": "a" * 1000}))


def test_invalid_regex_parses_but_never_matches() -> None:
    f = parse(["labels.x~=[unclosed"])
    assert not f.match(labels_of({"x": "[unclosed"}))
    # It only spoils its own clause; another filter string can still match.
    assert parse(["labels.x~=(", "name==n"]).match(labels_of({"x": "("}))


def test_presence() -> None:
    assert matches(["labels.x"], labels_of({"x": ""}))  # present though empty
    assert not matches(["labels.x"], labels_of({"y": "1"}))
    assert not matches(["labels.x"], labels_of({}))


def test_equal_requires_presence() -> None:
    assert not matches(['labels.x==""'], labels_of({"y": "1"}))
    assert matches(['labels.x==""'], labels_of({"x": ""}))


def test_not_equal_on_absent_field_compares_empty_string() -> None:
    # filter.go: `return value != m.value`, value "" when absent.
    assert matches(["labels.x!=foo"], labels_of({"y": "1"}))
    assert not matches(['labels.x!=""'], labels_of({"y": "1"}))
    assert not matches(["labels.x!=foo"], labels_of({"x": "foo"}))
    assert matches(["labels.x!=foo"], labels_of({"x": "bar"}))


def test_regex_on_absent_field_searches_empty_string() -> None:
    assert matches(["labels.x~=^$"], labels_of({"y": "1"}))
    assert not matches(["labels.x~=/./"], labels_of({"y": "1"}))


def test_regex_starting_with_dot_must_be_quoted() -> None:
    # "." right after the operator is a separator token to containerd.
    with pytest.raises(FilterSyntaxError, match="expected value or quoted"):
        parse(["name~=.*"])
    assert matches(["name~=/.*/"], labels_of({}))


# --- containerd's own corpus (filters/filter_test.go TestFilters) -----------

CORPUS: list[dict] = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]


def corpus_adaptor(entry: dict):
    def resolve(path: tuple[str, ...]) -> str | None:
        if path[0] in ("name", "other"):
            v = entry.get(path[0], "")
            return v if v else None
        if path[0] == "labels":
            return entry.get("labels", {}).get(".".join(path[1:]))
        return None

    return resolve


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", list(range(9))),
        ("name", list(range(9))),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        (r'labels."more complex label with \\ and \""==present', [4]),
        (r'labels."more complex label with \\ and \"".post==present', [5]),
    ],
)
def test_containerd_corpus(text: str, expected: list[int]) -> None:
    f = parse([text])
    got = [i for i, e in enumerate(CORPUS) if f.match(corpus_adaptor(e))]
    assert got == expected


# --- snapshot adaptor and the remote-snapshot filter ------------------------

REF = "containerd.io/snapshot.ref"


def test_remote_snapshot_filter() -> None:
    # The remote-snapshot lookup: target ref unquoted, parent Go-quoted (%q).
    f = parse([f'labels."{REF}"==sha256:abcd,parent=="default/4/sha256:ef01"'])

    def snap(parent: str, labels: dict[str, str]) -> Adaptor:
        return snapshot_adaptor("s1", parent, "committed", labels)

    assert f.match(snap("default/4/sha256:ef01", {REF: "sha256:abcd"}))
    assert not f.match(snap("default/5/sha256:ef01", {REF: "sha256:abcd"}))
    assert not f.match(snap("default/4/sha256:ef01", {REF: "sha256:abce"}))
    assert not f.match(snap("default/4/sha256:ef01", {}))


def test_remote_snapshot_filter_without_parent() -> None:
    # containerd formats the parent with %q, so a base layer gives parent=="".
    f = parse([f'labels."{REF}"==sha256:abcd,parent==""'])
    assert f.match(snapshot_adaptor("s1", "", "committed", {REF: "sha256:abcd"}))
    assert not f.match(snapshot_adaptor("s1", "p", "committed", {REF: "sha256:abcd"}))


def test_snapshot_adaptor_fields() -> None:
    a = snapshot_adaptor("default/7/x", "", "Active", {"a.b": "1"})
    assert a(("kind",)) == "active"
    assert a(("name",)) == "default/7/x"
    assert a(("parent",)) == ""  # storage/bolt.go: parent always present
    assert a(("labels", "a", "b")) == "1"  # path re-joined with "."
    assert a(("labels", "a")) is None
    assert a(("size",)) is None
    assert a(()) is None
    assert snapshot_adaptor("n", "", "unknown", {})(("kind",)) is None


def test_kind_filter() -> None:
    assert matches(["kind==view"], snapshot_adaptor("n", "", "view", {}))
    assert not matches(["kind==view"], snapshot_adaptor("n", "", "committed", {}))
    assert matches(["kind"], snapshot_adaptor("n", "", "committed", {}))


# --- properties -------------------------------------------------------------

_FILTER_ALPHABET = st.sampled_from(
    list('abcxyz_-09.,"\'/|\\=!~ \t\n:') + ["\x00", "\ufffd", "é", "牛", "\u2028"]
)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=_FILTER_ALPHABET, max_size=40)))
def test_parser_only_raises_filter_syntax_error(text: str) -> None:
    try:
        f = parse([text])
    except FilterSyntaxError as e:
        assert 0 <= e.position <= len(text)
        return
    f.match(snapshot_adaptor("n", "p", "active", {"k": "v"}))


# Text containerd's scanner accepts inside quotes once Go-quoted.
_quotable = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
)


def go_quote(s: str) -> str:
    """Close enough to Go's %q: JSON escapes are all valid Go escapes."""
    return json.dumps(s, ensure_ascii=False)


@settings(max_examples=300, deadline=None)
@given(key=_quotable, value=_quotable)
def test_quoted_label_round_trip(key: str, value: str) -> None:
    f = parse([f"labels.{go_quote(key)}=={go_quote(value)}"])
    assert f.match(labels_of({key: value}))
    assert not f.match(labels_of({key: value + "x"}))


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("abcXYZ0189:/._-@+=!~|'")),
        min_size=1,
    ).filter(lambda v: v[0] not in "\"/|,.=!~")
)
def test_unquoted_value_round_trip(value: str) -> None:
    (sel,) = parse_filter(f"parent=={value}")
    assert sel.value == value
