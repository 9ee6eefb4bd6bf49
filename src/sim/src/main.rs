//! `pairbd-sim`: runs the simulator over many seeds (the CI swarm and the
//! long swarm), or replays one seed with its story printed.
//!
//! ```text
//! pairbd-sim [--seeds A..B | --seed N] [--mutation NAME] [--trace | --trace-all]
//!            [--safety-ms MS] [--jobs N] [--stop-on-failure] [--expect-failure]
//!            [--no-verify-scenario] [--no-batch-scenario] [--no-merge-scenario] [--no-window-scenario]
//!            [--no-lanes-scenario]
//! ```
//!
//! Exits 1 if any seed broke an invariant (0 with `--expect-failure` if
//! some did, for a mutation).

use std::process::ExitCode;

use pairbd_sim::{mutation_name, parse_mutation, run_swarm, Figures, Mutation, Options};

struct Args {
    first: u64,
    end: u64,
    mutation: Option<Mutation>,
    trace: bool,
    trace_all: bool,
    safety_ms: Option<u64>,
    stop_on_failure: bool,
    expect_failure: bool,
    jobs: usize,
    no_verify_scenario: bool,
    no_batch_scenario: bool,
    no_merge_scenario: bool,
    no_window_scenario: bool,
    no_lanes_scenario: bool,
}

fn usage() -> String {
    let names: Vec<&str> = pairbd_sim::MUTATIONS
        .iter()
        .map(|m| mutation_name(*m))
        .collect();
    format!(
        "usage: pairbd-sim [--seeds A..B | --seed N] [--mutation NAME] [--trace | --trace-all] \
         [--safety-ms MS] [--jobs N] [--stop-on-failure] [--expect-failure] [--no-verify-scenario] [--no-batch-scenario] [--no-merge-scenario] [--no-window-scenario] [--no-lanes-scenario]\nmutations: {}",
        names.join(", ")
    )
}

fn parse_u64(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a number"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        first: 0,
        end: 1000,
        mutation: None,
        trace: false,
        trace_all: false,
        safety_ms: None,
        stop_on_failure: false,
        expect_failure: false,
        no_verify_scenario: false,
        no_batch_scenario: false,
        no_merge_scenario: false,
        no_window_scenario: false,
        no_lanes_scenario: false,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--seeds" => {
                let v = it.next().ok_or("--seeds needs A..B")?;
                let (x, y) = v.split_once("..").ok_or("--seeds needs A..B")?;
                a.first = x.parse().map_err(|_| format!("--seeds: bad start {x:?}"))?;
                a.end = y.parse().map_err(|_| format!("--seeds: bad end {y:?}"))?;
            }
            "--seed" => {
                a.first = parse_u64("--seed", it.next())?;
                a.end = a.first + 1;
            }
            "--mutation" => {
                let v = it.next().ok_or("--mutation needs a name")?;
                a.mutation =
                    Some(parse_mutation(&v).ok_or_else(|| format!("unknown mutation {v:?}"))?);
            }
            "--trace" => a.trace = true,
            "--trace-all" => {
                a.trace = true;
                a.trace_all = true;
            }
            "--safety-ms" => a.safety_ms = Some(parse_u64("--safety-ms", it.next())?),
            "--stop-on-failure" => a.stop_on_failure = true,
            "--jobs" => a.jobs = parse_u64("--jobs", it.next())?.max(1) as usize,
            "--expect-failure" => a.expect_failure = true,
            "--no-verify-scenario" => a.no_verify_scenario = true,
            "--no-batch-scenario" => a.no_batch_scenario = true,
            "--no-merge-scenario" => a.no_merge_scenario = true,
            "--no-window-scenario" => a.no_window_scenario = true,
            "--no-lanes-scenario" => a.no_lanes_scenario = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let make = |seed| {
        let mut opts = Options::new(seed);
        opts.mutation = args.mutation;
        opts.trace = args.trace;
        opts.trace_all = args.trace_all;
        opts.verify_scenario = !args.no_verify_scenario;
        opts.batch_scenario = !args.no_batch_scenario;
        opts.merge_scenario = !args.no_merge_scenario;
        opts.window_scenario = !args.no_window_scenario;
        opts.lanes_scenario = !args.no_lanes_scenario;
        if let Some(ms) = args.safety_ms {
            opts.safety_ms = ms;
        }
        opts
    };
    let jobs = if args.trace { 1 } else { args.jobs };
    let swarm = run_swarm(args.first..args.end, jobs, make, args.stop_on_failure);
    for outcome in &swarm.failures {
        eprint!("{}", outcome.report(args.mutation));
    }
    let total: Figures = swarm.figures;
    let failures: Vec<u64> = swarm.failures.iter().map(|o| o.seed).collect();
    println!(
        "pairbd-sim seeds {}..{}{}",
        args.first,
        args.end,
        args.mutation
            .map(|m| format!(" mutation {}", mutation_name(m)))
            .unwrap_or_default()
    );
    println!("{total}");
    if !failures.is_empty() {
        let shown: Vec<String> = failures.iter().take(20).map(|s| s.to_string()).collect();
        println!("failing seeds: {}", shown.join(" "));
    }
    match (failures.is_empty(), args.expect_failure) {
        (true, false) | (false, true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
