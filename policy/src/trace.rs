//! Flow verdicts with the rules that decided them (policy trace).
