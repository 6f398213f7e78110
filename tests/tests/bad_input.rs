//! Bad input gets a clear error and a non-zero exit.

use cluster_tests::*;
use std::time::Duration;

const EXIT: Duration = Duration::from_secs(60);

fn coordinator_fails(dir: &std::path::Path, name: &str, args: &[&str], expect: &str) {
    let all: Vec<String> = ["--listen", "127.0.0.1:0", "--workers", "1"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let mut p = Proc::start("coordinator", name, dir, &all).unwrap();
    let status = p.wait_exit(EXIT).unwrap();
    assert!(
        !status.success(),
        "coordinator should have failed\n{}",
        p.tail()
    );
    assert!(
        p.log_text().contains(expect),
        "expected {expect:?} in the error\n{}",
        p.tail()
    );
}

fn copy_mnist(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("mnist");
    std::fs::create_dir_all(&data).unwrap();
    for (name, _) in common::mnist::FILES {
        std::fs::copy(
            mnist_dir().join(format!("{name}.gz")),
            data.join(format!("{name}.gz")),
        )
        .unwrap();
    }
    data
}

#[test]
fn a_missing_mnist_file_is_named_in_the_error() {
    let dir = scratch("missing-mnist");
    let data = copy_mnist(&dir);
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    coordinator_fails(
        &dir,
        "coordinator",
        &["--data-dir", data.to_str().unwrap()],
        "t10k-labels-idx1-ubyte.gz is missing",
    );
}

#[test]
fn a_corrupt_mnist_file_fails_its_checksum() {
    let dir = scratch("corrupt-mnist");
    let data = copy_mnist(&dir);
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let mut raw = vec![0u8, 0, 8, 1, 0, 0, 0x27, 0x10];
    raw.extend(std::iter::repeat_n(3u8, 10_000));
    std::fs::write(data.join("t10k-labels-idx1-ubyte"), raw).unwrap();
    coordinator_fails(
        &dir,
        "coordinator",
        &["--data-dir", data.to_str().unwrap()],
        "is corrupt: SHA-256",
    );
}

#[test]
fn a_truncated_gzip_file_is_reported() {
    let dir = scratch("truncated-mnist");
    let data = copy_mnist(&dir);
    let path = data.join("train-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    coordinator_fails(
        &dir,
        "coordinator",
        &["--data-dir", data.to_str().unwrap()],
        "truncated or corrupt",
    );
}

#[test]
fn invalid_coordinator_flags_say_what_to_change() {
    let dir = scratch("bad-flags");
    let mnist = mnist_dir();
    let data = mnist.to_str().unwrap();
    coordinator_fails(
        &dir,
        "batch",
        &["--data-dir", data, "--batch-size", "0"],
        "--batch-size must be between 1 and the 55000 training images",
    );
    coordinator_fails(
        &dir,
        "batch-too-big",
        &["--data-dir", data, "--batch-size", "60000"],
        "--batch-size must be between 1 and the 55000 training images",
    );
    coordinator_fails(
        &dir,
        "schedule",
        &["--data-dir", data, "--lr-schedule", "cosine"],
        "unknown schedule \"cosine\" (constant or linear)",
    );
    coordinator_fails(
        &dir,
        "lr",
        &["--data-dir", data, "--lr=-1"],
        "--lr must be a positive number",
    );
    coordinator_fails(
        &dir,
        "micro",
        &["--data-dir", data, "--micro-batch", "500"],
        "--micro-batch must be between",
    );
    coordinator_fails(
        &dir,
        "backend",
        &["--data-dir", data, "--backend", "cuda"],
        "unknown backend \"cuda\" (expected flex or tch)",
    );
    coordinator_fails(
        &dir,
        "device",
        &["--data-dir", data, "--device", "cuda:0"],
        "cuda:0 (the flex backend is CPU only; use --backend tch for CUDA)",
    );
    coordinator_fails(
        &dir,
        "unknown",
        &["--data-dir", data, "--no-such-flag"],
        "unexpected argument",
    );
}

#[test]
fn invalid_worker_flags_say_what_to_change() {
    let dir = scratch("bad-worker-flags");
    for (name, args, expect) in [
        (
            "threads",
            vec!["--threads", "0"],
            "--threads must be at least 1",
        ),
        ("backend", vec!["--backend", "cuda"], "unknown backend"),
        ("device", vec!["--device", "tpu"], "unknown device"),
    ] {
        let all: Vec<String> = ["--coordinator", "http://127.0.0.1:1"]
            .iter()
            .chain(&args)
            .map(|s| s.to_string())
            .collect();
        let mut p = Proc::start("worker", name, &dir, &all).unwrap();
        assert!(!p.wait_exit(EXIT).unwrap().success(), "{}", p.tail());
        assert!(
            p.log_text().contains(expect),
            "expected {expect:?}\n{}",
            p.tail()
        );
    }
}

#[test]
fn a_worker_with_an_unreachable_coordinator_gives_up_with_a_clear_error() {
    let dir = scratch("unreachable");
    let mut p = start_worker(
        &dir,
        "worker",
        "http://127.0.0.1:1",
        &["--connect-timeout", "2"],
    )
    .unwrap();
    let status = p.wait_exit(EXIT).unwrap();
    assert!(!status.success());
    assert!(p.log_text().contains("unreachable for 2s"), "{}", p.tail());
}

#[test]
fn a_worker_speaking_another_protocol_version_or_model_is_refused() {
    let dir = scratch("version");
    let (_c, url) = start_coordinator(&dir, "coordinator", &["--workers", "1"]).unwrap();
    let mut old = start_worker(&dir, "old", &url, &["--protocol-version", "99"]).unwrap();
    assert!(!old.wait_exit(EXIT).unwrap().success(), "{}", old.tail());
    assert!(
        old.log_text()
            .contains("protocol version 99 is not supported"),
        "{}",
        old.tail()
    );
    let mut other = start_worker(&dir, "other-model", &url, &["--model", "inception"]).unwrap();
    assert!(
        !other.wait_exit(EXIT).unwrap().success(),
        "{}",
        other.tail()
    );
    assert!(
        other.log_text().contains("insists on inception"),
        "{}",
        other.tail()
    );
}
