//! What every dialling command (send, pipe, bench) shares: the QUIC connection to one peer,
//! its current path, the errors that end the command, the connect deadline, and the short
//! linger after the work so the QUIC close reaches the peer.

use std::time::{Duration, Instant};

use burrow::node::{NodeCore, NodeEvent, PathKind};
use burrow::transport::{ConnectionHandle, Event, Side, Transport};
use burrow::wire::PeerId;

/// How long the loop keeps running after the work is over, so the CONNECTION_CLOSE
/// reaches the peer (one flight).
const LINGER: Duration = Duration::from_millis(200);

/// The dialled peer's connection state.
pub(crate) struct Dial {
    pub peer: PeerId,
    pub conn: Option<ConnectionHandle>,
    pub path: Option<PathKind>,
    pub error: Option<String>,
    connect_deadline: Instant,
    linger_until: Option<Instant>,
    /// What the peer should be running, for the "no connection" message.
    expects: &'static str,
}

impl Dial {
    pub fn new(peer: PeerId, connect_timeout: Duration, expects: &'static str) -> Dial {
        Dial {
            peer,
            conn: None,
            path: None,
            error: None,
            connect_deadline: Instant::now() + connect_timeout,
            linger_until: None,
            expects,
        }
    }

    /// Our client connection to the peer came up: returns it the first time.
    pub fn connected(&mut self, event: &Event) -> Option<ConnectionHandle> {
        match event {
            Event::Connected {
                conn,
                peer,
                side: Side::Client,
            } if *peer == self.peer && self.conn.is_none() => {
                self.conn = Some(*conn);
                Some(*conn)
            }
            Event::ConnectionLost { peer, reason, .. }
                if *peer == self.peer && self.conn.is_none() =>
            {
                self.error = Some(format!("cannot connect to {peer}: {reason}"));
                None
            }
            _ => None,
        }
    }

    /// Records path changes and the failures that end the command; returns the new path
    /// when it changed.
    pub fn on_node_event(&mut self, event: &NodeEvent) -> Option<PathKind> {
        match event {
            NodeEvent::PathChanged { peer, path } if *peer == self.peer => {
                self.path = Some(*path);
                return Some(*path);
            }
            NodeEvent::ConnectFailed { peer, message, .. } if *peer == self.peer => {
                self.error = Some(format!("cannot reach {peer}: {message}"));
            }
            NodeEvent::RelayError { code, message } => {
                self.error = Some(format!("relay refused us: {code:?}: {message}"));
            }
            _ => {}
        }
        None
    }

    /// Per turn: learns the first path, enforces the connect deadline, and once `finished`
    /// (or failed) closes the connection and starts the linger.
    pub fn tick(
        &mut self,
        now: Instant,
        core: &mut NodeCore,
        transport: &mut Transport,
        finished: bool,
    ) {
        if self.path.is_none() {
            self.path = core.path(now, &self.peer);
        }
        if self.conn.is_none() && now >= self.connect_deadline && self.error.is_none() {
            self.error = Some(format!(
                "no connection to {} (is it running `{}`?)",
                self.peer, self.expects
            ));
        }
        if self.linger_until.is_none() && (finished || self.error.is_some()) {
            self.linger_until = Some(now + LINGER);
            if let Some(conn) = self.conn {
                let _ = transport.close(now, conn, 0, b"done");
            }
        }
    }

    /// The dial's own timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let connect = self.conn.is_none().then_some(self.connect_deadline);
        [connect, self.linger_until].into_iter().flatten().min()
    }

    /// The linger is over.
    pub fn is_done(&self) -> bool {
        self.linger_until.is_some_and(|t| Instant::now() >= t)
    }
}
