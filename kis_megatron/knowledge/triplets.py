"""Knowledge sets: (subject, relation, object) triplets plus per-relation text templates.

A knowledge set is two files:

- ``triplets.jsonl``: one JSON object per line with ``subject``, ``relation``, ``object``
  (strings; integers are accepted and turned into strings) and an optional ``id`` (string
  or integer, e.g. a Wikidata item). Blank lines are skipped. The *fact id* of a triplet is
  its index among the triplets of the file (0-based), which is what rendered documents and
  probes refer to.
- ``templates.yaml``::

      name: general            # optional
      description: ...         # optional
      relations:
        employer:
          statements:          # required: rendered into training text, {subject} and {object}
            - "{subject} works for {object}."
            - "The employer of {subject} is {object}."
          questions:           # optional: recall probes, a prompt the object follows
            - "{subject} works for"
          heldout_questions:   # optional: probes never rendered into training text
            - "Q: Who employs {subject}? A:"

  When ``questions`` is absent, recall prompts are derived from the statements: the text
  before ``{object}`` in every statement where ``{subject}`` comes first (so
  ``"{subject} works for {object}."`` gives ``"{subject} works for"``). An explicit empty
  list means "no recall probes for this relation". Literal braces are written ``{{ }}``.

  Probes score ``" " + object`` after the prompt. With a word-level tokenizer, punctuation
  glued to the object in a statement (``"{object}."``) makes the trained token (``Velton.``)
  differ from the probed one (``Velton``); the synthetic worlds avoid that, and user
  templates should too (sentencepiece usually splits the punctuation off, but check).

Every problem a user can cause raises :class:`KnowledgeError` naming the file and line.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kis_megatron.errors import KisError
from kis_megatron.utils import atomic_write_text, read_jsonl

SLOTS = ("subject", "object")
TEMPLATE_KINDS = ("statements", "questions", "heldout_questions")
# Placeholders used to compare templates as text without real names.
_S, _O = "\x00SUBJECT\x00", "\x00OBJECT\x00"


class KnowledgeError(KisError, ValueError):
    """A problem in a knowledge set (triplets or templates); the message names file and line."""


@dataclass(frozen=True)
class Triplet:
    """One fact. ``id`` is an optional external identifier (e.g. a Wikidata item)."""

    subject: str
    relation: str
    object: str
    id: str | int | None = None

    def to_json(self) -> dict:
        row = {"subject": self.subject, "relation": self.relation, "object": self.object}
        if self.id is not None:
            row["id"] = self.id
        return row


@dataclass
class RelationTemplates:
    """Templates of one relation; see the module docstring for what each list is for.
    ``questions=None`` derives recall prompts from the statements (:func:`derive_questions`),
    as a templates file without a ``questions`` key does; ``[]`` means none."""

    statements: list[str]
    questions: list[str] | None = None
    heldout_questions: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.questions is None:
            self.questions = derive_questions(self.statements)


@dataclass
class KnowledgeSet:
    """A named list of triplets with the templates of every relation they use."""

    name: str
    triplets: list[Triplet]
    templates: dict[str, RelationTemplates]

    def objects_by_relation(self) -> dict[str, list[str]]:
        """Distinct objects of each relation, in first-seen order (the distractor pools)."""
        pools: dict[str, dict[str, None]] = {}
        for t in self.triplets:
            pools.setdefault(t.relation, {})[t.object] = None
        return {rel: list(objs) for rel, objs in pools.items()}


# ----------------------------------------------------------------------------- templates


def _parse_fields(template: str, where: str) -> list[str]:
    """Names of the ``{...}`` fields of a template, in order; rejects anything but our slots."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise KnowledgeError(f"{where}: template {template!r} has unbalanced braces ({e}); "
                             "write literal braces as '{{' and '}}'") from None
    names = []
    for _literal, name, spec, conv in parts:
        if name is None:
            continue
        if name not in SLOTS:
            raise KnowledgeError(f"{where}: template {template!r} has unknown slot {{{name}}}; "
                                 "only {subject} and {object} are allowed")
        if spec or conv:
            raise KnowledgeError(f"{where}: template {template!r} has a format spec or "
                                 f"conversion on {{{name}}}; write the bare slot")
        names.append(name)
    return names


def check_template(template: str, kind: str, where: str) -> None:
    """Validate one template of the given kind (statements / questions / heldout_questions)."""
    if not isinstance(template, str) or not template.strip():
        raise KnowledgeError(f"{where}: {kind} entries must be non-empty strings, "
                             f"got {template!r}")
    if "\n" in template or "\r" in template:
        raise KnowledgeError(f"{where}: template {template!r} spans several lines; "
                             "one template is one line")
    names = _parse_fields(template, where)
    if "subject" not in names:
        raise KnowledgeError(f"{where}: template {template!r} is missing the {{subject}} slot")
    if kind == "statements":
        if "object" not in names:
            raise KnowledgeError(f"{where}: statement template {template!r} is missing the "
                                 "{object} slot")
    else:
        if "object" in names:
            raise KnowledgeError(f"{where}: question template {template!r} contains {{object}}; "
                                 "a question is a prompt that the object follows, so end it "
                                 "where the object would start")
        if template != template.rstrip():
            raise KnowledgeError(f"{where}: question template {template!r} ends with "
                                 "whitespace; the answer is joined with one space")


def fill(template: str, subject: str, obj: str | None = None) -> str:
    """Render a template with a subject (and an object for statements)."""
    return template.format(subject=subject, object=obj if obj is not None else "")


def derive_questions(statements: list[str]) -> list[str]:
    """Recall prompts from statements: the text before {object} where {subject} precedes it."""
    out: list[str] = []
    for s in statements:
        before, sep, _after = s.partition("{object}")
        prompt = before.rstrip()
        if sep and "{subject}" in before and prompt not in out:
            out.append(prompt)
    return out


def _heldout_leaks(rel: str, rt: RelationTemplates, where: str) -> None:
    """A held-out question must not occur inside any statement, or it is not held out."""
    rendered = [fill(s, _S, _O) for s in rt.statements]
    for h in rt.heldout_questions:
        hf = fill(h, _S)
        for s, sf in zip(rt.statements, rendered):
            if hf in sf:
                raise KnowledgeError(f"{where}: relation {rel!r}: held-out question {h!r} "
                                     f"occurs in statement {s!r}, so it would be seen in "
                                     "training; reword one of them")


def _node_line(node) -> int:
    return node.start_mark.line + 1


def _string_list(node, source: str, what: str) -> list[tuple[str, int]]:
    if not isinstance(node, yaml.SequenceNode):
        raise KnowledgeError(f"{source}:{_node_line(node)}: {what} must be a list of strings")
    out = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode):
            raise KnowledgeError(f"{source}:{_node_line(item)}: {what} entries must be "
                                 "strings")
        out.append((item.value, _node_line(item)))
    return out


def parse_templates(text: str, source: str = "<templates>") -> dict[str, RelationTemplates]:
    """Parse and validate a templates YAML document; errors name ``source`` and the line."""
    return _parse_templates_doc(text, source)[1]


def _parse_templates_doc(text: str, source: str):
    """(optional ``name`` key, templates) of a templates YAML document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise KnowledgeError(f"{source}{line}: malformed YAML ({getattr(e, 'problem', e)})") \
            from None
    if root is None:
        raise KnowledgeError(f"{source}: empty templates file; it needs a 'relations' mapping")
    if not isinstance(root, yaml.MappingNode):
        raise KnowledgeError(f"{source}:{_node_line(root)}: the top level must be a mapping "
                             "with a 'relations' key")
    relations_node, name = None, None
    for key, value in root.value:
        if key.value == "relations":
            relations_node = value
        elif key.value == "name" and isinstance(value, yaml.ScalarNode) and value.value:
            name = value.value
        elif key.value not in ("name", "description"):
            raise KnowledgeError(f"{source}:{_node_line(key)}: unknown top-level key "
                                 f"{key.value!r}; expected relations, name, description")
    if relations_node is None:
        raise KnowledgeError(f"{source}: no 'relations' key at the top level")
    if not isinstance(relations_node, yaml.MappingNode) or not relations_node.value:
        raise KnowledgeError(f"{source}:{_node_line(relations_node)}: 'relations' must be a "
                             "non-empty mapping from relation name to its templates")
    out: dict[str, RelationTemplates] = {}
    for key, value in relations_node.value:
        rel, rel_line = key.value, _node_line(key)
        where = f"{source}:{rel_line}"
        if rel in out:
            raise KnowledgeError(f"{where}: relation {rel!r} is defined twice")
        if not isinstance(value, yaml.MappingNode):
            raise KnowledgeError(f"{where}: relation {rel!r} must map to a mapping with "
                                 "'statements' (and optionally 'questions', "
                                 "'heldout_questions')")
        lists: dict[str, list[str]] = {}
        for k, v in value.value:
            if k.value not in TEMPLATE_KINDS:
                raise KnowledgeError(f"{source}:{_node_line(k)}: relation {rel!r} has unknown "
                                     f"key {k.value!r}; expected one of {TEMPLATE_KINDS}")
            items = _string_list(v, source, f"relation {rel!r} {k.value}")
            for tmpl, line in items:
                check_template(tmpl, k.value, f"{source}:{line}")
            lists[k.value] = [t for t, _ in items]
        if not lists.get("statements"):
            raise KnowledgeError(f"{where}: relation {rel!r} has no statement templates; "
                                 "add at least one under 'statements'")
        rt = RelationTemplates(lists["statements"], lists.get("questions"),
                               lists.get("heldout_questions", []))
        _heldout_leaks(rel, rt, where)
        out[rel] = rt
    return name, out


def load_templates(path: str | Path) -> dict[str, RelationTemplates]:
    """Read and validate a templates YAML file."""
    return _read_templates(path)[1]


def _read_templates(path: str | Path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise KnowledgeError(f"{path}: cannot read templates file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise KnowledgeError(f"{path}: not UTF-8 text; templates must be UTF-8 YAML") from None
    return _parse_templates_doc(text, str(path))


def templates_to_yaml(templates: dict[str, RelationTemplates], name: str | None = None) -> str:
    """The YAML text of a templates mapping (the inverse of :func:`parse_templates`)."""
    doc: dict = {}
    if name is not None:
        doc["name"] = name
    doc["relations"] = {
        rel: {"statements": list(rt.statements), "questions": list(rt.questions),
              "heldout_questions": list(rt.heldout_questions)}
        for rel, rt in templates.items()
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)


# ----------------------------------------------------------------------------- triplets


def _text_field(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise KnowledgeError(f"{where}: missing field {key!r}; each line needs subject, "
                             "relation and object")
    value = row[key]
    if isinstance(value, int) and not isinstance(value, bool) and key != "relation":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeError(f"{where}: field {key!r} must be a non-empty string, "
                             f"got {value!r}")
    if value != value.strip() or "\n" in value or "\r" in value:
        raise KnowledgeError(f"{where}: field {key!r} = {value!r} has surrounding whitespace "
                             "or a line break; strip it")
    return value


def load_triplets(path: str | Path) -> tuple[list[Triplet], dict[str, int]]:
    """Read a triplets JSONL file; rejects malformed lines and (subject, relation) duplicates,
    naming the file and line. Returns the triplets and, per relation, the line of its first
    use (so later errors can point at the file)."""
    out: list[Triplet] = []
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    first_line: dict[str, int] = {}
    for lineno, row in read_jsonl(path, KnowledgeError, _TRIPLETS_HINT, what="triplets file"):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise KnowledgeError(f"{where}: expected a JSON object with subject, relation, "
                                 f"object; got {type(row).__name__}")
        subject = _text_field(row, "subject", where)
        relation = _text_field(row, "relation", where)
        obj = _text_field(row, "object", where)
        tid = row.get("id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, (str, int))):
            raise KnowledgeError(f"{where}: field 'id' must be a string or an integer")
        key = (subject, relation)
        if key in seen:
            prev_obj, prev_line = seen[key]
            what = ("repeats the same fact" if prev_obj == obj else
                    f"conflicts with object {prev_obj!r}")
            raise KnowledgeError(f"{where}: ({subject!r}, {relation!r}, {obj!r}) {what} on "
                                 f"line {prev_line}; keep one object per subject and relation")
        seen[key] = (obj, lineno)
        first_line.setdefault(relation, lineno)
        out.append(Triplet(subject, relation, obj, tid))
    return out, first_line


_TRIPLETS_HINT = "; a triplets file holds one JSON object per line, in UTF-8"


def triplets_to_jsonl(triplets: list[Triplet]) -> str:
    return "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in triplets)


# ----------------------------------------------------------------------------- knowledge sets


def make_knowledge_set(name: str, triplets: list[Triplet],
                       templates: dict[str, RelationTemplates],
                       source: str = "<triplets>",
                       first_line: dict[str, int] | None = None) -> KnowledgeSet:
    """Check that the triplets and templates fit together and bundle them."""
    if not triplets:
        raise KnowledgeError(f"{source}: the knowledge set {name!r} has no triplets")
    for rel, rt in templates.items():  # templates built in code, not read from a file
        where = f"<templates of {name!r}>: relation {rel!r}"
        if not rt.statements:
            raise KnowledgeError(f"{where} has no statement templates")
        for kind in TEMPLATE_KINDS:
            for tmpl in getattr(rt, kind):
                check_template(tmpl, kind, where)
        _heldout_leaks(rel, rt, where)
    for t in triplets:
        if t.relation not in templates:
            line = f":{first_line[t.relation]}" if first_line and t.relation in first_line else ""
            raise KnowledgeError(f"{source}{line}: relation {t.relation!r} is used by the "
                                 "triplets but has no templates; add it to the templates file "
                                 f"(known: {sorted(templates)})")
    return KnowledgeSet(name, list(triplets), dict(templates))


def load_knowledge_set(triplets_path: str | Path, templates_path: str | Path,
                       name: str | None = None) -> KnowledgeSet:
    """Load and cross-validate a knowledge set. ``name`` defaults to the templates file's
    ``name`` key, else the triplets file's parent directory name."""
    file_name, templates = _read_templates(templates_path)
    triplets, first_line = load_triplets(triplets_path)
    if name is None:
        name = file_name or Path(triplets_path).resolve().parent.name
    return make_knowledge_set(name, triplets, templates, str(triplets_path), first_line)


def render_documents(ks: KnowledgeSet, renders_per_fact: int | None = None,
                     seed: int = 0) -> list[dict]:
    """Training documents, one per rendered statement:
    ``{"text": ..., "fact_id": i, "template": j}`` where ``i`` indexes ``ks.triplets`` and
    ``j`` indexes the relation's statements.

    ``renders_per_fact=None`` renders every paraphrase once. A number ``n`` renders each fact
    ``n`` times, cycling through its templates in seeded random rounds so the paraphrases are
    used as evenly as possible (and distinct templates when ``n`` is at most their count).
    The documents are shuffled with ``seed``, so the same inputs give the same file.
    """
    if renders_per_fact is not None and (isinstance(renders_per_fact, bool)
                                         or not isinstance(renders_per_fact, int)
                                         or renders_per_fact < 1):
        raise KnowledgeError(f"renders_per_fact must be a positive integer, "
                             f"got {renders_per_fact!r}")
    rng = random.Random(seed)
    docs = []
    for fact_id, t in enumerate(ks.triplets):
        statements = ks.templates[t.relation].statements
        n = len(statements) if renders_per_fact is None else renders_per_fact
        chosen: list[int] = []
        order = list(range(len(statements)))
        while len(chosen) < n:
            rng.shuffle(order)
            chosen.extend(order)
        for j in chosen[:n]:
            docs.append({"text": fill(statements[j], t.subject, t.object),
                         "fact_id": fact_id, "template": j})
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- writing


def jsonl_text(rows) -> str:
    """JSON Lines text of an iterable of JSON-serialisable objects."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def save_knowledge_set(ks: KnowledgeSet, directory: str | Path) -> tuple[Path, Path]:
    """Write ``triplets.jsonl`` and ``templates.yaml`` into ``directory`` (atomically each)."""
    directory = Path(directory)
    tp, yp = directory / "triplets.jsonl", directory / "templates.yaml"
    atomic_write_text(tp, triplets_to_jsonl(ks.triplets))
    atomic_write_text(yp, templates_to_yaml(ks.templates, ks.name))
    return tp, yp
