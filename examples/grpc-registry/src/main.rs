//! A `dewy.RegistryService` that answers from a folder laid out like dewy's
//! `file://` registry (`ROOT/<tag>/<artifact>`): the newest version (semver)
//! and the artifact for the caller's platform, chosen with dewy-registry.
//! Reports are printed as JSON lines. A starting point for a team's own
//! release service.
//!
//! ```sh
//! grpc-registry --root /srv/releases --listen 127.0.0.1:9000 \
//!   [--base-url https://files.example.com/releases]
//! dewy server --registry 'grpc://127.0.0.1:9000?no-tls=true' -p 8000 -- ./app
//! ```
//!
//! Without `--base-url` the artifact URLs are `file://` paths (dewy on the
//! same host or a shared mount); with it, `BASE/<tag>/<artifact>` (a web
//! server in front of the folder).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("dewy");
}

use pb::registry_service_server::{RegistryService, RegistryServiceServer};

/// Serves the releases under `root`.
#[derive(Debug, Clone)]
struct Folder {
    root: PathBuf,
    base_url: Option<String>,
}

/// Dewy's callers send Go's names (`amd64`, `darwin`); dewy-registry
/// chooses artifacts with Rust's (`x86_64`, `macos`).
fn platform(arch: &str, os: &str) -> dewy_registry::Platform {
    let arch = match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "386" => "x86",
        other => other,
    };
    let os = match os {
        "darwin" => "macos",
        other => other,
    };
    dewy_registry::Platform {
        os: os.to_owned(),
        arch: arch.to_owned(),
        libc: None,
    }
}

fn names_in(dir: &Path, dirs: bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir() == dirs))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

impl Folder {
    fn current(&self, request: &pb::CurrentRequest) -> Result<pb::CurrentResponse, Status> {
        let tags = names_in(&self.root, true);
        let selection = dewy_registry::Selection {
            scheme: dewy_registry::Scheme::SemVer,
            pre_release: false,
            slot: None,
        };
        let version = dewy_registry::choose_latest(tags.iter().map(String::as_str), &selection)
            .ok_or_else(|| Status::not_found("no release yet"))?;
        let dir = self.root.join(&version.tag);
        let created_at = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| jiff::Timestamp::try_from(t).ok());
        let files = names_in(&dir, false);
        // `arifact_name` is Dewy's wire name (sic).
        let artifact = match &request.arifact_name {
            Some(name) if files.contains(name) => Some(name.clone()),
            Some(_) => None,
            None => match dewy_registry::choose_artifact(
                files.iter().map(String::as_str),
                &platform(&request.arch, &request.os),
            ) {
                dewy_registry::Choice::One(name) => Some(name),
                dewy_registry::Choice::None => None,
                dewy_registry::Choice::Ambiguous(names) => {
                    return Err(Status::failed_precondition(format!(
                        "several artifacts fit {}/{}: {}; ask with artifact=",
                        request.os,
                        request.arch,
                        names.join(", ")
                    )));
                }
            },
        };
        let Some(artifact) = artifact else {
            // Not published for this platform yet: NOT_FOUND with the
            // release's time, so dewy applies its grace period.
            let mut status = Status::not_found(format!(
                "release `{}` has no artifact for {}/{}",
                version.tag, request.os, request.arch
            ));
            if let Some(t) = created_at {
                if let Ok(v) = t.to_string().parse() {
                    status.metadata_mut().insert("created-at", v);
                }
                if let Ok(v) = version.tag.parse() {
                    status.metadata_mut().insert("tag", v);
                }
            }
            return Err(status);
        };
        let artifact_url = match &self.base_url {
            Some(base) => format!("{}/{}/{artifact}", base.trim_end_matches('/'), version.tag),
            None => format!("file://{}", dir.join(&artifact).display()),
        };
        Ok(pb::CurrentResponse {
            id: format!("{}/{artifact}", version.tag),
            tag: version.tag.clone(),
            artifact_url,
            created_at: created_at.map(|t| prost_types::Timestamp {
                seconds: t.as_second(),
                nanos: t.subsec_nanosecond(),
            }),
        })
    }
}

#[tonic::async_trait]
impl RegistryService for Folder {
    async fn current(&self, request: Request<pb::CurrentRequest>) -> Result<Response<pb::CurrentResponse>, Status> {
        self.current(request.get_ref()).map(Response::new)
    }

    async fn report(&self, request: Request<pb::ReportRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        // One JSON object per line; a real service would store it.
        let line = format!(
            "{{\"id\":{:?},\"tag\":{:?},\"command\":{:?},\"err\":{}}}",
            r.id,
            r.tag,
            r.command,
            r.err.as_ref().map_or("null".to_owned(), |e| format!("{e:?}"))
        );
        #[allow(clippy::print_stdout)]
        {
            println!("{line}");
        }
        Ok(Response::new(()))
    }
}

const USAGE: &str = "usage: grpc-registry --root DIR [--listen 127.0.0.1:9000] [--base-url URL]";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut root, mut listen, mut base_url) = (None, "127.0.0.1:9000".to_owned(), None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(USAGE)?;
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value)),
            "--listen" => listen = value,
            "--base-url" => base_url = Some(value),
            _ => return Err(USAGE.into()),
        }
    }
    let root = root.ok_or(USAGE)?;
    let addr: SocketAddr = listen.parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    #[allow(clippy::print_stderr)]
    {
        eprintln!("serving {} on {}", root.display(), listener.local_addr()?);
    }
    tonic::transport::Server::builder()
        .add_service(RegistryServiceServer::new(Folder { root, base_url }))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
