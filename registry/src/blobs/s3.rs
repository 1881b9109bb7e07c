//! What object_store does not offer on S3: listing and aborting incomplete multipart
//! uploads, which a replica killed mid-upload leaves behind (invisible, but billed). Two
//! plain S3 calls, `ListMultipartUploads` and `AbortMultipartUpload`, signed with
//! object_store's own SigV4 signer and sent with its HTTP client; the store's options
//! (endpoint, region, credentials) configure them exactly as they configure the store.

use bytes::Bytes;
use http::Method;
use object_store::aws::{
    AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredentialProvider,
};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::{ClientConfigKey, ClientOptions};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::error::{Error, Result};

/// RFC 3986 unreserved characters stay; everything else is escaped (SigV4's rule).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// The same, keeping the path's slashes.
const PATH: &AsciiSet = &QUERY.remove(b'/');

/// One incomplete multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Incomplete {
    /// Object key, from the bucket's root.
    pub(crate) key: String,
    /// S3's upload id.
    pub(crate) upload_id: String,
}

/// Lists and aborts incomplete multipart uploads under one bucket prefix.
#[derive(Debug)]
pub(crate) struct Janitor {
    client: HttpClient,
    credentials: AwsCredentialProvider,
    region: String,
    /// `https://endpoint/bucket` (path-style).
    bucket_url: String,
    /// The store's key prefix inside the bucket (`""` or `prefix/`).
    root: String,
}

fn s3_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Blob(object_store::Error::Generic {
        store: "S3",
        source: format!("{what}: {e}").into(),
    })
}

/// Opens the store at `url` (`s3://bucket/prefix`) with `options` (object_store's keys,
/// unknown ones ignored, as `object_store::parse_url_opts` does), and the janitor for it,
/// configured by the same builder.
pub(crate) fn open(url: &url::Url, options: &[(String, String)]) -> Result<(AmazonS3, Janitor)> {
    let builder = options.iter().fold(
        AmazonS3Builder::new().with_url(url.as_str()),
        |b, (k, v)| match k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            Ok(key) => b.with_config(key, v),
            Err(_) => b,
        },
    );
    Janitor::new(builder, url)
}

impl Janitor {
    /// Reads the endpoint, region and client settings from `builder`, then builds the
    /// store, whose credentials the janitor shares.
    fn new(builder: AmazonS3Builder, url: &url::Url) -> Result<(AmazonS3, Self)> {
        let allow_http = builder
            .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let bucket = url
            .host_str()
            .ok_or_else(|| Error::InvalidArgument(format!("store url {url}: no bucket")))?
            .to_owned();
        let store = builder.build()?;
        let client =
            ReqwestConnector {}.connect(&ClientOptions::new().with_allow_http(allow_http))?;
        let prefix = url.path().trim_matches('/');
        let janitor = Self {
            client,
            credentials: store.credentials().clone(),
            region,
            bucket_url: format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            root: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        };
        Ok((store, janitor))
    }

    /// The store's key for a bucket key (`None`: outside the store's prefix).
    pub(crate) fn store_key<'a>(&self, bucket_key: &'a str) -> Option<&'a str> {
        bucket_key.strip_prefix(self.root.as_str())
    }

    async fn send(&self, method: Method, url: String) -> Result<Bytes> {
        let credential = self.credentials.get_credential().await?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(&url)
            .body(HttpRequestBody::empty())
            .map_err(|e| s3_error("building a request", e))?;
        AwsAuthorizer::new(&credential, "s3", &self.region).try_authorize(&mut request, None)?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| s3_error(&url, e))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| s3_error(&url, e))?;
        if !status.is_success() {
            return Err(s3_error(
                &url,
                format!("{status}: {}", String::from_utf8_lossy(&body)),
            ));
        }
        Ok(body)
    }

    /// Incomplete multipart uploads whose store key starts with `prefix`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<Incomplete>> {
        let full = format!("{}{prefix}", self.root);
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut url = format!(
                "{}?prefix={}&uploads=",
                self.bucket_url,
                utf8_percent_encode(&full, QUERY)
            );
            if let Some((key, id)) = &markers {
                url.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    utf8_percent_encode(key, QUERY),
                    utf8_percent_encode(id, QUERY)
                ));
            }
            let body = self.send(Method::GET, url).await?;
            let text = String::from_utf8_lossy(&body);
            for upload in elements(&text, "Upload") {
                if let (Some(key), Some(upload_id)) =
                    (element(upload, "Key"), element(upload, "UploadId"))
                {
                    out.push(Incomplete { key, upload_id });
                }
            }
            let truncated = element(&text, "IsTruncated").as_deref() == Some("true");
            match (
                truncated,
                element(&text, "NextKeyMarker"),
                element(&text, "NextUploadIdMarker"),
            ) {
                (true, Some(k), Some(i)) => markers = Some((k, i)),
                _ => return Ok(out),
            }
        }
    }

    /// Aborts one upload (its parts are freed).
    pub(crate) async fn abort(&self, upload: &Incomplete) -> Result<()> {
        let url = format!(
            "{}/{}?uploadId={}",
            self.bucket_url,
            utf8_percent_encode(&upload.key, PATH),
            utf8_percent_encode(&upload.upload_id, QUERY)
        );
        self.send(Method::DELETE, url).await.map(drop)
    }
}

/// The bodies of every `<tag>…</tag>` in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// The text of the first `<tag>…</tag>`, with XML's five escapes undone.
fn element(xml: &str, tag: &str) -> Option<String> {
    elements(xml, tag).first().map(|s| {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_list_multipart_uploads_answer() {
        let xml = "<ListMultipartUploadsResult><IsTruncated>true</IsTruncated>\
            <NextKeyMarker>p/b</NextKeyMarker><NextUploadIdMarker>2</NextUploadIdMarker>\
            <Upload><Key>p/a&amp;b</Key><UploadId>1</UploadId></Upload>\
            <Upload><Key>p/b</Key><UploadId>2</UploadId></Upload></ListMultipartUploadsResult>";
        let uploads: Vec<_> = elements(xml, "Upload")
            .into_iter()
            .map(|u| (element(u, "Key").unwrap(), element(u, "UploadId").unwrap()))
            .collect();
        assert_eq!(
            uploads,
            vec![("p/a&b".into(), "1".into()), ("p/b".into(), "2".into())]
        );
        assert_eq!(element(xml, "IsTruncated").as_deref(), Some("true"));
        assert_eq!(element(xml, "Missing"), None);
    }
}
