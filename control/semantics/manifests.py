"""Manifest directories → cluster state (docs/interfaces.md, Manifest directories).

A directory holds files ending .yaml, .yml or .json, each with one or more documents
(multi-document YAML, or ``kind: List`` with ``items``) of the kinds Namespace, Pod,
NetworkPolicy, Service, EndpointSlice and ClusterProperty; other kinds are ignored with
a note. YAML goes through libyaml's C loader: the pure-Python
loader is several times slower and reading manifests is part of every ``mcnp matrix``.

Two modes share one reader: *strict* (offline tools: the first invalid object stops the
run with one line naming file, object and field) and *lenient* (the daemon: invalid
objects are collected as errors, new invalid policies, Services and EndpointSlices are
replaced by their fail-closed stand-ins, everything else keeps flowing — rule S9).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import yaml

from control.semantics import objects
from control.semantics.model import ClusterSet, ClusterState, InvalidObject, Options

logger = logging.getLogger(__name__)

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    raise ImportError("mcnp needs PyYAML built with libyaml (yaml.CSafeLoader)") from None

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = (*objects.PARSERS, "ClusterProperty")

#: Largest manifest file read, in bytes: a larger one is an invalid file (rule S9),
#: reported by name, instead of a reader that exhausts the node's memory.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: How many nodes YAML aliases may add to one file beyond those written in it. libyaml
#: builds an alias as a second reference to one object, cheap to hold, but everything
#: that walks the result (validation, error messages, hashing) pays the expanded size:
#: a few hundred bytes of nested aliases expand to hundreds of millions of nodes.
#: Manifests that ``kubectl`` prints have no aliases at all.
MAX_ALIAS_NODES = 100_000


@dataclass
class Document:
    source: str  # "path" or "path#index" for multi-document files
    obj: Mapping[str, Any]


@dataclass
class LoadResult:
    state: ClusterState
    declared_name: Optional[str] = None  # from a ClusterProperty
    notes: list[str] = field(default_factory=list)
    errors: list[InvalidObject] = field(default_factory=list)


def manifest_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise InvalidObject(path, "directory", "path", "is not a directory")
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SUFFIXES) and not f.startswith("."))


def read_bytes(path: str) -> bytes:
    """A manifest file's contents, at most :data:`MAX_FILE_BYTES` of them."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise InvalidObject(path, "file", "-", f"cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidObject(path, "file", "-", f"is larger than {MAX_FILE_BYTES} bytes")
    return data


def parse_documents(path: str, data: bytes) -> list:
    """The documents of one file's contents (JSON when ``path`` ends .json, else YAML),
    within the bounds above. Raises :class:`InvalidObject` naming ``path``."""
    try:
        if path.endswith(".json"):
            return [json.loads(data)]
        docs = list(yaml.load_all(data, Loader=_Loader))
    except (ValueError, yaml.YAMLError) as e:
        detail = str(e).replace("\n", " ")
        raise InvalidObject(path, "file", "-", f"cannot be parsed: {detail}") from None
    except RecursionError:
        raise InvalidObject(path, "file", "-", "cannot be parsed: nested too deeply") from None
    if b"*" in data:  # an alias needs its '*'
        _check_aliases(path, docs)
    return docs


def _check_aliases(path: str, docs: list) -> None:
    """Reject documents whose aliases expand beyond :data:`MAX_ALIAS_NODES` new nodes or
    refer to themselves. Each distinct list or mapping is visited once (its expanded
    size is remembered), so the check costs what the file holds, not what it expands to."""
    expanded: dict[int, int] = {}  # id of a container -> its expanded node count
    written = 0  # nodes as written: each distinct container and its scalar children
    stack: list[tuple[Any, bool]] = [(docs, False)]
    open_ids: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        if children_done:
            open_ids.discard(key)
            expanded[key] = 1 + sum(expanded.get(id(c), 1) for c in children)
            continue
        if key in expanded:
            continue
        if key in open_ids:
            raise InvalidObject(path, "file", "-", "an alias refers to itself (a recursive structure)")
        open_ids.add(key)
        stack.append((node, True))
        written += 1
        for child in children:
            if isinstance(child, (dict, list)):
                if id(child) in open_ids:
                    raise InvalidObject(path, "file", "-", "an alias refers to itself (a recursive structure)")
                stack.append((child, False))
            else:
                written += 1
    if expanded[id(docs)] - written > MAX_ALIAS_NODES:
        raise InvalidObject(path, "file", "-", f"its aliases expand to more than {MAX_ALIAS_NODES} nodes beyond those written")


def read_file(path: str) -> Iterator[Document]:
    """Documents of one file, ``kind: List`` flattened. Unparsable files raise."""
    return split_documents(path, parse_documents(path, read_bytes(path)))


def split_documents(path: str, docs: list) -> Iterator[Document]:
    """:class:`Document` values of a file's parsed documents, ``kind: List`` flattened."""
    multi = len(docs) > 1
    for i, doc in enumerate(docs):
        src = f"{path}#{i}" if multi else path
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise InvalidObject(src, "document", "-", f"must be an object, not {type(doc).__name__}")
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise InvalidObject(src, "List", "items", "must be a list")
            for j, item in enumerate(items):
                if not isinstance(item, Mapping):
                    raise InvalidObject(src, "List", f"items[{j}]", "must be an object")
                yield Document(f"{src}[{j}]", item)
        else:
            yield Document(src, doc)


def read_directory(path: str, errors: Optional[list] = None) -> list[Document]:
    """Every document of the directory; with an ``errors`` list, a file that cannot be
    read is appended to it and the others are still read."""
    docs: list[Document] = []
    for f in manifest_files(path):
        try:
            docs.extend(read_file(f))
        except InvalidObject as err:
            if errors is None:
                raise
            errors.append(err)
    return docs


def build_cluster(name: str, docs: list[Document], strict: bool = True, errors: Optional[list] = None) -> LoadResult:
    """Parse documents into one cluster's state. ``strict`` raises on the first invalid
    object (or, given an ``errors`` list, appends every invalid object to it for the
    caller to report all at once); lenient mode records it and, for the kinds that have
    one (policies, Services, EndpointSlices), installs the fail-closed stand-in (rule S9)."""
    result = LoadResult(ClusterState(name))
    state = result.state
    seen: dict[tuple, str] = {}

    def reject(err: InvalidObject) -> None:
        if strict:
            if errors is None:
                raise err
            errors.append(err)
            return
        logger.warning("Cluster %s: rejected %s", name, err)
        result.errors.append(err)

    for doc in docs:
        kind = doc.obj.get("kind")
        if kind not in KINDS:
            note = f"{doc.source}: {objects.describe(doc.obj)}: ignored (kind {kind!r} is not one mcnp reads)"
            result.notes.append(note)
            continue
        try:
            if kind == "ClusterProperty":
                _declare(result, doc)
                continue
            obj = objects.PARSERS[kind](doc.obj, name, doc.source)
            key = (kind, *_table_key(kind, obj))
            if key in seen:
                raise InvalidObject(doc.source, objects.describe(doc.obj), "metadata.name", f"duplicate of the object in {seen[key]}")
            seen[key] = doc.source
        except InvalidObject as err:
            reject(err)
            if kind in objects.STAND_INS and not strict:
                stand_in = objects.STAND_INS[kind](doc.obj, name, doc.source, err)
                table = state.table(kind)
                if stand_in is not None and (stand_in.namespace, stand_in.name) not in table:
                    table[(stand_in.namespace, stand_in.name)] = stand_in
            continue
        tkey = _table_key(kind, obj)
        state.table(kind)[tkey[0] if kind == "Namespace" else tkey] = obj
    return result


def _table_key(kind: str, obj) -> tuple:
    """Where a parsed object sits: (name,) for namespaces, (namespace, name) otherwise."""
    return (obj.name,) if kind == "Namespace" else (obj.namespace, obj.name)


def _declare(result: LoadResult, doc: Document) -> None:
    """A ClusterProperty: the cluster's declared name, which no second one may contradict."""
    value = objects.cluster_property_value(doc.obj, doc.source)
    if value is None:
        return
    if result.declared_name not in (None, value):
        raise InvalidObject(doc.source, objects.describe(doc.obj), "spec.value", f"declares cluster {value!r}, another ClusterProperty declares {result.declared_name!r}")
    result.declared_name = value


def load_cluster(name: Optional[str], path: str, strict: bool = True, errors: Optional[list] = None) -> LoadResult:
    """Load one manifest directory. The cluster's name comes from ``name`` or, when that
    is None, from its ClusterProperty; if both are given they must agree (rule M1).
    ``errors``: see :func:`build_cluster`."""
    docs = read_directory(path, errors)
    declared = None
    for doc in docs:
        if doc.obj.get("kind") == "ClusterProperty":
            value = objects.cluster_property_value(doc.obj, doc.source)
            if value is not None:
                if name is not None and value != name:
                    raise InvalidObject(doc.source, objects.describe(doc.obj), "spec.value", f"declares cluster {value!r} but it was given as {name!r}")
                declared = declared or value
    cluster = name or declared
    if cluster is None:
        raise InvalidObject(path, "directory", "-", "has no cluster name: give NAME=DIR or add a ClusterProperty cluster.clusterset.k8s.io")
    if not objects.DNS_LABEL.match(cluster):
        raise InvalidObject(path, "directory", "-", f"invalid cluster name {cluster!r} (must be an RFC 1123 label)")
    return build_cluster(cluster, docs, strict, errors)


def parse_cluster_arg(text: str) -> tuple[Optional[str], str]:
    """``NAME=DIR`` (or a bare ``DIR`` whose ClusterProperty names it)."""
    name, sep, path = text.partition("=")
    if not sep:
        return None, text
    return name, path


def load_clusterset(specs: list[tuple[Optional[str], str]], options: Options = Options(), strict: bool = True,
                    errors: Optional[list] = None) -> tuple[ClusterSet, list[str]]:
    """Load several directories into one cluster set; duplicate names are an error.
    ``errors``: see :func:`build_cluster`."""
    cset = ClusterSet(options=options)
    notes: list[str] = []
    for name, path in specs:
        result = load_cluster(name, path, strict, errors)
        cname = result.state.name
        if cname in cset.clusters:
            raise InvalidObject(path, "directory", "--cluster", f"duplicate cluster name {cname!r}")
        cset.clusters[cname] = result.state
        notes.extend(result.notes)
    return cset, notes
