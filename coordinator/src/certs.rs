//! `coordinator certs DIR`: the cluster's TLS material and tokens (README "Security"), made with
//! rcgen: a CA (or the user's own, when DIR already holds `ca.pem` and `ca.key`), the
//! coordinator's server certificate, a worker client certificate, a job token and a read-only
//! status token. Keys and tokens are written with mode 0600.

use crate::args::CertsArgs;
use proto::transport::files;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use time::{Duration, OffsetDateTime};

const CA_DAYS: i64 = 3650;

pub fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir)?;
    let (ca_pem, ca_key) = (dir.join(files::CA), dir.join(files::CA_KEY));
    let (issuer, ca_note) = if ca_pem.exists() && ca_key.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca_pem)?, key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ca_pem.display()))?;
        (issuer, "reused")
    } else {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name = name("dtrain cluster CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, CA_DAYS);
        write(&ca_pem, &p.self_signed(&key)?.pem(), 0o644)?;
        write(&ca_key, &key.serialize_pem(), 0o600)?;
        (Issuer::new(p, key), "created")
    };

    let ns = &args.namespace;
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1", "coordinator"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // The Service of deploy/k8s is `dtrain-coordinator`; `coordinator` is kept for other setups.
    for svc in ["coordinator", "dtrain-coordinator"] {
        sans.extend([
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ]);
    }
    sans.push("dtrain-coordinator".into());
    sans.extend(args.sans.iter().cloned());
    let days = i64::from(args.days.max(1));
    leaf(
        dir,
        "dtrain coordinator",
        sans.clone(),
        ExtendedKeyUsagePurpose::ServerAuth,
        days,
        &issuer,
        (files::COORDINATOR_CERT, files::COORDINATOR_KEY),
    )?;
    leaf(
        dir,
        "dtrain worker",
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        days,
        &issuer,
        (files::WORKER_CERT, files::WORKER_KEY),
    )?;
    write(&dir.join(files::TOKEN), &token(), 0o600)?;
    write(&dir.join(files::STATUS_TOKEN), &token(), 0o600)?;
    println!(
        "wrote {}: CA ({ca_note}), coordinator certificate for {}, worker client certificate (valid {days} days), job token, read-only status token",
        dir.display(),
        sans.join(", ")
    );
    println!(
        "start the coordinator and workers with --tls-dir {} (and `coordinator status --tls-dir {}`)",
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "dtrain");
    dn
}

/// Valid from an hour ago (clock skew between machines) for `days`.
fn validity(p: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

fn leaf(
    dir: &Path,
    common_name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    days: i64,
    issuer: &Issuer<'_, KeyPair>,
    (cert_file, key_file): (&str, &str),
) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name = name(common_name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    write(
        &dir.join(cert_file),
        &p.signed_by(&key, issuer)?.pem(),
        0o644,
    )?;
    write(&dir.join(key_file), &key.serialize_pem(), 0o600)?;
    Ok(())
}

/// 32 random bytes, hex.
fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Writes `text` to `path` created with `mode` (a key is never readable by others, not even
/// for a moment).
fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
