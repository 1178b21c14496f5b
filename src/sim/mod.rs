//! Deterministic in-memory network with RFC 4787 NAT models and a virtual clock.
