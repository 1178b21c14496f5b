//! The sans-IO relay core (registration, rendezvous, STUN, forwarding, limits). It lives in the library, not in `relay/`, so that the simulator can run it next to the node core.
