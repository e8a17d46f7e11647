"""Markdown of chat messages as safe HTML, rendered on the server: markdown-it-py (CommonMark, tables,
strikethrough; raw HTML in the source stays text), code blocks highlighted by Pygments, and the result
cleaned by nh3 (a whitelist of tags and attributes; links only http(s)/mailto, rel=noopener). Nothing the
model or a character card writes can run in the page."""

from __future__ import annotations

import functools
from html import escape

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "span", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ATTRIBUTES = {"span": {"class"}, "code": {"class"}, "a": {"href", "title"}, "ol": {"start"}}
CODE_STYLE = "monokai"
MAX_CACHE = 4096


def _highlight(code: str, lang: str, _attrs: str) -> str:
    try:
        lexer = get_lexer_by_name(lang.strip().split()[0]) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return escape(code)
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


_MD = (
    MarkdownIt("commonmark", {"html": False, "breaks": True, "highlight": _highlight})
    .enable("table")
    .enable("strikethrough")
)


@functools.lru_cache(maxsize=MAX_CACHE)
def render_markdown(text: str) -> str:
    """`text` (Markdown) as sanitized HTML."""
    html = _MD.render(text)
    return nh3.clean(
        html,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def code_css(scope: str = ".md pre") -> str:
    """The Pygments colours for highlighted code under `scope`."""
    return HtmlFormatter(style=CODE_STYLE).get_style_defs(scope)
