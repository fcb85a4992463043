use clap::Parser;
use ringfence::cli::Options;

fn main() {
    let opts = Options::parse();
    if opts.print_capabilities {
        println!("{}", ringfence::cli::capabilities_json());
        return;
    }
    eprintln!("ringfence: not implemented yet");
    std::process::exit(1);
}
