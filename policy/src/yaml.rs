//! Span-aware YAML (and JSON) document tree: every node knows its line and column.
