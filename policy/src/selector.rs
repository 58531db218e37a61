//! Selector cache: which identities each peer selector selects, kept up to date incrementally.
