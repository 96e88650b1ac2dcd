"""Griffe extension: read gatekit's docstrings as the Markdown of this site.

- They end with bare ``>>>`` examples. Google-style parsing recognises doctests only under an
  ``Examples:`` heading; elsewhere Markdown would read ``>>>`` as nested block quotes and
  ``[x][:2]`` as a link. Each run of non-blank lines that starts with ``>>>`` becomes a fenced
  ``pycon`` block, without its ``# doctest:`` flags.
- Sphinx roles (``:func:`convert```) become code spans.
"""
import re

import griffe

_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class MarkdownDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(_ROLE.sub(r"`\1`", obj.docstring.value))


def fence_doctests(text: str) -> str:
    lines, out, in_example = text.split("\n"), [], False
    for line in lines:
        if not in_example and line.startswith(">>>"):
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(_FLAGS.sub("", line) if in_example else line)
    if in_example:
        out.append("```")
    return "\n".join(out)
