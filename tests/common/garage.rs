//! A single-node Garage server on 127.0.0.1 with its own temp dirs, a key and a
//! bucket, for tests of the S3 backend. Stopped on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BUCKET: &str = "objfs-test";
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub fn garage_bin() -> String {
    if let Ok(b) = std::env::var("GARAGE_BIN") {
        return b;
    }
    for cand in ["/opt/garage/bin/garage", "/usr/local/bin/garage"] {
        if std::path::Path::new(cand).exists() {
            return cand.into();
        }
    }
    "garage".into()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Garage {
    pub dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    pub endpoint: String,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{0}/meta"
data_dir = "{0}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{secret}"
"#,
                dir.path().display(),
                secret = SECRET,
            ),
        )
        .unwrap();
        let mut g = Garage {
            dir,
            config,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        g.run_server();
        let node = g.cli(&["node", "id", "-q"]);
        let id = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["key", "import", "--yes", "-n", "objfs", KEY_ID, SECRET]);
        g.cli(&["bucket", "create", BUCKET]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "objfs",
        ]);
        g
    }

    fn run_server(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting garage ({}): {e}; scripts/test.sh installs it",
                    garage_bin()
                )
            });
        self.child = Some(child);
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        assert!(
            crate::common::wait_until(Duration::from_secs(30), || std::net::TcpStream::connect(
                &addr
            )
            .is_ok()),
            "garage did not start"
        );
    }

    /// Runs a garage CLI command against this node (retrying while it settles).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut last = String::new();
        for _ in 0..50 {
            let out = Command::new("timeout")
                .arg("30")
                .arg(garage_bin())
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("garage {args:?} failed: {last}");
    }

    /// Stops the server (as a crash would); `restart` brings it back on the same data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run_server();
    }

    /// Environment for objfs commands talking to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
            ("AWS_REGION", "garage".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}
