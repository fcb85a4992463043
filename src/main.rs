use std::io::Write;

use clap::Parser;
use ringfence::cli::Options;

fn main() {
    let opts = Options::parse();
    if opts.print_capabilities {
        println!("{}", ringfence::cli::capabilities_json());
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
