use std::io::Write;

use clap::Parser;
use ringfence::cli::{Command, Options};

fn main() {
    let opts = match Options::try_parse() {
        Ok(o) => o,
        Err(e) if !e.use_stderr() => {
            // --help, --version: print as clap formats them.
            let _ = e.print();
            return;
        }
        Err(e) => {
            // One line: clap's first line, without its usage and help hints (a list clap
            // puts under it, e.g. the options a flag conflicts with, joined onto it).
            let text = e.to_string();
            let mut lines = text.lines();
            let mut first = lines.next().unwrap_or("invalid arguments").to_string();
            if first.ends_with(':') {
                let list: Vec<&str> = lines
                    .take_while(|l| l.starts_with("  "))
                    .map(str::trim)
                    .collect();
                first = format!("{} {}", first, list.join(", "));
            }
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("ringfence: error: {first} (see --help)");
            std::process::exit(1);
        }
    };
    if opts.print_capabilities {
        println!("{}", ringfence::cli::capabilities_json());
        return;
    }
    // Commands for a running daemon (through its stats socket).
    let done = match &opts.command {
        Some(Command::Stat(o)) => Some(ringfence::opsctl::stat(o)),
        Some(Command::Resize(o)) => Some(ringfence::opsctl::resize(o)),
        Some(Command::Limits(o)) => Some(ringfence::opsctl::limits(o)),
        None => None,
    };
    if let Some(r) = done {
        if let Err(e) = r {
            eprintln!("ringfence: error: {e}");
            std::process::exit(1);
        }
        return;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            writeln!(
                buf,
                "[ringfence {}] {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
    if let Err(e) = ringfence::daemon::run(&opts) {
        eprintln!("ringfence: error: {e}");
        std::process::exit(1);
    }
}
