//! The sans-IO node core: relay session, address discovery, peer table, punching, path choice.
