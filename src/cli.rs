//! Command-line definitions and mount-option parsing.

use crate::store::StoreOptions;
use crate::util::parse_size;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "objfs",
    version,
    about = "A POSIX filesystem kept in an object store",
    long_about = "objfs shows a normal folder tree whose data and metadata live in a flat object store \
                  (a local directory, a file:// URL, or s3://BUCKET[/PREFIX]). Set RUST_LOG=debug for more logging."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the store; S3 settings otherwise come from AWS_* variables and ~/.aws.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// S3 endpoint URL [default: AWS_ENDPOINT_URL, ~/.aws/config endpoint_url, else AWS].
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// S3 path-style addressing [default: on when an endpoint is given].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub path_style: Option<bool>,
    /// Seconds a failing store request is retried before the operation fails (EIO).
    #[arg(long, value_name = "SECS")]
    pub retry_budget: Option<u64>,
}

impl StoreArgs {
    pub fn options(&self) -> Result<StoreOptions, String> {
        if self.retry_budget == Some(0) || self.retry_budget.is_some_and(|s| s > 86_400) {
            return Err("--retry-budget must be between 1 and 86400 seconds".into());
        }
        Ok(StoreOptions {
            endpoint: self.endpoint.clone(),
            path_style: self.path_style,
            retry_budget: self.retry_budget.map(std::time::Duration::from_secs),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a filesystem in STORE (a missing local directory is created).
    Mkfs {
        /// Where the filesystem lives: a local directory, file:// URL or s3://BUCKET[/PREFIX].
        store: String,
        /// Block size (power of two, 4K..64M; K/M/G suffixes).
        #[arg(long, value_name = "SIZE", default_value = "1M")]
        block_size: String,
        /// Store blocks compressed: zstd (each block that shrinks by at least an
        /// eighth; the rest stay plain) or none.
        #[arg(long, value_name = "CODEC", default_value = "none")]
        compression: String,
        #[command(flatten)]
        store_args: StoreArgs,
    },
    /// Mount STORE at MOUNTPOINT. Returns once the mount is live; a daemon serves it.
    Mount(Box<MountArgs>),
    /// Flush everything to the store and unmount; returns after the daemon exited.
    Umount {
        mountpoint: PathBuf,
        /// Seconds to wait for the daemon to finish flushing.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Check the filesystem in STORE for consistency.
    Fsck {
        store: String,
        /// Also read every block and verify its hash.
        #[arg(long)]
        verify_data: bool,
        /// Fix what is safe: dangling entries, link counts, parent links; directories
        /// cut off from the root go to /lost+found. Takes the writer lease.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        store_args: StoreArgs,
    },
    /// Delete blocks in STORE that no file references (refuses beside a live writer).
    Gc {
        store: String,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        store_args: StoreArgs,
    },
    /// Show what STORE holds: files, bytes, blocks, dedup ratio, index size.
    Stat {
        store: String,
        #[command(flatten)]
        store_args: StoreArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where the filesystem lives: a local directory, file:// URL or s3://BUCKET[/PREFIX].
    pub store: String,
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub store_args: StoreArgs,
    /// Serve in this process instead of a background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Mount read-only (never creates or changes anything in STORE).
    #[arg(long)]
    pub read_only: bool,
    /// Memory block cache size.
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Directory of the disk cache tier [default: $XDG_CACHE_HOME/objfs or ~/.cache/objfs].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Disk cache size; 0 turns it off [default: 4G for S3 stores, 0 for local stores,
    /// whose blocks are on local disk already].
    #[arg(long, value_name = "SIZE")]
    pub disk_cache_size: Option<String>,
    /// Hard budget for the memory cache, dirty data and uploads together
    /// (--cache-size and --dirty-limit shrink to fit inside it).
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Dirty data held in memory before writers flush synchronously.
    #[arg(long, value_name = "SIZE")]
    pub dirty_limit: Option<String>,
    /// Seconds between background journal commits.
    #[arg(long, value_name = "SECS")]
    pub commit_interval: Option<String>,
    /// Journal segments after which a snapshot compacts the journal.
    #[arg(long, value_name = "N")]
    pub snapshot_every: Option<String>,
    /// Read-only mounts: seconds between checks for the writer's new commits.
    #[arg(long, value_name = "SECS")]
    pub refresh: Option<String>,
    /// Seconds a writer lease lasts unless renewed (renewed every third of it).
    #[arg(long, value_name = "SECS")]
    pub lease_ttl: Option<String>,
    /// FUSE worker threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<String>,
    /// Parallel block uploads per flush.
    #[arg(long, value_name = "N")]
    pub upload_threads: Option<String>,
    /// Daemon log file [default: $XDG_STATE_HOME/objfs/<name>-<hash>.log, i.e.
    /// ~/.local/state/objfs/<mountpoint's name>-<12 hex of its path>.log].
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Let other users access the mount (default when mounted by root).
    #[arg(long)]
    pub allow_other: bool,
    /// POSIX ACLs (setfacl, getfacl, cp -a), enforced by the kernel. Off by default:
    /// with them, `ls -l` and `cp -a` make one more round trip per file, since a file
    /// without an ACL answers "none" where otherwise the whole mount says "unsupported".
    #[arg(long)]
    pub acl: bool,
    /// The kernel gathers writes in its page cache and sends them in large requests:
    /// small writes (4 KiB) several times faster, large streams and creates ~15-20%
    /// slower. Data still reaches objfs by close and fsync.
    #[arg(long)]
    pub writeback_cache: bool,
    /// Take requests through io_uring queues where the kernel offers them (fuse
    /// module parameter enable_uring=Y) instead of /dev/fuse.
    #[arg(long)]
    pub io_uring: bool,
    /// The kernel asks objfs at every open and close, as without zero-message opens:
    /// close(2) then reports write-back errors per descriptor, at two round trips
    /// more per file opened.
    #[arg(long)]
    pub open_requests: bool,
    /// Comma-separated options: ro, rw, allow_other, acl, noacl, default_permissions, and any
    /// long option as key=value (cache_size=64M,commit_interval=2).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
}

/// Mount settings after flags and -o are merged and validated.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub read_only: bool,
    pub cache_size: u64,
    pub dirty_limit: u64,
    pub memory_limit: Option<u64>,
    pub cache_dir: Option<PathBuf>,
    pub disk_cache_size: Option<u64>,
    pub commit_interval_secs: u64,
    pub lease_ttl_secs: u64,
    pub refresh_secs: u64,
    pub snapshot_every: u64,
    pub threads: usize,
    pub upload_threads: usize,
    pub log_file: Option<PathBuf>,
    pub allow_other: bool,
    pub posix_acls: bool,
    pub writeback_cache: bool,
    pub io_uring: bool,
    pub open_requests: bool,
    pub store: StoreOptions,
}

fn parse_count(name: &str, text: &str, max: u64) -> Result<u64, String> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("--{name}: '{text}' is not a whole number"))?;
    if n == 0 || n > max {
        return Err(format!("--{name}: {n} is out of range (1..={max})"));
    }
    Ok(n)
}

fn parse_bounded_size(name: &str, text: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = parse_size(text).map_err(|e| format!("--{name}: {e}"))?;
    if n < min || n > max {
        return Err(format!(
            "--{name}: {text} is out of range ({} .. {})",
            crate::util::format_bytes(min),
            crate::util::format_bytes(max)
        ));
    }
    Ok(n)
}

impl MountArgs {
    pub fn settings(&self) -> Result<MountSettings, String> {
        let mut a = self.clone();
        for group in &self.options {
            for opt in group.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                a.apply_option(opt)?;
            }
        }
        let is_root = unsafe { libc::geteuid() } == 0;
        let cache_size = match &a.cache_size {
            Some(s) => parse_bounded_size("cache-size", s, 1 << 20, 1 << 40)?,
            None => 256 << 20,
        };
        let dirty_limit = match &a.dirty_limit {
            Some(s) => parse_bounded_size("dirty-limit", s, 4 << 20, 1 << 40)?,
            None => 128 << 20,
        };
        let memory_limit = match &a.memory_limit {
            Some(s) => Some(parse_bounded_size("memory-limit", s, 40 << 20, 1 << 42)?),
            None => None,
        };
        Ok(MountSettings {
            read_only: a.read_only,
            cache_size,
            dirty_limit,
            memory_limit,
            cache_dir: a.cache_dir.clone(),
            disk_cache_size: match &a.disk_cache_size {
                Some(s) if s.trim() == "0" => Some(0),
                Some(s) => Some(parse_bounded_size("disk-cache-size", s, 1 << 20, 1 << 50)?),
                None => None,
            },
            commit_interval_secs: match &a.commit_interval {
                Some(s) => parse_count("commit-interval", s, 3600)?,
                None => 5,
            },
            lease_ttl_secs: match &a.lease_ttl {
                Some(s) => parse_count("lease-ttl", s, 3600)?.max(3),
                None => 30,
            },
            refresh_secs: match &a.refresh {
                // Freed blocks stay 30 s: a replica must look more often than that.
                Some(s) => parse_count("refresh", s, 20)?,
                None => 1,
            },
            snapshot_every: match &a.snapshot_every {
                Some(s) => parse_count("snapshot-every", s, 1_000_000)?,
                None => 256,
            },
            threads: match &a.threads {
                Some(s) => parse_count("threads", s, 64)? as usize,
                None => 4,
            },
            upload_threads: match &a.upload_threads {
                Some(s) => parse_count("upload-threads", s, 256)? as usize,
                None => 8,
            },
            log_file: a.log_file.clone(),
            allow_other: a.allow_other || is_root,
            posix_acls: a.acl,
            writeback_cache: a.writeback_cache,
            io_uring: a.io_uring,
            open_requests: a.open_requests,
            store: a.store_args.options()?,
        })
    }

    fn apply_option(&mut self, opt: &str) -> Result<(), String> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
            None => (opt, None),
        };
        let key = key.replace('-', "_");
        let need =
            |v: Option<String>| v.ok_or_else(|| format!("-o {key} needs a value ({key}=...)"));
        match key.as_str() {
            "ro" | "read_only" => self.read_only = true,
            "rw" => self.read_only = false,
            "allow_other" => self.allow_other = true,
            "acl" => self.acl = true,
            "noacl" => self.acl = false,
            "writeback_cache" => self.writeback_cache = true,
            "no_writeback_cache" => self.writeback_cache = false,
            "io_uring" => self.io_uring = true,
            "no_io_uring" => self.io_uring = false,
            "open_requests" => self.open_requests = true,
            "no_open_requests" => self.open_requests = false,
            // Always on: the kernel checks permissions.
            "default_permissions" => {}
            // Words mount(8) and fstab pass along that mean nothing to objfs.
            "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser" | "dev"
            | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "relatime" | "atime" => {}
            "cache_size" => self.cache_size = Some(need(value)?),
            "dirty_limit" => self.dirty_limit = Some(need(value)?),
            "memory_limit" => self.memory_limit = Some(need(value)?),
            "cache_dir" => self.cache_dir = Some(need(value)?.into()),
            "disk_cache_size" => self.disk_cache_size = Some(need(value)?),
            "commit_interval" => self.commit_interval = Some(need(value)?),
            "threads" => self.threads = Some(need(value)?),
            "lease_ttl" => self.lease_ttl = Some(need(value)?),
            "refresh" => self.refresh = Some(need(value)?),
            "snapshot_every" => self.snapshot_every = Some(need(value)?),
            "upload_threads" => self.upload_threads = Some(need(value)?),
            "log_file" => self.log_file = Some(need(value)?.into()),
            "foreground" => self.foreground = true,
            "endpoint" => self.store_args.endpoint = Some(need(value)?),
            "path_style" => {
                let v = value.unwrap_or_else(|| "true".into());
                self.store_args.path_style = Some(
                    v.parse()
                        .map_err(|_| format!("-o path_style={v}: use true or false"))?,
                );
            }
            "retry_budget" => {
                let v = need(value)?;
                self.store_args.retry_budget = Some(
                    v.parse()
                        .map_err(|_| format!("-o retry_budget={v}: not a whole number"))?,
                );
            }
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<MountSettings, String> {
        let mut argv = vec!["objfs", "mount", "/s", "/m"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Mount(m) => m.settings(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn dash_o_sets_the_same_tunables_as_flags() {
        let s = parse(&["-o", "ro,cache_size=64M,commit_interval=2"]).unwrap();
        assert!(s.read_only);
        assert_eq!(s.cache_size, 64 << 20);
        assert_eq!(s.commit_interval_secs, 2);
        let s = parse(&["--cache-size", "2g"]).unwrap();
        assert_eq!(s.cache_size, 2 << 30);
        assert!(!s.posix_acls);
        assert!(parse(&["--acl"]).unwrap().posix_acls);
        assert!(parse(&["-o", "acl"]).unwrap().posix_acls);
        assert!(!parse(&["--acl", "-o", "noacl"]).unwrap().posix_acls);
        assert!(!s.writeback_cache);
        assert!(parse(&["-o", "writeback_cache"]).unwrap().writeback_cache);
        assert!(!s.open_requests);
        assert!(parse(&["-o", "open_requests"]).unwrap().open_requests);
    }

    #[test]
    fn bad_options_are_clear_errors() {
        for bad in [
            vec!["-o", "bogus"],
            vec!["-o", "cache_size"],
            vec!["--cache-size", "12Q"],
            vec!["--cache-size", "99999T"],
            vec!["--threads", "0"],
            vec!["--commit-interval", "-1"],
            vec!["--commit-interval=-1"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }
}
