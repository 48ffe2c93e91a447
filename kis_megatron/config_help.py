"""``kis-train --help-config``: every config key with its type, default, allowed values and
comment, read from the dataclasses of ``config.py`` (the comments from their source), so the
list cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing

from kis_megatron import config as config_module
from kis_megatron.config import Config

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment: the ``# ...`` at the end of its line, after the comment
    lines just above it (a comment block above a field describes that field)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    trailing = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    out, above = {}, []
    for i, line in enumerate(lines):
        if line.strip().startswith("#"):
            above.append(trailing[i])
            continue
        m = _FIELD.match(line)
        if m and not line.strip().startswith(("def ", "class ")):
            parts = above + ([trailing[i]] if i in trailing else [])
            out[m.group(1)] = " ".join(p for p in parts if p)
        above = []
    return out


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    return typing._type_repr(tp).replace("typing.", "").replace("kis_megatron.config.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_keys() -> list[dict]:
    """One entry per key: section.key, type, default, allowed (domain or choices), comment."""
    return [k for section in dataclasses.fields(Config)
            for k in _keys(section.default_factory().__class__, section.name)]


def _keys(cls, prefix: str) -> list[dict]:
    hints = typing.get_type_hints(cls, vars(config_module))
    comments = field_comments(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp):  # a nested section (train.profile): its own keys
            keys += _keys(tp, f"{prefix}.{f.name}")
            continue
        allowed = f.metadata.get("domain") or (" | ".join(f.metadata["choices"])
                                               if "choices" in f.metadata else "")
        keys.append({"key": f"{prefix}.{f.name}", "type": _type_name(tp), "default": _default(f),
                     "allowed": allowed, "comment": comments.get(f.name, "")})
    return keys


def help_config() -> str:
    rows = config_keys()
    width = max(len(r["key"]) for r in rows)
    out = ["Config keys (YAML sections, or dotted overrides section.key=value):", ""]
    section = None
    for r in rows:
        head = r["key"].split(".")[0]
        if head != section:
            if section is not None:
                out.append("")
            section = head
        default = "null" if r["default"] is None else repr(r["default"])
        allowed = r["allowed"]
        if allowed:
            allowed = f"  (one of {allowed})" if "|" in allowed else f"  (values {allowed})"
        out.append(f"  {r['key']:<{width}}  {r['type']} = {default}{allowed}")
        if r["comment"]:
            out += textwrap.wrap(r["comment"], 100, initial_indent=" " * (width + 6),
                                 subsequent_indent=" " * (width + 6))
    return "\n".join(out)
