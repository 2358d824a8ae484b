"""Errors that name the caller's options, spelled the caller's way.

A message is a template whose options appear as ``{name}``, the library's parameter names. ``str(err)``
shows those names (``use_variant``); ``err.spelled(spell)`` shows another spelling, e.g. the CLI's flags
(``--use_variant``). So library code never names a CLI flag, and the CLI's error lines keep them.
"""

from __future__ import annotations

import string
from collections.abc import Callable


class OptionError(ValueError):
    """A ValueError whose message names options: ``OptionError("{seqlen} must be at least 2")``."""

    def __init__(self, template: str):
        super().__init__(template)
        self.template = template
        self.options = tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every ``{option}`` written as ``spell(option)``."""
        return self.template.format_map({name: spell(name) for name in self.options})

    def __str__(self) -> str:
        return self.spelled(str)


def quote(text: str) -> str:
    """Literal text for an :class:`OptionError` template: braces doubled, so they are not read as options."""
    return text.replace("{", "{{").replace("}", "}}")
