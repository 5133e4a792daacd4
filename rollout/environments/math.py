"""Math answers: the last \\boxed{...} of the response (else, unless require_boxed, its last number),
compared with the row's reference answer.

Normalisation (the usual MATH/GSM8K verifier rules, kept small): drop $, spaces, \\left/\\right, thin
spaces (\\! \\, \\; \\:), \\text{...} wrappers (a trailing unit such as 5\\text{ cm} entirely), trailing
periods, degree signs and thousands separators; \\dfrac/\\tfrac -> \\frac; a whole answer in \\boxed{} is
unwrapped. A reference like GSM8K's "... #### 72" is reduced to what follows the last ####.

Two answers are equivalent when their normalised strings are identical, or when both parse as the same
mathematical value (`parse` below, a small recursive-descent parser; nothing is ever evaluated as code):
- numbers and arithmetic: integers, decimals (0.5, .5, 0.50), a/b, \\frac{a}{b}, \\frac12, + - * / ^,
  \\cdot, \\times, \\div, implicit products (2\\sqrt{2}, 3(x+1)), parentheses and braces, \\sqrt{x},
  \\sqrt[n]{x}, sqrt(x), \\pi, e (Euler's number), \\sin \\cos \\tan \\ln \\exp, \\infty. Two integers
  must be equal, other values agree to 1e-6 (relative); rational parts are computed exactly (Fractions),
  the rest in complex floating point.
- expressions in variables (single letters: x+1 vs 1+x, 2(x+1) vs 2x+2): equal at several fixed random
  points. Adjacent letters are a word, not a product (so "yes" never equals "sey"): such answers compare
  as strings only.
- a trailing percent sign: 10\\% equals both 10 (the MATH convention: references often drop the sign)
  and 0.1 (its value).
- lists: (1,2), [0,1) compare item by item with the same brackets (points, intervals); an unbracketed
  list (1, -2: the solutions of an equation) compares as a multiset, in any order.
- an equation x=5 against a bare 5 compares its right-hand side; two equations compare both sides.

Not sympy: sympify/parse_expr run Python's eval on the text (a policy's output must never reach it)
and simplify has no time bound. Everything here is bounded by the answer's length (at most
MAX_ANSWER_CHARS are parsed) and by guards on exact powers.
"""

from __future__ import annotations

import cmath
import math
import random
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from core.errors import InputError
from rollout.environments.base import Completion, Environment, reference_answer, register_environment

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT = re.compile(r"(?<=[\d}).])\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}$")
_EQUATION = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?)=([^=]+)$")

MAX_ANSWER_CHARS = 400  # longer answers compare as strings only
TOLERANCE = 1e-6  # relative, with an absolute floor of 1e-6 for values below 1
_FUNCTIONS = {"sqrt": cmath.sqrt, "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "ln": cmath.log}
_FUNCTIONS["exp"] = cmath.exp
_COMMANDS = {"frac", "dfrac", "tfrac", "sqrt", "pi", "infty", *_FUNCTIONS}
_OPERATORS = {"cdot": "*", "times": "*", "div": "/"}
_POINTS = [[random.Random(1000 * i + j).uniform(0.5, 2.5) for j in range(26)] for i in range(4)]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    box = _braced(text, text.index("{", start))
    return None if box is None else box[0]  # None: unbalanced, cut off by max_tokens


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) of the {...} group opening at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j], j + 1
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def normalise(answer: str) -> str:
    s = answer.strip()
    if s.startswith(("\\boxed{", "\\fbox{")) and (box := _braced(s, s.index("{"))) and box[1] == len(s):
        s = box[0]  # a whole answer in a box
    s = _UNIT.sub("", s.rstrip(". "))
    s = _TEXT.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", "")):
        s = s.replace(old, new)
    for old, new in (("\\$", ""), ("$", ""), ("\\%", "%"), ("{,}", ","), ("−", "-")):
        s = s.replace(old, new)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = "".join(s.split()).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def as_number(s: str) -> Fraction | None:
    """The exact value of a normalised answer without variables (1/2, \\frac{1}{2}, 2^{10}, ...); None
    when it has none (not a number, irrational, or not parsed)."""
    tree = parse(s)
    return None if tree is None else exact(tree)


def equivalent(answer: str, reference: str) -> bool:
    """Whether two answers mean the same (see the module docstring)."""
    a, r = normalise(answer), normalise(reference)
    if a == r:
        return True
    if max(len(a), len(r)) > MAX_ANSWER_CHARS:
        return False
    return any(_same_answer(x, y) for x in _readings(a) for y in _readings(r))


def _readings(s: str) -> list[str]:
    """A trailing percent sign: the number as written and its value (10% -> 10 and 0.1)."""
    if s.endswith("%") and s[:-1] and "%" not in s[:-1]:
        return [s[:-1], f"({s[:-1]})/100"]
    return [s]


def _same_answer(a: str, b: str) -> bool:
    ea, eb = _EQUATION.match(a), _EQUATION.match(b)
    if ea and eb:
        return ea[1] == eb[1] and _same_list(ea[2], eb[2])
    if ea or eb:
        return _same_list(ea[2] if ea else a, eb[2] if eb else b)
    return _same_list(a, b)


def _same_list(a: str, b: str) -> bool:
    la, lb = split_list(a), split_list(b)
    if la is None or lb is None:
        return la is None and lb is None and _same_value(a, b)
    (open_a, items_a, close_a), (open_b, items_b, close_b) = la, lb
    if (open_a, close_a) != (open_b, close_b) or len(items_a) != len(items_b):
        return False
    if open_a:  # a point or an interval: in order
        return all(_same_value(x, y) for x, y in zip(items_a, items_b, strict=True))
    unmatched = list(items_b)  # a list of solutions: in any order
    for x in items_a:
        match = next((i for i, y in enumerate(unmatched) if _same_value(x, y)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return True


def split_list(s: str) -> tuple[str, list[str], str] | None:
    """(open bracket, items, close bracket) of a comma-separated list ("" for no brackets: 1,2), or None
    when s is a single item."""
    opening, closing = "", ""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _depth_ok(s[1:-1]):
        opening, closing, s = s[0], s[-1], s[1:-1]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    if len(items) == 1 or any(not item for item in items):
        return None
    return opening, items, closing


def _depth_ok(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _same_value(a: str, b: str) -> bool:
    ta, tb = parse(a), parse(b)
    if ta is None or tb is None:
        return False
    x, y = exact(ta), exact(tb)
    if x is not None and y is not None:
        return close(x, y)
    names = sorted(variables(ta) | variables(tb))
    if len(names) > len(_POINTS[0]):
        return False
    points = _POINTS if names else _POINTS[:1]
    agreed = 0
    for point in points:
        env = dict(zip(names, point, strict=False))
        u, v = value(ta, env), value(tb, env)
        if u is None or v is None:
            continue  # outside one side's domain (a pole): try the next point
        if not close(u, v):
            return False
        agreed += 1
    return agreed >= min(2, len(points))


def close(x: complex | Fraction, y: complex | Fraction) -> bool:
    """Equal within TOLERANCE; two integers exactly (1000000 is not 1000001)."""
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        if x.denominator == y.denominator == 1:
            return x == y
        return abs(x - y) <= TOLERANCE * max(1, abs(y))
    x, y = complex(x), complex(y)
    if any(math.isinf(p) for p in (x.real, x.imag, y.real, y.imag)):
        return x == y
    return abs(x - y) <= TOLERANCE * max(1.0, abs(y))


# ---- the parser: normalised answer text -> a tree of tuples ----------------------------------------
#
#   expr  := term (('+' | '-') term)*
#   term  := unary (('*' | '/' | \cdot | \times | \div | implicit product) unary)*
#   unary := ('-' | '+') unary | power
#   power := atom ('^' unary)?                                  (right-associative)
#   atom  := number | '(' expr ')' | '{' expr '}' | letter | \pi | e | \infty | \frac A B | \sqrt[n]? A
#            | function A                                     (A: '{' expr '}', one digit or letter, or an atom)
# Trees: ("num", Fraction) ("var", name) ("pi",) ("e",) ("inf",) ("neg", t) ("+"|"-"|"*"|"/"|"^", t, u)
# ("root", t, n) ("fn", name, t).


_DECIMAL = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_WORD = re.compile(r"[A-Za-z]+")


class _ParseError(ValueError):
    pass


def parse(s: str) -> tuple | None:
    """The expression tree of a normalised answer, or None when it is not a (supported) expression."""
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    parser = _Parser(s)
    try:
        tree = parser.expr()
        if parser.i != len(s):
            raise _ParseError(f"unexpected {s[parser.i]!r}")
    except (_ParseError, RecursionError):
        return None
    return tree


class _Parser:
    def __init__(self, s: str) -> None:
        self.s, self.i = s, 0

    def peek(self, text: str) -> bool:
        return self.s.startswith(text, self.i)

    def take(self, text: str) -> bool:
        if self.peek(text):
            self.i += len(text)
            return True
        return False

    def command(self) -> str | None:
        """The name of the \\command at the cursor (not consumed)."""
        m = _COMMAND.match(self.s, self.i)
        return m[1] if m else None

    def expr(self) -> tuple:
        tree = self.term()
        while self.i < len(self.s) and self.s[self.i] in "+-":
            op = self.s[self.i]
            self.i += 1
            tree = (op, tree, self.term())
        return tree

    def term(self) -> tuple:
        tree = self.unary()
        while self.i < len(self.s):
            name = self.command()
            if self.s[self.i] in "*/":
                op = self.s[self.i]
                self.i += 1
            elif name in _OPERATORS:
                op = _OPERATORS[name]
                self.i += len(name) + 1
            elif self.s[self.i] in "0123456789.({\\" or self.s[self.i].isalpha():
                op = "*"  # implicit product: 2x, 2\sqrt{2}, 3(x+1)
            else:
                break
            tree = (op, tree, self.unary())
        return tree

    def unary(self) -> tuple:
        if self.take("-"):
            return ("neg", self.unary())
        if self.take("+"):
            return self.unary()
        base = self.atom()
        if self.take("^") or self.take("**"):
            return ("^", base, self.unary())
        return base

    def atom(self) -> tuple:
        s, i = self.s, self.i
        if i >= len(s):
            raise _ParseError("unexpected end")
        if m := _DECIMAL.match(s, i):
            self.i = m.end()
            return ("num", Fraction(m[0]))
        for opening, closing in (("(", ")"), ("{", "}")):
            if self.take(opening):
                tree = self.expr()
                if not self.take(closing):
                    raise _ParseError(f"missing {closing!r}")
                return tree
        if s[i] == "\\":
            return self.latex_command()
        if s[i].isalpha():
            return self.word()
        raise _ParseError(f"unexpected {s[i]!r}")

    def word(self) -> tuple:
        word = _WORD.match(self.s, self.i)[0]
        if word in ("pi", "e"):
            self.i += len(word)
            return (word,)
        if word in _FUNCTIONS:  # sqrt(2), sin(x): ascii function names
            self.i += len(word)
            return ("fn", word, self.argument())
        if len(word) > 1:
            raise _ParseError(f"a word, not a product of variables: {word!r}")
        self.i += 1
        return ("var", word)

    def latex_command(self) -> tuple:
        name = self.command()
        if name not in _COMMANDS:
            raise _ParseError(f"unsupported command \\{name}")
        self.i += len(name) + 1
        if name == "pi":
            return ("pi",)
        if name == "infty":
            return ("inf",)
        if name in ("frac", "dfrac", "tfrac"):
            return ("/", self.argument(), self.argument())
        if name == "sqrt":
            degree = ("num", Fraction(2))
            if self.take("["):
                degree = self.expr()
                if not self.take("]"):
                    raise _ParseError("missing ']'")
            return ("root", self.argument(), degree)
        return ("fn", name, self.argument())

    def argument(self) -> tuple:
        """A command's argument: {expr}, or TeX's single token (\\frac12: one digit), or an atom."""
        if self.i < len(self.s) and self.s[self.i].isdigit():
            self.i += 1
            return ("num", Fraction(self.s[self.i - 1]))
        if self.i < len(self.s) and self.s[self.i].isalpha() and not self.peek("pi"):
            self.i += 1
            return ("var", self.s[self.i - 1])
        return self.atom()


# ---- evaluation -----------------------------------------------------------------------------------

_MAX_EXACT_BITS = 4096  # an exact power larger than this is computed in floating point (or overflows)


def exact(tree: tuple) -> Fraction | None:
    """The exact rational value of a tree without variables; None when it has none (irrational, a
    variable, a division by zero, too large)."""
    try:
        return _exact(tree)
    except (ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None


def _exact(t: tuple) -> Fraction | None:
    kind = t[0]
    if kind == "num":
        return t[1]
    if kind == "neg":
        x = _exact(t[1])
        return None if x is None else -x
    if kind in "+-*/^" and len(kind) == 1:
        x, y = _exact(t[1]), _exact(t[2])
        if x is None or y is None:
            return None
        if kind == "^":
            return _exact_power(x, y)
        if kind == "/":
            return x / y if y else None
        return {"+": x + y, "-": x - y, "*": x * y}[kind]
    if kind == "root":
        x, n = _exact(t[1]), _exact(t[2])
        if x is None or n is None or n.denominator != 1 or n <= 0 or x < 0:
            return None
        num, den = _int_root(x.numerator, int(n)), _int_root(x.denominator, int(n))
        return None if num is None or den is None else Fraction(num, den)
    return None  # pi, inf, variables, functions


def _exact_power(x: Fraction, y: Fraction) -> Fraction | None:
    if y.denominator != 1:
        return None
    bits = abs(y.numerator) * max(x.numerator.bit_length(), x.denominator.bit_length(), 1)
    if bits > _MAX_EXACT_BITS or (x == 0 and y < 0):
        return None
    return x ** int(y)


def _int_root(x: int, n: int) -> int | None:
    """The integer n-th root of x, None when x is not an n-th power."""
    if n == 2:
        r = math.isqrt(x)
    elif n > 64 or x.bit_length() > 1000:
        return None
    else:
        r = round(x ** (1 / n))
    return next((c for c in (r - 1, r, r + 1) if c >= 0 and c**n == x), None)


def value(tree: tuple, env: Mapping[str, float]) -> complex | None:
    """The complex value of a tree with its variables set from env; None where it has none (a pole, an
    overflow, an unknown variable)."""
    try:
        return _value(tree, env)
    except (ZeroDivisionError, OverflowError, ValueError, KeyError, RecursionError):
        return None


def _value(t: tuple, env: Mapping[str, float]) -> complex:
    kind = t[0]
    if kind == "num":
        return complex(float(t[1]))
    if kind == "var":
        return complex(env[t[1]])
    if kind == "pi":
        return complex(math.pi)
    if kind == "e":
        return complex(math.e)
    if kind == "inf":
        return complex(math.inf)
    if kind == "neg":
        return -_value(t[1], env)
    if kind == "fn":
        return _FUNCTIONS[t[1]](_value(t[2], env))
    if kind == "root":
        x, n = _value(t[1], env), _value(t[2], env)
        if n.imag == 0 and n.real == 2:
            return cmath.sqrt(x)
        if x.imag == 0 and x.real < 0 and n.imag == 0 and n.real % 2 == 1:
            return -((-x) ** (1 / n))  # the real odd root of a negative number
        return x ** (1 / n)
    x, y = _value(t[1], env), _value(t[2], env)
    if kind == "^":
        if y.imag == 0 and y.real == int(y.real) and abs(y.real) > 10_000:
            raise OverflowError("exponent too large")
        return x**y
    if kind == "/":
        return x / y
    return {"+": x + y, "-": x - y, "*": x * y}[kind]


def variables(tree: tuple) -> set[str]:
    if tree[0] == "var":
        return {tree[1]}
    return {name for child in tree[1:] if isinstance(child, tuple) for name in variables(child)}


# ---- the environment ------------------------------------------------------------------------------


def reference_of(row: Mapping[str, Any], key: str) -> str:
    ref = reference_answer(row, key)
    return ref.rsplit("####", 1)[-1].strip() if "####" in ref else ref


@register_environment("math")
class MathEnvironment(Environment):
    def __init__(
        self,
        correct_reward: float = 1.0,
        format_reward: float = 0.0,
        answer_key: str = "answer",
        require_boxed: bool = False,
    ) -> None:
        super().__init__(correct_reward, format_reward)
        self.answer_key, self.require_boxed = answer_key, require_boxed

    def extract(self, text: str) -> str | None:
        # A response that opened a box answers there; one cut off inside it has no answer.
        if self.require_boxed or "\\boxed{" in text or "\\fbox{" in text:
            return last_boxed(text)
        return last_number(text)

    def judge(self, completion: Completion) -> tuple[bool, bool]:
        answer = self.extract(completion.text)
        if answer is None:
            return False, False
        correct = equivalent(answer, reference_of(completion.row, self.answer_key))
        return correct, completion.finish_reason == "stop"

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        try:
            reference_answer(row, self.answer_key)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
