//! `delta-registry check-config`: a TOML file, the environment and flags merge (flags win,
//! then the environment, then the file), secrets are redacted, mistakes are named.

use std::process::{Command, Output};

fn check_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_delta-registry"));
    c.arg("check-config").args(args);
    for k in [
        "DELTA_LISTEN",
        "DELTA_DATA_DIR",
        "DELTA_STORE",
        "DELTA_CONFIG",
        "DELTA_LOG_FORMAT",
        "DELTA_DATABASE",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn file_environment_and_flags_merge_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &file,
        format!(
            r#"
data_dir = "{}"
listen = "127.0.0.1:6000"
max_tensors = 7
max_open_uploads = 11
idle_timeout = "5s"
metrics_listen = "127.0.0.1:9464"
log_format = "json"

[store_options]
aws_region = "eu-west-1"
aws_secret_access_key = "very-secret"
"#,
            data.display()
        ),
    )
    .unwrap();
    let out = check_config(
        &["--config", file.to_str().unwrap(), "--max-tensors", "9"],
        &[("DELTA_LISTEN", "127.0.0.1:7000")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(line(&text, "max_tensors"), "max_tensors = 9", "flag wins");
    assert_eq!(
        line(&text, "listen"),
        "listen = 127.0.0.1:7000",
        "environment beats the file"
    );
    assert_eq!(line(&text, "max_open_uploads"), "max_open_uploads = 11");
    assert_eq!(line(&text, "idle_timeout"), "idle_timeout = 5s");
    assert_eq!(
        line(&text, "metrics_listen"),
        "metrics_listen = 127.0.0.1:9464"
    );
    assert_eq!(line(&text, "log_format"), "log_format = json");
    assert_eq!(
        line(&text, "store_options.aws_region"),
        "store_options.aws_region = eu-west-1"
    );
    assert_eq!(
        line(&text, "store_options.aws_secret_access_key"),
        "store_options.aws_secret_access_key = <redacted>"
    );
    assert!(!text.contains("very-secret"));
    assert!(text.contains("configuration OK"));
}

#[test]
fn mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max_tensor = 3\n").unwrap();
    let out = check_config(&["--config", file.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("max_tensor"), "{err}");
    assert!(err.contains("unknown setting"), "{err}");
    // A value is checked as its flag would be, and the file is named.
    std::fs::write(&file, "max_tensors = \"many\"\n").unwrap();
    let out = check_config(&["--config", file.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("config file") && err.contains("'many' for '--max-tensors"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = check_config(&["--config", "/nonexistent/registry.toml"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    let out = check_config(&["--log-format", "yaml"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format must be text or json"));
    let out = check_config(&["--store", "nosuch://x"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("blob store"));
}

#[test]
fn the_database_password_is_redacted_and_an_unreachable_database_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = "postgres://delta:hunter2@127.0.0.1:1/hub";
    let out = check_config(
        &["--data-dir", data.to_str().unwrap()],
        &[("DELTA_DATABASE", url)],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        line(&stdout, "database"),
        "database = postgres://delta:***@127.0.0.1:1/hub"
    );
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    assert!(!out.status.success());
    assert!(
        stderr.contains("the database postgres://delta:***@127.0.0.1:1/hub does not open"),
        "{stderr}"
    );
}

#[test]
fn store_option_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\n[store_options]\naws_region = \"eu-west-1\"\n",
            data.display()
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let out = check_config(
        &[
            "--config",
            config,
            "--store-option",
            "aws_region=eu-central-1",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        line(&text, "store_options.aws_region"),
        "store_options.aws_region = eu-central-1"
    );
    assert_eq!(text.matches("store_options.aws_region").count(), 1);
    let bad = check_config(&["--config", config, "--store-option", "no-equals"], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not KEY=VALUE"));
}

/// `check-config | head -2`: the reader goes away; the command ends quietly (killed by
/// SIGPIPE, as any Unix tool), never with a "Broken pipe" panic.
#[test]
fn a_closed_pipe_ends_check_config_quietly() {
    let dir = tempfile::tempdir().unwrap();
    delta_tests::assert_closed_pipe_is_quiet(
        Command::new(env!("CARGO_BIN_EXE_delta-registry"))
            .args(["check-config", "--data-dir"])
            .arg(dir.path()),
    );
}

/// `tls self-signed` writes a certificate and a private key only its owner can read.
#[test]
fn tls_self_signed_writes_a_certificate_and_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_delta-registry"))
        .args(["tls", "self-signed", "--name", "registry.internal", "--out"])
        .arg(dir.path().join("tls"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = std::fs::read_to_string(dir.path().join("tls/cert.pem")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    let key = dir.path().join("tls/key.pem");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("--tls-cert") && printed.contains("https://registry.internal"),
        "{printed}"
    );
}

/// An S3 store that does not take writes fails `check-config` by name, instead of
/// passing and failing every push with "internal error"; a working one passes.
#[test]
fn check_config_writes_to_the_store() {
    let moto = delta_tests::s3::Moto::start("present");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let options: Vec<String> = moto
        .options()
        .into_iter()
        .flat_map(|(k, v)| ["--store-option".to_owned(), format!("{k}={v}")])
        .collect();
    let run = |store: &str| {
        let mut args = vec!["--data-dir", &data, "--store", store];
        args.extend(options.iter().map(String::as_str));
        check_config(&args, &[])
    };
    let good = run(&moto.url("registry"));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("configuration OK"));
    let missing = run("s3://no-such-bucket/registry");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("s3://no-such-bucket/registry does not take a write"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&missing.stdout).contains("configuration OK"));
}
