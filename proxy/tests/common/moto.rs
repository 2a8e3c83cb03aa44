//! A real S3 server for the tests that need one, and an independent client to look at it.

use super::skip;

/// moto's S3 server (PyPI `moto[server]`, see docs/engine-proxy.md) on 127.0.0.1 at a port it
/// picks itself, with one empty bucket. `None` (after saying why) when moto is not installed.
pub struct Moto {
    child: std::process::Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MOTO: &str = r#"
import logging, sys, urllib.request
logging.getLogger("werkzeug").setLevel(logging.ERROR)
try:
    from moto.server import ThreadedMotoServer
except ImportError as e:
    print("missing", e, flush=True)
    sys.exit(3)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/{sys.argv[1]}", method="PUT"))
print(port, flush=True)
sys.stdin.read()
"#;

pub fn start_moto(bucket: &str) -> Option<Moto> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("python3")
        .args(["-c", MOTO, bucket])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return skip(&format!("cannot run python3 for moto's S3 server: {e}")),
    };
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    let mut moto = Moto {
        child,
        endpoint: String::new(),
    };
    match line.trim().parse::<u16>() {
        Ok(port) => {
            moto.endpoint = format!("http://127.0.0.1:{port}");
            Some(moto)
        }
        Err(_) => skip(&format!(
            "moto's S3 server is not available ({}); `pip install 'moto[server]'` (.ci/run does)",
            line.trim()
        )),
    }
}

/// `envs` exactly as longhorn-manager sends them for S3: every key, some empty.
pub fn s3_envs(endpoint: &str) -> Vec<String> {
    [
        ("AWS_ACCESS_KEY_ID", "test-access-key"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret-key"),
        ("AWS_ENDPOINTS", endpoint),
        ("AWS_CERT", ""),
        ("HTTPS_PROXY", ""),
        ("HTTP_PROXY", ""),
        ("NO_PROXY", ""),
        ("VIRTUAL_HOSTED_STYLE", ""),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

/// Keys under `prefix` and the bytes of `key`, read with AWS's own Python SDK (boto3, which
/// moto brings): the objects as stored, not as our S3 driver reads them.
pub fn boto3_look(endpoint: &str, bucket: &str, prefix: &str, key: &str) -> (Vec<String>, String) {
    const LOOK: &str = r#"
import sys, json, boto3
endpoint, bucket, prefix, key = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test-access-key", aws_secret_access_key="test-secret-key")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])]
body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode() if key in keys else ""
print(json.dumps({"keys": keys, "body": body}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", LOOK, endpoint, bucket, prefix, key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    (keys, v["body"].as_str().unwrap().to_string())
}
