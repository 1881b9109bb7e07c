//! TLS: a registry with a certificate, the CLI trusting a custom CA.

use delta_client::Remote;
use delta_client::remote::ConnectOptions;
use delta_registry::RegistryConfig;
use delta_registry::config::TlsFiles;
use serde_json::json;

use crate::{TestRegistry, fixtures};

#[tokio::test]
async fn https_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    // What `delta-registry tls self-signed` writes.
    let (cert, key) =
        delta_registry::tls::self_signed(&["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let tls = TlsFiles {
        cert: cert_path.clone(),
        key: key_path,
    };
    let reg = TestRegistry::start_in(dir, |p| RegistryConfig {
        tls: Some(tls),
        ..RegistryConfig::for_test(p)
    })
    .await;
    let url = format!("https://127.0.0.1:{}", reg.addr.port());

    let remote = Remote::connect_opts(
        &url,
        &ConnectOptions {
            token: None,
            ca_cert: Some(cert_path.clone()),
            lazy: false,
        },
    )
    .await
    .unwrap();
    assert!(remote.list_bases().await.unwrap().is_empty());

    // Not trusting the certificate fails; so does plain HTTP to a TLS port.
    let untrusted = match Remote::connect_opts(&url, &ConnectOptions::default()).await {
        Ok(r) => r.list_bases().await.is_err(),
        Err(_) => true,
    };
    assert!(untrusted, "an unknown certificate was trusted");
    let plain = match Remote::connect(&format!("http://127.0.0.1:{}", reg.addr.port())).await {
        Ok(r) => r.list_bases().await.is_err(),
        Err(_) => true,
    };
    assert!(plain);

    // The CLI end to end over TLS.
    use clap::Parser;
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base.safetensors");
    fixtures::write_base(&base, 1);
    let delta = work.path().join("d");
    fixtures::write_native_lora(&delta, 1, 2, json!({}));
    let cache = work.path().join("cache");
    let creds = work.path().join("creds.json");
    let out = work.path().join("out").to_string_lossy().into_owned();
    for args in [
        vec!["base", "add", "tiny", base.to_str().unwrap()],
        vec![
            "push",
            delta.to_str().unwrap(),
            "team/tls",
            "--base",
            "tiny",
        ],
        vec!["pull", "team/tls", "-o", out.as_str()],
    ] {
        let mut argv = vec![
            "delta",
            "--registry",
            &url,
            "--ca-cert",
            cert_path.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ];
        argv.extend(["--credentials", creds.to_str().unwrap()]);
        argv.extend(args);
        delta_client::cli::run(delta_client::cli::Cli::try_parse_from(argv).unwrap())
            .await
            .unwrap();
    }
    assert!(work.path().join("out/delta.safetensors").is_file());
}

/// The usual `openssl req -x509` certificate is a CA certificate, which TLS refuses as a
/// server's own: the client says so in plain words and how to make one that works.
#[tokio::test]
async fn a_ca_certificate_on_the_server_is_explained() {
    let certs = tempfile::tempdir().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let signing = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&signing).unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing.serialize_pem()).unwrap();
    let tls = TlsFiles {
        cert: cert_path.clone(),
        key: key_path,
    };
    let reg = TestRegistry::start_in(tempfile::tempdir().unwrap(), |p| RegistryConfig {
        tls: Some(tls),
        ..RegistryConfig::for_test(p)
    })
    .await;
    let url = format!("https://127.0.0.1:{}", reg.addr.port());
    let opts = ConnectOptions {
        token: None,
        ca_cert: Some(cert_path),
        lazy: false,
    };
    let err = match Remote::connect_opts(&url, &opts).await {
        Ok(r) => r.list_bases().await.map(|_| ()).unwrap_err(),
        Err(e) => e,
    }
    .to_string();
    assert!(err.contains("is a CA certificate"), "{err}");
    assert!(err.contains("delta-registry tls self-signed"), "{err}");
    assert!(!err.contains("OtherError"), "{err}");
}
