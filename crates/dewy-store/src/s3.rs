//! S3 and S3-compatible stores (aws-sdk-s3).

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

use crate::Error;
use crate::{FileSink, Listing, ObjectInfo, ObjectRequest, ObjectStore, Precondition};

/// A bucket on S3 or an S3-compatible server.
///
/// With `endpoint` (or `AWS_ENDPOINT_URL`) the client uses path-style
/// addressing and sends checksums only when an operation requires them, which
/// S3-compatible servers expect. Credentials come from `credentials` when
/// given, else from the AWS default chain.
pub struct S3Store {
    region: String,
    bucket: String,
    endpoint: Option<String>,
    credentials: Option<(String, String, Option<String>)>,
    client: tokio::sync::OnceCell<Client>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The SDK's HTTPS client (rustls with aws-lc-rs) with the proxy settings
/// of the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`), which the
/// SDK's default client ignores.
fn https_client() -> impl aws_sdk_s3::config::HttpClient + 'static {
    use aws_smithy_http_client::{Connector, proxy::ProxyConfig, tls};
    let proxied = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    aws_smithy_http_client::Builder::new().build_with_connector_fn(move |settings, components| {
        let mut connector = Connector::builder().proxy_config(ProxyConfig::from_env());
        if proxied {
            // Some proxies (tinyproxy) ignore a second request on a client
            // connection without closing it: never reuse one.
            connector = connector.pool_max_idle_per_host(0);
        }
        if let Some(settings) = settings {
            connector = connector.connector_settings(settings.clone());
        }
        if let Some(sleep) = components.and_then(|c| c.sleep_impl()) {
            connector = connector.sleep_impl(sleep);
        }
        connector
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
            .build()
    })
}

impl S3Store {
    /// A store for `bucket` in `region`; the client is built on first use.
    pub fn new(
        region: String,
        bucket: String,
        endpoint: Option<String>,
        credentials: Option<(String, String, Option<String>)>,
    ) -> Self {
        Self {
            region,
            bucket,
            endpoint,
            credentials,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_config::Region::new(self.region.clone()))
                    .http_client(https_client());
                if let Some(ep) = &self.endpoint {
                    loader = loader.endpoint_url(ep);
                }
                if let Some((id, secret, token)) = &self.credentials {
                    loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                        id,
                        secret,
                        token.clone(),
                        None,
                        "dewy",
                    ));
                }
                let shared = loader.load().await;
                let mut config = aws_sdk_s3::config::Builder::from(&shared);
                if shared.endpoint_url().is_some() {
                    config = config
                        .force_path_style(true)
                        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
                        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
                }
                Client::from_conf(config.build())
            })
            .await
    }

    /// The SDK's error as one line for people: the service's error code,
    /// its message, the HTTP status and the request id; for a request that
    /// never got an answer, the chain of causes. Never the SDK's Debug
    /// output (kilobytes, with headers).
    fn remote<E>(&self, op: &'static str, name: &str, err: aws_sdk_s3::error::SdkError<E>) -> Error
    where
        E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + Send + Sync + 'static,
    {
        use aws_sdk_s3::error::ProvideErrorMetadata as _;
        use aws_sdk_s3::operation::RequestId as _;
        let status = err.raw_response().map(|r| r.status().as_u16());
        if matches!(status, Some(412 | 409)) {
            return Error::Conflict {
                location: format!("{}/{name}", self.location()),
            };
        }
        let mut message = match (err.code(), err.message()) {
            (Some(code), Some(msg)) => format!("{code}: {msg}"),
            (Some(code), None) => code.to_owned(),
            (None, _) => {
                let mut chain = err.to_string();
                let mut source = std::error::Error::source(&err);
                while let Some(s) = source {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    source = s.source();
                }
                chain
            }
        };
        if let Some(status) = status {
            message.push_str(&format!(" (HTTP {status}"));
            if let Some(id) = err.request_id() {
                message.push_str(&format!(", request id {id}"));
            }
            message.push(')');
        }
        Error::Remote {
            op,
            location: format!("{}/{name}", self.location()),
            message,
        }
    }

    /// `GetObject`, or `None` when the object does not exist.
    async fn open(
        &self,
        name: &str,
        op: &'static str,
    ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, Error> {
        match self
            .client()
            .await
            .get_object()
            .bucket(&self.bucket)
            .key(name)
            .send()
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if Self::not_found(&e) => Ok(None),
            Err(e) => Err(self.remote(op, name, e)),
        }
    }

    fn body_error(&self, op: &'static str, name: &str, e: impl std::fmt::Display) -> Error {
        Error::Remote {
            op,
            location: format!("{}/{name}", self.location()),
            message: e.to_string(),
        }
    }

    /// A 404 for an absent object; a missing bucket is a failure.
    fn not_found<E: aws_sdk_s3::error::ProvideErrorMetadata>(err: &aws_sdk_s3::error::SdkError<E>) -> bool {
        use aws_sdk_s3::error::ProvideErrorMetadata as _;
        err.raw_response().is_some_and(|r| r.status().as_u16() == 404) && err.code() != Some("NoSuchBucket")
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.region, self.bucket)
    }

    async fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>, Error> {
        let Some(resp) = self.open(name, "read").await? else {
            return Ok(None);
        };
        let version = resp.e_tag().unwrap_or_default().to_owned();
        let data = resp
            .body
            .collect()
            .await
            .map_err(|e| self.body_error("read", name, e))?;
        Ok(Some((data.into_bytes().to_vec(), version)))
    }

    async fn download(&self, name: &str, dest: &Path) -> Result<bool, Error> {
        let Some(mut resp) = self.open(name, "download").await? else {
            return Ok(false);
        };
        let mut sink = FileSink::create(dest).await?;
        while let Some(chunk) = resp
            .body
            .try_next()
            .await
            .map_err(|e| self.body_error("download", name, e))?
        {
            sink.write(&chunk).await?;
        }
        sink.finish().await?;
        Ok(true)
    }

    async fn put(&self, name: &str, data: Vec<u8>, pre: Precondition) -> Result<String, Error> {
        let mut req = self
            .client()
            .await
            .put_object()
            .bucket(&self.bucket)
            .key(name)
            .body(ByteStream::from(data));
        req = match pre {
            Precondition::Any => req,
            Precondition::Absent => req.if_none_match("*"),
            Precondition::Matches(etag) => req.if_match(etag),
        };
        let out = req.send().await.map_err(|e| self.remote("write", name, e))?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn upload(&self, name: &str, src: &Path) -> Result<(), Error> {
        let body = ByteStream::from_path(src).await.map_err(|e| Error::Remote {
            op: "upload",
            location: src.display().to_string(),
            message: e.to_string(),
        })?;
        self.client()
            .await
            .put_object()
            .bucket(&self.bucket)
            .key(name)
            .body(body)
            .send()
            .await
            .map_err(|e| self.remote("upload", name, e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, Error> {
        let mut out = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .client()
                .await
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix);
            if delimited {
                req = req.delimiter("/");
            }
            if let Some(t) = token.take() {
                req = req.continuation_token(t);
            }
            let page = req.send().await.map_err(|e| self.remote("list", prefix, e))?;
            for o in page.contents() {
                out.objects.push(ObjectInfo {
                    name: o.key().unwrap_or_default().to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok()),
                });
            }
            for p in page.common_prefixes() {
                if let Some(p) = p.prefix() {
                    out.prefixes.push(p.to_owned());
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        match self
            .client()
            .await
            .delete_object()
            .bucket(&self.bucket)
            .key(name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if Self::not_found(&e) => Ok(()),
            Err(e) => Err(self.remote("delete", name, e)),
        }
    }

    async fn request(&self, name: &str) -> Result<ObjectRequest, Error> {
        let config =
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(15 * 60)).map_err(|e| {
                Error::Remote {
                    op: "presign",
                    location: self.location(),
                    message: e.to_string(),
                }
            })?;
        let presigned = self
            .client()
            .await
            .get_object()
            .bucket(&self.bucket)
            .key(name)
            .presigned(config)
            .await
            .map_err(|e| self.remote("presign", name, e))?;
        Ok(ObjectRequest {
            url: presigned.uri().to_owned(),
            headers: presigned
                .headers()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
                .collect(),
        })
    }
}
