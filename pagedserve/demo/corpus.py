"""The demo model's training data, built from English text every CPython installation
carries (PSF licence): the reference topics in `pydoc_data.topics` and the docstrings of
the standard library's pure-Python modules (read with `ast`, nothing is imported). On top
of the plain text, question/answer chats derived from the same text teach the chat turns.

Everything here is deterministic for a given Python version and seed."""

from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

Message = dict[str, str]

# Standard-library folders that are tests, GUI demos or vendored copies, not documentation.
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "tkinter", "turtledemo",
              "ensurepip", "distutils", "__pycache__", "__phello__"}
_TABLE_BORDER = re.compile(r"^\s*[+|][-=+| ]*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(*])")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?(\n[\w.]+\(.*\)( -> .*)?)*$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_UNDERLINE = re.compile(r"^([=*\-])\1{2,}$")


@dataclass(frozen=True)
class QA:
    """One question/answer pair: `subject` is what the question asks about."""

    subject: str
    answer: str
    kind: str  # "topic" (a statement, a concept) or "api" (a function, method, class)


# ---- plain text ---------------------------------------------------------------------------
def pydoc_topics() -> list[str]:
    """The reference topics (`help("if")` and friends), table borders dropped."""
    from pydoc_data.topics import topics

    return ["\n".join(ln for ln in topics[k].splitlines() if not _TABLE_BORDER.match(ln)).strip()
            for k in sorted(topics)]


def stdlib_sources() -> Iterator[tuple[str, str]]:
    """(dotted module name, source path) of the standard library's pure-Python modules."""
    root = sysconfig.get_paths()["stdlib"]
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith(("config-", "plat-")))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].replace(os.sep, ".")
                mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                yield mod, os.path.join(d, f)


@dataclass(frozen=True)
class Docstring:
    name: str  # dotted: module, module.func, module.Class.method; builtins bare (len, str.split)
    signature: str  # "(a, b=1)" for functions, "" otherwise
    text: str
    is_module: bool = False


@functools.lru_cache(maxsize=None)
def stdlib_docstrings(min_chars: int = 20) -> tuple[Docstring, ...]:
    """Docstrings of public modules, classes and functions, in a fixed order."""
    out = []
    for mod, path in stdlib_sources():
        if any(p.startswith("_") for p in mod.split(".")):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        _collect(tree, mod, out, min_chars)
    return tuple(out)


def _collect(node: ast.AST, name: str, out: list[Docstring], min_chars: int) -> None:
    doc = ast.get_docstring(node, clean=True)
    if doc and len(doc) >= min_chars and doc.isascii():
        sig = ""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sig = "(" + ast.unparse(node.args) + ")"
        out.append(Docstring(name, sig, doc.strip(), isinstance(node, ast.Module)))
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
            _collect(child, f"{name}.{child.name}", out, min_chars)


# Modules implemented (wholly or partly) in C, whose docstrings `ast` cannot see: builtins
# (str.split, len, ...) and the like. Importing these has no side effects.
_C_MODULES = ("builtins", "math", "cmath", "itertools", "operator", "time", "sys", "os", "array", "binascii",
              "zlib", "select", "io", "gc", "marshal", "unicodedata", "heapq", "bisect", "collections",
              "functools", "struct", "pickle", "datetime", "decimal", "socket", "hashlib", "csv", "re",
              "threading", "atexit", "faulthandler", "random", "string", "signal", "errno")


@functools.lru_cache(maxsize=None)
def runtime_docstrings(min_chars: int = 20) -> tuple[Docstring, ...]:
    """Docstrings of the public functions, classes and methods of `_C_MODULES` that the
    source scan does not already cover (builtins are named bare: `str.split`, `len`)."""
    import importlib
    import inspect

    seen = {d.name for d in stdlib_docstrings()}
    out = []

    def add(name: str, obj: object) -> None:
        doc = inspect.getdoc(obj) if isinstance(getattr(obj, "__doc__", None), str) else None
        if name in seen or not doc or len(doc) < min_chars or not doc.isascii():
            return
        seen.add(name)
        try:
            sig = str(inspect.signature(obj)) if callable(obj) and not inspect.isclass(obj) else ""
        except (TypeError, ValueError):
            sig = ""
        sig = _ADDRESS.sub("", sig)  # "<object object at 0x7f...>" differs from run to run
        out.append(Docstring(name, sig, doc.strip()))

    for mod_name in _C_MODULES:
        mod = importlib.import_module(mod_name)
        prefix = "" if mod_name == "builtins" else f"{mod_name}."
        for name in sorted(dir(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or inspect.ismodule(obj) or not callable(obj):
                continue
            add(prefix + name, obj)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    if not attr.startswith("_") and callable(getattr(obj, attr, None)):
                        add(f"{prefix}{name}.{attr}", getattr(obj, attr))
    return tuple(out)


def all_docstrings() -> tuple[Docstring, ...]:
    return stdlib_docstrings() + runtime_docstrings()


def text_documents() -> list[str]:
    """The plain-text part of the corpus: every pydoc topic, then every docstring."""
    docs = pydoc_topics()
    docs += [f"{d.name}{d.signature}\n\n{d.text}" for d in all_docstrings()]
    return docs


# ---- question / answer pairs ---------------------------------------------------------------
def _unwrap(paragraph: str) -> str:
    return " ".join(ln.strip() for ln in paragraph.splitlines())


def _is_prose(paragraph: str, min_chars: int = 30) -> bool:
    first = paragraph.splitlines()[0]
    return (not first.startswith((" ", "+", "|", "*", "-", "..", ">>>")) and not paragraph.rstrip().endswith(":")
            and len(paragraph) >= min_chars and not first.startswith(("Changed in version", "New in version", "See also",
                                                                 "Deprecated", "Note:")))


def first_sentences(paragraph: str, max_sentences: int = 3, max_chars: int = 400) -> str:
    """The opening sentences of a paragraph, whole sentences only, within max_chars."""
    text = _unwrap(paragraph)
    out = ""
    for i, s in enumerate(_SENTENCE_END.split(text)):
        if i >= max_sentences or (out and len(out) + len(s) + 1 > max_chars):
            break
        out = f"{out} {s}" if out else s
    return out if out.endswith((".", "!", "?")) else ""


def _subject(title: str) -> str:
    """'The "assert" statement' -> 'the "assert" statement'; keep acronyms' capitals."""
    title = title.split(" — ")[0].strip()
    if len(title) > 1 and title[0].isupper() and title[1].islower():
        title = title[0].lower() + title[1:]
    return title


def topic_qas() -> list[QA]:
    """From each pydoc topic: its title, its section titles and its entries (`str.split(...)`
    followed by an indented description), each with the first sentences that follow."""
    from pydoc_data.topics import topics

    qas = []
    for key in sorted(topics):
        paras = re.split(r"\n\s*\n", topics[key])
        title, pending_entry = None, None
        for p in paras:
            lines = p.strip("\n").splitlines()
            if len(lines) == 2 and _UNDERLINE.match(lines[1].strip()):  # a (section) title
                title, pending_entry = lines[0].strip(), None
                continue
            if len(lines) == 1 and not p.startswith(" ") and re.match(r"^[\w.]+(\(.*\))?$", lines[0].strip()):
                pending_entry, title = lines[0].strip(), None  # e.g. "str.casefold()"
                continue
            if pending_entry and p.startswith("   "):
                answer = first_sentences(_dedent(p))
                if answer and _is_prose(_dedent(p)):
                    qas.append(QA(pending_entry, answer, "api"))
                pending_entry = None
                continue
            if title and _is_prose(p):
                answer = first_sentences(p)
                if answer:
                    qas.append(QA(_subject(title), answer, "topic"))
                title = None
    return qas


def _dedent(p: str) -> str:
    import textwrap

    return textwrap.dedent(p.strip("\n"))


def docstring_qas() -> list[QA]:
    """From each public function/class docstring: its name and its first sentences."""
    qas = []
    for d in all_docstrings():
        if d.is_module:
            continue
        # C docstrings often open with a signature line ("print(value, ..., sep=' ')"): skip it.
        paras = [p for p in d.text.split("\n\n") if not _SIGNATURE.match(p.strip())]
        if not paras or not _is_prose(paras[0], min_chars=15):
            continue
        answer = first_sentences(paras[0], max_sentences=2)
        if answer:
            qas.append(QA(d.name, answer, "api"))
    return qas


_TOPIC_QUESTIONS = ["What is {s}?", "Tell me about {s}.", "Explain {s}.", "Can you describe {s}?",
                    "What do you know about {s}?"]
_API_QUESTIONS = ["What does {s} do?", "What is {s}?", "Explain {s}.", "Tell me about {s}.",
                  "What does {s} do in Python?"]

# Hand-written small talk (part of this repository, Apache-2.0), so greetings get an answer.
_GREETINGS = ["Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "Hello, how are you?"]
_GREETING_ANSWER = ("Hello! I am the pagedserve demo model, a small language model trained on the Python "
                    "documentation. Ask me about Python.")
_ABOUT = ["Who are you?", "What are you?", "What can you do?", "Tell me about yourself."]
_ABOUT_ANSWER = ("I am the pagedserve demo model: a tiny Llama-shaped language model trained on the reference "
                 "text and docstrings that ship with CPython. I know a little about Python and not much else.")
_THANKS = ["Thanks!", "Thank you.", "Thank you!", "Thanks, bye."]
_THANKS_ANSWER = "You are welcome. Goodbye!"


def _question(qa: QA, rng: random.Random) -> str:
    s = qa.subject
    if qa.kind == "topic" and '"' in s and rng.random() < 0.5:
        s = s.replace('"', "")  # users type: what is the assert statement?
    if qa.kind == "api":  # users type: what does str.split do? (no argument list)
        s = s.split("(")[0] + ("()" if "(" in s and rng.random() < 0.3 else "")
    return rng.choice(_TOPIC_QUESTIONS if qa.kind == "topic" else _API_QUESTIONS).format(s=s)


def chat_conversations(seed: int = 0, repeats: int = 2) -> list[list[Message]]:
    """Every question/answer pair `repeats` times (with different phrasings), grouped into
    conversations of one to three exchanges, some opening with a greeting or closing with
    thanks."""
    rng = random.Random(seed)
    qas = topic_qas() + docstring_qas()
    pool = [qa for qa in qas for _ in range(repeats)]
    rng.shuffle(pool)
    convs: list[list[Message]] = []
    i = 0
    while i < len(pool):
        n = rng.choice([1, 1, 2, 2, 3])
        msgs: list[Message] = []
        r = rng.random()
        # Small talk stays rare: its fixed answers would otherwise crowd out the real ones.
        if r < 0.03:
            msgs += [_user(rng.choice(_GREETINGS)), _assistant(_GREETING_ANSWER)]
        elif r < 0.05:
            msgs += [_user(rng.choice(_ABOUT)), _assistant(_ABOUT_ANSWER)]
        for qa in pool[i:i + n]:
            msgs += [_user(_question(qa, rng)), _assistant(qa.answer)]
        if rng.random() < 0.02:
            msgs += [_user(rng.choice(_THANKS)), _assistant(_THANKS_ANSWER)]
        convs.append(msgs)
        i += n
    return convs


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


# ---- the "real words" measure -----------------------------------------------------------------
_STRIP = "\"'`*()[]{}<>,.;:!?"


def normalize_word(word: str) -> str:
    return word.strip(_STRIP).lower()


def word_vocabulary(texts: Optional[Iterable[str]] = None) -> set[str]:
    """Every whitespace-separated word of the training text, punctuation-stripped, lowercased."""
    if texts is None:
        texts = text_documents()
    vocab = set()
    for t in texts:
        vocab.update(normalize_word(w) for w in t.split())
    vocab.discard("")
    return vocab


def real_word_fraction(text: str, vocab: set[str]) -> float:
    """The share of `text`'s whitespace-separated words that occur in `vocab` (bare
    punctuation does not count as a word)."""
    words = [normalize_word(w) for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0
    return sum(w in vocab for w in words) / len(words)
