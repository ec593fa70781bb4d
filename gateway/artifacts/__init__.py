"""Versions as immutable artifacts: model archives, the version registry and the schema gate.

An archive packages one version of a Triton model (config.pbtxt, its version folder, extra files) with a
MANIFEST.json; its digest (the sha256 of that manifest, which lists the sha256 of every other file) names
the version's content. The registry, kept in the store, records each version id once with its digest.
The schema gate compares a version's tensors with its baseline's before it gets traffic.

Decisions are pure functions (`manifest`, `schema`, `registry`, `gate`); files, Triton and the store are
reached at the edges (`archive`, `deploy`, `guard`). docs/archives.md describes the format and workflow.
"""
