//! The `fake-service` binary: environment in, `listening on ADDR` out, then HTTP.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

#[tokio::test]
async fn prints_its_address_and_answers() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-service"))
        .env_clear()
        .env("NAME", "frontend")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("no address printed within 10s")
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").expect(&line).to_owned();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: frontend\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("\"name\": \"frontend\""), "{reply}");

    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn rejects_bad_configuration_with_the_variable_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_fake-service"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ERROR_DELAY", "3")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ERROR_DELAY"), "{err}");
}
