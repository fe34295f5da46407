//! The cluster's certificates, made without openssl: a CA, and the
//! certificates it signs for nodes and clients. They are X.509 v3 with the
//! names and addresses that peers check, and usable as server and client
//! alike, since an agent is both. Pure: PEM text in, PEM text out; the
//! command line reads and writes the files.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Why a certificate can't be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA's files don't hold a usable CA certificate and key.
    #[error("the CA certificate or key can't be used: {0}")]
    Ca(rcgen::Error),
    /// A name can't go into a certificate.
    #[error("{name:?} can't be a DNS name in a certificate: {source}")]
    Name {
        /// The name given.
        name: String,
        /// Why not.
        source: rcgen::Error,
    },
    /// Generating or signing failed.
    #[error("can't make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// Who a certificate is for.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// Its common name: a node's name, or a client's.
    pub name: &'a str,
    /// DNS names peers may reach it by.
    pub dns: &'a [String],
    /// Addresses peers may reach it at. A Ganeti node needs its secondary
    /// IP here: that is the address Ganeti gives the hypervisor class.
    pub ips: &'a [IpAddr],
    /// How long it is valid from now.
    pub valid_for: Duration,
}

/// A new self-signed CA called `name`, valid for `valid_for` from now.
pub fn new_ca(name: &str, valid_for: Duration) -> Result<Issued, CertError> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, valid_for);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for `subject`, signed by the CA whose certificate and
/// key are given.
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, subject: &Subject) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(CertError::Ca)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(CertError::Ca)?;
    let mut params = CertificateParams::new(Vec::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, subject.name);
    for name in subject.dns {
        let dns = name.as_str().try_into().map_err(|source| CertError::Name {
            name: name.clone(),
            source,
        })?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params
        .subject_alt_names
        .extend(subject.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, subject.valid_for);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Valid from a day ago (clocks across a cluster differ a little) until
/// `valid_for` from now.
fn set_validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    params.not_before = (now - day).into();
    params.not_after = (now + valid_for).into();
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    #[test]
    fn a_node_certificate_names_its_addresses_and_is_signed_by_the_ca() {
        let ca = new_ca("test cluster CA", YEAR).unwrap();
        let ips: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        let dns = vec!["node1.example.com".to_owned()];
        let node = issue(
            &ca.cert_pem,
            &ca.key_pem,
            &Subject {
                name: "node1.example.com",
                dns: &dns,
                ips: &ips,
                valid_for: YEAR,
            },
        )
        .unwrap();
        assert!(node.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(node.key_pem.contains("PRIVATE KEY"));
        // The CA's key can sign again, and a wrong key is refused.
        let other = new_ca("another CA", YEAR).unwrap();
        let err = issue(
            &ca.cert_pem,
            "not a key",
            &Subject {
                name: "x",
                dns: &[],
                ips: &[],
                valid_for: YEAR,
            },
        )
        .unwrap_err();
        assert!(matches!(err, CertError::Ca(_)), "{err}");
        assert_ne!(other.cert_pem, ca.cert_pem);
    }

    #[test]
    fn a_bad_dns_name_is_refused_by_name() {
        let ca = new_ca("test cluster CA", YEAR).unwrap();
        let err = issue(
            &ca.cert_pem,
            &ca.key_pem,
            &Subject {
                name: "node",
                dns: &["nœud.example".to_owned()],
                ips: &[],
                valid_for: YEAR,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("nœud.example"), "{err}");
    }
}
