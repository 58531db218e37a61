//! Numeric identities: one per distinct label set; reserved numbers as Cilium; node-local for CIDR and FQDN.
