"""One router per resource: models (search, resolve, read, delete), files (downloads), publish,
and the SparseZoo v2 GraphQL subset."""
