"""report.html: report.md rendered as one self-contained page.

The markdown is rendered by markdown-it-py (CommonMark with tables; it comes
with flax through rich) and every local image it references is embedded as
a base64 data URI, so the page needs no other file and opens anywhere.
"""
import base64
import html
import os
import re

from markdown_it import MarkdownIt

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def inline_images(text, root):
  """Markdown `text` with each local image `![alt](path)` (relative to
  `root`) replaced by a data URI; missing files raise FileNotFoundError."""
  def embed(m):
    alt, path = m.group(1), m.group(2)
    if path.startswith(("data:", "http:", "https:")):
      return m.group(0)
    mime = _MIME.get(os.path.splitext(path)[1].lower())
    if mime is None:
      raise ValueError(f"report image {path!r}: only PNG/JPEG are embedded")
    with open(os.path.join(root, path), "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    return f"![{alt}](data:{mime};base64,{data})"
  return _IMAGE.sub(embed, text)


def render(text, root, title):
  """Complete HTML document of markdown `text` with images inlined."""
  body = MarkdownIt("commonmark").enable("table").render(
      inline_images(text, root))
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
          f"<body>\n{body}</body></html>\n")


def write(workdir, text, title):
  path = os.path.join(workdir, "report.html")
  with open(path, "w") as f:
    f.write(render(text, workdir, title))
  return path
