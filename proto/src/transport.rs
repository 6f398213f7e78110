//! The cluster's transport, set up in this one place: TLS (mutual for workers), the job token,
//! and the bounds every server and channel runs with.
//!
//! Who may call what (README "Security"):
//! - With TLS the coordinator presents its certificate and asks clients for one signed by the
//!   cluster CA. A certificate from another CA, an expired one or plaintext fails the handshake.
//! - `Trainer` calls need a client certificate (when TLS is on) and the job token (when set).
//! - `Status` calls and reflection need a client certificate, the job token or the read-only
//!   status token, unless the coordinator runs with neither TLS nor a token (loopback only).
//! - `grpc.health.v1` is always open, for probes.
//!
//! Every refusal is logged with the peer's address and counted ([`Refusals`], shown in status);
//! tokens are compared in constant time and never logged.

use crate::{CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES};
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server};
use tonic::{Request, Status};
use tracing::warn;

/// The files `coordinator certs DIR` writes and `--tls-dir DIR` reads.
pub mod files {
    pub const CA: &str = "ca.pem";
    pub const CA_KEY: &str = "ca.key";
    pub const COORDINATOR_CERT: &str = "coordinator.pem";
    pub const COORDINATOR_KEY: &str = "coordinator.key";
    pub const WORKER_CERT: &str = "worker.pem";
    pub const WORKER_KEY: &str = "worker.key";
    pub const TOKEN: &str = "token";
    pub const STATUS_TOKEN: &str = "status-token";
}

/// Server bounds. A connection beyond [`MAX_CONNECTIONS`] waits in the kernel's backlog until
/// one closes; a handshake that takes longer than [`HANDSHAKE_TIMEOUT`] is dropped.
pub const MAX_CONNECTIONS: usize = 512;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent calls on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// The longest a unary call (or a client stream, until its reply) may take on the server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(String),
}

fn config(msg: impl Into<String>) -> TransportError {
    TransportError::Config(msg.into())
}

/// TLS and token flags, the same on every program (each has a `DTRAIN_*` environment fallback,
/// so one set of variables configures a container).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Directory written by `coordinator certs`: the CA, this program's certificate and key,
    /// and the token. The single-file flags below override its files.
    #[arg(long, env = "DTRAIN_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This program's certificate (PEM).
    #[arg(long, env = "DTRAIN_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This program's private key (PEM).
    #[arg(long, env = "DTRAIN_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the coordinator checks client certificates against it, clients
    /// check the coordinator's.
    #[arg(long, env = "DTRAIN_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// File holding the job's shared token.
    #[arg(long, env = "DTRAIN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding a read-only token: the coordinator accepts it for status, `coordinator
    /// status` sends it.
    #[arg(long, env = "DTRAIN_STATUS_TOKEN_FILE", value_name = "FILE")]
    pub status_token_file: Option<PathBuf>,
    /// Clients: the name the coordinator's certificate must carry (default: the URL's host),
    /// for an address that is not in it, such as a Kubernetes ClusterIP.
    #[arg(long, env = "DTRAIN_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// Which program reads the material: it decides the files taken from `--tls-dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Worker,
    /// `coordinator status` and other read-only clients: the CA and a token.
    Reader,
}

/// PEM files and tokens, read once at start.
#[derive(Default)]
pub struct Material {
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub ca: Option<Vec<u8>>,
    pub token: Option<String>,
    pub status_token: Option<String>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for Material {
    // Never prints a key or a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("tls", &self.ca.is_some())
            .field("client_or_server_cert", &self.cert.is_some())
            .field("token", &self.token.is_some())
            .field("status_token", &self.status_token.is_some())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_token(path: &Path) -> Result<String, TransportError> {
    let text = String::from_utf8(read(path)?)
        .map_err(|_| config(format!("{} is not text", path.display())))?;
    let token = text.trim().to_string();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(config(format!(
            "{} must hold one token of printable ASCII characters",
            path.display()
        )));
    }
    Ok(token)
}

impl SecurityArgs {
    /// Reads what `role` uses: explicit files first, then `--tls-dir`'s; checks the parts fit.
    pub fn load(&self, role: Role) -> Result<Material, TransportError> {
        let dir = self.tls_dir.as_deref();
        if let Some(d) = dir
            && !d.is_dir()
        {
            return Err(config(format!(
                "--tls-dir {} is not a directory (create one with `coordinator certs {}`)",
                d.display(),
                d.display()
            )));
        }
        let in_dir = |name: &str| dir.map(|d| d.join(name));
        let (cert_name, key_name) = match role {
            Role::Coordinator => (Some(files::COORDINATOR_CERT), Some(files::COORDINATOR_KEY)),
            Role::Worker => (Some(files::WORKER_CERT), Some(files::WORKER_KEY)),
            Role::Reader => (None, None),
        };
        let pick = |flag: &Option<PathBuf>, name: Option<&str>| {
            flag.clone().or_else(|| name.and_then(in_dir))
        };
        let cert = pick(&self.tls_cert, cert_name);
        let key = pick(&self.tls_key, key_name);
        let ca = pick(&self.tls_ca, Some(files::CA));
        // A reader may hold only the read-only token: the job token is optional for it.
        let token = self
            .token_file
            .clone()
            .or_else(|| in_dir(files::TOKEN).filter(|p| role != Role::Reader || p.exists()));
        // Optional, and never a worker's: a separate read-only token for status.
        let status_token = match role {
            Role::Worker => None,
            _ => self
                .status_token_file
                .clone()
                .or_else(|| in_dir(files::STATUS_TOKEN).filter(|p| p.exists())),
        };
        let m = Material {
            cert: cert.as_deref().map(read).transpose()?,
            key: key.as_deref().map(read).transpose()?,
            ca: ca.as_deref().map(read).transpose()?,
            token: token.as_deref().map(read_token).transpose()?,
            status_token: status_token.as_deref().map(read_token).transpose()?,
            server_name: self.tls_server_name.clone(),
        };
        m.check(role)?;
        Ok(m)
    }
}

impl Material {
    fn check(&self, role: Role) -> Result<(), TransportError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(config("--tls-cert and --tls-key go together"));
        }
        match role {
            Role::Coordinator if self.cert.is_some() != self.ca.is_some() => Err(config(
                "the coordinator's TLS needs --tls-cert, --tls-key and --tls-ca (the CA checks the workers' client certificates)",
            )),
            Role::Worker if self.ca.is_some() && self.cert.is_none() => Err(config(
                "a worker over TLS needs a client certificate signed by the cluster CA: --tls-cert and --tls-key",
            )),
            Role::Worker | Role::Reader if self.cert.is_some() && self.ca.is_none() => Err(config(
                "--tls-ca is needed to check the coordinator's certificate",
            )),
            _ => Ok(()),
        }
    }

    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TransportError::Tls(format!("{what}: no certificate in it")));
    }
    Ok(certs)
}

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Refused connections and calls, since the server started (shown in status and metrics).
#[derive(Debug, Default)]
pub struct Refusals {
    /// TLS handshakes that failed: no or a foreign or expired certificate, plaintext, timeout.
    pub handshakes: AtomicU64,
    /// Calls refused with `UNAUTHENTICATED`: no client certificate where one is needed, a
    /// missing or wrong token.
    pub calls: AtomicU64,
}

/// The coordinator's side: its TLS acceptor, the tokens it accepts, what it refused.
pub struct ServerSecurity {
    acceptor: Option<TlsAcceptor>,
    token: Option<TokenDigest>,
    status_token: Option<TokenDigest>,
    pub refusals: Arc<Refusals>,
}

impl ServerSecurity {
    pub fn new(m: &Material) -> Result<Self, TransportError> {
        let acceptor = match (&m.cert, &m.key, &m.ca) {
            (Some(cert), Some(key), Some(ca)) => Some(acceptor(cert, key, ca)?),
            _ => None,
        };
        Ok(ServerSecurity {
            acceptor,
            token: m.token.as_deref().map(digest),
            status_token: m.status_token.as_deref().map(digest),
            refusals: Arc::default(),
        })
    }

    /// TLS and a token: safe to listen beyond loopback.
    pub fn is_secured(&self) -> bool {
        self.acceptor.is_some() && self.token.is_some()
    }

    pub fn tls(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Trainer calls need the job token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// What protects the server, for the start-up log line.
    pub fn describe(&self) -> &'static str {
        match (self.acceptor.is_some(), self.token.is_some()) {
            (true, true) => "TLS, client certificates and token",
            (true, false) => "TLS and client certificates, no token",
            (false, true) => "token, no TLS",
            (false, false) => "no TLS, no token",
        }
    }

    /// The check in front of the `Trainer` service.
    pub fn trainer_guard(&self) -> Guard {
        self.guard(Audience::Trainer)
    }

    /// The check in front of `Status` and reflection.
    pub fn reader_guard(&self) -> Guard {
        self.guard(Audience::Reader)
    }

    fn guard(&self, audience: Audience) -> Guard {
        Guard {
            audience,
            tls: self.tls(),
            token: self.token,
            status_token: self.status_token,
            refusals: self.refusals.clone(),
        }
    }

    /// Accepts connections on `listener` until `stop`: at most [`MAX_CONNECTIONS`] at once,
    /// each through the TLS handshake when TLS is on (failures are logged and counted).
    pub fn incoming(&self, listener: TcpListener, stop: CancellationToken) -> mpsc::Receiver<Conn> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let refusals = self.refusals.clone();
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = accept(&listener, &permits) => a,
                };
                let (tcp, remote, permit) = accepted;
                let Some(acceptor) = acceptor.clone() else {
                    let conn = Conn {
                        io: ConnIo::Plain(tcp),
                        info: ConnInfo {
                            remote,
                            client_cert: false,
                        },
                        _permit: permit,
                    };
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                    continue;
                };
                let (tx, refusals) = (tx.clone(), refusals.clone());
                tokio::spawn(async move {
                    // A connection closed before sending a byte is a port check (a Kubernetes
                    // tcpSocket probe, a load balancer): no refusal, nothing logged.
                    let mut first = [0u8; 1];
                    if let Ok(Ok(0)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await
                    {
                        return;
                    }
                    let why =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let client_cert = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .is_some_and(|c| !c.is_empty());
                                let conn = Conn {
                                    io: ConnIo::Tls(Box::new(tls)),
                                    info: ConnInfo {
                                        remote,
                                        client_cert,
                                    },
                                    _permit: permit,
                                };
                                let _ = tx.send(conn).await;
                                return;
                            }
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                        };
                    refusals.handshakes.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %remote, error = why, "refused a connection: TLS handshake failed");
                });
            }
        });
        rx
    }
}

/// Takes a connection slot, then a connection (retrying after transient accept errors such as
/// running out of file descriptors).
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((tcp, remote)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, remote, permit);
            }
            Err(e) => {
                warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn acceptor(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<TlsAcceptor, TransportError> {
    let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca, "--tls-ca")? {
        roots.add(c).map_err(|e| tls(&e))?;
    }
    // A client certificate is optional at the handshake (status readers may use a token
    // instead) but checked against the CA whenever one is presented; the Trainer guard then
    // insists on one.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| tls(&format!("--tls-key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert, "--tls-cert")?, key)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The peer of a call, as its connection was accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The peer presented a certificate the cluster CA signed.
    pub client_cert: bool,
}

/// The peer of a call on a server fed by [`ServerSecurity::incoming`].
pub fn peer<T>(req: &Request<T>) -> Option<ConnInfo> {
    req.extensions().get::<ConnInfo>().copied()
}

/// The peer's address as logs and status show it ("unknown" off such a server).
pub fn peer_name<T>(req: &Request<T>) -> String {
    peer(req).map_or_else(|| "unknown".to_string(), |p| p.remote.to_string())
}

/// An accepted connection; holds its connection slot until dropped.
pub struct Conn {
    io: ConnIo,
    info: ConnInfo,
    _permit: OwnedSemaphorePermit,
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn info(&self) -> ConnInfo {
        self.info
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    Trainer,
    Reader,
}

/// The check in front of a service (see the module docs for the rules).
#[derive(Clone)]
pub struct Guard {
    audience: Audience,
    tls: bool,
    token: Option<TokenDigest>,
    status_token: Option<TokenDigest>,
    refusals: Arc<Refusals>,
}

const AUTHORIZATION: &str = "authorization";

impl Guard {
    fn refusal<T>(&self, req: &Request<T>) -> Option<&'static str> {
        let client_cert = peer(req).is_some_and(|p| p.client_cert);
        let sent = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(digest);
        let matches = |want: Option<TokenDigest>| match (want, sent) {
            (Some(w), Some(s)) => bool::from(w.ct_eq(&s)),
            _ => false,
        };
        match self.audience {
            Audience::Trainer if self.tls && !client_cert => {
                Some("a client certificate signed by the cluster CA is required")
            }
            Audience::Trainer if self.token.is_some() && sent.is_none() => {
                Some("the job token is required")
            }
            Audience::Trainer if self.token.is_some() && !matches(self.token) => {
                Some("wrong token")
            }
            Audience::Trainer => None,
            Audience::Reader if !self.tls && self.token.is_none() => None,
            Audience::Reader
                if client_cert || matches(self.token) || matches(self.status_token) =>
            {
                None
            }
            Audience::Reader if sent.is_some() => Some("wrong token"),
            Audience::Reader => Some("a client certificate or a token is required"),
        }
    }
}

impl Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(why) = self.refusal(&req) else {
            return Ok(req);
        };
        self.refusals.calls.fetch_add(1, Ordering::Relaxed);
        warn!(peer = peer_name(&req), why, "refused a call");
        Err(Status::unauthenticated(why))
    }
}

/// gRPC server settings for every listener of the cluster: keep-alive, flow-control windows
/// large enough for a parameter vector, and the bounds above.
pub fn server() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .timeout(REQUEST_TIMEOUT)
}

/// A client's side: TLS settings and the token it sends.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    tls: Option<ClientTlsConfig>,
    token: Option<MetadataValue<Ascii>>,
}

impl ClientSecurity {
    /// Plaintext, no token (a loopback coordinator without security).
    pub fn none() -> Self {
        ClientSecurity::default()
    }

    /// A client with `m` (a worker: its certificate and the job token; a reader: the CA and
    /// the status token, or the job token where there is none; see [`SecurityArgs::load`]).
    pub fn new(m: &Material) -> Result<Self, TransportError> {
        let tls = m.ca.as_ref().map(|ca| {
            let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let (Some(cert), Some(key)) = (&m.cert, &m.key) {
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &m.server_name {
                cfg = cfg.domain_name(name.clone());
            }
            cfg
        });
        let token = m
            .status_token
            .as_ref()
            .or(m.token.as_ref())
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| config("the token is not a valid header value"))
            })
            .transpose()?;
        Ok(ClientSecurity { tls, token })
    }

    /// An endpoint for `url` with this security and the cluster's flow-control windows. With
    /// TLS an `http://` URL is taken as `https://` (TLS material means TLS, never plaintext).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TransportError> {
        let url = match (&self.tls, url.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => url.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| config(format!("{url:?} is not a URL: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| TransportError::Tls(e.to_string()))?;
        }
        Ok(endpoint)
    }

    /// `channel` sending this client's token with every call.
    pub fn authorize(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, AddToken(self.token.clone()))
    }
}

/// A channel that sends the job's token (if any) with every call.
pub type AuthChannel = InterceptedService<Channel, AddToken>;

/// Adds `authorization: Bearer <token>` to each call.
#[derive(Clone)]
pub struct AddToken(Option<MetadataValue<Ascii>>);

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, t.clone());
        }
        Ok(req)
    }
}

/// Refuses to serve `what` on a non-loopback `addr` without TLS and a token (`secured`),
/// unless `insecure`; then it warns.
pub fn check_exposure(
    what: &str,
    addr: SocketAddr,
    secured: bool,
    insecure: bool,
) -> Result<(), TransportError> {
    if addr.ip().is_loopback() || secured {
        return Ok(());
    }
    if insecure {
        warn!(%addr, "--insecure: serving {what} beyond loopback without TLS and a token");
        return Ok(());
    }
    Err(config(format!(
        "refusing to serve {what} on {addr} without TLS and a token: anyone who reaches it could join the job, read the model or poison it. \
         Create the material with `coordinator certs DIR` and start with --tls-dir DIR, or listen on 127.0.0.1, or accept the risk with --insecure"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cert: bool, token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(ConnInfo {
            remote: "127.0.0.1:1".parse().expect("addr"),
            client_cert: cert,
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert(AUTHORIZATION, format!("Bearer {t}").parse().expect("ascii"));
        }
        r
    }

    fn guard(audience: Audience, tls: bool, token: Option<&str>, status: Option<&str>) -> Guard {
        Guard {
            audience,
            tls,
            token: token.map(digest),
            status_token: status.map(digest),
            refusals: Arc::default(),
        }
    }

    #[test]
    fn trainer_calls_need_a_certificate_and_the_job_token() {
        let g = guard(Audience::Trainer, true, Some("job"), Some("read"));
        assert_eq!(g.refusal(&req(true, Some("job"))), None);
        assert!(g.refusal(&req(false, Some("job"))).is_some());
        assert_eq!(
            g.refusal(&req(true, None)),
            Some("the job token is required")
        );
        assert_eq!(g.refusal(&req(true, Some("jab"))), Some("wrong token"));
        // The read-only token does not train.
        assert_eq!(g.refusal(&req(true, Some("read"))), Some("wrong token"));
        // Loopback without security: open.
        let open = guard(Audience::Trainer, false, None, None);
        assert_eq!(open.refusal(&req(false, None)), None);
    }

    #[test]
    fn readers_need_a_certificate_or_either_token() {
        let g = guard(Audience::Reader, true, Some("job"), Some("read"));
        assert_eq!(g.refusal(&req(false, Some("read"))), None);
        assert_eq!(g.refusal(&req(false, Some("job"))), None);
        assert_eq!(g.refusal(&req(true, None)), None);
        assert_eq!(g.refusal(&req(false, Some("x"))), Some("wrong token"));
        assert!(g.refusal(&req(false, None)).is_some());
        assert_eq!(
            guard(Audience::Reader, false, None, None).refusal(&req(false, None)),
            None
        );
    }

    #[test]
    fn a_reader_needs_only_the_ca_and_the_status_token() {
        let dir = std::env::temp_dir().join(format!("dtrain-reader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join(files::CA), "ca").expect("write");
        std::fs::write(dir.join(files::STATUS_TOKEN), "read-only\n").expect("write");
        let args = SecurityArgs {
            tls_dir: Some(dir.clone()),
            ..SecurityArgs::default()
        };
        let m = args.load(Role::Reader).expect("reader material");
        assert!(m.tls() && m.token.is_none());
        assert_eq!(m.status_token.as_deref(), Some("read-only"));
        // A worker cannot go without its certificate and the job token.
        assert!(args.load(Role::Worker).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_loopback_may_go_without_tls_and_a_token() {
        let lo: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        assert!(check_exposure("gRPC", lo, false, false).is_ok());
        let err = check_exposure("gRPC", any, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--insecure") && err.contains("coordinator certs"),
            "{err}"
        );
        assert!(check_exposure("gRPC", any, true, false).is_ok());
        assert!(check_exposure("gRPC", any, false, true).is_ok());
    }
}
