"""The embedded default corpus: docstrings of the Python standard library, which every machine
that runs babyrt has. Deterministic for a given Python version."""
from __future__ import annotations

import importlib
import inspect

MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "math", "mimetypes", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile",
]


def stdlib_docstrings(max_chars: int = 1_500_000) -> str:
    """Module, class, function and method docstrings, in a fixed order, ASCII only."""
    seen, parts, total = set(), [], 0

    def add(obj):
        nonlocal total
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40 and doc not in seen:
            seen.add(doc)
            doc = doc.encode("ascii", "ignore").decode()
            parts.append(doc)
            total += len(doc) + 2

    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module this Python lacks (e.g. built without sqlite3, tk)
            continue
        add(mod)
        for _, member in sorted(vars(mod).items()):
            if getattr(member, "__module__", None) != mod.__name__:
                continue
            add(member)
            if inspect.isclass(member):
                for _, attr in sorted(vars(member).items()):
                    if callable(attr):
                        add(attr)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]
