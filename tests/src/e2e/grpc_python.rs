//! A client in another language: Python grpcio, with stubs generated from the `.proto`
//! and server reflection checked (run by scripts/test.sh's virtualenv).

use std::process::Command;

use super::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_talks_to_the_registry() {
    let env = Env::start().await;
    let python = std::env::var("DELTA_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let script = root.join("tests/python/grpc_client.py");
    let addr = env.registry.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&script)
            .arg(&addr)
            .arg(root.join("proto"))
            .output()
    })
    .await
    .unwrap()
    .expect("python3 must be installed (scripts/test.sh sets up a virtualenv with grpcio)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("health: SERVING"), "{stdout}");
    assert!(
        stdout.contains("reflection: delta.registry.v1.Registry"),
        "{stdout}"
    );
    assert!(stdout.contains("bases: tiny"), "{stdout}");
    assert!(stdout.contains("upload: committed"), "{stdout}");
}
