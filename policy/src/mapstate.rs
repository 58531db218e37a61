//! Per-endpoint policy map state: keys and entries as the datapath's policy map holds them, and diffs.
