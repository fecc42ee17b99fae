"""Templates rendered in a sandbox: what a stored version becomes for one locale, one set
of data and the channels of a route. No session and no I/O: `crud` stores versions,
`delivery` renders them before anything is stored.

A version holds, per locale, the e-mail `subject`, `text` and `html`, the `sms` text and
the `telegram` text (each optional, one at least). Its sources are Jinja2 templates run by
an `ImmutableSandboxedEnvironment`:

- `StrictUndefined`: a variable not given is an error, never an empty string;
- autoescaping in HTML (e-mail and Telegram's HTML `parse_mode`), none in plain text;
- no loader but the service's layouts (`templates/_layouts`), so `{% extends %}` reaches
  nothing else; no globals but a bounded `range`;
- a small allowlist of filters (`FILTERS`): dates, times, money and plural forms by
  Babel's CLDR data, and a few harmless string ones;
- limits: each source at most `MAX_SOURCE` characters, each output at most `MAX_OUTPUT`,
  `range` at most `MAX_RANGE` items, `*` and `+` never building a value over
  `MAX_OUTPUT`, and attribute names starting with `_` refused before anything runs.

A template breaking any rule is a `TemplateError` (a 422), whether at save, preview or send.
"""

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_currency, format_decimal
from jinja2 import (
    BaseLoader,
    DictLoader,
    FunctionLoader,
    StrictUndefined,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    pass_context,
)
from jinja2 import (
    TemplateError as JinjaError,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import sync_do_join
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import pass_eval_context
from markupsafe import Markup
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from channels.sms_ru import sms_segments
from headers import header_problem
from models import Channel

MAX_SOURCE = 64 * 1024
MAX_OUTPUT = 256 * 1024
# RFC 5322's line limit, and the subject column's.
MAX_SUBJECT = 998
MAX_RANGE = 1_000
LOCALES = ("ru", "en")
DEFAULT_LOCALE = "ru"
# A version's parts per locale, and the channel each serves.
PARTS = ("subject", "text", "html", "sms", "telegram")
PART_CHANNEL = {
    "subject": Channel.EMAIL,
    "text": Channel.EMAIL,
    "html": Channel.EMAIL,
    "sms": Channel.SMS,
    "telegram": Channel.TELEGRAM,
}
LAYOUTS_DIR = Path(__file__).resolve().parent / "templates" / "_layouts"
# Names every render is given; a template may not declare them.
RESERVED = frozenset({"locale", "brand"})


class TemplateError(ValueError):
    """A template, or the data given to it, the service cannot render (a 422): `field`
    names the part or variable."""

    def __init__(self, message: str, *, field: str = "template") -> None:
        super().__init__(message)
        self.field = field


# Declared variable types and how a request's JSON value becomes one.
VARIABLE_TYPES: dict[str, TypeAdapter[Any]] = {
    "string": TypeAdapter(str),
    "integer": TypeAdapter(int),
    "number": TypeAdapter(Decimal),
    "boolean": TypeAdapter(bool),
    "date": TypeAdapter(date),
    "datetime": TypeAdapter(AwareDatetime),
    "list": TypeAdapter(list[Any]),
    "object": TypeAdapter(dict[str, Any]),
}


@dataclass(frozen=True)
class Variable:
    name: str
    type: str = "string"
    required: bool = True
    example: Any = None


@dataclass(frozen=True)
class Rendered:
    """What one channel sends, as rendered at acceptance (the notification's snapshot)."""

    text: str
    subject: str | None = None
    html: str | None = None
    parse_mode: str | None = None

    def stored(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def of(cls, stored: Mapping[str, str]) -> "Rendered":
        return cls(**stored)


def _locale(context: Context) -> str:
    value = context.get("locale")
    return value if isinstance(value, str) else DEFAULT_LOCALE


def _as_datetime(value: Any) -> datetime | date:
    if isinstance(value, datetime | date):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise TemplateError(f"not a date or time: {_shown(value)}")


# Babel's formatting is most of a render's cost, and a bulk repeats its dates: each
# (value, format, locale) is formatted once.
@lru_cache(maxsize=4096)
def _formatted(kind: str, moment: datetime | date, format: str, locale: str) -> str:
    if kind == "date":
        return format_date(moment, format=format, locale=locale)
    if not isinstance(moment, datetime):
        if kind == "time":
            raise TemplateError("a time needs a datetime, not a date")
        moment = datetime(moment.year, moment.month, moment.day)
    # Shown in the value's own offset: the booking's local time, as the caller wrote it.
    tz = moment.tzinfo or UTC
    if kind == "time":
        return format_time(moment, format=format, tzinfo=tz, locale=locale)
    return format_datetime(moment, format=format, tzinfo=tz, locale=locale)


@pass_context
def _date(context: Context, value: Any, format: str = "long") -> str:
    return _formatted("date", _as_datetime(value), format, _locale(context))


@pass_context
def _time(context: Context, value: Any, format: str = "short") -> str:
    return _formatted("time", _as_datetime(value), format, _locale(context))


@pass_context
def _datetime(context: Context, value: Any, format: str = "medium") -> str:
    return _formatted("datetime", _as_datetime(value), format, _locale(context))


def _shown(value: Any) -> str:
    """A value in an error message: a string's start, else its type (a list's text may be
    as long as the limits allow)."""
    return repr(value[:40]) if isinstance(value, str) else f"a {type(value).__name__}"


def _decimal(value: Any) -> Decimal:
    if not isinstance(value, str | int | float | Decimal) or isinstance(value, bool):
        raise TemplateError(f"not a number: {_shown(value)}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise TemplateError(f"not a number: {_shown(value)}") from None
    # 1e999999999 is a number, and Babel's plural rule would write out all its digits.
    if not number.is_finite() or abs(number.adjusted()) > 30 or len(number.as_tuple()[1]) > 40:
        raise TemplateError(f"not a number a message shows: {_shown(value)}")
    return number


@pass_context
def _money(context: Context, value: Any, currency: str = "RUB") -> str:
    return format_currency(_decimal(value), currency, locale=_locale(context))


@pass_context
def _number(context: Context, value: Any) -> str:
    return format_decimal(_decimal(value), locale=_locale(context))


# CLDR's plural categories, in the order `plural` takes its forms.
_CATEGORIES = ("zero", "one", "two", "few", "many", "other")


@pass_context
def _plural(context: Context, value: Any, *forms: str) -> str:
    """`{{ n|plural("место", "места", "мест") }}`: the number and the word in the form the
    locale's CLDR rule gives it, the forms in CLDR's order (ru: one, few, many, other: «1
    место», «2 места», «5 мест», «1,5 места»; en: one, other). A fraction given no form of
    its own (`other`) takes the second; another category without one, the last."""
    if not forms:
        raise TemplateError("plural needs the word's forms")
    # By its text: Decimal("4") == Decimal("4.0"), yet CLDR counts the written fraction.
    formatted, index, other = _plural_form(_locale(context), str(_decimal(value)))
    if index >= len(forms):
        index = 1 if other and len(forms) > 1 else len(forms) - 1
    return f"{formatted} {forms[index]}"


# Bookings repeat a few counts (seats, minutes): Babel's rule and formatting cost a
# quarter of an e-mail's render, once per count instead.
@lru_cache(maxsize=4096)
def _plural_form(name: str, text: str) -> tuple[str, int, bool]:
    """The number as the locale writes it, the index of its CLDR category among the
    locale's, and whether that category is `other`."""
    locale, number = Locale.parse(name), Decimal(text)
    tags = [tag for tag in _CATEGORIES if tag in locale.plural_form.tags or tag == "other"]
    category = locale.plural_form(number)
    return format_decimal(number, locale=locale), tags.index(category), category == "other"


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise SecurityError(f"range() is limited to {MAX_RANGE} items")
    return numbers


_STRING_FILTERS = (
    "capitalize",
    "default",
    "d",
    "e",
    "escape",
    "first",
    "join",
    "last",
    "length",
    "count",
    "lower",
    "round",
    "int",
    "float",
    "striptags",
    "title",
    "trim",
    "truncate",
    "upper",
)
OUR_FILTERS: dict[str, Callable[..., str]] = {
    "date": _date,
    "time": _time,
    "datetime": _datetime,
    "money": _money,
    "number": _number,
    "plural": _plural,
}
FILTERS = (*_STRING_FILTERS, *OUR_FILTERS)


# Integers past this many bits are no booking's numbers, only a way to burn CPU.
_MAX_BITS = 4096


def _weight(value: Any, depth: int = 0) -> int:
    """About how many characters `value` becomes as text: a string its length, a list
    or mapping the weight of what it holds (a list of one string repeated is as heavy as
    its text), anything else a few."""
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        # Deeper than any booking's data: counted as too heavy rather than walked.
        return MAX_OUTPUT + 1
    if isinstance(value, Mapping):
        return len(value) + sum(
            _weight(k, depth + 1) + _weight(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return len(value) + sum(_weight(item, depth + 1) for item in value)
    return 8


def _over_limit(parts: Iterable[Any]) -> bool:
    """Whether `parts` as text add up to more than `MAX_OUTPUT` characters."""
    return sum(_weight(p) for p in parts) > MAX_OUTPUT


_TEXT = frozenset({str, Markup})


def _too_heavy() -> SecurityError:
    return SecurityError(f"a value over {MAX_OUTPUT} characters")


def _refuse_heavy(value: Any) -> Any:
    # A string is as long as it is: the output's own count measures it as it is written.
    if value.__class__ not in _TEXT and _weight(value) > MAX_OUTPUT:
        raise _too_heavy()
    return value


class _BoundedConcat(CodeGenerator):
    """Compiles `~` (which Jinja2 never hands to `call_binop`) to a call of the
    environment's `bounded_concat`, so it is bounded like `+`."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Jinja2's own visit_Concat's join, handed to `bounded_concat` with the operands.
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.bounded_concat({join}, (")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")


@pass_eval_context
def _bounded_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if _over_limit(items) or len(d) * len(items) > MAX_OUTPUT:
        raise _too_heavy()
    joined: str = sync_do_join(eval_ctx, items, d, attribute)
    return joined


def _weighed(filter_: Callable[..., Any]) -> Callable[..., Any]:
    """`filter_`, refusing a value that would be too long as text before it runs (most
    filters make text of their value first)."""
    passed = getattr(filter_, "jinja_pass_arg", None)

    def weighed(*args: Any, **kwargs: Any) -> Any:
        _refuse_heavy(args[1] if passed is not None else args[0])
        return filter_(*args, **kwargs)

    if passed is not None:
        weighed.jinja_pass_arg = passed  # type: ignore[attr-defined]
    return weighed


# Filters that never make text of a container they are given (they pass it on, count it,
# read a number or a date of it), or measure it themselves (join), so are not wrapped.
_NOT_TEXT_MAKING = frozenset(
    {"default", "d", "first", "last", "length", "count", "round", "int", "float"}
    | {"date", "time", "datetime", "join"}
)

# Loop iterations a part's render may take, all its loops together (3 nested loops of
# range(1000) would otherwise run a billion times without writing a byte).
MAX_ITERATIONS = 100_000
_iterations: ContextVar[list[int]] = ContextVar("iterations")


def _counted(iterable: Any) -> Iterator[Any]:
    """What a `{% for %}` loops over, counted against the render's MAX_ITERATIONS."""
    left = _iterations.get()
    for item in iterable:
        left[0] -= 1
        if left[0] < 0:
            raise SecurityError(f"loops are limited to {MAX_ITERATIONS} iterations a render")
        yield item


def _count_loops(tree: nodes.Template) -> None:
    """Every `{% for %}` of `tree` loops over `_counted(...)` (a name no source may use)."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name("_counted", "load"), [loop.iter], [], None, None)


# The methods a template may call, by the type they belong to: none that builds a value
# larger than its input (str.ljust, str.format, int.to_bytes) or runs a format of its own.
_METHODS: tuple[tuple[Any, frozenset[str]], ...] = (
    (
        str,
        frozenset(
            "lower upper strip lstrip rstrip title capitalize casefold startswith endswith "
            "split rsplit splitlines partition rpartition count find rfind removeprefix "
            "removesuffix isdigit isalpha isalnum isspace islower isupper isnumeric "
            "isdecimal".split()
        ),
    ),
    (Mapping, frozenset({"items", "keys", "values", "get"})),
    (list | tuple, frozenset({"index", "count"})),
    (LoopContext, frozenset({"cycle", "changed"})),
)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with our filters, globals and limits: every value
    written, joined, repeated, concatenated or handed to a filter is measured first;
    loops are counted; only a few methods may be called; `%` does no string formatting."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedConcat

    def __init__(self, *, html: bool, loader: BaseLoader) -> None:
        super().__init__(
            loader=loader,
            undefined=StrictUndefined,
            autoescape=html,
            keep_trailing_newline=True,
            auto_reload=False,
            finalize=_refuse_heavy,
        )
        filters = {name: self.filters[name] for name in _STRING_FILTERS} | OUR_FILTERS
        filters["join"] = _bounded_join
        self.filters = {
            name: f if name in _NOT_TEXT_MAKING else _weighed(f) for name, f in filters.items()
        }
        self.globals = {"range": _bounded_range, "_counted": _counted}

    def wrap_str_format(self, value: Any) -> None:
        # No str.format at all (Jinja2 would hand it a sandboxed formatter): a width
        # such as {:>999999999} is a gigabyte.
        return None

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        if not callable(value):
            return True
        return any(isinstance(obj, kind) and attr in names for kind, names in _METHODS)

    @staticmethod
    def bounded_concat(join: Callable[[Sequence[Any]], str], operands: Sequence[Any]) -> str:
        """A `~` expression's value, refused before it is built past `MAX_OUTPUT`."""
        if _over_limit(operands):
            raise _too_heavy()
        return join(operands)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and isinstance(left, str):
            raise SecurityError("% does no string formatting here: use the filters")
        if operator == "**":
            if not isinstance(right, int) or abs(right) > 64:
                raise SecurityError("** is limited to small integer exponents")
            if isinstance(left, int) and left.bit_length() * abs(right) > _MAX_BITS:
                raise SecurityError("a number too large")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_BITS:
                    raise SecurityError("a number too large")
            sized, count = (left, right) if hasattr(left, "__len__") else (right, left)
            if hasattr(sized, "__len__") and isinstance(count, int):
                if _weight(sized) * count > MAX_OUTPUT:
                    raise _too_heavy()
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            if _weight(left) + _weight(right) > MAX_OUTPUT:
                raise _too_heavy()
        return super().call_binop(context, operator, left, right)


def _refuse_private_names(tree: nodes.Template, part: str) -> None:
    """Refuse, before anything runs, what only an escape attempt writes: `_`-names
    (`__class__`, `_module`) by attribute or item."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else ""
        else:
            name = node.name if isinstance(node, nodes.Name) else ""
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateError(f"{name!r} is not allowed in a template", field=part)


@dataclass(frozen=True)
class Checked:
    """A version's content after its checks: CSS inlined, and what a preview warns of."""

    content: dict[str, dict[str, str]]
    warnings: list[str] = field(default_factory=list)


class Renderer:
    """Compiles and renders versions; compiled sources are cached (versions never change)."""

    def __init__(
        self, *, brand: Mapping[str, Any], layouts: Mapping[str, str] | None = None
    ) -> None:
        layouts = dict(load_layouts() if layouts is None else layouts)
        self.brand = dict(brand)
        self._text = _Sandbox(html=False, loader=DictLoader(layouts))
        self._html = _Sandbox(html=True, loader=_inlining_loader(layouts))
        self._compile = lru_cache(maxsize=4096)(self._compile_uncached)

    def _compile_uncached(self, source: str, html: bool, part: str) -> Any:
        environment = self._html if html else self._text
        if len(source) > MAX_SOURCE:
            raise TemplateError(f"the source is over {MAX_SOURCE // 1024} KB", field=part)
        try:
            tree = environment.parse(source)
            _refuse_private_names(tree, part)
            undeclared = meta.find_undeclared_variables(tree)
            _count_loops(tree)
            return environment.from_string(tree), undeclared
        except TemplateSyntaxError as exc:
            raise TemplateError(f"line {exc.lineno}: {exc.message}", field=part) from None

    def check(
        self,
        content: Mapping[str, Mapping[str, str | None]],
        variables: Sequence[Variable],
        *,
        telegram_html: bool = False,
    ) -> Checked:
        """A version's content as stored: each source compiled and checked, then rendered
        with its variables' examples; `TemplateError` for the first that fails."""
        if not content:
            raise TemplateError("a version needs at least one locale", field="content")
        declared = {v.name for v in variables}
        if declared & RESERVED:
            raise TemplateError(
                f"{sorted(declared & RESERVED)} are reserved names", field="variables"
            )
        used: set[str] = set()
        stored: dict[str, dict[str, str]] = {}
        for locale, parts in content.items():
            given = {part: source for part, source in parts.items() if source}
            if not given:
                raise TemplateError("needs at least one part", field=f"content.{locale}")
            if ("subject" in given) != ("text" in given or "html" in given):
                raise TemplateError(
                    "an e-mail needs a subject and a text or HTML body", field=f"content.{locale}"
                )
            if "html" in given and "<style" in given["html"]:
                # Inlined once, here: mail clients drop <style>; no send pays for it.
                given["html"] = _css_inline(given["html"], keep_style_tags=False)
            for part, source in given.items():
                html = part == "html" or (part == "telegram" and telegram_html)
                _, names = self._compile(source, html, f"content.{locale}.{part}")
                undeclared = names - declared - RESERVED
                if undeclared:
                    raise TemplateError(
                        f"uses undeclared variables: {', '.join(sorted(undeclared))}",
                        field=f"content.{locale}.{part}",
                    )
                used |= names
            stored[locale] = given
        examples = {v.name: v.example for v in variables if v.example is not None}
        missing = [v.name for v in variables if v.required and v.example is None]
        if missing:
            raise TemplateError(
                f"required variables need an example: {', '.join(missing)}", field="variables"
            )
        for locale in stored:
            self.render(stored, variables, examples, locale=locale, telegram_html=telegram_html)
        unused = sorted(declared - used)
        warnings = [f"declared but not used: {', '.join(unused)}"] if unused else []
        return Checked(stored, warnings)

    def render(
        self,
        content: Mapping[str, Mapping[str, str]],
        variables: Sequence[Variable],
        data: Mapping[str, Any],
        *,
        locale: str,
        channels: Iterable[Channel] = tuple(Channel),
        telegram_html: bool = False,
    ) -> dict[Channel, Rendered]:
        """Each of `channels` the version covers in `locale`, rendered with `data`
        (checked against `variables`: `TemplateError` naming one missing or ill-typed)."""
        values = typed_data(variables, data)
        context = {**values, "locale": locale, "brand": self.brand}
        parts = content[locale]
        out: dict[Channel, Rendered] = {}
        wanted = set(channels)
        if Channel.EMAIL in wanted and "subject" in parts:
            subject = " ".join(self._run(parts["subject"], False, context, "subject").split())
            problem = header_problem(subject)
            if len(subject) > MAX_SUBJECT:
                problem = f"renders over {MAX_SUBJECT} characters"
            if problem is not None:
                raise TemplateError(f"the subject {problem}", field="template.subject")
            html = self._run(parts["html"], True, context, "html") if "html" in parts else None
            if "text" in parts:
                text = self._run(parts["text"], False, context, "text")
            else:
                assert html is not None
                text = text_of(html)
            out[Channel.EMAIL] = Rendered(text=text, subject=subject, html=html)
        if Channel.SMS in wanted and "sms" in parts:
            sms = self._run(parts["sms"], False, context, "sms").strip()
            out[Channel.SMS] = Rendered(text=sms)
        if Channel.TELEGRAM in wanted and "telegram" in parts:
            telegram = self._run(parts["telegram"], telegram_html, context, "telegram").strip()
            out[Channel.TELEGRAM] = Rendered(
                text=telegram, parse_mode="HTML" if telegram_html else None
            )
        for channel, rendered in out.items():
            if not rendered.text.strip():
                raise TemplateError(f"the {channel} text renders empty", field=f"{channel}")
        return out

    def _run(self, source: str, html: bool, context: Mapping[str, Any], part: str) -> str:
        template, _ = self._compile(source, html, part)
        size = 0
        chunks: list[str] = []
        budget = _iterations.set([MAX_ITERATIONS])
        try:
            # Template.generate's own loop, without its wrapper's frame per chunk.
            for chunk in template.root_render_func(template.new_context(context)):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError(
                        f"renders over {MAX_OUTPUT // 1024} KB", field=f"template.{part}"
                    )
                chunks.append(chunk)
        except TemplateError:
            raise
        except UndefinedError as exc:
            raise TemplateError(str(exc), field=f"template.{part}") from None
        except (SecurityError, OverflowError, MemoryError) as exc:
            raise TemplateError(
                f"refused by the sandbox: {exc}", field=f"template.{part}"
            ) from None
        except RecursionError:
            raise TemplateError(
                "refused by the sandbox: macros call each other too deep", field=f"template.{part}"
            ) from None
        except (JinjaError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError(f"cannot render: {exc}", field=f"template.{part}") from None
        finally:
            _iterations.reset(budget)
        return "".join(chunks)


def typed_data(variables: Sequence[Variable], data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` as the declared variables' types; `TemplateError` naming the first missing
    or ill-typed one. Names not declared are dropped: no template can use them."""
    values: dict[str, Any] = {}
    for variable in variables:
        if variable.name not in data or data[variable.name] is None:
            if variable.required:
                raise TemplateError("a required variable is missing", field=f"data.{variable.name}")
            values[variable.name] = None
            continue
        try:
            values[variable.name] = VARIABLE_TYPES[variable.type].validate_python(
                data[variable.name]
            )
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise TemplateError(
                f"must be of type {variable.type}: {message}", field=f"data.{variable.name}"
            ) from None
        if not encodable(values[variable.name]):
            raise TemplateError(
                "must not contain an unpaired surrogate (\\ud800…): it is no UTF-8 text",
                field=f"data.{variable.name}",
            )
    return values


def encodable(value: Any) -> bool:
    """Whether every string in `value` (strings, lists, objects) can be written as UTF-8: a
    JSON body's `\\ud800` escape makes a string that cannot."""
    if isinstance(value, str):
        return value.isascii() or _utf8(value)
    if isinstance(value, Mapping):
        return all(encodable(k) and encodable(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(encodable(item) for item in value)
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_BLANK_LINES = re.compile(r"\n{3,}")


def text_of(html: str) -> str:
    """A readable plain-text twin of an HTML body (inscriptis), links kept as `text
    (url)`-like pairs."""
    text = _text_maker()(html)
    return _BLANK_LINES.sub("\n\n", "\n".join(line.rstrip() for line in text.splitlines())).strip()


def _css_inline(html: str, *, keep_style_tags: bool) -> str:
    # Imported when a version is saved, the only time CSS is inlined: not on the send path.
    import css_inline

    return css_inline.inline(html, keep_style_tags=keep_style_tags)


@lru_cache(maxsize=1)
def _text_maker() -> Callable[[str], str]:
    # Imported when first needed (a version with HTML and no text): inscriptis and its
    # lxml are 9 MB of every process's memory otherwise.
    from inscriptis import get_text
    from inscriptis.css_profiles import CSS_PROFILES
    from inscriptis.model.config import ParserConfig

    config = ParserConfig(css=CSS_PROFILES["strict"], display_links=True)
    return lambda html: get_text(html, config)


def _inlining_loader(layouts: Mapping[str, str]) -> FunctionLoader:
    """The layouts, each with its CSS inlined when a template first extends it (Jinja keeps
    the compiled layout): a process that renders no HTML never loads css-inline."""

    def source(name: str) -> str | None:
        text = layouts.get(name)
        if text is not None and name.endswith(".html") and "<style" in text:
            text = _css_inline(text, keep_style_tags=False)
        return text

    return FunctionLoader(source)


def load_layouts(directory: Path = LAYOUTS_DIR) -> dict[str, str]:
    """The layouts templates may extend, by file name (`base.html`, `base.txt`)."""
    if not directory.is_dir():
        return {}
    return {path.name: path.read_text("utf-8") for path in sorted(directory.iterdir())}


def pick_locale(available: Iterable[str], *wanted: str | None) -> str | None:
    """The first of `wanted` (then `ru`) the version has, by language: `en-GB` takes `en`."""
    have = list(available)
    for candidate in (*wanted, DEFAULT_LOCALE):
        if not candidate:
            continue
        for form in (candidate, candidate.replace("_", "-").split("-")[0].lower()):
            if form in have:
                return form
    return None


def sms_info(text: str) -> dict[str, Any]:
    """How an SMS text is sent: its encoding and the number of parts billed."""
    encoding, segments = sms_segments(text)
    return {"encoding": encoding, "segments": segments, "characters": len(text)}


def known_locale(value: str) -> bool:
    try:
        Locale.parse(value.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return False
    return True
