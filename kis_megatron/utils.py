"""Writing files so that no reader ever sees half of one, and reading JSON Lines files so
that every error names the file and the line: the one way the whole package does both.

- :func:`atomic_write` (and ``atomic_write_bytes`` / ``_text`` / ``_json``): the data goes to
  a temporary name beside the target, is fsynced, then renamed over it; a crash leaves the
  old file or the new one, never a mix. The temporary file is created like any other file
  (``open(..., "x")``: the usual permissions under the umask) and its name never looks
  like the target's (``.NAME.<pid>-<random>.tmp``).
- :func:`refuse_to_replace`: the one check every writer of a user's outputs makes first
  (tokenizer, shards, worlds, exports): what exists is replaced only when asked (``--force``).
- :func:`staging_dir` / :func:`publish_dir`: the same for a directory of files: it is
  filled under a temporary name beside its final place, then renamed into place whole.
- :func:`read_yaml`: a YAML file whose mappings may not repeat a key (PyYAML alone keeps the
  last silently, so a duplicated section would drop half a config).
- :func:`read_lines` / :func:`read_jsonl`: UTF-8 (an optional BOM), LF, CRLF or CR line
  ends, decoded line by line so a bad byte is reported at its own line, streamed so a large
  corpus is never held in memory; each error is ``error("FILE:LINE: what")`` of the error
  class the caller names (its users' errors are KisErrors: DataError, KnowledgeError, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from kis_megatron.errors import KisError


# ---------------------------------------------------------------------------- writing


def temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A fresh name in ``path``'s directory for a temporary file or directory on its way
    to ``path``: hidden, unique to the process and the call, and never ``path`` itself or
    another name a reader looks for."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


class OutputExists(KisError):
    """An output that would replace an existing file or folder without being asked to."""


def refuse_to_replace(paths, force: bool = False, flag: str = "--force") -> None:
    """Raise :class:`OutputExists` naming every one of ``paths`` that exists (a file, a link,
    or a folder that is not empty), unless ``force``."""
    existing = [os.fspath(p) for p in paths
                if os.path.lexists(p) and not (os.path.isdir(p) and not os.listdir(p))]
    if existing and not force:
        raise OutputExists(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                           f"nothing was written: choose another output, or pass {flag} to replace "
                           f"{'it' if len(existing) == 1 else 'them'}")


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Call ``write(f)`` on a binary file at a temporary name beside ``path``, fsync it,
    then rename it to ``path``; on any error the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_export(path: str | os.PathLike, export: Callable[[str], Any]) -> None:
    """:func:`atomic_write` for writers that take a file name rather than a file (a
    profiler's trace, a CUDA memory snapshot): ``export(temporary name)``, then the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        export(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Flush every file under ``staging`` to disk, then rename ``staging`` to ``final``. An
    existing ``final`` is first renamed aside and deleted only once the new one is in place,
    so a reader sees the old directory or the new one, whole."""
    staging, final = Path(staging), Path(final)
    for root, _, files in os.walk(staging):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    old = None
    if final.exists():
        old = temp_path(final, ".old")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A new, empty directory beside ``final`` to fill; published as ``final`` (replacing
    it, see :func:`publish_dir`) when the ``with`` block ends without an error, and removed
    with whatever it holds when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()  # like any new directory: the usual permissions under the umask
    try:
        yield tmp
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def read_lines(path: str | os.PathLike, error: type[Exception], hint: str = "",
               what: str = "file") -> Iterator[tuple[int, str, bool]]:
    """(line number, line without its line end, whether a line end followed it) for each
    line of a UTF-8 text file, streamed. Invalid UTF-8 raises ``error("PATH:LINE: not valid
    UTF-8 (reason)" + hint)``; a file that cannot be opened, ``error("PATH: cannot read
    <what> (reason)")``."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    lineno = 0
    with f:
        for raw in f:
            ended = raw.endswith((b"\n", b"\r"))
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")  # LF or CRLF
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                at = lineno + 1 + raw[:e.start].count(b"\r")  # lone CRs end lines too
                raise error(f"{path}:{at}: not valid UTF-8 ({e.reason}){hint}") from None
            if lineno == 0:
                text = text.removeprefix("\ufeff")
            parts = text.split("\r")
            for i, part in enumerate(parts):
                lineno += 1
                yield lineno, part, ended or i < len(parts) - 1


def read_jsonl(path: str | os.PathLike, error: type[Exception], hint: str = "", what: str = "file",
               on_cut: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON Lines file, streamed.

    A line that is not JSON raises ``error("PATH:LINE: invalid JSON (reason at column C)"
    + hint)``. With ``on_cut``, a last line without its line end that is not JSON (what a
    writer killed mid-line leaves) is passed over and ``on_cut(line number)`` called instead.
    What each value must hold is the caller's to check; ``what`` as in :func:`read_lines`."""
    for lineno, line, ended in read_lines(path, error, hint, what):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if on_cut is not None and not ended:
                on_cut(lineno)
                continue
            raise error(f"{os.fspath(path)}:{lineno}: invalid JSON ({e.msg} at column "
                        f"{e.colno}){hint}") from None
        yield lineno, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key."""


def _construct_unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        except TypeError:  # an unhashable key; the base constructor names it
            break
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` for a repeated key in a mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Any:
    """The YAML document of ``path`` (None when empty); ``error("PATH: ...")`` when it cannot
    be read, is not valid YAML or repeats a key in a mapping."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
