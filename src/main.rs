//! vhost-device-blk: parse the command line, set up logging, run the daemon, map errors to exit
//! codes. The only place that exits.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use log::error;

use vhost_device_blk::block::qcow2::check::Repair;
use vhost_device_blk::cli::{Args, Command, OutputArg, RepairArg, CAPABILITIES};
use vhost_device_blk::tools::{self, CreateOptions, Output};
use vhost_device_blk::{daemon, Config};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line, without its usage block.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vhost-device-blk: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    if let Some(cmd) = args.command {
        return run_tool(cmd);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-device-blk: {e}");
            return ExitCode::from(2);
        }
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run_tool(cmd: Command) -> ExitCode {
    let output = |o: OutputArg| match o {
        OutputArg::Human => Output::Human,
        OutputArg::Json => Output::Json,
    };
    let result = match cmd {
        Command::Info {
            image,
            output: o,
            force_share,
        } => tools::info(&image, output(o), force_share).map(|s| (s, 0)),
        Command::Check {
            image,
            repair,
            output: o,
            force_share,
        } => {
            let repair = match repair {
                None => Repair::None,
                Some(RepairArg::Leaks) => Repair::Leaks,
                Some(RepairArg::All) => Repair::All,
            };
            tools::check(&image, repair, output(o), force_share)
        }
        Command::Create {
            image,
            size,
            cluster_size,
            extended_l2,
            lazy_refcounts,
            backing,
            backing_format,
        } => tools::create(
            &image,
            &CreateOptions {
                size,
                cluster_size,
                extended_l2,
                lazy_refcounts,
                backing,
                backing_format,
            },
        )
        .map(|()| (String::new(), 0)),
    };
    match result {
        Ok((text, code)) => {
            print!("{text}");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("vhost-device-blk: {e}");
            ExitCode::from(1)
        }
    }
}
