//! Request `envs` (`KEY=VALUE`) of SnapshotBackup and BackupRestore, turned into the credential
//! map of that one call. Longhorn's proxy checks them against an allowlist (GHSA-wgh7-5vxp-4qr4),
//! `os.Setenv`s them into the instance-manager process and reads the target's credential back
//! from the environment; lhnet never touches its environment and builds the same map from the
//! call's own entries, with the keys the target's scheme reads (backupstore's
//! `GetBackupCredential`).

use std::collections::HashMap;

use tonic::Status;

/// The keys Longhorn v1.12.1's proxy accepts (`env_allowlist.go`).
pub const CREDENTIAL_KEYS: [&str; 14] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINTS",
    "AWS_CERT",
    "VIRTUAL_HOSTED_STYLE",
    "CIFS_USERNAME",
    "CIFS_PASSWORD",
    "AZBLOB_ACCOUNT_NAME",
    "AZBLOB_ACCOUNT_KEY",
    "AZBLOB_ENDPOINT",
    "AZBLOB_CERT",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
];

/// Known to longhorn-manager (an IAM role through the pod's annotation); accepted from older
/// managers, never passed on.
const MANAGER_ONLY_KEYS: [&str; 1] = ["AWS_IAM_ROLE_ARN"];

/// Read by the AWS SDK itself (spec §2.5); the backup-target RPCs, which talk to S3 from lhnet,
/// take them from `envs` too. Not passed on to engines, whose credential map has no place
/// for them.
pub const TARGET_ONLY_KEYS: [&str; 2] = ["AWS_SESSION_TOKEN", "AWS_REGION"];

/// The credential map of a SnapshotBackup / BackupRestore for `target`: refused with
/// INTERNAL "failed to set envs: …" for an entry the allowlist refuses, and INVALID_ARGUMENT
/// "failed to get backup credential: …" for an unusable pair of keys, as Longhorn's proxy
/// answers. The map has the keys of the target's scheme (all present, some empty) and none for
/// nfs:// or vfs://.
pub fn credential_map(envs: &[String], target: &str) -> Result<HashMap<String, String>, Status> {
    let given =
        parse(envs, &[]).map_err(|e| Status::internal(format!("failed to set envs: {e}")))?;
    credential_for(&given, target)
        .map_err(|e| Status::invalid_argument(format!("failed to get backup credential: {e}")))
}

/// As [`credential_map`], for the backup-target RPCs: every key given (and
/// [`TARGET_ONLY_KEYS`]), INVALID_ARGUMENT for anything refused.
pub fn target_credentials(envs: &[String]) -> Result<HashMap<String, String>, Status> {
    let map = parse(envs, &TARGET_ONLY_KEYS)
        .map_err(|e| Status::invalid_argument(format!("envs: {e}")))?;
    let access = map.get("AWS_ACCESS_KEY_ID").is_some_and(|v| !v.is_empty());
    let secret = map
        .get("AWS_SECRET_ACCESS_KEY")
        .is_some_and(|v| !v.is_empty());
    if access != secret {
        return Err(Status::invalid_argument(
            "envs: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be given together",
        ));
    }
    Ok(map)
}

fn parse(envs: &[String], extra: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for entry in envs {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("malformed env entry {entry:?}: expected KEY=VALUE"));
        };
        if key.is_empty() {
            return Err(format!("malformed env entry {entry:?}: empty key"));
        }
        if MANAGER_ONLY_KEYS.contains(&key) {
            continue;
        }
        if !CREDENTIAL_KEYS.contains(&key) && !extra.contains(&key) {
            return Err(format!(
                "env key {key:?} is not permitted by the backup env allowlist (allowed: {})",
                CREDENTIAL_KEYS
                    .iter()
                    .chain(extra)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        map.insert(key.to_string(), value.to_string());
    }
    Ok(map)
}

/// backupstore's `getCredentialFromEnvVars`, over the call's entries instead of the process
/// environment.
fn credential_for(
    given: &HashMap<String, String>,
    target: &str,
) -> Result<HashMap<String, String>, String> {
    let get = |k: &str| given.get(k).cloned().unwrap_or_default();
    let scheme = target.split_once("://").map(|(s, _)| s).unwrap_or("");
    let keys: &[&str] = match scheme {
        "s3" => {
            let (access, secret) = (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"));
            if access.is_empty() && !secret.is_empty() {
                return Err("s3 credential access key not found".into());
            }
            if !access.is_empty() && secret.is_empty() {
                return Err("s3 credential secret access key not found".into());
            }
            if access.is_empty() {
                &[
                    "AWS_ENDPOINTS",
                    "AWS_CERT",
                    "HTTPS_PROXY",
                    "HTTP_PROXY",
                    "NO_PROXY",
                    "VIRTUAL_HOSTED_STYLE",
                ]
            } else {
                &[
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_ENDPOINTS",
                    "AWS_CERT",
                    "HTTPS_PROXY",
                    "HTTP_PROXY",
                    "NO_PROXY",
                    "VIRTUAL_HOSTED_STYLE",
                ]
            }
        }
        "cifs" => &["CIFS_USERNAME", "CIFS_PASSWORD"],
        "azblob" => &[
            "AZBLOB_ACCOUNT_NAME",
            "AZBLOB_ACCOUNT_KEY",
            "AZBLOB_ENDPOINT",
            "AZBLOB_CERT",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "NO_PROXY",
        ],
        _ => &[],
    };
    Ok(keys.iter().map(|k| (k.to_string(), get(k))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn envs(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn the_target_scheme_picks_the_keys() {
        let s3 = credential_map(
            &envs(&[
                "AWS_ACCESS_KEY_ID=a",
                "AWS_SECRET_ACCESS_KEY=b=c",
                "AWS_IAM_ROLE_ARN=r",
                "CIFS_USERNAME=u",
            ]),
            "s3://bucket@us-east-1/",
        )
        .unwrap();
        assert_eq!(s3.len(), 8);
        assert_eq!(s3["AWS_SECRET_ACCESS_KEY"], "b=c");
        assert_eq!(s3["AWS_ENDPOINTS"], "");
        assert!(!s3.contains_key("CIFS_USERNAME"));
        let cifs = credential_map(&envs(&["CIFS_USERNAME=u"]), "cifs://host/share").unwrap();
        assert_eq!(cifs.len(), 2);
        assert!(
            credential_map(&envs(&["AWS_ACCESS_KEY_ID=a"]), "nfs://h:/x")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn refusals_read_as_longhorn_s() {
        let e = credential_map(&envs(&["LD_PRELOAD=/tmp/x.so"]), "s3://b@r/").unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(
            e.message()
                .starts_with("failed to set envs: env key \"LD_PRELOAD\" is not permitted by the backup env allowlist"),
            "{e:?}"
        );
        assert!(std::env::var_os("LD_PRELOAD").is_none());
        let e = credential_map(&envs(&["NOEQUALS"]), "s3://b@r/").unwrap_err();
        assert!(
            e.message().contains("malformed env entry \"NOEQUALS\""),
            "{e:?}"
        );
        let e = credential_map(&envs(&["AWS_ACCESS_KEY_ID=a"]), "s3://b@r/").unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::InvalidArgument,
                "failed to get backup credential: s3 credential secret access key not found"
            )
        );
        let region = envs(&["AWS_REGION=eu-west-1"]);
        assert!(
            credential_map(&region, "s3://b@r/").is_err(),
            "engines get no AWS_REGION"
        );
        assert_eq!(
            target_credentials(&region).unwrap()["AWS_REGION"],
            "eu-west-1"
        );
    }
}
