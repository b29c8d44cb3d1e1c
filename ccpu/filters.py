"""containerd's filter syntax, for the snapshot List RPC.

containerd hands a snapshotter ``ListSnapshotsRequest.filters`` (repeated
string) and expects it to apply them the way its own ``filters`` package does
(``filters/parser.go``, ``scanner.go``, ``quote.go``, ``filter.go`` in 1.6/1.7;
``pkg/filters`` in 2.x).  The one filter that matters most is the one the
metadata layer sends in the remote-snapshot path to find a layer the backend
already has::

    labels."containerd.io/snapshot.ref"==sha256:...,parent=="default/4/sha256:..."

Getting that wrong means duplicate unpacks or a failed pull, so this module
reproduces containerd's grammar and matching rules, quirks included, rather
than a tidier approximation of them.

Grammar (as containerd's scanner really behaves)::

    filters   := filter*              OR: any filter string may match
    filter    := "" | selector ("," selector)*     AND: all must match
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_-]+ | "..."             (Go-quoted, double quotes)
    operator  := "==" | "!=" | "~="
    value     := "..." | unquoted
               | /.../ | |...|                       (only after "~=")

* An empty list matches everything, and so does an empty filter string.
* A bare fieldpath tests presence.  ``!=`` compares the adaptor's value even
  when the field is absent (absent reads as ""), so ``labels.x!=foo`` matches
  objects without ``labels.x`` while ``labels.x==<anything>`` never does.
* ``~=`` is an unanchored search, like Go's ``Regexp.MatchString``.  A pattern
  that does not compile is not a syntax error: the selector simply never
  matches (containerd compiles lazily and logs).
* Unquoted values run to the next "," or whitespace and may hold any printable
  character, so ``parent==default/3/sha256:abc`` and ``a==x|y`` (value
  ``x|y``) are fine.  They may not *start* with ``"``, ``/`` or ``|`` (those
  open a quoted string), ``,`` or ``.`` (separators) or ``=``, ``!``, ``~``
  (which extend the operator: ``a===b`` is the unsupported operator "===").
* Whitespace is skipped before an operator and before a value, but not after
  a value: ``a == b`` parses, ``a==b ,c`` does not.
* Quoted strings use Go escapes (``\\a \\b \\f \\n \\r \\t \\v \\\\ \\"``,
  ``\\ooo``, ``\\xhh``, ``\\uhhhh``, ``\\Uhhhhhhhh``).  ``\\x`` and octal
  escapes give raw bytes as in Go; bytes that are not UTF-8 survive as lone
  surrogates (``surrogateescape``) so they never equal a real label.
* There is no in-string OR.  ``|`` is only an alternative regexp delimiter;
  OR across filters comes from passing several strings.
* Single quotes are not quotes: ``name=='x'`` compares with the three
  characters ``'x'``, and a field cannot start with ``'``.

Version notes:

* containerd <= 1.6 rejects ``-`` inside unquoted field names (issue
  containerd#5642/#8538); the newest 1.x-tree ``filters/scanner.go`` accepts
  it.  We accept it, the lenient choice for a server: containerd itself
  quotes label keys.
* containerd 2.x (``pkg/filters``) keeps this grammar and these semantics.
  Downstream forks of the package add ``=``, ``!==``, ``!~=``, ``*``
  wildcards and parse-time regexp errors; containerd sends none of that, and
  it is not accepted here (``a=b`` is an unsupported operator).

Regexps: containerd uses Go's ``regexp`` (RE2 syntax and semantics, linear time); so do we,
through Google's RE2 (the ``google-re2`` package, docs/dependencies.md).  Python's ``re``
backtracks: ``labels.x~=^(a|a)*$`` against a label of 30 ``a`` and a ``b`` took it minutes, on
the snapshotter's event loop.  RE2 gives the same answers as Go for the same pattern (``$`` only
at the end, ``\\d``/``\\w``/``\\s``/``\\b`` ASCII, ``\\pL``, ``\\z``, ``(?i)`` with Unicode
folding, repeat counts up to 1000) and refuses what Go refuses (back-references,
look-around): such a pattern never matches, as in containerd.  Known gap: a pattern holding
bytes that are not UTF-8 (``\\xff`` in a quoted filter value) never matches here, while Go
would compile it.

Error positions are character offsets into the filter string; Go reports byte
offsets, which differ only for non-ASCII input.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]  # google-re2: Go's regexp semantics, linear time

__all__ = [
    "Adaptor",
    "Filter",
    "FilterSyntaxError",
    "Operator",
    "Selector",
    "parse",
    "parse_filter",
    "snapshot_adaptor",
]


class Adaptor(Protocol):
    """Resolves a field path on one object.

    Returns the field's value, or None when the field is absent.  "" means
    present but empty, which is what lets ``labels.x==""`` tell an empty
    label from a missing one (Go's adaptors return ``(value, present)``).
    """

    def __call__(self, path: tuple[str, ...], /) -> str | None: ...


class FilterSyntaxError(ValueError):
    """A filter string does not parse; containerd answers InvalidArgument.

    ``str()`` is containerd's own message, e.g.
    ``filters: parse error: [a >|=|< b]: unsupported operator "="``, where
    ``>|.|<`` marks the offending character (or the whole input is shown when
    the error is at its end).  ``position`` is that offset.
    """

    def __init__(self, text: str, position: int, reason: str) -> None:
        self.text = text
        self.position = position
        self.reason = reason
        if position < len(text):
            where = (
                f"[{text[:position]} >|{text[position]}|< {text[position + 1:]}]"
            )
        else:
            where = f"[{text}]"
        super().__init__(f"filters: parse error: {where}: {reason}")


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


_OPERATORS = {"==": Operator.EQUAL, "!=": Operator.NOT_EQUAL, "~=": Operator.MATCHES}


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath[op value]`` term; see the module doc for semantics."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    _regex: Any = field(default=None, init=False, repr=False, compare=False)  # re2 pattern

    def __post_init__(self) -> None:
        if self.operator is Operator.MATCHES:
            object.__setattr__(self, "_regex", _compile(self.value))

    def match(self, adaptor: Adaptor) -> bool:
        found = adaptor(self.fieldpath)
        value = "" if found is None else found
        if self.operator is Operator.PRESENT:
            return found is not None
        if self.operator is Operator.EQUAL:
            return found is not None and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            return value != self.value
        return self._regex is not None and _search(self._regex, value)


@dataclass(frozen=True)
class Filter:
    """Parsed filters: OR over ``clauses``, AND within each clause.

    No clauses at all means "no filters given" and matches everything (Go's
    ``ParseAll()``); an empty clause came from an empty string and matches
    everything too.
    """

    clauses: tuple[tuple[Selector, ...], ...] = ()

    def match(self, adaptor: Adaptor) -> bool:
        if not self.clauses:
            return True
        return any(all(s.match(adaptor) for s in c) for c in self.clauses)


def parse(filters: Sequence[str]) -> Filter:
    """Parse a request's repeated ``filters`` field (OR of the strings)."""
    if isinstance(filters, str):
        # A bare string is a Sequence[str] of characters: never what was meant.
        raise TypeError("parse() takes a sequence of filter strings, not a str")
    return Filter(tuple(parse_filter(f) for f in filters))


def parse_filter(text: str) -> tuple[Selector, ...]:
    """Parse one filter string into its AND-ed selectors ("" gives ())."""
    if text == "":
        return ()
    return _Parser(text).selectors()


def snapshot_adaptor(
    name: str, parent: str, kind: str, labels: Mapping[str, str]
) -> Adaptor:
    """Adaptor for a snapshot Info, as containerd's snapshotters resolve it.

    Follows ``adaptSnapshot`` in ``snapshots/storage/bolt.go`` (what the
    built-in snapshotters apply to their own Walk), because a proxy
    snapshotter stands in that place: ``name`` and ``parent`` are always
    present, so ``parent==""`` selects snapshots without a parent.  (The
    metadata layer's adaptor in ``metadata/adaptors.go`` instead treats an
    empty parent as absent.)  ``kind`` is one of "active", "view",
    "committed", case-insensitive; anything else reads as absent.  A label
    path's components are re-joined with "." to form the key, and with no
    labels at all every label is absent.
    """
    kind_value: str | None = kind.lower()
    if kind_value not in ("active", "view", "committed"):
        kind_value = None
    label_map = dict(labels)

    def resolve(path: tuple[str, ...], /) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "kind":
            return kind_value
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "labels":
            if not label_map:
                return None
            return label_map.get(".".join(path[1:]))
        return None

    return resolve


# --- regexps ---------------------------------------------------------------


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern from a client is not worth a line on stderr


def _compile(pattern: str) -> Any:
    """Compile with RE2 as Go would accept it, or None: such a selector never matches."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except (re2.error, UnicodeEncodeError, ValueError, TypeError):
        return None


def _search(regex: Any, value: str) -> bool:
    try:
        return regex.search(value) is not None
    except UnicodeEncodeError:  # a lone surrogate: no real label value holds one
        return False


# --- scanner ---------------------------------------------------------------
# A port of the state machine in containerd's filters/scanner.go; the parser's
# error positions and messages depend on its exact peek/next bookkeeping.

_EOF = -1
_ILLEGAL = -2
_Rune = str | int


class _Tok(enum.Enum):
    EOF = enum.auto()
    ILLEGAL = enum.auto()
    QUOTED = enum.auto()
    VALUE = enum.auto()
    FIELD = enum.auto()
    SEPARATOR = enum.auto()
    OPERATOR = enum.auto()
    OTHER = enum.auto()  # any other single character


_QUOTES = frozenset('"/|')
_SEPARATORS = frozenset(",.")
_OPERATOR_CHARS = frozenset("=!~")
# Go's unicode.IsSpace: the Latin-1 set plus the White_Space property.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_FIELD_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
)
_HEX = "0123456789abcdef"


def _digit_val(ch: _Rune) -> int:
    """ASCII hex digit value, 16 for anything else (int() is too lenient)."""
    if isinstance(ch, str) and len(ch) == 1 and ch.isascii():
        i = _HEX.find(ch.lower())
        if i >= 0:
            return i
    return 16


def _is_space(ch: _Rune) -> bool:
    return isinstance(ch, str) and ch in _SPACES


def _is_value_char(ch: _Rune) -> bool:
    # Go: not ',' nor space, and letter/digit/number/graphic/punct; graphic
    # covers L, M, N, P, S and Zs (all of which are spaces).
    if not isinstance(ch, str) or ch == "," or ch in _SPACES:
        return False
    return unicodedata.category(ch)[0] in "LMNPS"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0  # start of the current character
        self.ppos = 0  # just past it
        self.value = False  # an operator was seen: next token is a value
        self.err = ""  # first error only, as in Go

    def _error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def next(self) -> _Rune:
        if self.pos >= len(self.input):
            return _EOF
        self.pos = self.ppos
        if self.ppos >= len(self.input):
            return _EOF
        ch = self.input[self.ppos]
        self.ppos += 1
        # Go decodes U+FFFD, like invalid UTF-8, as utf8.RuneError.
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self._error("rune error")
            return _ILLEGAL
        if ch == "\x00":
            self._error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> _Rune:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        pos = self.pos
        while isinstance(ch, str):
            if ch in _QUOTES:
                ok = self._scan_quoted(ch)
                return pos, _Tok.QUOTED if ok else _Tok.ILLEGAL, self._text(pos)
            if ch in _SEPARATORS:
                self.value = False
                return pos, _Tok.SEPARATOR, self._text(pos)
            if ch in _OPERATOR_CHARS:
                while self.peek() in _OPERATOR_CHARS:
                    self.next()
                self.value = True
                return pos, _Tok.OPERATOR, self._text(pos)
            if ch in _SPACES:
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                # The first character is taken whatever it is (Go does too).
                while _is_value_char(self.peek()):
                    self.next()
                self.value = False
                return pos, _Tok.VALUE, self._text(pos)
            if ch in _FIELD_CHARS:
                while self.peek() in _FIELD_CHARS:
                    self.next()
                return pos, _Tok.FIELD, self._text(pos)
            return self.pos, _Tok.OTHER, ""
        return self.pos, _Tok.EOF if ch == _EOF else _Tok.ILLEGAL, ""

    def _text(self, pos: int) -> str:
        return self.input[pos : self.ppos]

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        ch = self.next()
        while ch != quote:
            if ch == "\n" or not isinstance(ch, str):
                self._error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self.next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[_Rune, bool]:
        ch = self.next()
        if isinstance(ch, str):
            if ch in "abfnrtv\\" or ch == quote:
                return self.next(), True
            if ch in "01234567":
                return self._scan_digits(ch, 8, 3)
            widths = {"x": 2, "u": 4, "U": 8}
            if ch in widths:
                return self._scan_digits(self.next(), 16, widths[ch])
        self._error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: _Rune, base: int, n: int) -> tuple[_Rune, bool]:
        while n > 0 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self._error("illegal numeric escape sequence")
            return ch, False
        return ch, True


# --- unquoting (filters/quote.go: Go's strconv.Unquote plus / and |) --------


class _QuoteSyntax(Exception):
    pass


_SIMPLE_ESCAPES = {
    "a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A,
    "r": 0x0D, "t": 0x09, "v": 0x0B, "\\": 0x5C,
}


def _hex_value(digits: str, n: int) -> int:
    if len(digits) < n or any(_digit_val(c) >= 16 for c in digits):
        raise _QuoteSyntax
    return int(digits, 16)


def _unquote(s: str) -> str:
    """Decode a quoted token; works on bytes like Go, then back to str."""
    if len(s) < 2 or s[0] != s[-1] or s[0] not in _QUOTES:
        raise _QuoteSyntax
    quote = s[0]
    body = s[1:-1]
    if "\n" in body:
        raise _QuoteSyntax
    if "\\" not in body and quote not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise _QuoteSyntax
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _QuoteSyntax
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e == "x":
            out.append(_hex_value(body[i : i + 2], 2))
            i += 2
        elif e in ("u", "U"):
            n = 4 if e == "u" else 8
            v = _hex_value(body[i : i + n], n)
            i += n
            if v > 0x10FFFF:
                raise _QuoteSyntax
            # Go's utf8.EncodeRune writes U+FFFD for surrogate halves.
            rune = "\ufffd" if 0xD800 <= v <= 0xDFFF else chr(v)
            out += rune.encode("utf-8")
        elif e in "01234567":
            digits = body[i : i + 2]
            if len(digits) < 2 or any(d not in "01234567" for d in digits):
                raise _QuoteSyntax
            v = int(e + digits, 8)
            if v > 255:
                raise _QuoteSyntax
            out.append(v)
            i += 2
        elif e in "'\"|/" and e == quote:
            out.append(ord(e))
        else:
            raise _QuoteSyntax
    return out.decode("utf-8", "surrogateescape")


# --- parser (filters/parser.go) --------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sc = _Scanner(text)

    def _fail(self, pos: int, reason: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, pos, reason)

    def selectors(self) -> tuple[Selector, ...]:
        out = [self._selector()]
        while True:
            ch = self.sc.peek()
            if ch == ",":
                self.sc.scan()
                out.append(self._selector())
            elif ch == _EOF:
                return tuple(out)
            else:
                shown = ch if isinstance(ch, str) else "\ufffd"
                raise self._fail(self.sc.ppos, f"unexpected input: {shown}")

    def _selector(self) -> Selector:
        path = self._fieldpath()
        if self.sc.peek() in (",", _EOF):
            return Selector(path, Operator.PRESENT)
        op = self._operator()
        return Selector(path, op, self._value(alt_quotes=op is Operator.MATCHES))

    def _fieldpath(self) -> tuple[str, ...]:
        parts = [self._field()]
        while self.sc.peek() == ".":
            self.sc.scan()
            parts.append(self._field())
        return tuple(parts)

    def _field(self) -> str:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, alt_quotes=False)
        if tok is _Tok.ILLEGAL:
            raise self._fail(pos, self.sc.err)
        raise self._fail(pos, "expected field or quoted")

    def _operator(self) -> Operator:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.OPERATOR:
            op = _OPERATORS.get(text)
            if op is None:
                raise self._fail(pos, f'unsupported operator "{text}"')
            return op
        if tok is _Tok.ILLEGAL:
            raise self._fail(pos, self.sc.err)
        raise self._fail(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, *, alt_quotes: bool) -> str:
        pos, tok, text = self.sc.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, alt_quotes=alt_quotes)
        if tok is _Tok.ILLEGAL:
            raise self._fail(pos, self.sc.err)
        raise self._fail(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, *, alt_quotes: bool) -> str:
        if not alt_quotes and text[0] != '"':
            raise self._fail(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except _QuoteSyntax:
            raise self._fail(pos, "unquoting failed: quote syntax error") from None
