"""The part of the SparseZoo v2 GraphQL API that the sparsezoo 1.8.1 client uses, as a real schema
executed by graphql-core.

The client (``sparsezoo/model/utils.py: load_files_from_stub``, ``sparsezoo/api/query_parser.py``)
posts ``{"query": "{ models(domain: ..., task: ..., architecture: ..., subArchitecture: ...,
framework: ..., repo: ..., sourceDataset: ..., sparseTag: ...) { modelId
modelOnnxSizeCompressedBytes files(version: 2) { displayName downloadUrl fileSize fileType modelId }
benchmarkResults { batchSize deviceInfo numCores recordedUnits recordedValue } trainingResults {
datasetName datasetType recordedUnits recordedValue } repoName repoNamespace } }"}`` to
``{SPARSEZOO_API_URL}/v2/graphql`` and reads ``data.models``. A v2 stub is looked up by ``repoName``.
"""

from __future__ import annotations

import json
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
    graphql_sync,
)
from sqlalchemy import select

from obert_modifiers.zoo.db import Model
from obert_modifiers.zoo.service import Hub, file_type_map, file_url


def _serialize_big_int(value: Any) -> int:
    return int(value)


# file sizes exceed GraphQL's 32-bit Int
BigInt = GraphQLScalarType("BigInt", serialize=_serialize_big_int, description="A 64-bit integer")
REPO_NAMESPACE = "obert-hub"


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


def execute(
    hub: Hub, base_url: str, query: str, variables: dict | None = None, operation_name: str | None = None
) -> dict:
    result = graphql_sync(
        SCHEMA,
        query,
        variable_values=variables,
        operation_name=operation_name,
        context_value={"hub": hub, "base_url": base_url},
    )
    payload: dict[str, Any] = {"data": result.data}
    if result.errors:
        payload["errors"] = [error.formatted for error in result.errors]
    return payload
