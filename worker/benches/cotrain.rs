//! Co-training on MiniLM: four rank-8 LoRA jobs trained together in mixed batches
//! (`delta-worker serve --co-train 4`) against the same four trained one after the other,
//! on the same texts, steps and threads; examples per second and the ratio.
//!
//! `cargo bench -p delta-worker --bench cotrain` (fetches MiniLM through
//! scripts/fetch-minilm.sh).

use std::time::Instant;

use candle_core::Device;
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::data::Encoded;
use delta_worker::methods::Trainable;
use delta_worker::run::LocalBase;
use delta_worker::train::{Session, co_train, train};

const JOBS: usize = 4;
const STEPS: usize = 4;

fn main() {
    delta_worker::alloc::tune_for_training();
    let minilm = delta_worker::run::minilm_dir().expect("MiniLM");
    let base = LocalBase::open(&minilm, &Device::Cpu).expect("MiniLM");
    let tok = base.tokenizer(64).expect("tokenizer");
    let labels = ["negative".to_owned(), "positive".to_owned()];
    let frozen = delta_worker::mounts::Mounts::new(&base.weights);
    println!(
        "MiniLM, {JOBS} rank-8 LoRA jobs (query,value), {STEPS} steps each, dropout on, 2 threads"
    );
    // Warm-up, untimed: one co-trained step of the largest batch below, so that no row
    // pays for the process's first touch of that much memory (on this VM a fresh page
    // costs several times a reused one) while the runs it is compared with do not.
    {
        let ex = delta_worker::data::joined_sentences(16, 4, 1);
        let set = tok.encode_all(&ex, &labels).expect("encode");
        let mut spec = TrainSpec::new(&[Method::Lora]);
        spec.rank = 8;
        spec.batch_size = 16;
        spec.max_steps = Some(1);
        let ts: Vec<Trainable> = (0..JOBS)
            .map(|_| Trainable::new(&spec, &base.weights, &labels).expect("trainable"))
            .collect();
        let sessions: Vec<Session<'_, '_>> = ts
            .iter()
            .map(|t| Session::new(t, &frozen, &set, None).expect("session"))
            .collect();
        for r in co_train(sessions, &mut |_, _| Ok(())) {
            r.expect("warm-up");
        }
    }
    println!(
        "| batch per job | tokens per example | one after the other | together (co-train) | ratio |"
    );
    println!("|---|---|---|---|---|");
    for (batch, join) in [(16, 4), (4, 4), (16, 1)] {
        let sets: Vec<Vec<Encoded>> = (0..JOBS)
            .map(|j| {
                let ex = delta_worker::data::joined_sentences(batch * STEPS, join, 100 + j as u64);
                tok.encode_all(&ex, &labels).expect("encode")
            })
            .collect();
        let tokens = sets[0].iter().map(|e| e.ids.len()).sum::<usize>() / sets[0].len();
        let specs: Vec<TrainSpec> = (0..JOBS)
            .map(|j| {
                let mut s = TrainSpec::new(&[Method::Lora]);
                s.rank = 8;
                s.batch_size = batch;
                s.max_steps = Some(STEPS);
                s.seed = j as u64;
                s
            })
            .collect();
        let examples = (JOBS * STEPS * batch) as f64;

        let ts: Vec<Trainable> = specs
            .iter()
            .map(|s| Trainable::new(s, &base.weights, &labels).expect("trainable"))
            .collect();
        let started = Instant::now();
        for (t, set) in ts.iter().zip(&sets) {
            train(t, &frozen, set, None, &mut |_| Ok(())).expect("train");
        }
        let alone = examples / started.elapsed().as_secs_f64();

        let ts: Vec<Trainable> = specs
            .iter()
            .map(|s| Trainable::new(s, &base.weights, &labels).expect("trainable"))
            .collect();
        let sessions: Vec<Session<'_, '_>> = ts
            .iter()
            .zip(&sets)
            .map(|(t, set)| Session::new(t, &frozen, set, None).expect("session"))
            .collect();
        let started = Instant::now();
        for r in co_train(sessions, &mut |_, _| Ok(())) {
            r.expect("co-train");
        }
        let together = examples / started.elapsed().as_secs_f64();
        println!(
            "| {batch} | {tokens} | {alone:.1} examples/s | {together:.1} examples/s | {:.2}x |",
            together / alone
        );
    }
    // What a mixed batch costs on this backend regardless of mixing: one job whose batch is
    // the four jobs' rows together.
    let ex = delta_worker::data::joined_sentences(64 * STEPS, 4, 100);
    let set = tok.encode_all(&ex, &labels).expect("encode");
    let mut rate = Vec::new();
    for batch in [16, 64] {
        let mut s = TrainSpec::new(&[Method::Lora]);
        s.batch_size = batch;
        s.max_steps = Some(STEPS);
        let t = Trainable::new(&s, &base.weights, &labels).expect("trainable");
        let started = Instant::now();
        train(&t, &frozen, &set, None, &mut |_| Ok(())).expect("train");
        rate.push((STEPS * batch) as f64 / started.elapsed().as_secs_f64());
    }
    println!();
    println!(
        "One LoRA job alone, ~35 tokens: batch 16 {:.1} examples/s, batch 64 {:.1} examples/s \
         (a batch of 64 rows costs {:.2}x per example what a batch of 16 does here).",
        rate[0],
        rate[1],
        rate[0] / rate[1]
    );
}
