"""Maintainer tool: build the shipped corpus from Debian's python3.11-doc package (PSF licence).

    cd /tmp && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
    python -m nanochat.corpus_build /tmp/pydoc

Reads the reST sources (html/_sources/**/*.rst.txt), strips Sphinx markup noise, splits each file into
documents at section headings, and writes nanochat/data/embedded_corpus.jsonl.xz plus the licence notice.
Same input gives the same bytes (sorted files, fixed xz preset); then update EMBEDDED_SHA256 in corpus.py.
"""

import gzip
import hashlib
import json
import lzma
import re
import sys
import textwrap
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
OUT_PATH = DATA_DIR / "embedded_corpus.jsonl.xz"
LICENSE_PATH = DATA_DIR / "EMBEDDED_CORPUS_LICENSE.txt"
SOURCES = "usr/share/doc/python3.11/html/_sources"
SKIP = ("contents.rst.txt", "license.rst.txt", "copyright.rst.txt", "includes/")  # TOC/legal boilerplate
MAX_DOC = 12_000  # a section longer than this is split at its subsections
MIN_DOC = 100     # shorter pieces are merged forward (headings) or dropped
API_LEVEL = 1000  # section level of a function/class/... signature: deeper than any heading

# Directive handling: dropped with their body, kept as code, rendered as a label, or a signature line.
DROP = {"index", "module", "moduleauthor", "sectionauthor", "toctree", "highlight", "currentmodule", "testsetup",
        "testcleanup", "include", "literalinclude", "image", "figure", "raw", "tabularcolumns", "audit-event",
        "audit-event-table", "contents", "program", "miscnews", "limited-api-list", "default-role"}
CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "productionlist", "parsed-literal"}
LABEL = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
         "caution": "Caution:", "tip": "Tip:", "attention": "Attention:", "danger": "Danger:", "hint": "Hint:",
         "impl-detail": "CPython implementation detail:", "availability": "Availability: {}.",
         "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
         "deprecated": "Deprecated since version {}:",
         "deprecated-removed": "Deprecated since version {}, will be removed in version {}:"}
OBJECT = {"function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
          "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod",
          "awaitablefunction", "awaitablemethod", "property", "object", "describe", "cmdoption", "option",
          "envvar", "pdbcommand", "opcode", "c:function", "c:member", "c:type", "c:var", "c:macro", "c:struct",
          "c:data"}
CODE_ROLES = {"class", "func", "meth", "mod", "exc", "attr", "const", "data", "keyword", "file", "option", "envvar",
              "program", "command", "kbd", "opcode", "source", "samp", "code", "token", "makevar", "pdbcmd", "obj"}

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
ADORN = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")  # a heading under/overline: one punctuation char repeated
OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
INLINE = re.compile(
    r"``(.+?)``"                                       # inline literal
    r"|(?<![\w`]):(?:py:|c:)?([\w-]+):`([^`]+)`"       # role
    r"|`([^`]+)`(_{0,2})"                              # hyperlink (with _) or default role
    r"|\\(.)", re.S)                                   # backslash escape


def indent(line):
    return len(line) - len(line.lstrip())


def block_end(lines, start, base):
    """End of the block that starts at `start` and is indented deeper than `base` (trailing blanks excluded)."""
    j = start
    while j < len(lines) and (not lines[j].strip() or indent(lines[j]) > base):
        j += 1
    while j > start and not lines[j - 1].strip():
        j -= 1
    return j


def inline(m):
    literal, role, content, ref, underscores, escaped = m.groups()
    if literal is not None:
        return f"`{literal}`"
    if escaped is not None:
        return "" if escaped == " " else escaped
    if role is not None:
        title = re.match(r"^(.*?)\s*<([^<>]*)>$", content, re.S)
        text = (title.group(1) or title.group(2)) if title else content.lstrip("!")
        if not title and text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        if role in ("pep", "rfc"):
            return text if title else f"{role.upper()} {text}"
        if role in ("issue", "gh"):
            return f"{'bpo' if role == 'issue' else 'gh'}-{text}"
        if role in ("func", "meth") and not title and not text.endswith(")"):
            text += "()"
        return f"`{text}`" if (role in CODE_ROLES or role in ("type", "macro", "member", "expr", "var", "struct")) \
            else text
    title = re.match(r"^(.*?)\s*<([^<>]*)>$", ref, re.S)
    if underscores:
        return (title.group(1) or title.group(2)) if title else ref
    return f"`{ref}`"


def convert(lines):
    """reST lines -> [(kind, text)], kind in text/code/head:<style>; directive bodies are converted recursively."""
    out, i, n = [], 0, len(lines)
    literal_after = None  # indent of a paragraph that ended in '::': the deeper block after it is literal
    while i < n:
        line, s, ind = lines[i], lines[i].strip(), indent(lines[i])
        prev_blank = i == 0 or not lines[i - 1].strip()
        if not s:
            out.append(("text", ""))
            i += 1
            continue
        if literal_after is not None:
            if ind > literal_after:  # the literal block ends at the first line indented less than its start
                j = block_end(lines, i, ind - 1)
                out += [("code", l) for l in lines[i:j]]
                i, literal_after = j, None
                continue
            literal_after = None
        # headings, with or without an overline; the style (char, overline) gives the level
        if ind == 0 and prev_blank and not ADORN.match(line) and i + 1 < n and ADORN.match(lines[i + 1]) \
                and len(lines[i + 1].strip()) >= len(s) - 2:
            out.append((f"head:{lines[i + 1][0]}", s))
            i += 2
            continue
        if ADORN.match(line) and i + 2 < n and lines[i + 2].strip() == s and lines[i + 1].strip():
            out.append((f"head:{s[0]}^", lines[i + 1].strip()))
            i += 3
            continue
        if (ADORN.match(line) and prev_blank) or re.match(r"^:(orphan|tocdepth|nosearch):", line):
            i += 1  # a transition line or file metadata
            continue
        m = DIRECTIVE.match(line)
        if m:
            i = directive(lines, i, m, out)
            continue
        if s.startswith(".."):  # comment, label, substitution definition or footnote
            j = block_end(lines, i + 1, ind)
            note = re.match(r"^\.\.\s+\[[^\]]*\]\s*(.*)$", s)
            if note:  # keep the footnote text
                out += [(k, " " * ind + t) for k, t in convert(textwrap.dedent("\n".join(
                    [note.group(1)] + lines[i + 1:j])).splitlines())]
            i = j
            continue
        if s.startswith("__ ") or (s.startswith(">>>") and prev_blank):
            j = i
            while j < n and lines[j].strip():
                j += 1
            if s.startswith(">>>"):  # doctest block: verbatim up to the blank line
                out += [("code", l) for l in lines[i:j]]
            i = j
            continue
        if s.endswith("::"):
            literal_after = ind
            line = line.rstrip()[:-2].rstrip() + ("" if s == "::" or s.endswith(" ::") else ":")
            if not line.strip():
                i += 1
                continue
        out.append(("text", line))
        i += 1
    return out


def directive(lines, i, m, out):
    """Render the directive at line i into `out`; return the index after its block."""
    ind, name, arg = len(m.group(1)), m.group(2).removeprefix("py:"), m.group(3).strip()
    end = block_end(lines, i + 1, ind)
    block = lines[i + 1:end]
    head = 0  # the stretch before the first blank line holds options and, for objects, more signatures
    while head < len(block) and block[head].strip():
        head += 1
    first_lines = [l for l in block[:head] if not OPTION.match(l)]
    sigs = [l.strip() for l in first_lines] if name in OBJECT else []
    body = block[head:] if name in OBJECT else first_lines + block[head:]
    body = textwrap.dedent("\n".join(body)).splitlines()
    pad = " " * ind
    if name in DROP:
        pass
    elif name in CODE:
        out += [("code", pad + "    " + l if l.strip() else "") for l in body]
    elif name in OBJECT:
        out += [("sig" if ind == 0 else "code", pad + sig) for sig in [arg] + sigs]
        out += [(k, pad + t if t else "") for k, t in convert(body)]
    else:
        label, text = "", "" if name == "only" else arg  # rubric, topic, list-table...: keep the argument
        if name == "availability":
            label, text = LABEL[name].format(arg), ""
        elif name in LABEL:  # the leading version number(s) go into the label, the rest is text
            nargs = LABEL[name].count("{}")
            words = arg.split(None, nargs) + [""] * nargs
            label, text = LABEL[name].format(*words[:nargs]), " ".join(words[nargs:]).strip()
        first = " ".join(x for x in (label, text) if x)
        converted = convert(body)
        while converted and converted[0] == ("text", ""):
            converted.pop(0)
        if converted and converted[0][0] == "text" and converted[0][1].strip() and label:
            first = f"{first} {converted.pop(0)[1].strip()}"
        if first:
            out.append(("text", pad + first))
        out += [(k, pad + t if t else "") for k, t in converted]
    return end


def tidy(text):
    """Inline markup of one paragraph or heading -> plain text (code stays in backticks)."""
    text = INLINE.sub(inline, text)
    text = re.sub(r"\s*\[#[\w-]*\]_", "", text)  # auto-numbered footnote references
    text = re.sub(r"\[([\w.-]+)\]_", r"[\1]", text)
    for a, b in ((" --- ", " — "), ("|release|", "3.11"), ("|version|", "3.11"), (" |nbsp| ", " ")):
        text = text.replace(a, b)
    return text


def render(items):
    """Join converted items into text: inline markup is resolved per paragraph (links and roles wrap lines)."""
    parts, para = [], []

    def flush():
        if para:
            parts.append(tidy("\n".join(para)))
            para.clear()

    for kind, text in items:
        if kind == "text" and text.strip():
            para.append(text)
        else:
            flush()
            parts.append(tidy(text) if kind.startswith("head") else text)
            if kind.startswith("head"):
                parts.append("")
    flush()
    text = "\n".join(l.rstrip() for l in "\n".join(parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_documents(items):
    """Split at headings: a section is kept whole if short enough, else split at its next heading level."""
    levels = {}
    sections = [[0, []]]  # [level, items]; level 0 = text before the first heading
    for item in items:
        if item[0].startswith("head"):
            level = levels.setdefault(item[0], len(levels) + 1)
            sections.append([level, []])
        elif item[0] == "sig" and not (sections[-1][1] and sections[-1][1][-1][0] == "sig"):
            sections.append([API_LEVEL, []])  # an API entry: below every heading, split only in big sections
        sections[-1][1].append(item)

    def split(group):
        text = render([it for _, its in group for it in its])
        if len(text) <= MAX_DOC or len(group) == 1:
            return [text]
        sub = min(level for level, _ in group[1:])
        cuts = [0] + [k for k in range(1, len(group)) if group[k][0] == sub] + [len(group)]
        docs = [doc for a, b in zip(cuts, cuts[1:]) for doc in split(group[a:b])]
        if sub == API_LEVEL:  # pack runs of short API entries together rather than one tiny doc each
            packed = [docs[0]]
            for doc in docs[1:]:
                if len(packed[-1]) + len(doc) <= MAX_DOC // 2:
                    packed[-1] += "\n\n" + doc
                else:
                    packed.append(doc)
            docs = packed
        return docs

    docs, pending = [], ""
    for doc in split(sections):
        doc = f"{pending}\n\n{doc}".strip() if pending else doc
        if len(doc) < 2 * MIN_DOC:  # a bare heading or intro: carry it into the next section
            pending = doc
        else:
            docs.append(doc)
            pending = ""
    if len(pending) >= MIN_DOC:
        docs.append(pending)
    return docs


def build(root):
    src = Path(root) / SOURCES
    files = sorted(p for p in src.rglob("*.rst.txt") if not str(p.relative_to(src)).startswith(SKIP))
    if not files:
        sys.exit(f"no *.rst.txt under {src}: pass the root of the unpacked python3.11-doc .deb")
    lines = []
    for path in files:
        rel = str(path.relative_to(src))
        for doc in split_documents(convert(path.read_text(encoding="utf-8").expandtabs(8).splitlines())):
            lines.append(json.dumps({"source": rel, "text": doc}, ensure_ascii=False, sort_keys=True))
    data = lzma.compress(("\n".join(lines) + "\n").encode("utf-8"), format=lzma.FORMAT_XZ,
                         check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_bytes(data)
    write_license(Path(root))
    chars = sum(len(json.loads(l)["text"]) for l in lines)
    print(f"wrote {OUT_PATH}\nsha256 {hashlib.sha256(data).hexdigest()}\nsize {len(data)} bytes\n"
          f"docs {len(lines)}\nchars {chars}")


def write_license(root):
    """Attribution: package + version, what was changed (PSF licence clause 3), and the notices, verbatim."""
    doc = root / "usr/share/doc"
    version = gzip.open(doc / "python3.11-doc/changelog.Debian.gz", "rt").readline().split()[1].strip("()")
    copyright_deb = (doc / "python3.11-doc/copyright").read_text(encoding="utf-8")
    psf = copyright_deb[copyright_deb.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"):
                        copyright_deb.index("BEOPEN.COM LICENSE AGREEMENT")].rstrip()
    sources = root / SOURCES
    notice = (sources / "copyright.rst.txt").read_text(encoding="utf-8")
    notice = notice[notice.index("Python and this documentation is:"):notice.index("-------")].rstrip()
    lic = (sources / "license.rst.txt").read_text(encoding="utf-8")
    terms = lic[lic.index("Python software and documentation are licensed"):lic.index("Some software incorporated")]
    bsd = lic[lic.index("ZERO-CLAUSE BSD LICENSE"):lic.index(".. _OtherLicenses:")].rstrip()
    LICENSE_PATH.write_text(
        "nanochat/data/embedded_corpus.jsonl.xz\n\n"
        "Derived from the Python 3.11 documentation (https://docs.python.org/3.11/), as shipped in the Debian\n"
        f"package python3.11-doc, version {version} (reST sources under /{SOURCES}/).\n\n"
        "Summary of changes: files other than the table of contents and the licence pages were read; Sphinx\n"
        "markup was stripped (index entries, labels, author lines and similar directives removed; roles, links\n"
        "and admonitions rewritten as plain text; code examples kept); each file was split into documents at\n"
        "its section headings, and documents were stored as JSON lines compressed with xz.\n\n"
        "The notices below are copied verbatim from the package.\n\n"
        f"==== From {SOURCES}/copyright.rst.txt ====\n\n{notice}\n\n"
        f"==== From {SOURCES}/license.rst.txt ====\n\n{terms}{bsd}\n\n"
        f"==== From usr/share/doc/python3.11-doc/copyright ====\n\n{psf}\n",
        encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(sys.argv[1])
