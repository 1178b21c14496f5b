//! QUIC data plane on quinn-proto: one connection per peer over a stable virtual address.
