//! The peer table: per-peer state in a [`Slab`] behind a generational handle, with the
//! lookup maps (peer ID, relay channel, punch tag, direct address) kept beside it.
//!
//! Why generations: a slab reuses freed slots, so a handle kept by a driver (or a timer)
//! after its peer was removed would silently reach whichever peer took the slot next. The
//! generation stored next to each entry makes such a stale handle miss instead.

use std::collections::HashMap;
use std::net::SocketAddr;

use slab::Slab;

use super::punch::PunchState;
use crate::wire::PeerId;
use crate::wire::control::Role;
use crate::wire::relay_data::ChannelId;

/// A reference to one peer in a [`super::NodeCore`]; stale handles (peer removed, slot
/// reused) never resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerHandle {
    index: u32,
    generation: u32,
}

/// What the current introduction gave us: how to reach the peer via the relay, and the key
/// that authenticates punch packets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IntroKeys {
    /// Relay channel for relayed data.
    pub channel: ChannelId,
    /// Shared punch secret.
    pub nonce: [u8; 32],
    /// `wire::punch::tag(nonce)`, cached.
    pub tag: u64,
    /// Our role in the introduction.
    pub role: Role,
}

/// Everything the node keeps about one peer.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Who.
    pub id: PeerId,
    /// The application asked to connect (so we re-request introductions after a relay
    /// restart); false for peers that were introduced to us by someone else's request.
    pub wanted: bool,
    /// `request_id` of our outstanding `Connect`, if any.
    pub pending_request: Option<u32>,
    /// The current introduction, if any (its keys outlive the relay channel: a direct path
    /// keeps using the nonce after the relay forgot the pair).
    pub intro: Option<IntroKeys>,
    /// The introduction's relay channel still forwards (false after `PeerGone` or when the
    /// relay session was lost, until the next introduction).
    pub channel_live: bool,
    /// Punching and the direct path.
    pub punch: PunchState,
    /// Addresses that sent us an authenticated punch packet for this peer, newest last.
    /// QUIC datagrams are accepted from these too, so the two sides may pick different
    /// direct paths (say, LAN one way, public the other) without losing data.
    pub validated: Vec<SocketAddr>,
    /// The validated address the peer last pinged us from: its chosen direct path. Never
    /// pushed out of `validated` by newer addresses (a hard-NAT spray brings hundreds).
    pub pinned: Option<SocketAddr>,
    /// The node's relay epoch (registration count) when `intro` arrived.
    pub intro_epoch: u64,
    /// The peer's NAT report and candidates as last heard (introduction or
    /// `PeerCandidates`): a hard-NAT attempt is planned from them.
    pub peer_nat: crate::wire::control::NatReport,
    /// See `peer_nat`.
    pub peer_candidates: Vec<crate::wire::control::Candidate>,
    /// When to ask the relay for this (wanted, known) peer again after it was unknown there.
    pub reconnect_at: Option<std::time::Instant>,
    /// The last wait before `reconnect_at` (doubles).
    pub reconnect_backoff: Option<std::time::Duration>,
}

/// Most validated addresses remembered per peer. Usually a handful; a hard-NAT spray
/// (`super::spray`, 256 sockets) can validate one per socket of the peer, and the one the
/// peer ends up sending from must not have been pushed out by the others.
const MAX_VALIDATED: usize = 320;

/// The slab plus its indexes. All mutations of indexed fields go through here so the maps
/// never disagree with the entries.
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    slab: Slab<(u32, Peer)>,
    next_generation: u32,
    by_id: HashMap<PeerId, PeerHandle>,
    by_channel: HashMap<ChannelId, PeerHandle>,
    by_tag: HashMap<u64, PeerHandle>,
    by_direct: HashMap<SocketAddr, PeerHandle>,
    by_validated: HashMap<SocketAddr, PeerHandle>,
}

impl PeerTable {
    /// The handle of `id`, inserting a fresh entry made by `make` when absent.
    pub fn get_or_insert(&mut self, id: PeerId, make: impl FnOnce() -> Peer) -> PeerHandle {
        if let Some(h) = self.by_id.get(&id) {
            return *h;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let index = self.slab.insert((generation, make())) as u32;
        let h = PeerHandle { index, generation };
        self.by_id.insert(id, h);
        h
    }

    /// Resolves a handle; `None` when stale.
    pub fn get(&self, h: PeerHandle) -> Option<&Peer> {
        match self.slab.get(h.index as usize) {
            Some((g, p)) if *g == h.generation => Some(p),
            _ => None,
        }
    }

    /// Resolves a handle mutably; `None` when stale.
    pub fn get_mut(&mut self, h: PeerHandle) -> Option<&mut Peer> {
        match self.slab.get_mut(h.index as usize) {
            Some((g, p)) if *g == h.generation => Some(p),
            _ => None,
        }
    }

    /// The peer with this ID.
    pub fn by_id(&self, id: &PeerId) -> Option<PeerHandle> {
        self.by_id.get(id).copied()
    }

    /// The peer on this relay channel.
    pub fn by_channel(&self, c: ChannelId) -> Option<PeerHandle> {
        self.by_channel.get(&c).copied()
    }

    /// The peer whose introduction has this punch tag.
    pub fn by_tag(&self, tag: u64) -> Option<PeerHandle> {
        self.by_tag.get(&tag).copied()
    }

    /// The peer whose confirmed direct path is this remote address.
    pub fn by_direct(&self, addr: SocketAddr) -> Option<PeerHandle> {
        self.by_direct.get(&addr).copied()
    }

    /// The peer that sent an authenticated punch packet from this address.
    pub fn by_validated(&self, addr: SocketAddr) -> Option<PeerHandle> {
        self.by_validated.get(&addr).copied()
    }

    /// Records that `addr` proved (with a MAC) to be the peer's.
    pub fn validate_addr(&mut self, h: PeerHandle, addr: SocketAddr) {
        let Some(p) = self.get_mut(h) else { return };
        if p.validated.last() == Some(&addr) {
            return;
        }
        p.validated.retain(|a| *a != addr);
        let evicted = if p.validated.len() >= MAX_VALIDATED {
            let oldest = p
                .validated
                .iter()
                .position(|a| Some(*a) != p.pinned)
                .unwrap_or(0);
            Some(p.validated.remove(oldest))
        } else {
            None
        };
        p.validated.push(addr);
        if let Some(old) = evicted
            && self.by_validated.get(&old) == Some(&h)
        {
            self.by_validated.remove(&old);
        }
        self.by_validated.insert(addr, h);
    }

    /// Validates `addr` and pins it: the peer's own direct path (it pinged us from there).
    pub fn pin_addr(&mut self, h: PeerHandle, addr: SocketAddr) {
        self.validate_addr(h, addr);
        if let Some(p) = self.get_mut(h) {
            p.pinned = Some(addr);
        }
    }

    /// Installs a (new) introduction, replacing the channel and tag indexes of the old one.
    pub fn set_intro(&mut self, h: PeerHandle, keys: IntroKeys) {
        let Some(p) = self.get_mut(h) else { return };
        let old = p.intro.replace(keys);
        if let Some(old) = old {
            self.by_channel.remove(&old.channel);
            self.by_tag.remove(&old.tag);
        }
        self.by_channel.insert(keys.channel, h);
        self.by_tag.insert(keys.tag, h);
        if let Some(p) = self.get_mut(h) {
            p.channel_live = true;
        }
    }

    /// Forgets the introduction (peer gone from the relay), keeping the peer and any
    /// working direct path.
    pub fn clear_channel(&mut self, h: PeerHandle) {
        let Some(p) = self.get_mut(h) else { return };
        p.channel_live = false;
        if let Some(keys) = p.intro
            && self.by_channel.get(&keys.channel) == Some(&h)
        {
            self.by_channel.remove(&keys.channel);
        }
    }

    /// Records that the peer's direct path is now `addr` (or none).
    pub fn set_direct(&mut self, h: PeerHandle, old: Option<SocketAddr>, new: Option<SocketAddr>) {
        if let Some(old) = old
            && self.by_direct.get(&old) == Some(&h)
        {
            self.by_direct.remove(&old);
        }
        if let Some(new) = new {
            self.by_direct.insert(new, h);
        }
    }

    /// All live handles (a snapshot, so the caller may mutate while iterating).
    pub fn handles(&self) -> Vec<PeerHandle> {
        self.slab
            .iter()
            .map(|(i, (g, _))| PeerHandle {
                index: i as u32,
                generation: *g,
            })
            .collect()
    }

    /// Number of peers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Removes a peer and every index entry pointing at it.
    #[cfg(test)]
    pub fn remove(&mut self, h: PeerHandle) -> Option<Peer> {
        self.get(h)?;
        let (_, p) = self.slab.remove(h.index as usize);
        self.by_id.remove(&p.id);
        if let Some(k) = p.intro {
            self.by_channel.remove(&k.channel);
            self.by_tag.remove(&k.tag);
        }
        self.by_direct.retain(|_, v| *v != h);
        self.by_validated.retain(|_, v| *v != h);
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(b: u8) -> Peer {
        Peer {
            id: PeerId([b; 32]),
            wanted: false,
            pending_request: None,
            intro: None,
            channel_live: false,
            punch: PunchState::default(),
            validated: Vec::new(),
            pinned: None,
            reconnect_at: None,
            reconnect_backoff: None,
            peer_nat: Default::default(),
            peer_candidates: Vec::new(),
            intro_epoch: 0,
        }
    }

    #[test]
    fn stale_handle_does_not_reach_reused_slot() {
        let mut t = PeerTable::default();
        let a = t.get_or_insert(PeerId([1; 32]), || peer(1));
        t.remove(a).unwrap();
        let b = t.get_or_insert(PeerId([2; 32]), || peer(2));
        assert!(t.get(a).is_none(), "stale handle resolved");
        assert_eq!(t.get(b).unwrap().id, PeerId([2; 32]));
        assert_eq!(t.by_id(&PeerId([1; 32])), None);
    }

    #[test]
    fn indexes_follow_introductions() {
        let mut t = PeerTable::default();
        let a = t.get_or_insert(PeerId([1; 32]), || peer(1));
        let keys = |c, tag| IntroKeys {
            channel: ChannelId(c),
            nonce: [0; 32],
            tag,
            role: Role::Initiator,
        };
        t.set_intro(a, keys(5, 50));
        assert_eq!(t.by_channel(ChannelId(5)), Some(a));
        t.set_intro(a, keys(6, 60));
        assert_eq!(t.by_channel(ChannelId(5)), None);
        assert_eq!(t.by_tag(50), None);
        assert_eq!(t.by_tag(60), Some(a));
        let addr: SocketAddr = "192.0.2.1:9".parse().unwrap();
        t.set_direct(a, None, Some(addr));
        assert_eq!(t.by_direct(addr), Some(a));
        t.set_direct(a, Some(addr), None);
        assert_eq!(t.by_direct(addr), None);
        // The peer's own path (it pinged us from there) survives a flood of others.
        t.pin_addr(a, SocketAddr::new(addr.ip(), 1));
        let n = MAX_VALIDATED as u16 + 20;
        for port in 2..n {
            t.validate_addr(a, SocketAddr::new(addr.ip(), port));
        }
        assert_eq!(t.get(a).unwrap().validated.len(), MAX_VALIDATED);
        assert_eq!(
            t.by_validated(SocketAddr::new(addr.ip(), 2)),
            None,
            "evicted"
        );
        assert_eq!(
            t.by_validated(SocketAddr::new(addr.ip(), 1)),
            Some(a),
            "pinned"
        );
        assert_eq!(t.by_validated(SocketAddr::new(addr.ip(), n - 1)), Some(a));
        assert_eq!(t.len(), 1);
    }
}
