"""Write the API reference pages ``docs/api/*.md`` from the docstrings of ``laplace``.

Plain mkdocs has no docstring plugin, so this script introspects the public names
(``__all__``) of a few modules and writes markdown. Re-run it after changing a
public docstring::

    python docs/gen_api.py
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
from pathlib import Path

API_DIR = Path(__file__).resolve().parent / "api"

# (module, page, title, what the page is about)
PAGES = [
    ("laplace", "laplace", "Laplace approximations", "The `Laplace` factory, the approximation classes and the enums."),
    ("laplace.curvature", "curvature", "Curvature backends", "Backends that compute Jacobians, GGN / Fisher / Hessian curvature. See also [which backend to use when](../backends.md)."),
    ("laplace.marglik_training", "marglik_training", "Marginal-likelihood training", "Joint training of the network and its hyperparameters."),
    ("laplace.utils", "utils", "Utilities", "Helpers of the `laplace.utils` namespace (Kronecker algebra, feature extraction, subnetwork masks, data helpers)."),
    ("laplace.utils.metrics", "metrics", "Metrics", "Calibration and OOD metrics used by the examples and by grid search."),
    ("laplace.utils.plotting", "plotting", "Plotting", "Reliability diagrams and 1-d regression bands (needs matplotlib)."),
]  # fmt: skip

# an item header of a numpy-style section: "name : type", "a, b : type" or "ValueError"
_ITEM = re.compile(r"\*{0,2}[A-Za-z_][\w.]*(, \*{0,2}[A-Za-z_][\w.]*)*")
# Sphinx cross-reference roles such as :class:`Kron` render as plain code
_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
_SECTIONS_WITH_ITEMS = {
    "Parameters",
    "Returns",
    "Raises",
    "Attributes",
    "Yields",
    "Other Parameters",
}


def docstring_to_markdown(doc: str | None) -> str:
    """Render a numpy-style docstring as markdown (sections bold, items as lists)."""
    if not doc:
        return "*No docstring.*"
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    section = None
    i = 0
    while i < len(lines):
        line = lines[i]
        underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and underline and set(underline) == {"-"}:
            section = line.strip()
            out += ["", f"**{section}**", ""]
            i += 2
            continue
        if section in _SECTIONS_WITH_ITEMS and line.strip():
            name, colon, kind = line.partition(" : ")
            if _ITEM.fullmatch(name) and (colon or " " not in name.replace(", ", ",")):
                out.append(
                    f"- `{name.strip()}`" + (f" ({kind.strip()})" if kind else "")
                )
            elif not line.startswith(" ") or not out or not out[-1].startswith("- `"):
                out.append(line.strip())
            else:
                # continuation lines join the item so the list stays one paragraph
                joiner = (
                    " — " if out[-1].startswith("- `") and "—" not in out[-1] else " "
                )
                out[-1] += joiner + line.strip()
        else:
            out.append(line)
        i += 1
    text = _ROLE.sub(r"`\2`", "\n".join(out))
    # reST literal blocks ("Example::") become fenced-free indented code blocks
    return re.sub(r"::\n\n", ":\n\n", text)


class _Default:
    """Wraps a default value so the signature shows a readable repr."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        if isinstance(self.value, enum.Enum):
            return repr(self.value.value)
        if inspect.isclass(self.value) or inspect.isfunction(self.value):
            return self.value.__qualname__
        return repr(self.value)


class _Annotation:
    """Shows a string annotation (``from __future__ import annotations``) unquoted."""

    def __init__(self, text: object) -> None:
        self.text = text if isinstance(text, str) else inspect.formatannotation(text)

    def __repr__(self) -> str:
        return self.text


def format_signature(obj: object, name: str, is_class: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = []
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.default is not p.empty:
            p = p.replace(default=_Default(p.default))
        if p.annotation is not p.empty:
            p = p.replace(annotation=_Annotation(p.annotation))
        params.append(p)
    returns = sig.return_annotation
    if is_class or returns is sig.empty:
        returns = sig.empty
    else:
        returns = _Annotation(returns)
    return f"{name}{sig.replace(parameters=params, return_annotation=returns)}"


def _is_mixin(base: type) -> bool:
    """A private base class or a mixin: no page of its own."""
    name = base.__name__
    from_laplace = base.__module__.startswith("laplace")
    return from_laplace and (name.startswith("_") or name.endswith("Mixin"))


def _own_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined in ``cls`` (plus ``__call__``) or in
    the mixins it lists as bases (and their mixin bases)."""
    namespace: dict[str, object] = {}
    mixins = [m for b in cls.__bases__ if _is_mixin(b) for m in b.__mro__]
    for base in reversed(list(dict.fromkeys(mixins))):
        if _is_mixin(base):
            namespace.update(vars(base))
    namespace.update(vars(cls))
    members = []
    for attr, value in namespace.items():
        if attr.startswith("_") and attr != "__call__":
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((attr, value))
    return members


def document_class(name: str, cls: type) -> list[str]:
    lines = [f"## `{name}`", ""]
    if issubclass(cls, enum.Enum):
        lines += [docstring_to_markdown(cls.__doc__), ""]
        lines += [
            "Members: " + ", ".join(f"`{m.name}` = `{m.value!r}`" for m in cls),
            "",
        ]
        return lines
    lines += [
        "```python",
        f"class {format_signature(cls, name, is_class=True)}",
        "```",
        "",
    ]
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    if bases:
        lines += ["Bases: " + ", ".join(f"`{b}`" for b in bases), ""]
    lines += [docstring_to_markdown(cls.__doc__), ""]
    for attr, member in _own_members(cls):
        if isinstance(member, property):
            lines += [
                f"### `{name}.{attr}` (property)",
                "",
                docstring_to_markdown(member.__doc__),
                "",
            ]
        else:
            lines += [
                f"### `{name}.{attr}`",
                "",
                "```python",
                format_signature(member, attr),
                "```",
                "",
            ]
            lines += [docstring_to_markdown(member.__doc__), ""]
    return lines


def document_function(name: str, func: object) -> list[str]:
    return [f"## `{name}`", "", "```python", format_signature(func, name), "```", "", docstring_to_markdown(func.__doc__), ""]  # fmt: skip


def document_module(module_name: str, title: str, blurb: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    names = [n for n in getattr(module, "__all__", []) if not n.startswith("_")]
    lines = [f"# {title}", "", f"`{module_name}`: {blurb}", ""]
    lines += [docstring_to_markdown(module.__doc__), ""]
    lines += ["**Contents**: " + ", ".join(f"[`{n}`](#{n.lower()})" for n in names), ""]
    for name in names:
        try:
            obj = getattr(module, name)
        except (ImportError, AttributeError) as err:
            lines += [f"## `{name}`", "", f"*Not importable here: {err}*", ""]
            continue
        if inspect.isclass(obj):
            lines += document_class(name, obj)
        elif callable(obj):
            lines += document_function(name, obj)
        else:
            lines += [f"## `{name}`", "", f"`{obj!r}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    API_DIR.mkdir(exist_ok=True)
    index = [
        "# API reference",
        "",
        "Generated from the docstrings by `docs/gen_api.py`.",
        "",
    ]
    for module_name, page, title, blurb in PAGES:
        text = document_module(module_name, title, blurb)
        if text is None:
            print(f"skipped {module_name} (not importable)")
            continue
        (API_DIR / f"{page}.md").write_text(text)
        index.append(f"- [{title}]({page}.md) (`{module_name}`)")
        print(f"wrote {API_DIR / page}.md")
    (API_DIR / "index.md").write_text("\n".join(index) + "\n")


if __name__ == "__main__":
    main()
