"""The part of the SparseZoo v2 GraphQL API that the sparsezoo 1.8.1 client uses, as a real schema
executed by graphql-core.

The client (``sparsezoo/model/utils.py: load_files_from_stub``, ``sparsezoo/api/query_parser.py``)
posts ``{"query": "{ models(domain: ..., task: ..., architecture: ..., subArchitecture: ...,
framework: ..., repo: ..., sourceDataset: ..., sparseTag: ...) { modelId
modelOnnxSizeCompressedBytes files(version: 2) { displayName downloadUrl fileSize fileType modelId }
benchmarkResults { batchSize deviceInfo numCores recordedUnits recordedValue } trainingResults {
datasetName datasetType recordedUnits recordedValue } repoName repoNamespace } }"}`` to
``{SPARSEZOO_API_URL}/v2/graphql`` and reads ``data.models``. A v2 stub is looked up by ``repoName``.

The endpoint is public, so a query is bounded before it runs (body size, tokens, fields with
aliases, depth) and while it runs (time); over a limit it is refused with HTTP 400.
"""

from __future__ import annotations

import json
import time
from typing import Any

from graphql import (
    GraphQLArgument,
    GraphQLField,
    GraphQLFloat,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLString,
    execute_sync,
    parse,
    validate,
)
from graphql.error import GraphQLError
from graphql.language import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from sqlalchemy import select

from obert_modifiers.zoo.db import Model
from obert_modifiers.zoo.service import Hub, file_type_map, file_url


def _serialize_big_int(value: Any) -> int:
    return int(value)


# file sizes exceed GraphQL's 32-bit Int
BigInt = GraphQLScalarType("BigInt", serialize=_serialize_big_int, description="A 64-bit integer")
REPO_NAMESPACE = "obert-hub"
# cost limits of a public endpoint; the sparsezoo client's query is ~1.2 KiB, ~90 tokens, 24 fields, 3 deep
MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS = 2000
MAX_FIELDS = 200
MAX_DEPTH = 6
MAX_SECONDS = 10.0


def _ctx(info) -> dict:
    return info.context


def _card(model: Model) -> dict:
    return json.loads(model.card_json)


def _files(model: Model, info, version: int | None = None) -> list[dict]:
    base_url = _ctx(info)["base_url"]
    types = file_type_map(model)
    files = []
    for f in model.files:
        file_type = types.get(f.path)
        # the client cannot download empty files (it treats Content-Length 0 as an invalid URL)
        if file_type is None or f.size == 0:
            continue
        files.append(
            {
                "displayName": f.path.split("/")[-1],
                "downloadUrl": file_url(base_url, model, f.path),
                "fileSize": f.size,
                "fileType": file_type,
                "modelId": model.id,
                "sha256": f.sha256,
                "path": f.path,
            }
        )
    return files


def _training_results(model: Model, _info) -> list[dict]:
    card = _card(model)
    return [
        {
            "datasetName": m.get("dataset") or model.dataset,
            "datasetType": "downstream",
            "recordedUnits": m["name"],
            "recordedValue": float(m["value"]),
            "recordedFormat": "float",
            "primaryResult": index == 0,
        }
        for index, m in enumerate(card.get("metrics", []))
    ]


def _benchmark_results(model: Model, _info) -> list[dict]:
    card = _card(model)
    results = []
    for lat in card.get("latency", []):
        items = lat.get("items_per_second") or (1000.0 * lat.get("batch_size", 1) / lat["median_ms"])
        results.append(
            {
                "batchSize": lat.get("batch_size", 1),
                "deviceInfo": lat["engine"],
                "numCores": lat.get("num_cores") or 0,
                "numStreams": 1,
                "recordedUnits": "items/seconds",
                "recordedValue": float(items),
                "runtime": lat["engine"],
            }
        )
    return results


FileType = GraphQLObjectType(
    "File",
    lambda: {
        "displayName": GraphQLField(GraphQLNonNull(GraphQLString)),
        "downloadUrl": GraphQLField(GraphQLNonNull(GraphQLString)),
        "fileSize": GraphQLField(GraphQLNonNull(BigInt)),
        "fileType": GraphQLField(GraphQLNonNull(GraphQLString)),
        "modelId": GraphQLField(GraphQLNonNull(GraphQLString)),
        "sha256": GraphQLField(GraphQLNonNull(GraphQLString)),
        "path": GraphQLField(
            GraphQLNonNull(GraphQLString), description="path inside the model (hub extension)"
        ),
    },
)

TrainingResultType = GraphQLObjectType(
    "TrainingResult",
    {
        "datasetName": GraphQLField(GraphQLString),
        "datasetType": GraphQLField(GraphQLString),
        "recordedUnits": GraphQLField(GraphQLString),
        "recordedValue": GraphQLField(GraphQLFloat),
        "recordedFormat": GraphQLField(GraphQLString),
        "primaryResult": GraphQLField(GraphQLString, resolve=lambda r, _i: str(r["primaryResult"]).lower()),
    },
)

BenchmarkResultType = GraphQLObjectType(
    "BenchmarkResult",
    {
        "batchSize": GraphQLField(GraphQLInt),
        "deviceInfo": GraphQLField(GraphQLString),
        "numCores": GraphQLField(GraphQLInt),
        "numStreams": GraphQLField(GraphQLInt),
        "recordedUnits": GraphQLField(GraphQLString),
        "recordedValue": GraphQLField(GraphQLFloat),
        "runtime": GraphQLField(GraphQLString),
    },
)


def _attr(name: str):
    return lambda model, _info: getattr(model, name)


ModelType = GraphQLObjectType(
    "Model",
    {
        "modelId": GraphQLField(GraphQLNonNull(GraphQLString), resolve=_attr("id")),
        "stub": GraphQLField(GraphQLNonNull(GraphQLString), resolve=_attr("stub")),
        "displayName": GraphQLField(
            GraphQLString, resolve=lambda m, _i: _card(m).get("display_name") or m.stub
        ),
        "domain": GraphQLField(GraphQLString, resolve=_attr("domain")),
        "task": GraphQLField(GraphQLString, resolve=_attr("sub_domain")),
        "subDomain": GraphQLField(GraphQLString, resolve=_attr("sub_domain")),
        "architecture": GraphQLField(GraphQLString, resolve=_attr("architecture")),
        "subArchitecture": GraphQLField(GraphQLString, resolve=_attr("sub_architecture")),
        "framework": GraphQLField(GraphQLString, resolve=_attr("framework")),
        "repo": GraphQLField(GraphQLString, resolve=_attr("repo")),
        "sourceDataset": GraphQLField(GraphQLString, resolve=_attr("dataset")),
        "trainingDataset": GraphQLField(GraphQLString, resolve=_attr("training_scheme")),
        "sparseTag": GraphQLField(GraphQLString, resolve=_attr("sparse_tag")),
        "repoName": GraphQLField(GraphQLString, resolve=_attr("id")),
        "repoNamespace": GraphQLField(GraphQLString, resolve=lambda _m, _i: REPO_NAMESPACE),
        "modelOnnxSizeCompressedBytes": GraphQLField(
            BigInt,
            resolve=lambda m, _i: next((f.size for f in m.files if f.path == "deployment/model.onnx"), None),
        ),
        "files": GraphQLField(
            GraphQLNonNull(GraphQLList(GraphQLNonNull(FileType))),
            args={"version": GraphQLArgument(GraphQLInt)},
            resolve=lambda m, info, version=None: _files(m, info, version),
        ),
        "trainingResults": GraphQLField(
            GraphQLNonNull(GraphQLList(GraphQLNonNull(TrainingResultType))), resolve=_training_results
        ),
        "benchmarkResults": GraphQLField(
            GraphQLNonNull(GraphQLList(GraphQLNonNull(BenchmarkResultType))), resolve=_benchmark_results
        ),
    },
)

# GraphQL argument -> Model column
_FILTERS = {
    "domain": "domain",
    "task": "sub_domain",
    "subDomain": "sub_domain",
    "architecture": "architecture",
    "subArchitecture": "sub_architecture",
    "framework": "framework",
    "repo": "repo",
    "sourceDataset": "dataset",
    "dataset": "dataset",
    "trainingDataset": "training_scheme",
    "sparseTag": "sparse_tag",
    "modelId": "id",
    "stub": "stub",
}


def _resolve_models(_root, info, **args) -> list[Model]:
    hub: Hub = _ctx(info)["hub"]
    query = select(Model)
    for arg, column in _FILTERS.items():
        if args.get(arg) is not None:
            query = query.where(getattr(Model, column) == args[arg])
    repo_name = args.get("repoName")
    if repo_name is not None:
        # a v2 stub ("zoo:arch-dataset-sparse_tag") or our own repo name (the model id)
        name = repo_name[4:] if repo_name.startswith("zoo:") else repo_name
        query = query.where(Model.id == name)
    if args.get("repoNamespace") not in (None, REPO_NAMESPACE):
        return []
    limit = max(0, min(int(args.get("limit") or 100), 1000))
    offset = max(0, int(args.get("offset") or 0))
    with hub.db.session() as session:
        return list(session.scalars(query.order_by(Model.created.desc()).limit(limit).offset(offset)))


QueryType = GraphQLObjectType(
    "Query",
    {
        "models": GraphQLField(
            GraphQLNonNull(GraphQLList(GraphQLNonNull(ModelType))),
            args={
                **{name: GraphQLArgument(GraphQLString) for name in _FILTERS},
                "repoName": GraphQLArgument(GraphQLString),
                "repoNamespace": GraphQLArgument(GraphQLString),
                "limit": GraphQLArgument(GraphQLInt),
                "offset": GraphQLArgument(GraphQLInt),
            },
            resolve=_resolve_models,
        ),
    },
)

SCHEMA = GraphQLSchema(query=QueryType)


class _OverLimit(Exception):
    pass


def _check_cost(document: DocumentNode) -> None:
    """Refuse (``_OverLimit``) a document over the field or depth limits before it is validated
    or run. Every field node counts, aliases included; fragments are expanded where they are
    spread, so a fragment spread twice counts twice (a cycle stops the walk: validation names it)."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    total = sum(1 for _ in _field_nodes(document))
    if total > MAX_FIELDS:
        raise _OverLimit(f"the query selects {total} fields (aliases included); the limit is {MAX_FIELDS}")
    budget = [0]

    def walk(selection_set: SelectionSetNode | None, depth: int, spreads: tuple[str, ...]) -> None:
        if selection_set is None:
            return
        for node in selection_set.selections:
            if isinstance(node, FieldNode):
                budget[0] += 1
                if budget[0] > MAX_FIELDS:
                    raise _OverLimit(
                        f"the query selects more than {MAX_FIELDS} fields once its fragments are expanded"
                    )
                if depth + 1 > MAX_DEPTH:
                    raise _OverLimit(f"the query nests fields more than {MAX_DEPTH} deep")
                walk(node.selection_set, depth + 1, spreads)
            elif isinstance(node, InlineFragmentNode):
                walk(node.selection_set, depth, spreads)
            elif isinstance(node, FragmentSpreadNode):
                name = node.name.value
                if name in spreads or name not in fragments:
                    continue  # a cycle or an unknown fragment: validation refuses it
                if len(spreads) >= MAX_DEPTH:
                    raise _OverLimit(f"the query nests fragments more than {MAX_DEPTH} deep")
                walk(fragments[name].selection_set, depth, (*spreads, name))

    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            walk(definition.selection_set, 0, ())


def _field_nodes(document: DocumentNode):
    stack = [d.selection_set for d in document.definitions if hasattr(d, "selection_set")]
    while stack:
        selection_set = stack.pop()
        if selection_set is None:
            continue
        for node in selection_set.selections:
            if isinstance(node, FieldNode):
                yield node
            if getattr(node, "selection_set", None) is not None:
                stack.append(node.selection_set)


def _refused(message: str) -> dict:
    return {"data": None, "errors": [{"message": message}]}


def execute(
    hub: Hub,
    base_url: str,
    query: str,
    variables: dict | None = None,
    operation_name: str | None = None,
    *,
    max_seconds: float = MAX_SECONDS,
) -> dict:
    """Run one GraphQL request; a payload whose ``data`` is None is a refusal (HTTP 400). The query is
    bounded before it runs (length, tokens, fields with aliases, depth) and while it runs (time)."""
    if len(query) > MAX_BODY_BYTES:
        return _refused(f"query refused: {len(query)} characters, the limit is {MAX_BODY_BYTES}")
    try:
        document = parse(query, max_tokens=MAX_TOKENS)
    except GraphQLError as error:
        return {"data": None, "errors": [error.formatted]}
    except RecursionError:
        return _refused(f"query refused: nested too deep (the limit is {MAX_DEPTH} levels)")
    try:
        _check_cost(document)
    except _OverLimit as error:
        return _refused(f"query refused: {error}")
    errors = validate(SCHEMA, document)
    if errors:
        return {"data": None, "errors": [error.formatted for error in errors]}
    deadline = time.monotonic() + max_seconds
    late: list[bool] = []

    def bounded(resolve, root, info, **args):
        if time.monotonic() > deadline:
            late.append(True)
            raise GraphQLError(f"query refused: it ran longer than {max_seconds:g} s")
        return resolve(root, info, **args)

    result = execute_sync(
        SCHEMA,
        document,
        variable_values=variables,
        operation_name=operation_name,
        context_value={"hub": hub, "base_url": base_url},
        middleware=[bounded],
    )
    if late:
        return _refused(f"query refused: it ran longer than {max_seconds:g} s")
    payload: dict[str, Any] = {"data": result.data}
    if result.errors:
        payload["errors"] = [error.formatted for error in result.errors]
    return payload
