"""Cut an OpenAPI document down to some paths and the components they reference, for ``bench/specs/``.

    python -m bench.trim_spec FULL.yaml OUT.yaml --prefix /files --prefix /fine_tuning/ \\
        --source "openai/openai-openapi@<commit> openapi.yaml" --licence MIT

The output keeps the document's ``openapi``, ``info``, ``servers`` and ``security``, the paths that start with
one of the prefixes, and every component (schema, parameter, response, request body, security scheme...)
reachable from them through ``$ref``, so that the trimmed document validates on its own. A header comment
names the source and its licence: the trimmed copy is a derivative of that document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = ("openapi", "info", "servers", "security", "tags")


def _refs(node: Any, out: set[str]) -> None:
    """Every local ``$ref`` target ("#/components/...") under ``node``."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            out.add(ref)
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def _resolve(doc: dict, ref: str) -> Any:
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def trim(doc: dict[str, Any], prefixes: list[str]) -> dict[str, Any]:
    """``doc`` restricted to the paths starting with one of ``prefixes`` and the components they reach."""
    paths = {p: item for p, item in doc.get("paths", {}).items() if p.startswith(tuple(prefixes))}
    if not paths:
        raise SystemExit(f"no path starts with any of {prefixes}")
    out: dict[str, Any] = {k: doc[k] for k in KEEP if k in doc}
    out["paths"] = paths
    # The security schemes the document requires are referenced by name, not by $ref.
    schemes = {name for req in doc.get("security", []) for name in req}
    for item in paths.values():
        for op in item.values():
            if isinstance(op, dict):
                schemes |= {name for req in op.get("security", []) for name in req}
    seen: set[str] = set()
    todo: set[str] = set()
    _refs(paths, todo)
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _refs(_resolve(doc, ref), todo)
    components: dict[str, dict[str, Any]] = {}
    for ref in sorted(seen):
        parts = ref[2:].split("/")
        if parts[0] != "components" or len(parts) != 3:
            raise SystemExit(f"unsupported $ref {ref}: only #/components/<kind>/<name> is handled")
        components.setdefault(parts[1], {})[parts[2]] = _resolve(doc, ref)
    # Llama Stack's document names a "Default" requirement without defining it: only defined ones are copied.
    defined = doc.get("components", {}).get("securitySchemes", {})
    for name in sorted(schemes & set(defined)):
        components.setdefault("securitySchemes", {})[name] = defined[name]
    out["components"] = components
    # Tags that no kept operation uses are dropped with their operations.
    used = {t for item in paths.values() for op in item.values() if isinstance(op, dict) for t in op.get("tags", [])}
    if "tags" in out:
        out["tags"] = [t for t in out["tags"] if t.get("name") in used]
    return out


def main(argv: list[str]) -> int:
    """Read FULL (YAML or JSON), write the trimmed YAML with a header naming ``--source`` and ``--licence``."""
    ap = argparse.ArgumentParser(prog="python -m bench.trim_spec", description=__doc__.split("\n\n")[0])
    ap.add_argument("full", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--prefix", action="append", required=True, help="keep the paths starting with this")
    ap.add_argument("--source", required=True, help="where FULL came from: repository@commit and path")
    ap.add_argument("--licence", required=True, help="FULL's licence (kept with the copy)")
    args = ap.parse_args(argv)
    doc = yaml.load(args.full.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    trimmed = trim(doc, args.prefix)
    header = (f"# Trimmed copy of {args.source}\n"
              f"# Licence: {args.licence} (the source document's; see its repository's LICENSE).\n"
              f"# Kept: the paths starting with {', '.join(args.prefix)} and the components they reference.\n"
              f"# Made by: python -m bench.trim_spec (do not edit by hand; re-run it on a newer document).\n")
    body = yaml.dump(trimmed, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     allow_unicode=True, width=120)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + body)
    n_ops = sum(1 for item in trimmed["paths"].values() for k in item if k in
                ("get", "put", "post", "delete", "patch", "head", "options"))
    n_comp = sum(len(v) for v in trimmed["components"].values())
    print(f"{args.out}: {len(trimmed['paths'])} paths, {n_ops} operations, {n_comp} components")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
