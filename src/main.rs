use clap::Parser;
use objfs::cli::{Cli, Command};
use objfs::index::{journal, superblock};
use objfs::store::StoreLocation;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static ALLOC: objfs::alloc::PageAlignedLarge = objfs::alloc::PageAlignedLarge;

fn mkfs(
    spec: &str,
    block_size: &str,
    compression: &str,
    opts: &objfs::store::StoreOptions,
) -> Result<(), String> {
    let size = objfs::util::parse_size(block_size).map_err(|e| format!("--block-size: {e}"))?;
    let size = superblock::validate_block_size(size).map_err(|e| format!("--block-size: {e}"))?;
    let compression = objfs::block::Compression::parse(compression)
        .ok_or_else(|| format!("--compression: unknown codec '{compression}' (zstd or none)"))?;
    let location = StoreLocation::parse_with(spec, opts)?;
    let store = location.open(true).map_err(|e| format!("{spec}: {e}"))?;
    let sb = journal::mkfs_with(&*store, size, compression).map_err(|e| format!("{spec}: {e}"))?;
    println!(
        "created objfs filesystem in {spec} (uuid {}, block size {}, compression {})",
        sb.uuid,
        objfs::util::format_bytes(u64::from(sb.block_size)),
        sb.codec
    );
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Mkfs {
            store,
            block_size,
            compression,
            store_args,
        } => mkfs(&store, &block_size, &compression, &store_args.options()?)?,
        Command::Mount(args) => objfs::daemon::mount(&args)?,
        Command::Umount {
            mountpoint,
            timeout,
        } => objfs::daemon::umount(&mountpoint, Duration::from_secs(timeout))?,
        Command::Stat { store, store_args } => objfs::tools::stat(&store, &store_args.options()?)?,
        Command::Gc {
            store,
            dry_run,
            store_args,
        } => objfs::tools::gc(&store, dry_run, &store_args.options()?)?,
        Command::Fsck {
            store,
            verify_data,
            repair,
            store_args,
        } => {
            if !objfs::tools::fsck(&store, verify_data, repair, &store_args.options()?)? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Users see one line, never a Rust panic message or backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("objfs: internal error: {info}");
    }));
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = env_logger::try_init();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("objfs: {msg}");
            ExitCode::from(1)
        }
    }
}
