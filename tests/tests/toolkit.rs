//! The lecture's convnet toolkit through the real binary: `summary`, `shape`, the inception
//! model and the lecture's preset.

use cluster_tests::*;
use std::process::Command;
use std::time::Duration;

fn coordinator(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("coordinator"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn summary_of_the_seed_model_totals_3274634_parameters() {
    let (ok, text) = coordinator(&["summary", "--model", "seed"]);
    assert!(ok, "{text}");
    for needle in [
        "28x28x32",
        "14x14x32",
        "14x14x64",
        "7x7x64",
        "3136",
        "1024",
        "Total params: 3,274,634",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn summary_of_the_inception_model_lists_its_four_branches() {
    let (ok, text) = coordinator(&["summary", "--model", "inception"]);
    assert!(ok, "{text}");
    for needle in [
        "inception.b1 (1x1",
        "inception.b2 (3x3",
        "inception.b3 (5x5",
        "inception.b4_pool",
        "14x14x56",
        "Total params: 711,862",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn shape_answers_the_lecture_quiz() {
    for (padding, out) in [
        ("same", "16x16x20"),
        ("valid", "13x13x20"),
        ("1", "14x14x20"),
    ] {
        let (ok, text) = coordinator(&[
            "shape",
            "--input",
            "32x32x3",
            "--filter",
            "8x8",
            "--filters",
            "20",
            "--stride",
            "2",
            "--padding",
            padding,
        ]);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("output: {out}")),
            "{padding}: {text}"
        );
    }
    let (_, text) = coordinator(&[
        "shape",
        "--input",
        "32x32x3",
        "--filter",
        "8x8",
        "--filters",
        "20",
        "--stride",
        "2",
        "--padding",
        "1",
    ]);
    assert!(text.contains("parameters with sharing: 3,860"), "{text}");
    assert!(
        text.contains("parameters without sharing: 756,560"),
        "{text}"
    );
    let (ok, text) = coordinator(&[
        "shape",
        "--input",
        "4x4x1",
        "--filter",
        "5x5",
        "--padding",
        "valid",
    ]);
    assert!(!ok && text.contains("does not fit"), "{text}");
}

#[test]
fn the_inception_model_trains_through_the_cluster_with_falling_loss() {
    let dir = scratch("inception");
    let log = run_job(
        &dir,
        2,
        &[
            "--model",
            "inception",
            "--max-steps",
            "30",
            "--eval-every",
            "10",
            "--validation-size",
            "500",
            "--test-size",
            "500",
            "--checkpoint-url",
            dir.join("ck").to_str().unwrap(),
        ],
        Duration::from_secs(600),
    )
    .unwrap();
    let points = validation_accuracies(&log);
    assert_eq!(points.len(), 3, "{log}");
    assert!(points[2].0 < points[0].0, "loss did not fall: {points:?}");
}

#[test]
fn the_seed_preset_prints_the_lectures_log_lines() {
    let dir = scratch("preset-seed");
    let log = run_job(
        &dir,
        2,
        &[
            "--preset",
            "seed",
            "--max-steps",
            "3",
            "--checkpoint-url",
            dir.join("ck").to_str().unwrap(),
        ],
        Duration::from_secs(300),
    )
    .unwrap();
    for batch in 1..=3 {
        let line = format!("Epoch  1, Batch   {batch} - Loss: ");
        assert!(log.contains(&line), "{line:?} missing:\n{log}");
    }
    assert!(log.contains("Validation Accuracy: 0."), "{log}");
    assert!(log.contains("Testing Accuracy: "), "{log}");
    // The lecture's optimizer took effect: plain gradient descent at lr 1e-5, the parameters
    // those 3 steps give in the single-process loop.
    let manifest = latest_manifest(&dir.join("ck")).unwrap();
    assert_eq!(manifest["config"]["lr"].as_f64(), Some(1e-5));
    assert_eq!(manifest["config"]["momentum"].as_f64(), Some(0.0));
    assert_eq!(manifest["config"]["lr_schedule"].as_str(), Some("constant"));
    let cfg = common::train::TrainConfig {
        lr: 1e-5,
        momentum: 0.0,
        lr_schedule: common::train::LrSchedule::Constant,
        ..default_config(3)
    };
    let reference = local_reference(&cfg, 3);
    assert_checkpoint_is(&dir.join("ck"), &reference, "lr 1e-5 without momentum");
}
