"""MkDocs hook: links from docs/ to other files of the repository.

On GitHub, ``[how to run it](../benchmarks/README.md)`` opens the file; the site holds only docs/,
so such a link becomes the file's repository path in code font instead of a broken link.
"""
import re

_OUTSIDE_DOCS = re.compile(r"\[([^\]]+)\]\((?:\.\./)+([^)#\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.count("/"):  # pages in subfolders link out with one more ../
        depth = page.file.src_uri.count("/")
        pattern = re.compile(r"\[([^\]]+)\]\((?:\.\./){%d,}([^)#\s]+)\)" % (depth + 1))
    else:
        pattern = _OUTSIDE_DOCS
    return pattern.sub(lambda match: f"{match.group(1)} (`{match.group(2)}` in the repository)", markdown)
