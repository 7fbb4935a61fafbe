"""One table renderer for every command that prints one: Markdown, or text aligned in columns."""
from __future__ import annotations


def table(head: list[str], rows: list[list[str]], fmt: str = "text", left: int | set[int] = 1) -> list[str]:
    """The table as lines: Markdown when fmt is "md", else aligned text. The first `left` columns
    (or the columns of that set) are words, left-aligned; the rest are numbers, right-aligned."""
    lefts = set(range(left)) if isinstance(left, int) else left
    if fmt == "md":
        rule = "|" + "|".join("---" if i in lefts else "---:" for i in range(len(head))) + "|"
        return ["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return ["  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [head, *rows]]
