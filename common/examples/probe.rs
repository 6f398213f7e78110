//! Scratch probe: speed and learning of the local loop.
use common::engine::{BackendKind, Engine};
use common::model::ModelSpec;
use common::train::*;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: u64 = args.get(1).map_or(Ok(50), |s| s.parse())?;
    let lr: f32 = args.get(2).map_or(Ok(0.05), |s| s.parse())?;
    let micro: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let data = common::mnist::load(std::path::Path::new("../shared/mnist"))?;
    let cfg = TrainConfig {
        model: ModelSpec::SEED,
        batch_size: 128,
        micro_batch: micro,
        lr,
        momentum: 0.9,
        keep_prob: 0.75,
        seed: 1,
        epochs: 3,
        max_steps: None,
    };
    let engine = Engine::new(cfg.model, BackendKind::Flex, "cpu", cfg.keep_prob)?;
    let mut state = TrainState::new(&cfg);
    let mut batcher = Batcher::new(&data.train, cfg.schedule(data.train.len()));
    let t = Instant::now();
    for i in 0..steps {
        let loss = local_step(&cfg, &engine, &mut batcher, &mut state)?;
        if i % 50 == 0 || i + 1 == steps {
            println!(
                "step {i} loss {loss:.4} {:.1} img/s",
                (i + 1) as f64 * 128.0 / t.elapsed().as_secs_f64()
            );
        }
    }
    let t = Instant::now();
    let acc = engine.accuracy(&state.params, &data.validation)?;
    println!("val acc {acc:.4} in {:?}", t.elapsed());
    Ok(())
}
