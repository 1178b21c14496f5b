//! UPnP IGD: SSDP discovery, the device description, and WANIPConnection's
//! `GetExternalIPAddress` / `AddPortMapping` / `DeletePortMapping` over SOAP, as one client
//! state machine for one UDP mapping.
//!
//! The driver carries the datagrams (SSDP M-SEARCH to 239.255.255.250:1900 and to the
//! gateway) and the HTTP exchanges (one TCP connection per request, `Connection: close`, the
//! whole reply handed back at EOF). Everything a device sends is untrusted: replies are
//! capped at [`MAX_HTTP_REPLY`] bytes, the description's URLs may only point back to the
//! device that answered the search, and XML is read with a streaming parser (quick-xml) that
//! keeps no tree.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use quick_xml::events::Event;
use tracing::{debug, trace};

use super::{Mapping, Protocol, Retransmit};

/// The SSDP multicast group and port (UPnP Device Architecture 1.1 §1.3.2).
pub const SSDP_MULTICAST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// Largest HTTP reply (headers + body) we read from a device; the driver stops reading
/// there and the reply counts as failed.
pub const MAX_HTTP_REPLY: usize = 64 * 1024;
/// How long one HTTP exchange may take before the device counts as silent.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Search target: any WAN connection service of an IGD (v1 or v2 devices both offer one).
const SEARCH_TARGET: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
/// The description of our mapping in the router's table.
const DESCRIPTION: &str = "burrow";

/// The M-SEARCH request (UDA 1.1 §1.3.2). `MX: 2`: devices answer within 2 s.
pub fn msearch(host: SocketAddrV4) -> Vec<u8> {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {host}\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: {SEARCH_TARGET}\r\n\r\n"
    )
    .into_bytes()
}

/// An `http://host:port/path` URL with an IPv4 literal host (all an IGD on the LAN uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host and port.
    pub addr: SocketAddrV4,
    /// Path (starting with `/`).
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://a.b.c.d[:port][/path]`; anything else (names, https, IPv6) is `None`.
    pub fn parse(s: &str) -> Option<HttpUrl> {
        let rest = s.trim().strip_prefix("http://")?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = match hostport.parse::<SocketAddrV4>() {
            Ok(a) => a,
            Err(_) => SocketAddrV4::new(hostport.parse().ok()?, 80),
        };
        if path.len() > 1024 || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return None;
        }
        Some(HttpUrl {
            addr,
            path: path.to_string(),
        })
    }

    /// Resolves a URL from a description (absolute, absolute path, or relative) against
    /// this one. Absolute URLs must name the same host.
    pub fn join(&self, s: &str) -> Option<HttpUrl> {
        let s = s.trim();
        if s.starts_with("http://") {
            let u = HttpUrl::parse(s)?;
            return (u.addr.ip() == self.addr.ip()).then_some(u);
        }
        if s.is_empty() || s.len() > 1024 || s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return None;
        }
        let path = if s.starts_with('/') {
            s.to_string()
        } else {
            let dir = &self.path[..self.path.rfind('/').map_or(0, |i| i + 1)];
            format!("{}{s}", if dir.is_empty() { "/" } else { dir })
        };
        Some(HttpUrl {
            addr: self.addr,
            path,
        })
    }
}

/// The `LOCATION` of an SSDP search response, if `b` is one (`HTTP/1.1 200`).
pub fn parse_ssdp_response(b: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(b) {
        Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial) => {}
        Err(e) => {
            trace!("SSDP: unparsable reply: {e}");
            return None;
        }
    }
    if resp.code != Some(200) {
        return None;
    }
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("location"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|s| s.trim().to_string())
}

/// A complete HTTP reply: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked, cut at `Content-Length`).
    pub body: Vec<u8>,
}

/// Parses a whole HTTP/1.x reply read until EOF.
pub fn parse_http_reply(b: &[u8]) -> Option<HttpReply> {
    if b.len() > MAX_HTTP_REPLY {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let status = resp.code?;
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let rest = &b[head_len..];
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpReply { status, body })
}

/// Decodes a chunked body (RFC 9112 §7.1); chunk extensions and trailers are skipped.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..line_end]).ok()?;
        let size_str = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_str, 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if size > b.len() || out.len() + size > MAX_HTTP_REPLY {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// The WAN connection service found in a device description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanService {
    /// Its exact `serviceType` (SOAP actions are namespaced with it).
    pub service_type: String,
    /// Where to POST actions.
    pub control: HttpUrl,
}

/// Finds the first WANIPConnection (or WANPPPConnection) service in an IGD description,
/// resolving its `controlURL` against `URLBase` or the description's own URL.
pub fn parse_description(xml: &[u8], location: &HttpUrl) -> Option<WanService> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    reader.config_mut().trim_text(true);
    let mut buf = Vec::new();
    let mut current: Option<String> = None;
    let mut url_base: Option<String> = None;
    let mut service_type: Option<String> = None;
    let mut control: Option<String> = None;
    let mut found: Vec<(String, String)> = Vec::new();
    for _ in 0..100_000 {
        buf.clear();
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                let name = AsRef::<str>::as_ref(&e.local_name()).to_string();
                if name == "service" {
                    service_type = None;
                    control = None;
                }
                current = Some(name);
            }
            Ok(Event::Text(t)) => {
                let Some(name) = current.as_deref() else {
                    continue;
                };
                let text = t.xml10_content().trim().to_string();
                match name {
                    "URLBase" => url_base = Some(text),
                    "serviceType" => service_type = Some(text),
                    "controlURL" => control = Some(text),
                    _ => {}
                }
            }
            Ok(Event::End(e)) => {
                if AsRef::<str>::as_ref(&e.local_name()) == "service"
                    && let (Some(t), Some(c)) = (service_type.take(), control.take())
                    && found.len() < 64
                {
                    found.push((t, c));
                }
                current = None;
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => {
                trace!("IGD description: XML error {e}");
                return None;
            }
        }
    }
    let base = match url_base.as_deref().and_then(HttpUrl::parse) {
        Some(b) if b.addr.ip() == location.addr.ip() => b,
        _ => location.clone(),
    };
    let pick = |kind: &str| {
        found
            .iter()
            .find(|(t, _)| t.starts_with(kind))
            .and_then(|(t, c)| {
                Some(WanService {
                    service_type: t.clone(),
                    control: base.join(c)?,
                })
            })
    };
    pick("urn:schemas-upnp-org:service:WANIPConnection:")
        .or_else(|| pick("urn:schemas-upnp-org:service:WANPPPConnection:"))
}

/// A SOAP action request (UPnP Device Architecture 1.1 §3.2.1).
pub fn soap_request(service: &WanService, action: &str, args: &[(&str, String)]) -> Vec<u8> {
    let mut body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{}\">",
        service.service_type
    );
    for (k, v) in args {
        body.push_str(&format!("<{k}>{v}</{k}>"));
    }
    body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        service.control.path,
        service.control.addr,
        service.service_type,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    req
}

/// A plain GET (for the description).
pub fn get_request(url: &HttpUrl) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.path, url.addr
    )
    .into_bytes()
}

/// The text of the first element named `name` (local name) in a SOAP body.
pub fn soap_field(xml: &[u8], name: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    reader.config_mut().trim_text(true);
    let mut buf = Vec::new();
    let mut inside = false;
    for _ in 0..10_000 {
        buf.clear();
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => inside = AsRef::<str>::as_ref(&e.local_name()) == name,
            Ok(Event::Empty(e)) if AsRef::<str>::as_ref(&e.local_name()) == name => {
                return Some(String::new());
            }
            Ok(Event::Text(t)) if inside => {
                return Some(t.xml10_content().trim().to_string());
            }
            Ok(Event::End(e)) if inside && AsRef::<str>::as_ref(&e.local_name()) == name => {
                return Some(String::new());
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    None
}

/// An HTTP exchange for the driver: connect to `to`, write `request`, read to EOF (at most
/// [`MAX_HTTP_REPLY`] bytes), report with [`super::PortMapper::handle_http`] and `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Matches the reply to the request.
    pub id: u64,
    /// The device.
    pub to: SocketAddr,
    /// The bytes to write.
    pub request: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Sending M-SEARCH.
    Searching,
    /// Fetching the description.
    Describing,
    /// Description read; waiting for the coordinator's go ahead.
    Ready,
    ExternalIp,
    Adding {
        external_ip: Ipv4Addr,
    },
    Mapped {
        external_ip: Ipv4Addr,
        renew_at: Instant,
    },
    Deleting,
    Done,
}

/// What the client concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report.
    None,
    /// Found an IGD (ready to map when told).
    Found,
    /// A mapping was obtained or renewed.
    Mapped(Mapping),
    /// No IGD or it refused.
    Failed(String),
    /// The delete finished (or was given up).
    Deleted,
}

/// One UDP mapping via UPnP IGD. Drain order after each input:
/// [`UpnpClient::poll_transmit`] (SSDP datagrams) and [`UpnpClient::poll_http`] until
/// `None`, then sleep until [`UpnpClient::poll_timeout`].
#[derive(Debug)]
pub struct UpnpClient {
    gateway: Ipv4Addr,
    local: Ipv4Addr,
    internal_port: u16,
    external_port: u16,
    /// Requested lease in seconds; 0 after a router said it only does permanent leases.
    lease: u32,
    phase: Phase,
    search: Retransmit,
    /// Whether the coordinator allowed mapping (`map`); discovery runs before that.
    go: bool,
    service: Option<WanService>,
    http_out: Option<HttpRequest>,
    /// The exchange we wait for, and when it times out.
    http_wait: Option<(u64, Instant)>,
    next_id: u64,
    udp_out: Vec<(SocketAddr, Vec<u8>)>,
    /// AddPortMapping conflicts seen (bounded retries on other ports).
    conflicts: u32,
}

/// Lease asked for, in seconds.
const LEASE: u32 = 3600;
/// A permanent lease is refreshed anyway this often (the router may have rebooted).
const PERMANENT_REFRESH: Duration = Duration::from_secs(1200);
/// Other external ports tried after `ConflictInMappingEntry` (718).
const MAX_CONFLICTS: u32 = 3;

impl UpnpClient {
    /// Starts searching (multicast and unicast to `gateway`) for an IGD. `local` is our
    /// address on the gateway's network (the mapping's internal client).
    pub fn new(now: Instant, gateway: Ipv4Addr, local: Ipv4Addr, internal_port: u16) -> Self {
        let mut c = UpnpClient {
            gateway,
            local,
            internal_port,
            external_port: internal_port,
            lease: LEASE,
            phase: Phase::Searching,
            search: Retransmit::new(now),
            go: false,
            service: None,
            http_out: None,
            http_wait: None,
            next_id: 1,
            udp_out: Vec::new(),
            conflicts: 0,
        };
        c.send_search();
        c
    }

    fn send_search(&mut self) {
        self.udp_out
            .push((SocketAddr::V4(SSDP_MULTICAST), msearch(SSDP_MULTICAST)));
        let unicast = SocketAddrV4::new(self.gateway, 1900);
        self.udp_out
            .push((SocketAddr::V4(unicast), msearch(unicast)));
    }

    /// SSDP datagrams to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.udp_out.pop()
    }

    /// The next HTTP exchange to carry out.
    pub fn poll_http(&mut self) -> Option<HttpRequest> {
        self.http_out.take()
    }

    /// When [`UpnpClient::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Searching => self.search.next(),
            Phase::Mapped { renew_at, .. } => Some(*renew_at),
            Phase::Ready | Phase::Done => None,
            _ => self.http_wait.map(|(_, t)| t),
        }
    }

    fn http(&mut self, now: Instant, to: SocketAddrV4, request: Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        self.http_out = Some(HttpRequest {
            id,
            to: SocketAddr::V4(to),
            request,
        });
        self.http_wait = Some((id, now + HTTP_TIMEOUT));
    }

    fn soap(&mut self, now: Instant, action: &str, args: &[(&str, String)]) {
        let Some(service) = self.service.clone() else {
            return;
        };
        let req = soap_request(&service, action, args);
        self.http(now, service.control.addr, req);
    }

    fn add_mapping(&mut self, now: Instant) {
        let args = [
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", self.external_port.to_string()),
            ("NewProtocol", "UDP".to_string()),
            ("NewInternalPort", self.internal_port.to_string()),
            ("NewInternalClient", self.local.to_string()),
            ("NewEnabled", "1".to_string()),
            ("NewPortMappingDescription", DESCRIPTION.to_string()),
            ("NewLeaseDuration", self.lease.to_string()),
        ];
        self.soap(now, "AddPortMapping", &args);
    }

    /// Retries the search, times out HTTP exchanges, renews the lease.
    pub fn handle_timeout(&mut self, now: Instant) -> Outcome {
        match self.phase.clone() {
            Phase::Searching => {
                if self.search.due(now) {
                    if self.search.fire(now) {
                        self.send_search();
                    } else {
                        self.phase = Phase::Done;
                        return Outcome::Failed("no UPnP IGD answered the search".into());
                    }
                }
                Outcome::None
            }
            Phase::Mapped {
                external_ip,
                renew_at,
            } if now >= renew_at => {
                trace!("UPnP: renewing the lease");
                self.phase = Phase::Adding { external_ip };
                self.add_mapping(now);
                Outcome::None
            }
            Phase::Ready | Phase::Done | Phase::Mapped { .. } => Outcome::None,
            Phase::Deleting => {
                if self.http_wait.is_some_and(|(_, t)| now >= t) {
                    self.phase = Phase::Done;
                    return Outcome::Deleted;
                }
                Outcome::None
            }
            _ => {
                if self.http_wait.is_some_and(|(_, t)| now >= t) {
                    self.phase = Phase::Done;
                    return Outcome::Failed("UPnP IGD did not answer over HTTP".into());
                }
                Outcome::None
            }
        }
    }

    /// A datagram on the SSDP socket (an M-SEARCH response).
    pub fn handle_ssdp(&mut self, now: Instant, from: SocketAddr, b: &[u8]) -> Outcome {
        if self.phase != Phase::Searching {
            return Outcome::None;
        }
        let Some(location) = parse_ssdp_response(b) else {
            return Outcome::None;
        };
        let Some(url) = HttpUrl::parse(&location) else {
            debug!(%location, "UPnP: unusable LOCATION");
            return Outcome::None;
        };
        // Only the gateway may be our IGD, and its description must be on itself: a LAN
        // host answering the search cannot send us elsewhere.
        if from.ip() != IpAddr::V4(self.gateway) || *url.addr.ip() != self.gateway {
            debug!(%from, %location, "UPnP: answer not from the gateway; ignored");
            return Outcome::None;
        }
        debug!(%location, "UPnP: IGD found");
        self.phase = Phase::Describing;
        self.search = Retransmit::idle();
        self.http(now, url.addr, get_request(&url));
        self.service = None;
        // Remember where the description is for resolving relative URLs.
        self.service = Some(WanService {
            service_type: String::new(),
            control: url,
        });
        Outcome::None
    }

    /// The reply to HTTP exchange `id`: the bytes read until EOF, or `None` on a
    /// connection error or a reply over [`MAX_HTTP_REPLY`].
    pub fn handle_http(&mut self, now: Instant, id: u64, reply: Option<&[u8]>) -> Outcome {
        if self.http_wait.map(|(i, _)| i) != Some(id) {
            trace!(id, "UPnP: stale HTTP reply; dropped");
            return Outcome::None;
        }
        self.http_wait = None;
        let reply = reply.and_then(parse_http_reply);
        match self.phase.clone() {
            Phase::Describing => {
                let location = self.service.take().map(|s| s.control);
                let service = match (reply, location) {
                    (Some(r), Some(loc)) if r.status == 200 => parse_description(&r.body, &loc),
                    _ => None,
                };
                match service {
                    Some(s) => {
                        debug!(service = %s.service_type, control = ?s.control, "UPnP: WAN service");
                        self.service = Some(s);
                        self.phase = Phase::Ready;
                        if self.go {
                            self.start_mapping(now);
                        }
                        Outcome::Found
                    }
                    None => {
                        self.phase = Phase::Done;
                        Outcome::Failed("UPnP IGD description has no WAN connection service".into())
                    }
                }
            }
            Phase::ExternalIp => {
                let ip = reply
                    .filter(|r| r.status == 200)
                    .and_then(|r| soap_field(&r.body, "NewExternalIPAddress"))
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
                    .filter(|ip| !ip.is_unspecified());
                match ip {
                    Some(external_ip) => {
                        self.phase = Phase::Adding { external_ip };
                        self.add_mapping(now);
                        Outcome::None
                    }
                    None => {
                        self.phase = Phase::Done;
                        Outcome::Failed("UPnP GetExternalIPAddress failed".into())
                    }
                }
            }
            Phase::Adding { external_ip } => {
                let Some(r) = reply else {
                    self.phase = Phase::Done;
                    return Outcome::Failed("UPnP AddPortMapping: no reply".into());
                };
                if r.status == 200 {
                    let renew = if self.lease == 0 {
                        PERMANENT_REFRESH
                    } else {
                        Duration::from_secs(u64::from(self.lease) / 2)
                    };
                    self.phase = Phase::Mapped {
                        external_ip,
                        renew_at: now + renew,
                    };
                    return Outcome::Mapped(Mapping {
                        protocol: Protocol::Upnp,
                        external: SocketAddr::new(external_ip.into(), self.external_port),
                        internal_port: self.internal_port,
                        lifetime: if self.lease == 0 {
                            Duration::ZERO
                        } else {
                            Duration::from_secs(self.lease.into())
                        },
                    });
                }
                let code = soap_field(&r.body, "errorCode").and_then(|s| s.parse::<u32>().ok());
                match code {
                    // 725 OnlyPermanentLeasesSupported (IGD v1 WANIPConnection §2.4.16).
                    Some(725) if self.lease != 0 => {
                        self.lease = 0;
                        self.add_mapping(now);
                        Outcome::None
                    }
                    // 718 ConflictInMappingEntry: the port is taken by another client.
                    Some(718) if self.conflicts < MAX_CONFLICTS => {
                        self.conflicts += 1;
                        self.external_port = self
                            .external_port
                            .checked_add(1)
                            .filter(|p| *p >= 1024)
                            .unwrap_or(1024);
                        self.add_mapping(now);
                        Outcome::None
                    }
                    _ => {
                        self.phase = Phase::Done;
                        Outcome::Failed(format!(
                            "UPnP AddPortMapping refused (HTTP {}, error {})",
                            r.status,
                            code.map_or("?".to_string(), |c| c.to_string())
                        ))
                    }
                }
            }
            Phase::Deleting => {
                self.phase = Phase::Done;
                Outcome::Deleted
            }
            _ => Outcome::None,
        }
    }

    fn start_mapping(&mut self, now: Instant) {
        self.phase = Phase::ExternalIp;
        self.soap(now, "GetExternalIPAddress", &[]);
    }

    /// Allows the client to create the mapping (now, or once the IGD is found).
    pub fn map(&mut self, now: Instant) {
        self.go = true;
        if self.phase == Phase::Ready {
            self.start_mapping(now);
        }
    }

    /// Deletes the mapping if one exists (or is being made). Returns whether a request went out.
    pub fn release(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Mapped { .. } | Phase::Adding { .. } => {
                self.phase = Phase::Deleting;
                let args = [
                    ("NewRemoteHost", String::new()),
                    ("NewExternalPort", self.external_port.to_string()),
                    ("NewProtocol", "UDP".to_string()),
                ];
                self.soap(now, "DeletePortMapping", &args);
                true
            }
            _ => {
                self.phase = Phase::Done;
                self.http_out = None;
                false
            }
        }
    }

    /// Whether the client has finished.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &str = r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>/WANIPCn.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>"#;

    fn gw() -> Ipv4Addr {
        Ipv4Addr::new(10, 1, 0, 1)
    }

    fn http_ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn msearch_bytes() {
        assert_eq!(
            msearch(SSDP_MULTICAST),
            b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
        );
    }

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap();
        assert_eq!(u.addr, "10.1.0.1:5000".parse().unwrap());
        assert_eq!(u.join("/ctl/IPConn").unwrap().path, "/ctl/IPConn");
        assert_eq!(u.join("ctl").unwrap().path, "/ctl");
        assert_eq!(
            u.join("http://10.1.0.1:6000/x").unwrap().addr,
            "10.1.0.1:6000".parse().unwrap()
        );
        // Another host: refused.
        assert_eq!(u.join("http://192.0.2.1/x"), None);
        assert_eq!(HttpUrl::parse("https://10.1.0.1/"), None);
        assert_eq!(HttpUrl::parse("http://router.local/"), None);
        assert_eq!(HttpUrl::parse("http://10.1.0.1").unwrap().addr.port(), 80);
    }

    #[test]
    fn description_and_soap() {
        let loc = HttpUrl::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap();
        let s = parse_description(DESC.as_bytes(), &loc).unwrap();
        assert_eq!(
            s.service_type,
            "urn:schemas-upnp-org:service:WANIPConnection:1"
        );
        assert_eq!(s.control.path, "/ctl/IPConn");
        let req = soap_request(&s, "GetExternalIPAddress", &[]);
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("POST /ctl/IPConn HTTP/1.1\r\nHost: 10.1.0.1:5000\r\n"));
        assert!(text.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#GetExternalIPAddress\""
        ));
        let reply = r#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalIPAddress>198.18.0.21</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"#;
        assert_eq!(
            soap_field(reply.as_bytes(), "NewExternalIPAddress").as_deref(),
            Some("198.18.0.21")
        );
        assert_eq!(soap_field(b"<a><b>", "x"), None);
        assert_eq!(parse_description(b"<<<", &loc), None);
    }

    #[test]
    fn http_replies() {
        let r = parse_http_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_http_reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert_eq!(
            parse_http_reply(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\nab"
            ),
            None
        );
        assert_eq!(
            parse_http_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"),
            None
        );
        assert_eq!(parse_http_reply(b"garbage"), None);
        assert_eq!(parse_http_reply(&vec![b'a'; MAX_HTTP_REPLY + 1]), None);
    }

    /// The whole flow against scripted replies: search → description → external IP → add →
    /// delete.
    #[test]
    fn discover_map_delete() {
        let t0 = Instant::now();
        let mut c = UpnpClient::new(t0, gw(), Ipv4Addr::new(10, 1, 0, 10), 4000);
        let mut sent = Vec::new();
        while let Some((to, _)) = c.poll_transmit() {
            sent.push(to);
        }
        assert!(sent.contains(&SocketAddr::V4(SSDP_MULTICAST)));
        let gw_ssdp = SocketAddr::new(gw().into(), 1900);
        // A LAN host other than the gateway: ignored.
        let ssdp =
            b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n\r\n";
        c.handle_ssdp(t0, "10.1.0.99:1900".parse().unwrap(), ssdp);
        assert!(c.poll_http().is_none());
        c.handle_ssdp(t0, gw_ssdp, ssdp);
        let get = c.poll_http().unwrap();
        assert_eq!(get.to, "10.1.0.1:5000".parse::<SocketAddr>().unwrap());
        assert!(get.request.starts_with(b"GET /rootDesc.xml HTTP/1.1\r\n"));
        assert_eq!(
            c.handle_http(t0, get.id, Some(&http_ok(DESC))),
            Outcome::Found
        );
        // Not allowed to map yet.
        assert!(c.poll_http().is_none());
        c.map(t0);
        let ext = c.poll_http().unwrap();
        assert!(String::from_utf8_lossy(&ext.request).contains("#GetExternalIPAddress"));
        let reply = "<s:Envelope><s:Body><u:R><NewExternalIPAddress>198.18.0.21</NewExternalIPAddress></u:R></s:Body></s:Envelope>";
        c.handle_http(t0, ext.id, Some(&http_ok(reply)));
        let add = c.poll_http().unwrap();
        let add_text = String::from_utf8_lossy(&add.request).to_string();
        assert!(add_text.contains("<NewInternalClient>10.1.0.10</NewInternalClient>"));
        assert!(add_text.contains("<NewExternalPort>4000</NewExternalPort>"));
        // Conflict: another external port.
        let conflict = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 80\r\n\r\n<s:Envelope><s:Body><s:Fault><detail><errorCode>718</errorCode></detail></s:Fault></s:Body></s:Envelope>";
        let conflict = conflict.replace(
            "80",
            &(conflict.split("\r\n\r\n").nth(1).unwrap().len()).to_string(),
        );
        assert_eq!(
            c.handle_http(t0, add.id, Some(conflict.as_bytes())),
            Outcome::None
        );
        let add2 = c.poll_http().unwrap();
        assert!(
            String::from_utf8_lossy(&add2.request)
                .contains("<NewExternalPort>4001</NewExternalPort>")
        );
        let Outcome::Mapped(m) = c.handle_http(t0, add2.id, Some(&http_ok("<ok/>"))) else {
            panic!()
        };
        assert_eq!(
            m.external,
            "198.18.0.21:4001".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(m.protocol, Protocol::Upnp);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(1800)));
        assert!(c.release(t0));
        let del = c.poll_http().unwrap();
        assert!(String::from_utf8_lossy(&del.request).contains("#DeletePortMapping"));
        assert_eq!(c.handle_http(t0, del.id, None), Outcome::Deleted);
        assert!(c.is_done());
    }

    #[test]
    fn silent_network_fails_after_bounded_searches() {
        let t0 = Instant::now();
        let mut c = UpnpClient::new(t0, gw(), Ipv4Addr::new(10, 1, 0, 10), 4000);
        for _ in 0..20 {
            while c.poll_transmit().is_some() {}
            let Some(t) = c.poll_timeout() else { break };
            if let Outcome::Failed(_) = c.handle_timeout(t) {
                return;
            }
        }
        panic!("search never gave up");
    }
}
