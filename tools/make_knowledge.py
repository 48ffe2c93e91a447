"""Generate synthetic knowledge worlds (or render your own triplets) into training text and
fixed probe sets.

Synthetic worlds (seeded, no downloads)::

    python tools/make_knowledge.py --out data/worlds --general-entities 300 \\
        --domain-entities 256 --domains 1 --seed 0
    python tools/make_knowledge.py --out data/worlds --config world.yaml

Your own triplets and templates (e.g. facts extracted from Wikidata)::

    python tools/make_knowledge.py --out data/wiki --triplets facts.jsonl \\
        --templates templates.yaml --name domain

Output (written to a temporary directory beside ``--out``, renamed into place at the end)::

    OUT/world.json              summary: seed, settings, per world counts
    OUT/<world>/triplets.jsonl  the facts; fact_id = index of the line's triplet
    OUT/<world>/templates.yaml  statements, recall questions, held-out questions
    OUT/<world>/train.jsonl     one document per rendered statement:
                                {"text": ..., "fact_id": i, "template": j}, shuffled
    OUT/<world>/probes.jsonl    the fixed probe set (recall + heldout)

Worlds are ``general`` and ``domain`` (or ``domain1``, ``domain2``, ... with ``--domains K``).
``train.jsonl`` is JSON Lines with a ``text`` field like any other corpus file, so the general
world can be concatenated with (or replaced by) a user corpus before tokenising, e.g.
``cat OUT/general/train.jsonl my_corpus.jsonl > general_mix.jsonl``.

A ``--config`` YAML holds the same settings::

    seed: 0
    renders_per_fact: null     # null: each paraphrase once per fact
    probe_k: 4                 # distractors per probe
    probe_seed: 0              # default: seed
    max_probe_facts: null      # cap probes per world (seeded sample); null: every fact
    general: {entities: 300, facts_per_entity: null, pool_sizes: {city: 24}}
    domain: {count: 1, entities: 256, relations: [colour, boiling_point, lab, use]}

Seed, render and probe flags override the config; world-shape flags cannot be mixed with it.
Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from kis_megatron.knowledge.triplets import (KnowledgeSet, jsonl_text,
                                         load_knowledge_set, render_documents, save_knowledge_set)
from kis_megatron.knowledge.worlds import configs_from_dict, default_configs, generate_worlds
from kis_megatron.errors import KisError, exit_with
from kis_megatron.eval.retention import build_probes, save_probes
from kis_megatron.utils import atomic_write_text, read_yaml, refuse_to_replace, staging_dir

_TOP_KEYS = ("seed", "renders_per_fact", "probe_k", "probe_seed", "max_probe_facts",
             "general", "domain")
_SHAPE_FLAGS = ("general_entities", "domain_entities", "domains", "facts_per_entity")


class UsageError(KisError, ValueError):
    """A bad combination of command-line options."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (must not exist unless "
                   "--force)")
    p.add_argument("--force", "--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--config", help="world YAML (see the module docstring)")
    p.add_argument("--general-entities", type=int, help="people in the general world "
                   "(default 300; 0 leaves it out)")
    p.add_argument("--domain-entities", type=int, help="entities per domain world "
                   "(default 256; 0 leaves them out)")
    p.add_argument("--domains", type=int, help="number of domain worlds (default 1)")
    p.add_argument("--facts-per-entity", type=int, help="relations per entity "
                   "(default: all)")
    p.add_argument("--triplets", help="render this triplets JSONL instead of generating")
    p.add_argument("--templates", help="templates YAML for --triplets")
    p.add_argument("--name", help="world name for --triplets (default: domain)")
    p.add_argument("--seed", type=int, help="generation and shuffling seed (default 0)")
    p.add_argument("--renders-per-fact", type=int, help="documents per fact "
                   "(default: one per statement template)")
    p.add_argument("--probe-k", type=int, help="distractors per probe (default 4)")
    p.add_argument("--probe-seed", type=int, help="probe sampling seed (default: --seed)")
    p.add_argument("--max-probe-facts", type=int, help="probe at most this many facts per "
                   "world (seeded sample; default: every fact, as infusion.facts and "
                   "eval.max_probes expect)")
    return p.parse_args(argv)


def _settings(args) -> tuple[dict, dict[str, KnowledgeSet], str]:
    """(settings, knowledge sets by world name, source) from the arguments."""
    shape_given = [f for f in _SHAPE_FLAGS if getattr(args, f) is not None]
    cfg: dict = {}
    if args.config:
        cfg = read_yaml(args.config, UsageError, "--config") or {}
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {args.config} must be a mapping")
        unknown = [k for k in cfg if k not in _TOP_KEYS]
        if unknown:
            raise UsageError(f"--config {args.config}: unknown key {unknown[0]!r}; expected "
                             f"one of {list(_TOP_KEYS)}")
    settings = {"seed": 0, "renders_per_fact": None, "probe_k": 4, "probe_seed": None,
                "max_probe_facts": None}
    settings.update({k: cfg[k] for k in settings if k in cfg})
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key, low in (("seed", 0), ("probe_k", 1), ("renders_per_fact", 1),
                     ("max_probe_facts", 1), ("probe_seed", 0)):
        v = settings[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise UsageError(f"{key} must be an integer >= {low}, got {v!r}")
    if settings["probe_seed"] is None:
        settings["probe_seed"] = settings["seed"]

    if args.triplets or args.templates:
        if not (args.triplets and args.templates):
            raise UsageError("--triplets and --templates go together; give both")
        if args.config or shape_given:
            raise UsageError("--triplets/--templates render your own facts; drop --config and "
                             "the world-shape flags (--general-entities, ...)")
        name = args.name or "domain"
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise UsageError(f"--name must be a simple directory name (letters, digits, _ . -), "
                             f"got {name!r}")
        return settings, {name: load_knowledge_set(args.triplets, args.templates, name)}, "user"
    if args.name:
        raise UsageError("--name applies only with --triplets/--templates")
    if args.config:
        if shape_given:
            flag = "--" + shape_given[0].replace("_", "-")
            raise UsageError(f"{flag} cannot be combined with --config; set it in the config")
        configs = configs_from_dict(cfg, args.config)
    else:
        for f in _SHAPE_FLAGS:
            v = getattr(args, f)
            if v is not None and v < (1 if f == "facts_per_entity" else 0):
                raise UsageError(f"--{f.replace('_', '-')} must be >= 0, got {v}")
        configs = default_configs(
            300 if args.general_entities is None else args.general_entities,
            256 if args.domain_entities is None else args.domain_entities,
            1 if args.domains is None else args.domains, args.facts_per_entity)
    return settings, generate_worlds(configs, settings["seed"]), "synthetic"


def write_world(ks: KnowledgeSet, directory: Path, settings: dict) -> dict:
    """Write one world's four files; return its summary for world.json."""
    save_knowledge_set(ks, directory)
    docs = render_documents(ks, settings["renders_per_fact"], settings["seed"])
    atomic_write_text(directory / "train.jsonl", jsonl_text(docs))
    probes = build_probes(ks, settings["probe_k"], settings["probe_seed"],
                          settings["max_probe_facts"])
    save_probes(directory / "probes.jsonl", probes)
    relations: dict[str, dict] = {}
    for rel, objs in ks.objects_by_relation().items():
        relations[rel] = {"facts": sum(t.relation == rel for t in ks.triplets),
                          "objects": len(objs)}
    return {
        "dir": directory.name,
        "entities": len({t.subject for t in ks.triplets}),
        "facts": len(ks.triplets),
        "relations": relations,
        "documents": len(docs),
        "words": len({w for d in docs for w in d["text"].split()}),
        "probes": {s: sum(p.style == s for p in probes) for s in ("recall", "heldout")},
    }


def make(args) -> Path:
    out = Path(args.out)
    refuse_to_replace([out], args.force)
    settings, worlds, source = _settings(args)
    with staging_dir(out) as tmp:  # replaces an existing --out (--force) whole
        summary = {"format": "kis-knowledge/1", "source": source, **settings, "worlds": {}}
        for name, ks in worlds.items():
            summary["worlds"][name] = write_world(ks, tmp / name, settings)
        atomic_write_text(tmp / "world.json", json.dumps(summary, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = make(args)
    except (KisError, OSError) as e:  # KnowledgeError, UsageError, DataError; the file system
        return exit_with(e)
    summary = json.loads((out / "world.json").read_text())
    for name, w in summary["worlds"].items():
        print(f"{name}: {w['entities']} entities, {w['facts']} facts, {w['documents']} "
              f"documents, {w['words']} distinct words, probes {w['probes']} -> {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
