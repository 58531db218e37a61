//! The engine: policies + endpoints + identities → per-endpoint map state, recomputed incrementally.
