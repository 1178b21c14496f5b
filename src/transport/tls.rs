//! TLS 1.3 bound to burrow identities: self-signed Ed25519 certificates and the verifiers that
//! turn a peer's certificate into its [`PeerId`].
//!
//! There is no certificate authority. A node's certificate is self-signed by its Ed25519
//! identity key, and the certificate's only meaning is "the holder of this key". What gives it
//! weight is the TLS 1.3 CertificateVerify message (RFC 8446 section 4.4.3): the peer signs
//! the handshake transcript with the certificate's key, proving it holds the secret key right
//! now. The verifiers below therefore check:
//!
//! 1. the certificate parses, its key is Ed25519 (OID 1.3.101.112, RFC 8410) and it is
//!    correctly self-signed with that key (rejects junk early, with a clear reason);
//! 2. client side: the key is exactly the [`PeerId`] the node meant to reach; a relay or a
//!    stranger presenting another key is refused with an error naming both IDs;
//!    server side: any such certificate is accepted and the authenticated [`PeerId`] goes to
//!    the layer above, which applies its allow list;
//! 3. the handshake signature, with ring's Ed25519, and only the `ed25519` scheme.
//!
//! Validity dates are deliberately not checked: the core has no clock for calendar time, and
//! the key binding, not the date, is what identifies a node.
//!
//! Both sides present certificates (mutual authentication); only TLS 1.3 with ring's
//! provider; ALPN `burrow/1` (RFC 7301) so a non-burrow QUIC peer fails the handshake.

use std::fmt;
use std::sync::{Arc, Mutex};

use ring::signature::{ED25519, UnparsedPublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::Identity;
use crate::wire::PeerId;

/// The ALPN protocol identifier of burrow's QUIC data plane.
pub const ALPN: &[u8] = b"burrow/1";

/// Server name sent in the ClientHello. The peer is identified by its key, not by a name, so
/// a fixed name keeps the target's peer ID out of the cleartext ClientHello.
pub const SERVER_NAME: &str = "burrow";

/// DER of the Ed25519 AlgorithmIdentifier contents: OID 1.3.101.112, parameters absent
/// (RFC 8410 section 3: "the parameters MUST be absent").
const ED25519_ALG_ID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// PKCS#8 v1 prefix for an Ed25519 private key (RFC 8410 section 7); the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: &[u8] = &[
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a certificate was refused, or a certificate could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The DER structure is not an X.509 certificate this parser understands.
    #[error("malformed certificate: {0}")]
    Malformed(&'static str),
    /// The certificate key or signature algorithm is not Ed25519.
    #[error("certificate is not an Ed25519 burrow certificate")]
    NotEd25519,
    /// The certificate is not signed by its own key.
    #[error("certificate self-signature does not verify")]
    BadSelfSignature,
    /// The certificate is a valid burrow certificate, but for another peer.
    #[error("peer presented identity {presented}, expected {expected}")]
    WrongPeer {
        /// The peer ID the node meant to reach.
        expected: PeerId,
        /// The peer ID in the certificate it got.
        presented: PeerId,
    },
    /// rcgen could not build our own certificate.
    #[error("building certificate: {0}")]
    Build(String),
}

/// Our certificate and private key, ready for rustls.
pub struct LocalCert {
    /// The self-signed certificate.
    pub cert: CertificateDer<'static>,
    /// The PKCS#8 Ed25519 private key.
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl LocalCert {
    /// Builds the self-signed certificate for `identity`.
    pub fn new(identity: &Identity) -> Result<Self, CertError> {
        let mut pkcs8 = PKCS8_ED25519_PREFIX.to_vec();
        pkcs8.extend_from_slice(&identity.secret_bytes());
        let key = PrivatePkcs8KeyDer::from(pkcs8);
        let build = |e: rcgen::Error| CertError::Build(e.to_string());
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(build)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(build)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, identity.peer_id().to_string());
        let cert = params.self_signed(&key_pair).map_err(build)?;
        Ok(LocalCert {
            cert: cert.der().clone(),
            key,
        })
    }

    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// One DER element: tag, the whole encoding, the contents, and what follows.
struct Tlv<'a> {
    tag: u8,
    whole: &'a [u8],
    value: &'a [u8],
    rest: &'a [u8],
}

/// Reads one DER TLV. Lengths up to 3 bytes (16 MiB) are accepted; anything else is refused.
fn tlv(input: &[u8]) -> Result<Tlv<'_>, CertError> {
    let short = CertError::Malformed("truncated element");
    let (&tag, after_tag) = input.split_first().ok_or(short.clone())?;
    let (&first, after_len) = after_tag.split_first().ok_or(short.clone())?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 3 || after_len.len() < n {
            return Err(CertError::Malformed("bad length"));
        }
        let len = after_len[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, 2 + n)
    };
    let end = header
        .checked_add(len)
        .filter(|&end| end <= input.len())
        .ok_or(short)?;
    Ok(Tlv {
        tag,
        whole: &input[..end],
        value: &input[header..end],
        rest: &input[end..],
    })
}

/// Reads one DER TLV and checks its tag.
fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<Tlv<'a>, CertError> {
    let t = tlv(input)?;
    if t.tag != tag {
        return Err(CertError::Malformed(what));
    }
    Ok(t)
}

/// Extracts the peer ID from a burrow certificate and checks its self-signature.
///
/// Walks just enough of RFC 5280's `Certificate` structure to find `tbsCertificate`, the
/// `subjectPublicKeyInfo`, the signature algorithm and the signature value.
pub fn peer_id_from_cert(der: &[u8]) -> Result<PeerId, CertError> {
    const SEQUENCE: u8 = 0x30;
    const BIT_STRING: u8 = 0x03;
    const INTEGER: u8 = 0x02;
    const VERSION: u8 = 0xa0;

    let cert = expect(der, SEQUENCE, "certificate is not a SEQUENCE")?;
    if !cert.rest.is_empty() {
        return Err(CertError::Malformed("trailing bytes after certificate"));
    }
    let tbs = expect(cert.value, SEQUENCE, "tbsCertificate")?;
    let sig_alg = expect(tbs.rest, SEQUENCE, "signatureAlgorithm")?;
    let sig_value = expect(sig_alg.rest, BIT_STRING, "signatureValue")?;

    // tbsCertificate: [0] version (optional), serial, signature, issuer, validity, subject, spki
    let mut field = tlv(tbs.value)?;
    if field.tag == VERSION {
        field = tlv(field.rest)?;
    }
    if field.tag != INTEGER {
        return Err(CertError::Malformed("serialNumber"));
    }
    let inner_alg = expect(field.rest, SEQUENCE, "signature")?;
    let issuer = expect(inner_alg.rest, SEQUENCE, "issuer")?;
    let validity = expect(issuer.rest, SEQUENCE, "validity")?;
    let subject = expect(validity.rest, SEQUENCE, "subject")?;
    let spki = expect(subject.rest, SEQUENCE, "subjectPublicKeyInfo")?;
    let key_alg = expect(spki.value, SEQUENCE, "subjectPublicKeyInfo algorithm")?;
    let key_bits = expect(key_alg.rest, BIT_STRING, "subjectPublicKey")?;

    if key_alg.value != ED25519_ALG_ID
        || sig_alg.value != ED25519_ALG_ID
        || inner_alg.value != ED25519_ALG_ID
    {
        return Err(CertError::NotEd25519);
    }
    // BIT STRING contents: one "unused bits" byte (0), then the 32-byte key.
    let key: [u8; 32] = match key_bits.value {
        [0, key @ ..] => key.try_into().map_err(|_| CertError::NotEd25519)?,
        _ => return Err(CertError::NotEd25519),
    };
    let signature = match sig_value.value {
        [0, sig @ ..] if sig.len() == 64 => sig,
        _ => return Err(CertError::Malformed("signature is not 64 bytes")),
    };
    UnparsedPublicKey::new(&ED25519, &key)
        .verify(tbs.whole, signature)
        .map_err(|_| CertError::BadSelfSignature)?;
    Ok(PeerId(key))
}

/// Verifies a TLS 1.3 handshake signature (CertificateVerify) made with the certificate's key.
fn verify_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let peer = peer_id_from_cert(cert).map_err(cert_error)?;
    UnparsedPublicKey::new(&ED25519, &peer.0)
        .verify(message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn cert_error(e: CertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

/// Where a verifier leaves its verdict for the transport, so that a refusal becomes a typed
/// event ([`CertError::WrongPeer`]) rather than only a TLS alert string.
pub type VerdictSlot = Arc<Mutex<Option<CertError>>>;

/// Client side: the server must present exactly the peer ID we dialled.
pub struct ExpectPeer {
    /// The peer we meant to reach.
    pub expected: PeerId,
    /// The reason of a refusal, read by the transport when the connection is lost.
    pub verdict: VerdictSlot,
}

impl fmt::Debug for ExpectPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectPeer")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for ExpectPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = peer_id_from_cert(end_entity).and_then(|presented| {
            if presented == self.expected {
                Ok(())
            } else {
                Err(CertError::WrongPeer {
                    expected: self.expected,
                    presented,
                })
            }
        });
        match result {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                tracing::debug!(error = %e, "refusing server certificate");
                if let Ok(mut slot) = self.verdict.lock() {
                    *slot = Some(e.clone());
                }
                Err(cert_error(e))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: any valid burrow certificate is accepted (client authentication is
/// mandatory); the authenticated peer ID is read from the session after the handshake.
#[derive(Debug)]
pub struct AnyBurrowPeer;

impl ClientCertVerifier for AnyBurrowPeer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match peer_id_from_cert(end_entity) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                tracing::debug!(error = %e, "refusing client certificate");
                Err(cert_error(e))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls server configuration: TLS 1.3 only, mandatory client certificates, ALPN `burrow/1`.
pub fn server_config(local: &LocalCert) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyBurrowPeer))
        .with_single_cert(vec![local.cert.clone()], local.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No session tickets: a resumed TLS 1.3 handshake carries no certificates (RFC 8446
    // section 2.2), so every connection proves both keys afresh instead.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// rustls client configuration for one connection: TLS 1.3 only, our certificate as client
/// certificate, the server must be `expected`.
pub fn client_config(
    local: &LocalCert,
    expected: PeerId,
    verdict: VerdictSlot,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectPeer { expected, verdict }))
        .with_client_auth_cert(vec![local.cert.clone()], local.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity() {
        let id = Identity::from_secret([7; 32]);
        let local = LocalCert::new(&id).unwrap();
        assert_eq!(peer_id_from_cert(&local.cert).unwrap(), id.peer_id());
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let id = Identity::from_secret([7; 32]);
        let local = LocalCert::new(&id).unwrap();
        let der = local.cert.to_vec();
        // Flip every byte in turn: parse errors or a failing signature, never a panic, and
        // never the original ID with a broken signature.
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            assert!(peer_id_from_cert(&bad).is_err(), "byte {i} flip accepted");
        }
        for n in 0..der.len() {
            assert!(peer_id_from_cert(&der[..n]).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)
        ) {
            let _ = peer_id_from_cert(&bytes);
        }

        #[test]
        fn spliced_certificates_are_refused(
            cut in 0usize..400,
            insert in proptest::collection::vec(proptest::num::u8::ANY, 1..40)
        ) {
            let local = LocalCert::new(&Identity::from_secret([9; 32])).unwrap();
            let mut der = local.cert.to_vec();
            let cut = cut.min(der.len());
            der.splice(cut..cut, insert.iter().copied());
            proptest::prop_assert!(peer_id_from_cert(&der).is_err());
        }
    }

    #[test]
    fn other_key_types_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(peer_id_from_cert(cert.der()), Err(CertError::NotEd25519));
    }
}
