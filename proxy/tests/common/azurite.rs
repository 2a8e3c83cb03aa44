//! A real Azure Blob server for the azblob tests: Azurite, Microsoft's emulator (npm
//! `azurite`, see docs/engine-proxy.md), on 127.0.0.1 at a port it picks itself, in memory,
//! telemetry off; and an independent client to look at it (Python's standard library signing
//! Azure's SharedKey requests itself, so the check does not go through object_store).

use std::io::BufRead;

use super::skip;
use std::process::{Child, Command, Stdio};

/// Azurite's well-known development account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    child: Child,
    dir: std::path::PathBuf,
    /// `http://127.0.0.1:PORT` (the account is the first path segment, as AZBLOB_ENDPOINT wants).
    pub endpoint: String,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts Azurite with one empty `container`; `None` (after saying why) when it is not
/// installed, except under CI, where that fails.
pub fn start_azurite(container: &str) -> Option<Azurite> {
    let dir =
        std::env::temp_dir().join(format!("lhnet-azurite-{}-{container}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut child = match Command::new("azurite-blob")
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "256",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ])
        // In memory (it refuses --location with that): the directory is only its cwd.
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return skip(&format!(
                "Azurite is not installed ({e}); `npm install -g azurite` (.ci/run does)"
            ))
        }
    };
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut endpoint = None;
    let mut line = String::new();
    for _ in 0..20 {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(at) = line
            .trim()
            .strip_prefix("Azurite Blob service successfully listens on ")
        {
            endpoint = Some(at.trim_end_matches('/').to_string());
            break;
        }
    }
    // Keep reading its output so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    let Some(endpoint) = endpoint else {
        let _ = child.kill();
        return skip("Azurite did not say where it listens");
    };
    let azurite = Azurite {
        child,
        dir,
        endpoint,
    };
    run_look(&azurite.endpoint, container, "create", "", "");
    Some(azurite)
}

/// `envs` exactly as longhorn-manager sends them for azblob: every key, some empty.
pub fn azblob_envs(endpoint: &str) -> Vec<String> {
    [
        ("AZBLOB_ACCOUNT_NAME", ACCOUNT),
        ("AZBLOB_ACCOUNT_KEY", KEY),
        ("AZBLOB_ENDPOINT", endpoint),
        ("AZBLOB_CERT", ""),
        ("HTTPS_PROXY", ""),
        ("HTTP_PROXY", ""),
        ("NO_PROXY", ""),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

const LOOK: &str = r#"
import sys, base64, hmac, hashlib, email.utils, json, re, urllib.parse, urllib.request
endpoint, container, op, prefix, key = sys.argv[1:6]
account = "devstoreaccount1"
secret = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
def call(method, path, query):
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    resource = f"/{account}{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    fields = [method, "", "", "", "", "", "", "", "", "", "", ""]
    to_sign = "\n".join(fields) + "\n" + canonical_headers + resource
    signature = base64.b64encode(hmac.new(secret, to_sign.encode(), hashlib.sha256).digest()).decode()
    headers["Authorization"] = f"SharedKey {account}:{signature}"
    url = endpoint + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(query) if query else "")
    return urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers)).read()
base = f"/{account}/{container}"
if op == "create":
    call("PUT", base, {"restype": "container"})
    print("{}")
    sys.exit(0)
names, marker = [], ""
while True:
    q = {"restype": "container", "comp": "list", "prefix": prefix}
    if marker:
        q["marker"] = marker
    text = call("GET", base, q).decode()
    names += re.findall(r"<Name>(.*?)</Name>", text)
    marker = (re.findall(r"<NextMarker>(.*?)</NextMarker>", text) or [""])[0]
    if not marker:
        break
body = call("GET", f"{base}/{key}", {}).decode() if key in names else ""
print(json.dumps({"keys": names, "body": body}))
"#;

fn run_look(endpoint: &str, container: &str, op: &str, prefix: &str, key: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", LOOK, endpoint, container, op, prefix, key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "looking at Azurite: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Blob names under `prefix` and the text of `key`, as Azurite stores them.
pub fn azure_look(
    endpoint: &str,
    container: &str,
    prefix: &str,
    key: &str,
) -> (Vec<String>, String) {
    let v: serde_json::Value =
        serde_json::from_str(&run_look(endpoint, container, "list", prefix, key)).unwrap();
    let keys = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    (keys, v["body"].as_str().unwrap().to_string())
}
